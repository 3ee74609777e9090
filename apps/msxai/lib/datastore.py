"""The studies folder as MONAI Label sees it: only study images (the FLAIRs) are listed, never their T1/MPRAGE or
the derived files beside them (lesion masks, brain masks); the naming rule is :mod:`msxai.studies`."""

from __future__ import annotations

import logging
import os

from monailabel.datastore.local import LocalDatastore

from msxai.studies import is_study_image

logger = logging.getLogger(__name__)


class MsxaiDatastore(LocalDatastore):
    """A :class:`LocalDatastore` whose image listing follows :func:`msxai.studies.is_study_image`."""

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


# --------------------------------------------------------------------------------------------------- DICOMweb (PACS)
import threading  # noqa: E402

from monailabel.datastore.dicom import DICOMWebDatastore  # noqa: E402
from monailabel.interfaces.datastore import DefaultLabelTag  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402

from msxai.studies import UnknownImageError, dicom_sequence_of, find_t1_series, validate_image_id  # noqa: E402


class DicomWebAccessError(RuntimeError):
    """The DICOMweb server cannot be used (unreachable, credentials refused): stops the start-up."""


class MsxaiDICOMwebDatastore(DICOMWebDatastore):
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

    def save_label(self, image_id, label_filename, label_tag, label_info, label_id=""):
        """``final`` labels become a DICOM SEG (written by msxai, not dcmqi) on the server; every label is also kept
        in the local cache, as MONAI Label's DICOMweb datastore does."""
        import pathlib

        from monailabel.datastore.local import LocalDatastore
        from monailabel.datastore.utils.convert import binary_to_image

        from msxai.dicom import lesion_segments
        from msxai.labelmaps import read_labelmap

        image_uri = self.get_image_uri(image_id)
        output_file = ""
        if "".join(pathlib.Path(label_filename).suffixes) == ".bin":
            output_file = label_filename = binary_to_image(image_uri, label_filename)
        try:
            if label_tag == DefaultLabelTag.FINAL:
                arr, aff = read_labelmap(label_filename)
                names = {}
                for i, li in enumerate((label_info or {}).get("label_info") or []):
                    if isinstance(li, dict) and li.get("name"):
                        names[str(li["name"])] = int(li.get("idx", li.get("id", i + 1)))
                import numpy as np

                values = [int(v) for v in np.unique(arr) if v != 0]
                for v in values:
                    if v not in names.values():
                        names[f"lesion {v}" if len(values) > 1 else "lesion"] = v
                info = self.store_seg(image_id, arr, aff, lesion_segments(names), self.FINAL_SEG_DESCRIPTION)
                image_info = self.get_image_info(image_id)
                label_info = dict(label_info or {})
                label_info.update({"SeriesInstanceUID": info["SeriesInstanceUID"],
                                   "Modality": image_info.get("Modality"), "PatientID": image_info.get("PatientID"),
                                   "StudyInstanceUID": image_info.get("StudyInstanceUID")})
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        finally:
            if output_file and os.path.exists(output_file):
                os.unlink(output_file)
