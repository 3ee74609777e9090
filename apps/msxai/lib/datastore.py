"""The studies folder as MONAI Label sees it, with validated, crash-safe writes.

* Listing: only study images (the FLAIRs) are listed, never their T1/MPRAGE or the derived files beside them
  (lesion masks, brain masks); the naming rule is :mod:`msxai.studies`.
* Writes (:class:`SafeWritesMixin`, shared by the local and the DICOMweb datastore): a label must read as an image
  on the study image's grid with integer values, its tag must match a strict pattern and its image must exist
  (:mod:`lib.validation`); it is written to a temp file, fsynced and renamed over the previous one, so a refused or
  interrupted save leaves the previous label byte for byte; ``datastore_v2.json`` is replaced the same way. The
  label a save or delete replaces is kept (hard link) in ``<studies>/msxai/<image>/label_history/<tag>/`` (the
  last :attr:`SafeWritesMixin.history_keep`), outside ``labels/`` so it is never listed as a tag. Every save and
  delete is logged with its user.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore

from msxai.studies import ARTIFACTS_DIRNAME, UnknownImageError, find_t1, is_study_image, validate_image_id

from lib.validation import (
    IMAGE_EXTENSIONS,
    ConflictError,
    InvalidTagError,
    LabelNotFoundError,
    atomic_write_bytes,
    check_image_file,
    check_label_file,
    copy_file_durably,
    extension_of,
    fsync_dir,
    image_grid,
    image_id_from_upload,
    label_bytes,
    validate_tag,
)

logger = logging.getLogger(__name__)
audit = logging.getLogger("msxai.audit")

HISTORY_DIRNAME = "label_history"
HISTORY_KEEP = 10
LABEL_EXT = ".nii.gz"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SafeWritesMixin:
    """Validated, atomic label/image writes for a :class:`LocalDatastore` (put it first in the bases)."""

    history_keep = HISTORY_KEEP

    def __init__(self, *args, **kwargs):
        self._write_lock = threading.RLock()
        super().__init__(*args, **kwargs)
        self._remove_stale_temp_files()

    # ---------------------------------------------------------------------------------------------- paths
    def _labels_root(self) -> Path:
        return Path(os.path.realpath(self._datastore.label_path(None)))

    def _label_files(self, image_id: str, tag: str) -> list[Path]:
        """The files on disk that are the label ``(image_id, tag)`` (normally one ``.nii.gz``; a ``.nii`` written by an
        earlier version of the app counts too)."""
        d = self._labels_root() / tag
        out = []
        for ext in (".nii.gz", ".nii"):
            p = d / f"{image_id}{ext}"
            if p.is_file():
                out.append(p)
        return out

    def history_dir(self, image_id: str, tag: str) -> Path:
        return Path(self._datastore_path) / ARTIFACTS_DIRNAME / image_id / HISTORY_DIRNAME / tag

    def label_history(self, image_id: str, tag: str) -> list[dict]:
        """Kept versions of a label, newest first: ``{"version", "file", "reason", "by", "kept_ts", "info"}``."""
        validate_image_id(image_id)
        validate_tag(tag)
        d = self.history_dir(image_id, tag)
        out = []
        if d.is_dir():
            for f in sorted(d.glob("*.nii.gz"), reverse=True):
                meta = {}
                side = f.with_name(f.name[: -len(".nii.gz")] + ".json")
                if side.is_file():
                    try:
                        meta = json.loads(side.read_text())
                    except ValueError:
                        meta = {}
                out.append({"version": f.name[: -len(".nii.gz")], "file": f"{HISTORY_DIRNAME}/{tag}/{f.name}", **meta})
        return out

    def _remove_stale_temp_files(self) -> None:
        """Temp files of writes a killed process did not finish (``.<name>.tmp-<pid>-<thread>``)."""
        dirs = [Path(self._datastore_path), Path(self._datastore.image_path()), self._labels_root()]
        root = self._labels_root()
        if root.is_dir():
            dirs += [p for p in root.iterdir() if p.is_dir()]
        for d in dirs:
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for n in names:
                if not n.startswith(".") or ".tmp-" not in n:
                    continue
                try:
                    pid = int(n.rsplit(".tmp-", 1)[1].split("-")[0])
                except ValueError:
                    continue
                if pid != os.getpid() and _pid_alive(pid):
                    continue
                try:
                    os.unlink(d / n)
                    logger.info(f"msxai: removed the temp file of an interrupted write: {d / n}")
                except OSError:
                    pass

    # ---------------------------------------------------------------------------------------------- index
    def _update_datastore_file(self, lock=True):
        """``datastore_v2.json`` replaced atomically (temp file, fsync, rename): a crash leaves the old or the new."""
        data = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str).encode()

        def write():
            self._ignore_event_config = True
            atomic_write_bytes(self._datastore_config_path, data)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with self._write_lock, FileLock(self._lock_file):
                write()
        else:  # the caller holds the file lock (MONAI Label's add_image, save_label), which every other index write
            # takes too; waiting here for _write_lock, held by a watcher's refresh waiting for that file lock, deadlocked
            write()

    def _reconcile_datastore(self):
        with self._write_lock:  # a watcher's refresh never interleaves with a write
            return super()._reconcile_datastore()

    # --------------------------------------------------------------------------------------------- images
    def _existing_image(self, image_id) -> str:
        """The image file of ``image_id``; refuses malformed ids (400) and ids the datastore does not hold (404)."""
        validate_image_id(image_id)
        obj = self._datastore.objects.get(image_id)
        uri = self.get_image_uri(image_id) if obj else ""
        if not uri or not os.path.isfile(uri):
            known = sorted(self.list_images())
            raise UnknownImageError(f"image {image_id!r} is not in the datastore ({len(known)} image(s), "
                                    f"e.g. {known[:3]})")
        return uri

    # --------------------------------------------------------------------------------------------- labels
    def _label_input(self, image_uri: str, label_filename: str):
        """``(path, extension, cleanup)`` of the uploaded label to check (DICOMweb converts OHIF's ``.bin``)."""
        return label_filename, extension_of(label_filename), None

    def _before_label_commit(self, image_id: str, tag: str, arr, affine, info: dict) -> dict:
        return info

    def save_label(self, image_id, label_filename, label_tag, label_info, label_id="", user=None):
        """Check the label (tag, image, readable, on the image's grid, integer values), then replace the stored one
        atomically, keeping the previous version in the label history. Returns the label id (= image id)."""
        tag = validate_tag(label_tag)
        image_uri = self._existing_image(image_id)
        path, ext, cleanup = self._label_input(image_uri, label_filename)
        try:
            arr, _ = check_label_file(path, ext, image_uri)
            _, image_affine = image_grid(image_uri)
            data = label_bytes(path, ext, arr, image_affine)
            info = dict(label_info or {})
            user = user or info.get("user")
            info = self._before_label_commit(image_id, tag, arr, image_affine, info)
        finally:
            if cleanup:
                cleanup()
        return self._commit_label(image_id, tag, data, info, user, int((arr > 0).sum()))

    def _commit_label(self, image_id: str, tag: str, data: bytes, info: dict, user, foreground: int) -> str:
        label_dir = self._labels_root() / tag
        name = image_id + LABEL_EXT
        dest = label_dir / name
        if os.path.realpath(dest.parent) != os.path.realpath(self._labels_root() / tag):
            raise InvalidTagError(f"label tag {tag!r} is not allowed")
        info = dict(info)
        info.update(ts=int(time.time()), name=name, sha256=hashlib.sha256(data).hexdigest())
        if user:
            info["user"] = user
        with self._write_lock, FileLock(self._lock_file):
            label_dir.mkdir(parents=True, exist_ok=True)
            kept = self._keep_history(image_id, tag, "replaced", user)
            atomic_write_bytes(dest, data)
            for other in self._label_files(image_id, tag):
                if other != dest:  # a .nii twin of an older version: kept in the history above
                    other.unlink()
            obj = self._datastore.objects.get(image_id)
            if obj is None:
                raise UnknownImageError(f"image {image_id!r} was removed while its label was being saved")
            obj.labels[tag] = DataModel(info=info, ext=LABEL_EXT)
            self._update_datastore_file(lock=False)
        audit.info(f"label saved: image={image_id} tag={tag} user={user or '-'} bytes={len(data)} "
                   f"foreground_voxels={foreground} sha256={info['sha256'][:16]}"
                   + (f" previous kept as {kept}" if kept else ""))
        return image_id

    def _keep_history(self, image_id: str, tag: str, reason: str, user) -> str | None:
        """Hard-link (or copy) the current label files into the history folder with a JSON sidecar; prune to
        :attr:`history_keep`. Returns the kept version name (None when there was no label)."""
        files = self._label_files(image_id, tag)
        if not files:
            return None
        d = self.history_dir(image_id, tag)
        d.mkdir(parents=True, exist_ok=True)
        obj = self._datastore.objects.get(image_id)
        lab = obj.labels.get(tag) if obj else None
        t = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f".{int(t * 1e6) % 1000000:06d}Z"
        while (d / f"{stamp}.nii.gz").exists():
            stamp += "_"
        src = next((f for f in files if f.name.endswith(".nii.gz")), files[0])
        target = d / f"{stamp}.nii.gz"
        if src.name.endswith(".nii.gz"):
            try:
                os.link(src, target)
            except OSError:
                copy_file_durably(src, target)
        else:  # a .nii of an older version: kept compressed
            import gzip

            atomic_write_bytes(target, gzip.compress(src.read_bytes(), compresslevel=6))
        meta = {"reason": reason, "by": user or None, "kept_ts": int(t), "info": lab.info if lab else {}}
        atomic_write_bytes(d / f"{stamp}.json", json.dumps(meta, default=str, indent=1).encode())
        fsync_dir(d)
        versions = sorted(d.glob("*.nii.gz"))
        for old in versions[: max(0, len(versions) - int(self.history_keep))]:
            old.unlink()
            side = old.with_name(old.name[: -len(".nii.gz")] + ".json")
            if side.exists():
                side.unlink()
        return f"{HISTORY_DIRNAME}/{tag}/{target.name}"

    def remove_label(self, label_id, label_tag, user=None):
        """Delete a label (its last version stays in the label history)."""
        tag = validate_tag(label_tag)
        validate_image_id(label_id)
        with self._write_lock, FileLock(self._lock_file):
            obj = self._datastore.objects.get(label_id)
            files = self._label_files(label_id, tag)
            if not files and not (obj and obj.labels.get(tag)):
                raise LabelNotFoundError(f"image {label_id!r} has no label with tag {tag!r}")
            kept = self._keep_history(label_id, tag, "deleted", user)
            for f in files:
                f.unlink()
            fsync_dir(self._labels_root() / tag)
            if obj is not None:
                obj.labels.pop(tag, None)
            self._update_datastore_file(lock=False)
        audit.info(f"label deleted: image={label_id} tag={tag} user={user or '-'}"
                   + (f" kept as {kept}" if kept else ""))

    def restore_label(self, image_id: str, tag: str, version: str, user=None) -> str:
        """Save a kept version of a label as the current one (the current one is kept in turn)."""
        validate_tag(tag)
        validate_image_id(image_id)
        if not isinstance(version, str) or "/" in version or "\\" in version or version.startswith("."):
            raise LabelNotFoundError(f"no kept version {version!r}")
        f = self.history_dir(image_id, tag) / f"{version}.nii.gz"
        if not f.is_file():
            have = [h["version"] for h in self.label_history(image_id, tag)]
            raise LabelNotFoundError(f"image {image_id!r} tag {tag!r} has no kept version {version!r} (kept: {have})")
        import tempfile

        with tempfile.TemporaryDirectory(prefix="msxai_restore_") as tmp:
            copy = Path(tmp) / "label.nii.gz"
            copy.write_bytes(f.read_bytes())
            return self.save_label(image_id, str(copy), tag, {"restored_from": version}, user=user)

    def update_label_info(self, label_id, label_tag, info):
        validate_tag(label_tag)
        validate_image_id(label_id)
        if not self._datastore.label(label_id, label_tag):
            raise LabelNotFoundError(f"image {label_id!r} has no label with tag {label_tag!r}")
        with self._write_lock:
            return super().update_label_info(label_id, label_tag, info)

    def update_image_info(self, image_id, info):
        self._existing_image(image_id)
        with self._write_lock:
            return super().update_image_info(image_id, info)


class MsxaiDatastore(SafeWritesMixin, LocalDatastore):
    """A :class:`LocalDatastore` whose image listing follows :func:`msxai.studies.is_study_image`, with the checked,
    atomic writes of :class:`SafeWritesMixin`."""

    def _is_images_dir(self, path) -> bool:
        return os.path.realpath(path) == os.path.realpath(self._datastore.image_path())

    def _list_files(self, path, patterns):
        files = super()._list_files(path, patterns)
        if self._is_images_dir(path):
            files = {k: v for k, v in files.items() if is_study_image(k)}
        return files

    def _remove_non_existing(self) -> int:
        # also forget companions that an earlier, unfiltered datastore_v2.json registered as images
        invalidate = super()._remove_non_existing()
        drop = [
            k
            for k, v in self._datastore.objects.items()
            if not is_study_image(self._filename(k, v.image.ext)) and not v.labels
        ]
        for k in drop:
            logger.info(f"msxai: not a study image (T1/derived file), unlisted: {k}")
            self._datastore.objects.pop(k, None)
        return invalidate + len(drop)

    # ------------------------------------------------------------------------------------------- uploads
    def add_image(self, image_id, image_filename, image_info, user=None, filename=None):
        """An uploaded image, checked like a study (3-D NIfTI, finite, not constant; a FLAIR on its T1's grid when
        the T1 is already there); never replaces an existing image. A T1/MPRAGE is stored beside its FLAIR and
        not listed (the naming rule of :mod:`msxai.studies`)."""
        from msxai.io import Volume, check_same_grid, load_volume

        image_id, ext = image_id_from_upload(image_id, filename or image_filename)
        validate_image_id(image_id)
        name = image_id + ext
        images = Path(self._datastore.image_path())
        clash = [images / f"{image_id}{e}" for e in IMAGE_EXTENSIONS if (images / f"{image_id}{e}").exists()]
        if image_id in self._datastore.objects or clash:
            raise ConflictError(f"image {image_id!r} already exists; remove it first (DELETE /datastore/image, "
                                "admin) or upload under another id")
        shape, affine = check_image_file(image_filename, name)
        note = ""
        if is_study_image(name):
            try:
                t1 = find_t1(images / name)
            except Exception as exc:  # no T1 yet (or ambiguous): the study answers with this message when used
                note = str(exc)
            else:
                check_same_grid(Volume(load_volume(image_filename, name).array, affine), load_volume(t1, t1.name),
                                name, t1.name)
        dest = images / name
        tmp = images / f".{name}.tmp-{os.getpid()}-{threading.get_ident()}"
        with self._write_lock, FileLock(self._lock_file):
            try:
                copy_file_durably(image_filename, tmp)
                try:
                    os.link(tmp, dest)  # never replaces: fails if the name appeared meanwhile
                except FileExistsError:
                    raise ConflictError(f"image {image_id!r} already exists") from None
                except OSError:
                    if dest.exists():
                        raise ConflictError(f"image {image_id!r} already exists") from None
                    os.replace(tmp, dest)
            finally:
                if tmp.exists():
                    tmp.unlink()
            fsync_dir(images)
            if is_study_image(name):
                info = dict(image_info or {})
                info.update(ts=int(time.time()), name=name)
                if user:
                    info["user"] = user
                self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
                self._update_datastore_file(lock=False)
        audit.info(f"image added: image={image_id} file={name} user={user or '-'} shape={tuple(shape)}"
                   + ("" if is_study_image(name) else " (companion/derived file: not listed)"))
        if note:
            logger.info(f"msxai: {note}")
        return image_id

    def remove_image(self, image_id, user=None):
        """Delete an image and its labels (the labels' last versions stay in the label history)."""
        self._existing_image(image_id)
        obj = self._datastore.objects.get(image_id)
        for tag in list(obj.labels.keys()):
            self.remove_label(image_id, tag, user=user)
        with self._write_lock, FileLock(self._lock_file):
            path = Path(self._datastore.image_path()) / self._filename(image_id, obj.image.ext)
            if path.exists():
                path.unlink()
            fsync_dir(path.parent)
            self._datastore.objects.pop(image_id, None)
            self._update_datastore_file(lock=False)
        audit.info(f"image removed: image={image_id} user={user or '-'}")


# --------------------------------------------------------------------------------------------------- DICOMweb (PACS)
from monailabel.datastore.dicom import DICOMWebDatastore  # noqa: E402
from monailabel.interfaces.datastore import DefaultLabelTag  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402

from msxai.studies import dicom_sequence_of, find_t1_series  # noqa: E402


class DicomWebAccessError(RuntimeError):
    """The DICOMweb server cannot be used (unreachable, credentials refused): stops the start-up."""


class MsxaiDICOMwebDatastore(SafeWritesMixin, DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore (series are downloaded and converted to NIfTI in its cache) with the msxai
    study rule: an image is a series of the search filter (MR) that is not itself a T1; its T1 is the series of the
    same study found by :func:`msxai.studies.find_t1_series`. Results are written back as DICOM SEG by
    :mod:`msxai.dicom` (no dcmqi), also the ``final`` labels MONAI Label saves."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fetch_lock = threading.Lock()

    # ---------------------------------------------------------------------------------------------- queries
    def check_access(self) -> None:
        from requests import HTTPError

        try:
            self._client.search_for_studies(limit=1)
        except HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            hint = (" (credentials refused: set MONAI_LABEL_DICOMWEB_USERNAME / MONAI_LABEL_DICOMWEB_PASSWORD)"
                    if code in (401, 403) else "")
            raise DicomWebAccessError(f"DICOMweb server {self._client.base_url} answered HTTP {code}{hint}") from None
        except Exception as exc:
            raise DicomWebAccessError(f"DICOMweb server {self._client.base_url} is not reachable: {exc}") from None

    def _series(self, **filters):
        return self._client.search_for_series(search_filters=filters or None,
                                              fields=["SeriesDescription", "StudyInstanceUID", "Modality"])

    @staticmethod
    def _value(row, tag):
        v = row.get(tag, {}).get("Value") or [""]
        return str(v[0])

    def list_images(self):
        """Image series of the search filter, T1s left out (they are the companions of the FLAIRs); not cached,
        so a study stored a second ago is listed."""
        rows = self._series(**self._search_filter)
        return [self._value(r, "0020000E") for r in rows if dicom_sequence_of(self._value(r, "0008103E")) != "T1"]

    def study_of(self, series_uid: str) -> str:
        rows = [r for r in self._series(SeriesInstanceUID=series_uid) if self._value(r, "0020000E") == series_uid]
        if not rows:
            raise UnknownImageError(f"series {series_uid!r} is not on the DICOMweb server {self._client.base_url}")
        return self._value(rows[0], "0020000D")

    def study_rows(self):
        """Every listed image with its T1 series (or the rule's error), from QIDO only (nothing downloaded)."""
        from msxai.errors import InputError

        out = []
        rows = self._series(**self._search_filter)
        for r in rows:
            uid, desc = self._value(r, "0020000E"), self._value(r, "0008103E")
            if dicom_sequence_of(desc) == "T1":
                continue
            row = {"image": uid, "description": desc, "study": self._value(r, "0020000D")}
            try:
                row["t1"] = find_t1_series([x for x in rows if self._value(x, "0020000D") == row["study"]], uid)
            except InputError as exc:
                row["error"] = str(exc)
            out.append(row)
        return out

    # ----------------------------------------------------------------------------------------------- images
    def get_image_uri(self, image_id: str) -> str:
        validate_image_id(image_id)
        with self._fetch_lock:
            image_dir = os.path.join(self._datastore.image_path(), image_id)
            if not os.path.isdir(image_dir) or not os.listdir(image_dir):
                self.study_of(image_id)  # a clear 404 instead of an IndexError deep in monailabel
            return super().get_image_uri(image_id)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """With ``image_id`` (MONAI Label's own use: ``label_id`` is a SEG series) as MONAI Label does; without it
        ``label_id`` is an image and its label is the one kept in the local cache (``""`` when there is none), never a
        download of the image series as if it were a SEG."""
        if label_tag == DefaultLabelTag.FINAL and not image_id:
            from monailabel.datastore.local import LocalDatastore

            return LocalDatastore.get_label_uri(self, label_id, label_tag) or ""
        return super().get_label_uri(label_id, label_tag, image_id)

    def image_series_dir(self, image_id: str) -> str:
        self.get_image_uri(image_id)
        return os.path.join(self._datastore.image_path(), image_id)

    def get_t1_uri(self, image_id: str) -> str:
        """The NIfTI of the T1 series paired with the FLAIR series ``image_id`` (downloaded once)."""
        study = self.study_of(image_id)
        # image series only (the search filter, MR): derived series (SEG, SR, Parametric Maps) named after a sequence
        # ("msxai SG MPRAGE+ lesion 1") are not T1 candidates
        rows = self._client.search_for_series(study_instance_uid=study, search_filters=self._search_filter or None,
                                              fields=["SeriesDescription"])
        for r in rows:  # some servers leave the study out of series rows under a study
            r.setdefault("0020000D", {"vr": "UI", "Value": [study]})
        return self.get_image_uri(find_t1_series(rows, image_id))

    # ----------------------------------------------------------------------------------------------- labels
    FINAL_SEG_DESCRIPTION = "msxai final label"

    def _label_segs(self) -> list[tuple[str, str, str]]:
        """``(study, SEG series, referenced image series)`` of the SEG series that are labels: MONAI Label counts
        every SEG referencing an image as its label; the app's own results (``msxai lesions ...``, ``msxai
        gradcampp ...``) are model output, not labels, and are left out."""
        out = []
        images = set(self.list_images())
        for r in self._series(Modality="SEG"):
            desc = self._value(r, "0008103E")
            if desc.startswith("msxai ") and desc != self.FINAL_SEG_DESCRIPTION:
                continue
            study, uid = self._value(r, "0020000D"), self._value(r, "0020000E")
            meta = Dataset.from_json(self._client.retrieve_series_metadata(study, uid)[0])
            refs = meta.get("ReferencedSeriesSequence")
            if refs and str(refs[0].SeriesInstanceUID) in images:
                out.append((study, uid, str(refs[0].SeriesInstanceUID)))
        return out

    def get_labeled_images(self, label_tag=None, labels=None):
        return sorted({image for _, _, image in self._label_segs()})

    def get_unlabeled_images(self, label_tag=None, labels=None):
        return sorted(set(self.list_images()) - set(self.get_labeled_images()))

    def _download_labeled_data(self):
        for _, seg_uid, image in self._label_segs():
            self.get_image_uri(image_id=image)
            self.get_label_uri(label_id=seg_uid, label_tag=DefaultLabelTag.FINAL, image_id=image)

    # ------------------------------------------------------------------------------------------------- SEG
    def store_seg(self, image_id: str, labels, affine, segments, description: str) -> dict:
        """Write ``labels`` (on the grid of ``get_image_uri(image_id)``) as a DICOM SEG of the series
        ``image_id`` and store it on the DICOMweb server (STOW-RS)."""
        from msxai.dicom import write_seg

        seg = write_seg(labels, affine, self._source_datasets(image_id), segments, series_description=description)
        self._client.store_instances([seg])
        return {"SeriesInstanceUID": str(seg.SeriesInstanceUID), "SOPInstanceUID": str(seg.SOPInstanceUID),
                "SeriesDescription": str(seg.SeriesDescription), "frames": int(seg.NumberOfFrames),
                "segments": [str(s.SegmentLabel) for s in seg.SegmentSequence]}

    def _source_datasets(self, image_id: str) -> list:
        """The headers of the image series' instances (downloaded once into the cache)."""
        import glob

        import pydicom

        return [pydicom.dcmread(p, stop_before_pixels=True)
                for p in sorted(glob.glob(os.path.join(self.image_series_dir(image_id), "*.dcm")))]

    def store_saliency(self, image_id: str, run_dir, result: dict, lesion_seg_content=None) -> dict:
        """The explanation saved in ``run_dir`` as DICOM Parametric Maps (float maps) and a TID 1500 SR (per-lesion
        table) of the series ``image_id`` (:func:`msxai.dicom_saliency.explain_dicom`), stored with STOW-RS beside
        its SEG. ``lesion_seg_content``: ``(labels, affine, segments, description)`` of the lesion SEG (the one the
        segmentation task stores, same UIDs): its segments are referenced by the SR; stored when absent."""
        from msxai.dicom import write_seg
        from msxai.dicom_saliency import explain_dicom

        src = self._source_datasets(image_id)
        seg = None
        if lesion_seg_content is not None:
            labels, affine, segments, description = lesion_seg_content
            seg = write_seg(labels, affine, src, segments, series_description=description)
            if not self._series(SeriesInstanceUID=str(seg.SeriesInstanceUID)):
                self._client.store_instances([seg])
        out = explain_dicom(run_dir, result, src, lesion_seg=seg, sink=lambda d: self._client.store_instances([d]))
        self._client.store_instances([out["report"]])
        sr = out["report"]
        return {"viewer": f"/ohif/viewer?StudyInstanceUIDs={sr.StudyInstanceUID}",
                "parametric_maps": [{k: v for k, v in p.items() if k != "dataset"} for p in out["parametric_maps"]],
                "parametric_maps_skipped": out["skipped"],
                "sr": {"SeriesInstanceUID": str(sr.SeriesInstanceUID), "SOPInstanceUID": str(sr.SOPInstanceUID),
                       "SeriesDescription": str(sr.SeriesDescription),
                       "groups": len(sr.ContentSequence[-1].ContentSequence)},
                "lesion_seg": str(seg.SeriesInstanceUID) if seg is not None else None}

    # ------------------------------------------------------------------------------------ checked writes
    def _existing_image(self, image_id) -> str:
        validate_image_id(image_id)
        uri = self.get_image_uri(image_id)  # downloads the series once; an unknown series is a 404
        if not uri or not os.path.isfile(uri):
            raise UnknownImageError(f"series {image_id!r} is not available from {self._client.base_url}")
        if image_id not in self._datastore.objects:  # converted earlier, index entry lost: list it again
            with self._write_lock:
                self._datastore.objects[image_id] = ImageLabelModel(
                    image=DataModel(info={"ts": int(time.time()), "name": os.path.basename(uri)}, ext=".nii.gz"))
        return uri

    def _label_input(self, image_uri: str, label_filename: str):
        """OHIF's ``.bin`` labels are converted on the image's grid first (as MONAI Label does)."""
        import pathlib

        from monailabel.datastore.utils.convert import binary_to_image

        if "".join(pathlib.Path(label_filename).suffixes) == ".bin":
            try:
                out = binary_to_image(image_uri, label_filename)
            except Exception as exc:
                from msxai.errors import InputError

                raise InputError(f"cannot read the .bin label on the image's grid ({exc})"[:300]) from None
            return out, extension_of(out), lambda: os.path.exists(out) and os.unlink(out)
        return super()._label_input(image_uri, label_filename)

    def _before_label_commit(self, image_id: str, tag: str, arr, affine, info: dict) -> dict:
        """``final`` labels become a DICOM SEG (written by msxai, not dcmqi) on the server before the local copy is
        replaced; a PACS that refuses it stops the save (the local label stays as it was)."""
        if tag != DefaultLabelTag.FINAL:
            return info
        import numpy as np

        from msxai.dicom import lesion_segments

        names = {}
        for i, li in enumerate((info or {}).get("label_info") or []):
            if isinstance(li, dict) and li.get("name"):
                try:
                    names[str(li["name"])] = int(li.get("idx", li.get("id", i + 1)))
                except (TypeError, ValueError):
                    continue
        arr = np.asarray(arr).astype(np.int32)  # checked: finite non-negative integers
        values = [int(v) for v in np.unique(arr) if v != 0]
        if not values:
            logger.info(f"msxai: empty final label of {image_id}: kept locally, no DICOM SEG written")
            return dict(info or {}, dicom_seg="not written: empty label")
        for v in values:
            if v not in names.values():
                names[f"lesion {v}" if len(values) > 1 else "lesion"] = v
        seg = self.store_seg(image_id, arr, affine, lesion_segments(names), self.FINAL_SEG_DESCRIPTION)
        image_info = self.get_image_info(image_id)
        info = dict(info or {})
        info.update({"SeriesInstanceUID": seg["SeriesInstanceUID"], "Modality": image_info.get("Modality"),
                     "PatientID": image_info.get("PatientID"), "StudyInstanceUID": image_info.get("StudyInstanceUID")})
        return info

    def add_image(self, image_id, image_filename, image_info, user=None, filename=None):
        from msxai.errors import InputError

        raise InputError("this server's images are the series of its DICOMweb server: store new studies there "
                         "(e.g. STOW-RS), not through PUT /datastore/image")

    def remove_image(self, image_id, user=None):
        from msxai.errors import InputError

        raise InputError("this server's images are the series of its DICOMweb server: remove them there")
