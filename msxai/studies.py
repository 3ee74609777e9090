"""Multi-sequence MS studies for the MONAI Label app: which file is the study's image, where its T1 is, where the
app keeps what it computes for a study, and the cached segmentation that explain requests refer to.

Naming rule (NIfTI, one folder; sequence tokens are matched case-insensitively)
-------------------------------------------------------------------------------
* The study's image is its FLAIR. ``<stem>_FLAIR.nii.gz`` (or ``-FLAIR``, ``.nii``) is paired with
  ``<stem>_T1.nii.gz``, ``<stem>_MPRAGE.nii.gz`` or ``<stem>_T1w.nii.gz`` beside it (same stem, same separator,
  either NIfTI extension).
* In a per-study folder, ``FLAIR.nii.gz`` is paired with ``T1.nii.gz`` / ``MPRAGE.nii.gz`` / ``T1w.nii.gz`` in the
  same folder (the layout of the open MS data set: ``patient26/{FLAIR,T1,consensus_gt}.nii.gz``).
* Exactly one T1 candidate must exist: none -> :class:`MissingSequenceError` naming the files looked for; two or
  more (say ``X_T1`` and ``X_MPRAGE``) -> :class:`AmbiguousSequenceError` naming them.
* Files whose last name token is a companion or derived sequence (``T1``, ``MPRAGE``, ``T1w``, ``lesions``,
  ``brainmask``, ``mask``, ``seg``, ``gt``, ``consensus_gt``, ``label(s)``, ``prob``) are not studies: the
  app's datastore does not list them as images to label.

DICOM rule (series of one study): the FLAIR series is the one the client opened; the T1 is the single other series
of the same study whose SeriesDescription names a T1 (``MPRAGE``, ``MP-RAGE``, ``MP2RAGE``, ``T1``, ``T1w``,
``TFL3D``, ``BRAVO``, ``SPGR``) but not FLAIR and not a post-contrast acquisition (``post``, ``gad``, ``gd``,
``+c``, ``contrast``, ``ce``) - see :func:`find_t1_series`.

App artefacts live in ``<studies>/msxai/<image_id>/`` (see :func:`artifact_dir`): the cached segmentation of each
model (``seg_<model>/``) and the exact float saliency maps of each explain request (``explain/<run>/``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from msxai import SEQUENCE_KEYS, SEQUENCES
from msxai.device import resolve_device
from msxai.errors import InputError
from msxai.io import file_sha256, json_default, to_jsonable
from msxai.lesions import parse_lesion_ids

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
FLAIR_TOKENS = ("FLAIR",)
T1_TOKENS = ("T1", "MPRAGE", "T1w")
AUX_TOKENS = ("lesions", "lesion", "brainmask", "mask", "seg", "gt", "consensus_gt", "label", "labels", "prob")
ARTIFACTS_DIRNAME = "msxai"
IMAGE_ID_MAX_LEN = 200
_IMAGE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\- ]*$")
_TOKEN_SPLIT_RE = re.compile(r"^(?P<stem>.*?)(?P<sep>[_-])(?P<token>[^_-]+)$")


class InvalidImageIdError(InputError):
    """An image id that is not a plain datastore name (path separators, ``..``, odd characters)."""


class UnknownImageError(InputError):
    """An image id the datastore does not hold."""


class MissingSequenceError(InputError):
    """A study whose T1/MPRAGE cannot be found by the naming rule."""


class AmbiguousSequenceError(InputError):
    """A study with more than one T1/MPRAGE candidate."""


# --------------------------------------------------------------------------------------------------- names and ids
def split_nifti_name(name: str) -> tuple[str, str]:
    """``"X_FLAIR.nii.gz" -> ("X_FLAIR", ".nii.gz")``; a name without a NIfTI extension gets ``ext == ""``."""
    lower = name.lower()
    for ext in NIFTI_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)], name[-len(ext):]
    return name, ""


def _split_token(stem: str) -> tuple[str, str, str]:
    """``"sub-01_FLAIR" -> ("sub-01", "_", "FLAIR")``; ``"FLAIR" -> ("", "", "FLAIR")``."""
    # aux tokens may contain the separator themselves (consensus_gt)
    for aux in sorted(AUX_TOKENS, key=len, reverse=True):
        for sep in ("_", "-"):
            if stem.lower().endswith(sep + aux.lower()) and len(stem) > len(aux) + 1:
                return stem[: -len(aux) - 1], sep, stem[-len(aux):]
    if stem.lower() in {a.lower() for a in AUX_TOKENS}:
        return "", "", stem
    m = _TOKEN_SPLIT_RE.match(stem)
    if m and m.group("stem"):
        return m.group("stem"), m.group("sep"), m.group("token")
    return "", "", stem


def sequence_of(name: str) -> str | None:
    """The role of a file by its name: ``"FLAIR"``, ``"T1"``, ``"aux"`` (derived/companion) or ``None``."""
    stem, ext = split_nifti_name(Path(name).name)
    _, _, token = _split_token(stem)
    t = token.lower()
    if t in {x.lower() for x in FLAIR_TOKENS}:
        return "FLAIR"
    if t in {x.lower() for x in T1_TOKENS}:
        return "T1"
    if t in {x.lower() for x in AUX_TOKENS}:
        return "aux"
    return None


def is_study_image(name: str) -> bool:
    """Whether a file in the studies folder is listed as a study image: a NIfTI that is not a T1/MPRAGE or a
    derived/companion file (lesions, masks, ...). FLAIR-named files are the intended study images; other NIfTIs are
    listed too and get a clear error from :func:`find_t1` when their T1 cannot be found."""
    base = Path(name).name
    if base.startswith("."):
        return False
    _, ext = split_nifti_name(base)
    if not ext:
        return False
    return sequence_of(base) not in ("T1", "aux")


def validate_image_id(image_id: Any) -> str:
    """Return ``image_id`` if it is a plain datastore name, else raise :class:`InvalidImageIdError`.

    Refused: non-strings, empty ids, ids longer than 200 characters, path separators (``/``, ``\\``), ``..``,
    a leading dot, NUL and other characters outside ``[A-Za-z0-9._+- ]``."""
    if not isinstance(image_id, str) or not image_id.strip():
        raise InvalidImageIdError(f"image id must be a non-empty string, got {image_id!r}")
    if len(image_id) > IMAGE_ID_MAX_LEN:
        raise InvalidImageIdError(f"image id is longer than {IMAGE_ID_MAX_LEN} characters")
    if "/" in image_id or "\\" in image_id or os.sep in image_id:
        raise InvalidImageIdError(
            f"image id {image_id!r} contains a path separator; pass the datastore id (the file name without "
            "extension, e.g. 'sub01_FLAIR'), not a path"
        )
    if ".." in image_id:
        raise InvalidImageIdError(f"image id {image_id!r} contains '..'")
    if not _IMAGE_ID_RE.match(image_id):
        raise InvalidImageIdError(
            f"image id {image_id!r} has characters outside [A-Za-z0-9._+- ] or starts with a non-alphanumeric"
        )
    return image_id


# ----------------------------------------------------------------------------------------------- the T1 companion
def t1_candidates(flair_path: str | Path) -> list[Path]:
    """The file names the naming rule accepts as the T1 of ``flair_path`` (whether or not they exist)."""
    flair_path = Path(flair_path)
    stem, ext = split_nifti_name(flair_path.name)
    if not ext:
        raise InputError(f"{flair_path.name}: not a NIfTI file (expected .nii.gz or .nii)")
    prefix, sep, token = _split_token(stem)
    if token.lower() not in {x.lower() for x in FLAIR_TOKENS}:
        raise MissingSequenceError(
            f"{flair_path.name}: cannot tell which T1 belongs to this image: the naming rule needs the FLAIR to be "
            f"named '<stem>_FLAIR.nii.gz' (T1 beside it as '<stem>_T1.nii.gz') or 'FLAIR.nii.gz' in a study folder "
            f"(with 'T1.nii.gz')"
        )
    out = []
    for t in T1_TOKENS:
        for e in NIFTI_EXTENSIONS:
            out.append(flair_path.with_name(f"{prefix}{sep}{t}{e}"))
    return out


def find_t1(flair_path: str | Path) -> Path:
    """The T1/MPRAGE beside ``flair_path`` by the module's naming rule (case-insensitive sequence token)."""
    flair_path = Path(flair_path)
    wanted = t1_candidates(flair_path)
    folder = flair_path.parent
    try:
        present = {p.name.lower(): p for p in folder.iterdir() if p.is_file()}
    except OSError as exc:
        raise MissingSequenceError(f"{flair_path.name}: cannot list {folder} ({exc})") from exc
    found = []
    for cand in wanted:
        p = present.get(cand.name.lower())
        if p is not None and p not in found:
            found.append(p)
    if not found:
        names = ", ".join(sorted({c.name for c in wanted if c.name.endswith('.nii.gz')}))
        raise MissingSequenceError(
            f"{flair_path.name}: no T1/MPRAGE found beside it in {folder.name or '.'}/ (looked for {names} "
            "or .nii); the model needs FLAIR + T1"
        )
    if len(found) > 1:
        raise AmbiguousSequenceError(
            f"{flair_path.name}: more than one T1/MPRAGE candidate ({', '.join(p.name for p in found)}); keep one"
        )
    return found[0]


@dataclass(frozen=True)
class StudyPair:
    image_id: str
    flair: Path
    t1: Path


def study_pair(flair_path: str | Path, image_id: str | None = None) -> StudyPair:
    flair_path = Path(flair_path)
    if not flair_path.is_file():
        raise UnknownImageError(f"image {image_id or flair_path.name!r}: file not found")
    return StudyPair(image_id or split_nifti_name(flair_path.name)[0], flair_path, find_t1(flair_path))


# ------------------------------------------------------------------------------------------------------- DICOM
_B, _E = r"(?<![a-z0-9])", r"(?![a-z0-9])"  # token boundaries where "_" and "-" separate words
_DICOM_T1_RE = re.compile(rf"(mp-?rage|mp2rage|{_B}t1w?{_E}|{_B}t1-?mpr|tfl3d|bravo|spgr)", re.IGNORECASE)
_DICOM_FLAIR_RE = re.compile(r"flair", re.IGNORECASE)
_DICOM_POST_RE = re.compile(rf"({_B}post{_E}|gad|{_B}gd{_E}|\+c{_E}|contrast|{_B}ce{_E})", re.IGNORECASE)


def _series_field(series: Mapping[str, Any], keyword: str, tag: str) -> str:
    if keyword in series:
        v = series[keyword]
    elif tag in series:  # DICOM JSON (QIDO-RS): {"0008103E": {"vr": "LO", "Value": ["..."]}}
        v = series[tag]
        v = (v.get("Value") or [""])[0] if isinstance(v, Mapping) else v
    else:
        return ""
    if isinstance(v, (list, tuple)):
        v = v[0] if v else ""
    return str(v or "")


def dicom_sequence_of(description: str) -> str | None:
    """``"FLAIR"``, ``"T1"`` or ``None`` for a SeriesDescription (T1-FLAIR and post-contrast T1 are neither)."""
    d = description or ""
    is_flair = bool(_DICOM_FLAIR_RE.search(d))
    is_t1 = bool(_DICOM_T1_RE.search(d))
    if is_flair and not is_t1:
        return "FLAIR"
    if is_t1 and not is_flair and not _DICOM_POST_RE.search(d):
        return "T1"
    return None


def find_t1_series(series: Iterable[Mapping[str, Any]], flair_series_uid: str) -> str:
    """The SeriesInstanceUID of the T1/MPRAGE in the same study as the FLAIR series ``flair_series_uid``.

    ``series`` are the study's series as dicts with ``SeriesInstanceUID``/``SeriesDescription`` (and optionally
    ``StudyInstanceUID``) keywords, or QIDO-RS DICOM JSON (tags ``0020000E``, ``0008103E``, ``0020000D``)."""
    rows = []
    for s in series:
        rows.append(
            {
                "uid": _series_field(s, "SeriesInstanceUID", "0020000E"),
                "desc": _series_field(s, "SeriesDescription", "0008103E"),
                "study": _series_field(s, "StudyInstanceUID", "0020000D"),
            }
        )
    flair = [r for r in rows if r["uid"] == flair_series_uid]
    if not flair:
        raise UnknownImageError(f"series {flair_series_uid!r} is not among the study's series")
    study = flair[0]["study"]
    others = [r for r in rows if r["uid"] != flair_series_uid and (not study or not r["study"] or r["study"] == study)]
    t1 = [r for r in others if dicom_sequence_of(r["desc"]) == "T1"]
    if not t1:
        descs = ", ".join(repr(r["desc"]) for r in others) or "none"
        raise MissingSequenceError(
            f"series {flair_series_uid!r} ({flair[0]['desc']!r}): no T1/MPRAGE series in the same study "
            f"(other series: {descs}); a T1 series description must name MPRAGE/T1 and not FLAIR or contrast"
        )
    if len(t1) > 1:
        raise AmbiguousSequenceError(
            f"series {flair_series_uid!r}: more than one T1/MPRAGE series in the study: "
            + ", ".join(f"{r['uid']} ({r['desc']!r})" for r in t1)
        )
    return t1[0]["uid"]


# --------------------------------------------------------------------------------------------------- artefacts
def artifact_dir(studies: str | Path, image_id: str, create: bool = False) -> Path:
    """``<studies>/msxai/<image_id>/``: where the app keeps what it computed for a study."""
    validate_image_id(image_id)
    d = Path(studies) / ARTIFACTS_DIRNAME / image_id
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d


def safe_artifact_path(studies: str | Path, image_id: str, relpath: str) -> Path:
    """A file under :func:`artifact_dir`, refusing anything that would leave it (``..``, absolute paths, links)."""
    base = artifact_dir(studies, image_id).resolve()
    if not relpath or relpath.startswith(("/", "\\")) or ".." in Path(relpath).parts or "\\" in relpath:
        raise InvalidImageIdError(f"file {relpath!r}: must be a relative path inside the study's artefacts")
    p = (base / relpath).resolve()
    if base != p and base not in p.parents:
        raise InvalidImageIdError(f"file {relpath!r}: outside the study's artefacts")
    return p


def list_artifacts(studies: str | Path, image_id: str) -> list[str]:
    base = artifact_dir(studies, image_id)
    if not base.is_dir():
        return []
    return sorted(str(p.relative_to(base)) for p in base.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(base).parts))


def file_fingerprint(paths: Sequence[str | Path]) -> str:
    """A short key that changes when any file changes (path, size, mtime in ns)."""
    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        h.update(f"{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def weights_fingerprint(bundle_path: str | Path) -> str:
    """Fingerprint of what a bundle's inference depends on: the contents (:func:`msxai.io.file_sha256`) of its
    weights (``models/*``) and ``configs/inference.json`` (training/evaluation configs do not change a segmentation)."""
    root = Path(bundle_path)
    files = sorted(p for p in (root / "models").glob("*") if p.is_file())
    if (root / "configs" / "inference.json").is_file():
        files.append(root / "configs" / "inference.json")
    return hashlib.sha1("".join(file_sha256(f) for f in files).encode()).hexdigest()[:16] if files else "none"


# ------------------------------------------------------------------------------------------ segmentation cache
class SegmentationCache:
    """The segmentation of an image by a model, kept in memory and on disk under
    ``<studies>/msxai/<image_id>/seg_<model>/`` (``labels.nii.gz``, ``prob.nii.gz``, ``meta.json``; on the FLAIR's
    grid, plus ``prob_network.nii.gz`` on the network grid when the bundle's pre-processing resampled the study).

    An entry is valid while the FLAIR, the T1 and the bundle's weights/configs are unchanged (their fingerprints
    are stored in ``meta.json``); it survives server restarts. ``compute`` is called at most once at a time per key
    (concurrent requests for the same key wait for the first), across processes too: MONAI Label's batch infer runs
    the app again in a subprocess beside the server, so each key also holds an exclusive ``flock`` on
    ``.seg_<model>.lock`` while it reads or computes, and an entry is written into a temporary folder that is renamed
    into place complete (a reader never sees a half-written entry)."""

    def __init__(self, studies: str | Path, max_memory_items: int = 8):
        self.studies = Path(studies)
        self.max_memory_items = max_memory_items
        self._mem: dict[tuple[str, str], tuple[str, dict]] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def _dir(self, image_id: str, model: str) -> Path:
        return artifact_dir(self.studies, image_id) / f"seg_{model}"

    def _lock(self, key):
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def get(self, image_id: str, model: str, fingerprint: str, compute) -> dict:
        """Return ``{"labels", "prob", "affine", "table", "prob_network", "network_affine", "from_cache"}``;
        ``compute()`` must return a dict with ``labels`` (int [X,Y,Z]), ``prob`` (float32 [X,Y,Z]), ``affine`` and
        ``table`` (list of dicts), optionally ``prob_network`` and ``network_affine`` (the probability on the
        network grid; the same as ``prob`` when absent)."""
        import nibabel as nib

        from msxai.io import save_volume

        key = (image_id, model)
        with self._lock(key), _process_lock(self._dir(image_id, model).with_name(f".seg_{model}.lock")):
            mem = self._mem.get(key)
            if mem is not None and mem[0] == fingerprint:
                return dict(mem[1], from_cache="memory")
            d = self._dir(image_id, model)
            meta_path = d / "meta.json"
            if meta_path.is_file():
                try:
                    meta = json.loads(meta_path.read_text())
                    if meta.get("fingerprint") == fingerprint:
                        lab = nib.load(str(d / "labels.nii.gz"))
                        prob = nib.load(str(d / "prob.nii.gz"))
                        entry = {
                            "labels": np.asarray(lab.dataobj).astype(np.int32),
                            "prob": np.asarray(prob.dataobj, dtype=np.float32),
                            "affine": np.asarray(lab.affine, dtype=np.float64),
                            "table": meta["table"],
                        }
                        if (d / "prob_network.nii.gz").is_file():
                            net = nib.load(str(d / "prob_network.nii.gz"))
                            entry["prob_network"] = np.asarray(net.dataobj, dtype=np.float32)
                            entry["network_affine"] = np.asarray(net.affine, dtype=np.float64)
                        else:
                            entry["prob_network"], entry["network_affine"] = entry["prob"], entry["affine"]
                        self._remember(key, fingerprint, entry)
                        return dict(entry, from_cache="disk")
                except Exception:  # a damaged cache entry is recomputed
                    pass
            computed = compute()
            entry = {
                "labels": np.asarray(computed["labels"]).astype(np.int32),
                "prob": np.asarray(computed["prob"], dtype=np.float32),
                "affine": np.asarray(computed["affine"], dtype=np.float64),
                "table": computed["table"],
            }
            net = computed.get("prob_network")
            net_affine = computed.get("network_affine")
            on_one_grid = net is None or (np.shape(net) == entry["prob"].shape
                                          and np.allclose(net_affine, entry["affine"], atol=1e-6))
            entry["prob_network"] = entry["prob"] if on_one_grid else np.asarray(net, dtype=np.float32)
            entry["network_affine"] = entry["affine"] if on_one_grid else np.asarray(net_affine, dtype=np.float64)
            tmp = d.with_name(f".{d.name}~tmp~{os.getpid()}~{threading.get_ident()}")
            tmp.mkdir(parents=True, exist_ok=True)
            save_volume(tmp / "labels.nii.gz", entry["labels"], entry["affine"], dtype=np.int32)
            save_volume(tmp / "prob.nii.gz", entry["prob"], entry["affine"], dtype=np.float32)
            if not on_one_grid:
                save_volume(tmp / "prob_network.nii.gz", entry["prob_network"], entry["network_affine"],
                            dtype=np.float32)
            (tmp / "meta.json").write_text(json.dumps({"fingerprint": fingerprint, "model": model,
                                                       "table": entry["table"]}, default=json_default, indent=1))
            _replace_dir(tmp, d)
            self._remember(key, fingerprint, entry)
            return dict(entry, from_cache=None)

    def _remember(self, key, fingerprint, entry):
        with self._guard:
            self._mem.pop(key, None)
            self._mem[key] = (fingerprint, entry)
            while len(self._mem) > self.max_memory_items:
                self._mem.pop(next(iter(self._mem)))


class _process_lock:
    """An exclusive ``fcntl.flock`` on ``path`` (created with its folder) for the ``with`` block: one process at a
    time (threads of one process are serialised by the cache's own locks first)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")
        fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
        self.fh.close()
        return False


# ------------------------------------------------------------------------------------------- explain parameters
MAX_SAMPLES_DEFAULT = 200
EXPLAIN_DEFAULTS = {
    "smoothgrad": {"lesion": "all", "samples": 50, "sigma": 0.05, "aggregation": "max", "seed": 0},
    "gradcampp": {"lesion": "all", "layer": ""},
}
EXPLAIN_METHODS = tuple(EXPLAIN_DEFAULTS)


def _first(v):
    """Client configs send lists of choices; the first entry is the selection (as the Slicer module does)."""
    return v[0] if isinstance(v, (list, tuple)) and v and not isinstance(v[0], (list, tuple)) else v


def _as_int(value, name: str, lo: int, hi: int) -> int:
    value = _first(value)
    if isinstance(value, bool):
        raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}") from None
    if not np.isfinite(f) or f != int(f) or not (lo <= f <= hi):
        raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(f)


def _as_float(value, name: str, lo: float, hi: float, lo_open: bool = False) -> float:
    value = _first(value)
    if isinstance(value, bool):
        raise InputError(f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(f) or f > hi or f < lo or (lo_open and f == lo):
        raise InputError(f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")
    return f


@dataclass
class ExplainParams:
    method: str
    model: str
    lesion: list[int] | str | None
    samples: int
    sigma: float
    aggregation: str
    layer: str | None
    seed: int
    sequence: str
    fractions: tuple[float, float]
    foreground: list | None
    domain_mode: str
    radius_mm: float
    label_value: int | None
    ignored: list[str]
    lesions_from: str = "model"

    def run_key(self, domain_key: str) -> str:
        """A stable folder name for this request's artefacts (same request -> same folder)."""
        h = hashlib.sha1(
            json.dumps([self.samples, self.sigma, self.aggregation, self.layer, self.fractions, self.domain_mode,
                        self.radius_mm, self.foreground, self.label_value, self.lesions_from], default=str).encode()
        ).hexdigest()[:8]
        return f"{self.method}_{self.model}_{domain_key}_seed{self.seed}_{h}"


def parse_explain_params(method: str, params: Mapping[str, Any], models: Sequence[str],
                         max_samples: int = MAX_SAMPLES_DEFAULT, default_layer: str | None = None) -> ExplainParams:
    """Validate an explain request's parameters; every refusal names the parameter and its valid range."""
    if method not in EXPLAIN_METHODS:
        raise InputError(f"method must be one of {EXPLAIN_METHODS}, got {method!r}")
    d = dict(EXPLAIN_DEFAULTS[method])
    d.update({k: v for k, v in params.items() if v is not None})
    # MONAI Label's request dict holds the task name under "model"; the app's infer route moves a client's
    # "model" parameter to "explain_model" (library callers may pass "model" directly)
    model = _first(d.get("explain_model")) or _first(d.get("model")) or (models[0] if models else None)
    if isinstance(model, str) and model.startswith("explain_"):
        model = models[0] if models else None
    if model not in models:
        raise InputError(f"model must be one of {list(models)}, got {model!r}")
    ignored = []
    if method == "smoothgrad":
        samples = _as_int(d.get("samples"), "samples", 1, int(max_samples))
        sigma = _as_float(d.get("sigma"), "sigma (noise, fraction of the FLAIR intensity range)", 0.0, 1.0)
        aggregation = str(_first(d.get("aggregation"))).lower()
        if aggregation not in ("max", "mean"):
            raise InputError(f"aggregation must be 'max' (Eq. 3) or 'mean' (Eq. 2), got {aggregation!r}")
        layer = None
        if params.get("layer"):
            ignored.append("layer")
    else:
        samples, sigma, aggregation = 0, 0.0, "none"
        for k in ("samples", "sigma", "aggregation"):
            if params.get(k) not in (None, ""):
                ignored.append(k)
        layer = _first(d.get("layer")) or default_layer
        if layer is None or not isinstance(layer, str):
            raise InputError("layer must name a module of the network (e.g. the bundle's Grad-CAM++ layer)")
    seed = _as_int(d.get("seed", 0), "seed", 0, 2**32 - 1)
    if method == "gradcampp" and params.get("seed") not in (None, ""):
        ignored.append("seed")
    sequence = str(_first(d.get("sequence", "FLAIR"))).upper()
    if sequence == "T1":
        sequence = "MPRAGE"
    if sequence not in SEQUENCES:
        raise InputError(f"sequence must be FLAIR or MPRAGE (T1), got {d.get('sequence')!r}")
    strong = _as_float(d.get("strong", 0.5), "strong (bin fraction)", 0.0, 1.0, lo_open=True)
    medium = _as_float(d.get("medium", 0.2), "medium (bin fraction)", 0.0, 1.0, lo_open=True)
    if medium >= strong:
        raise InputError(f"medium ({medium}) must be below strong ({strong})")
    fg = d.get("foreground")
    foreground = fg if fg not in (None, "", []) else None
    if isinstance(foreground, str):
        try:
            foreground = json.loads(foreground)
        except ValueError:
            raise InputError(f"foreground must be a list of [i, j, k] voxel coordinates, got {fg!r}") from None
    domain_mode = str(_first(d.get("domain_mode", "ball"))).lower()
    if domain_mode not in ("ball", "grow"):
        raise InputError(f"domain_mode must be 'ball' or 'grow', got {domain_mode!r}")
    radius_mm = _as_float(d.get("radius_mm", 3.0), "radius_mm", 0.0, 50.0, lo_open=True)
    lv = d.get("label_value")
    label_value = _as_int(lv, "label_value", 1, 2**31 - 1) if lv not in (None, "") else None
    lesion = d.get("lesion")
    lesion = parse_lesion_ids(lesion) if lesion not in (None, "", []) else None
    lesions_from = str(_first(d.get("lesions_from", "model")) or "model")
    if lesions_from != "model" and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", lesions_from):
        raise InputError(f"lesions_from must be 'model' or a datastore label tag (e.g. 'final'), got {lesions_from!r}")
    return ExplainParams(method, model, lesion, samples, sigma, aggregation, layer, seed, sequence,
                         (strong, medium), foreground, domain_mode, radius_mm, label_value, ignored, lesions_from)


# ------------------------------------------------------------------------------------------------- the service
class BundleLoadError(RuntimeError):
    """A bundle that cannot be served (missing weights, broken config): raised at app start-up."""


def _root_message(exc: BaseException) -> str:
    """The message of the innermost InputError in an exception chain (MONAI's ConfigParser wraps the bundle's own
    'model weights not found: ...' in a generic 'Failed to evaluate ConfigExpression'), else ``str(exc)``."""
    seen, e, best = set(), exc, None
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, InputError):
            best = e
        e = e.__cause__ or e.__context__
    return str(best) if best is not None else f"{type(exc).__name__}: {exc}"


def _read_label_on_grid(path: str | Path, shape, affine, what: str = "uploaded label") -> np.ndarray:
    from msxai.errors import GeometryError
    from msxai.io import AFFINE_ATOL
    from msxai.labelmaps import read_labelmap

    arr, aff = read_labelmap(path)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if tuple(arr.shape) != tuple(shape):
        raise GeometryError(
            f"{what} has shape {tuple(arr.shape)} but the image has {tuple(shape)}; draw it on the study's FLAIR"
        )
    if not np.allclose(aff, affine, atol=max(AFFINE_ATOL, 1e-2)):
        raise GeometryError(f"{what} is not on the image's grid (its orientation/origin/spacing differ)")
    return arr


def _read_domain_label(path: str | Path, shape, affine, value: int | None) -> np.ndarray:
    from msxai.labelmaps import domain_from_label

    return domain_from_label(_read_label_on_grid(path, shape, affine), shape, value)


class StudyService:
    """What the MONAI Label app serves, independent of MONAI Label: bundles by model name (loaded once per device),
    the segmentation cache, and the segmentation/explain requests (parameters in, label map file + JSON out).

    Model runs (segmentation, explanation) go through one dedicated worker thread (:meth:`run`): one at a time per
    server process, in arrival order, always on the same thread. Waiting requests hold only their parameters, and
    all model memory is allocated by that one thread, so the allocator keeps a single arena's worth of freed memory
    (with a run on whichever request thread, glibc's per-thread arenas would each keep one run's peak)."""

    def __init__(self, studies: str | Path, bundle_paths: Mapping[str, str | Path], max_samples: int = MAX_SAMPLES_DEFAULT,
                 loader=None, runner=None):
        if not bundle_paths:
            raise BundleLoadError("no model selected: pass --conf models all (or a subset such as unet,dynunet)")
        self.studies = Path(studies)
        self.bundle_paths = {k: Path(v) for k, v in bundle_paths.items()}
        self.max_samples = int(max_samples)
        self.cache = SegmentationCache(self.studies)
        self._loader = loader
        self._bundles: dict[tuple[str, str], Any] = {}
        self._bundle_lock = threading.Lock()
        self.runner = runner  # an object with .run(fn, *args, **kwargs) on the model thread (the app's scheduler)
        if runner is None:
            from concurrent.futures import ThreadPoolExecutor

            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="msxai-model")
        for model in self.bundle_paths:  # fail at start-up, not at the first request
            self.bundle(model, "cpu")

    def relocate(self, root: str | Path) -> None:
        """Keep artefacts and the segmentation cache under ``root`` (a DICOMweb datastore's local cache folder)."""
        self.studies = Path(root)
        self.cache = SegmentationCache(self.studies)

    def run(self, fn, *args, **kwargs):
        """Run ``fn`` on the model worker thread and wait for it (exceptions are re-raised here)."""
        if self.runner is not None:
            return self.runner.run(fn, *args, **kwargs)
        if threading.current_thread().name.startswith("msxai-model"):
            return fn(*args, **kwargs)
        return self._worker.submit(fn, *args, **kwargs).result()

    @property
    def models(self) -> list[str]:
        return list(self.bundle_paths)

    def bundle(self, model: str, device: str = "cpu"):
        if model not in self.bundle_paths:
            raise InputError(f"model must be one of {self.models}, got {model!r}")
        key = (model, device)
        with self._bundle_lock:
            if key not in self._bundles:
                path = self.bundle_paths[model]
                loader = self._loader
                if loader is None:
                    from msxai.bundle import load_bundle as loader
                if not path.is_dir():
                    raise BundleLoadError(f"bundle '{model}': folder {path} not found")
                try:
                    self._bundles[key] = loader(path, device=device)
                except Exception as exc:
                    raise BundleLoadError(
                        f"bundle '{model}' ({path}) cannot be loaded on {device}: {_root_message(exc)}"
                    ) from exc
            return self._bundles[key]

    # ----------------------------------------------------------------------------------------------- helpers
    def study(self, request: Mapping[str, Any]) -> StudyPair:
        image = request.get("image")
        image_id = request.get("image_id")
        if not isinstance(image, str) or not image:
            raise UnknownImageError(f"image {image_id!r} not found in the datastore")
        t1 = request.get("msxai_t1")  # set by the app for DICOMweb studies (T1 series of the same study)
        if t1:
            if not image_id or not Path(image).is_file() or not Path(t1).is_file():
                raise UnknownImageError(f"image {image_id!r}: FLAIR or T1 file not found")
            return StudyPair(validate_image_id(image_id), Path(image), Path(t1))
        return study_pair(image, validate_image_id(image_id) if image_id else None)

    def _fingerprint(self, pair: StudyPair, bundle) -> str:
        return file_fingerprint([pair.flair, pair.t1]) + "-" + weights_fingerprint(getattr(bundle, "path", ""))

    def segmentation(self, model: str, pair: StudyPair, device: str, prepared=None) -> dict:
        """The (cached) segmentation of a study by a model: labels, prob, affine, table, from_cache."""
        bundle = self.bundle(model, device)

        def compute():
            prep = prepared if prepared is not None else bundle.prepare(pair.flair, pair.t1)
            res = bundle.segment(prep)
            return {"labels": res.labels, "prob": res.prob, "affine": res.affine, "table": res.table,
                    "prob_network": res.prob_network, "network_affine": res.network_affine}

        return self.cache.get(pair.image_id, model, self._fingerprint(pair, bundle), compute)

    # ------------------------------------------------------------------------------------------ segmentation
    def segment_request(self, model: str, request: Mapping[str, Any], out_path: str | Path) -> dict:
        from msxai.labelmaps import instance_label_names, write_labelmap

        pair = self.study(request)
        device = str(resolve_device(_first(request.get("device"))))
        entry = self.run(self.segmentation, model, pair, device)
        labels, table = entry["labels"], entry["table"]
        mode = str(_first(request.get("label_mode", "auto")) or "auto").lower()
        if mode not in ("auto", "instances", "binary"):
            raise InputError(f"label_mode must be auto, instances or binary, got {mode!r}")
        note = None
        if mode == "auto":
            # the OHIF v3 plugin always sends restore_label_idx=false and maps values through the static labels
            # of /info ({"lesion": 1}); every other client gets the instance ids
            rli = request.get("restore_label_idx")
            mode = "binary" if rli is False or (isinstance(rli, str) and rli.lower() == "false") else "instances"
        dtype = _result_dtype(request.get("result_dtype"))
        n = int(labels.max()) if labels.size else 0
        if mode == "instances" and dtype is not None and n > np.iinfo(dtype).max:
            mode, note = "binary", f"{n} lesions do not fit in {np.dtype(dtype).name}: binary mask sent"
        if mode == "instances":
            out, names = labels, instance_label_names(labels, table)
        else:
            out, names = (labels > 0).astype(np.uint8), {"lesion": 1}
        write_labelmap(out_path, out, entry["affine"], dtype=dtype)
        bundle = self.bundle(model, device)
        result = {
            "model": model,
            "bundle": getattr(bundle, "name", model),
            "image": pair.image_id,
            "t1": pair.t1.name,
            "device": device,
            "label_mode": mode,
            "label_names": names,
            "n_lesions": len(table),
            "lesions": table,
            "threshold": getattr(bundle, "threshold", None),
            "min_volume_mm3": getattr(bundle, "min_volume_mm3", None),
            "cache": entry["from_cache"],
            "artifacts": f"{ARTIFACTS_DIRNAME}/{pair.image_id}/seg_{model}",
        }
        if note:
            result["note"] = note
        return result

    # -------------------------------------------------------------------------------------------- explanation
    def explain_request(self, method: str, request: Mapping[str, Any], out_path: str | Path, admit=None,
                        checkpoint=None) -> dict:
        """``admit(bundle=, prepared=, domains=, params=, device=)`` is called on the model thread once the domains are
        known, before any saliency is computed (it may refuse by raising); ``checkpoint(info)`` after every chunk of
        the computation (see :func:`explain_maps`)."""
        from msxai.io import save_volume
        from msxai.labelmaps import combine_signed_max, domain_from_points, saliency_bins, write_labelmap
        from msxai.lesions import lesion_domain

        pair = self.study(request)
        device = str(resolve_device(_first(request.get("device"))))
        p = parse_explain_params(method, request, self.models, self.max_samples, default_layer="")
        bundle = self.bundle(p.model, device)
        if method == "gradcampp" and not p.layer:
            p.layer = getattr(bundle, "gradcam_layer", None)
            if not p.layer:
                raise InputError(f"layer: bundle {p.model} names no Grad-CAM++ layer; pass one")
        label_file = request.get("label")

        def compute():
            prepared = bundle.prepare(pair.flair, pair.t1)
            # domains are given, and maps returned, on the FLAIR's native grid (what the client shows); the saliency
            # is computed on the network grid, where the domains are carried with nearest neighbours
            if getattr(prepared, "native_affine", None) is not None:
                shape, affine = tuple(prepared.native_shape), np.asarray(prepared.native_affine, dtype=np.float64)
            else:
                shape, affine = tuple(prepared.image.shape[1:]), np.asarray(prepared.affine, dtype=np.float64)
            seg = None
            domains: dict[str, np.ndarray] = {}
            not_predicted: dict[str, str] = {}  # domains that are not this bundle's own lesions (no error score)
            if label_file:
                domains["client_label"] = _read_domain_label(label_file, shape, affine, p.label_value)
                source = "uploaded label"
            elif p.foreground is not None:
                if p.domain_mode == "grow" and not getattr(prepared, "on_native_grid", True):
                    from msxai.io import load_sequence

                    native_flair = load_sequence(pair.flair, "FLAIR").array
                else:
                    native_flair = (prepared.raw if getattr(prepared, "raw", None) is not None else prepared.image)[0]
                domains["client_points"] = domain_from_points(
                    p.foreground, shape, affine, p.radius_mm, p.domain_mode, flair=native_flair,
                )
                source = f"foreground points ({p.domain_mode}, {p.radius_mm} mm)"
            else:
                if p.lesion is None:
                    raise InputError("nothing to explain: give lesion (id, list or 'all'), upload a label, or send "
                                     "foreground points")
                seg = self.segmentation(p.model, pair, device, prepared=prepared)
                saved = request.get("lesions_label")
                if saved:  # lesions of a label saved in the datastore (e.g. the clinician's corrected 'final')
                    from msxai.lesions import instances_from_mask, lesion_ids

                    arr = _read_label_on_grid(saved, shape, affine, "saved label")
                    labels = instances_from_mask(arr, affine=affine)
                    ids_all = lesion_ids(labels)
                    origin = f"the saved '{p.lesions_from}' label"
                else:
                    labels = seg["labels"]
                    ids_all = [int(r["id"]) for r in seg["table"]]
                    origin = f"segmentation_{p.model}"
                ids = ids_all if p.lesion == "all" else p.lesion
                if not ids:
                    from msxai.errors import EmptyDomainError

                    raise EmptyDomainError(
                        f"{origin} has no lesion in {pair.image_id}: nothing for lesion='all'; to ask why a "
                        "spot was missed, upload a label or send foreground points"
                    )
                for i in ids:
                    domains[f"lesion_{i}"] = lesion_domain(labels, i)
                    if saved:
                        not_predicted[f"lesion_{i}"] = f"a lesion of {origin}, not the model's own: no error score"
                source = f"lesion{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))} of {origin}"
            if seg is None:
                seg = self.segmentation(p.model, pair, device, prepared=prepared)
            to_network = getattr(prepared, "to_network", None)
            net_domains = {n: (to_network(m, n) if to_network else m) for n, m in domains.items()}
            prob_net = seg.get("prob_network", seg["prob"])
            if admit is not None:
                admit(bundle=bundle, prepared=prepared, domains=net_domains, params=p, device=device)
            maps, summaries = explain_maps(bundle, prepared, net_domains, p, device, prob=prob_net,
                                           checkpoint=checkpoint)
            from msxai.experiments.error_flag import score_for_bundle  # error score per lesion (or null + reason)

            for n in domains:
                if not n.startswith("lesion_"):
                    not_predicted[n] = "a drawn domain, not a lesion predicted by the bundle: no error score"
            scores, flag_info = score_for_bundle(
                getattr(bundle, "path", None), p.method, p.aggregation, p.samples, p.sigma, maps, net_domains,
                np.asarray(prepared.affine, dtype=np.float64), prob=prob_net,
                threshold=getattr(bundle, "threshold", 0.3), not_predicted=not_predicted)
            for n, sc in scores.items():
                summaries[n].update(sc)
            to_native = getattr(prepared, "to_native", None)
            if to_native is not None and not getattr(prepared, "on_native_grid", True):
                maps = {n: to_native(m) for n, m in maps.items()}
            return shape, affine, domains, source, maps, summaries, flag_info

        shape, affine, domains, source, maps, summaries, flag_info = self.run(compute)

        # one display map: the chosen sequence (SmoothGrad) or the CAM, largest magnitude over the domains
        ch = SEQUENCES.index(p.sequence)
        display = combine_signed_max([m[ch] if m.ndim == 4 else m for m in maps.values()])
        union = np.zeros(shape, dtype=bool)
        for dm in domains.values():
            union |= dm
        domain_name = _domain_display_name(domains)
        prefix = p.sequence if method == "smoothgrad" else "CAM"
        lab, names, edges = saliency_bins(display, union, p.fractions, prefix=prefix, domain_name=domain_name)
        write_labelmap(out_path, lab, affine, dtype=_result_dtype(request.get("result_dtype")))

        # the exact float maps beside the study
        key = p.run_key(_domain_key(domains))
        run_dir = artifact_dir(self.studies, pair.image_id) / "explain" / key
        tmp_dir = run_dir.with_name(f".{key}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp_dir.mkdir(parents=True, exist_ok=True)
        files = []
        for name, m in maps.items():
            if m.ndim == 4:
                for c, seq in enumerate(SEQUENCES):
                    save_volume(tmp_dir / f"{name}_{seq}.nii.gz", m[c], affine, dtype=np.float32)
                    files.append(f"{name}_{seq}.nii.gz")
            else:
                save_volume(tmp_dir / f"{name}_gradcampp.nii.gz", m, affine, dtype=np.float32)
                files.append(f"{name}_gradcampp.nii.gz")
            save_volume(tmp_dir / f"{name}_domain.nii.gz", domains[name].astype(np.uint8), affine, dtype=np.uint8)
            files.append(f"{name}_domain.nii.gz")
        write_labelmap(tmp_dir / "labelmap.nii.gz", lab, affine)
        files.append("labelmap.nii.gz")
        result = {
            "method": method,
            "model": p.model,
            "image": pair.image_id,
            "device": device,
            "domain_source": source,
            "domains": {k: int(v.sum()) for k, v in domains.items()},
            "label_names": names,
            "labelmap_sequence": p.sequence if method == "smoothgrad" else "Grad-CAM++",
            "bins": edges,
            "summary": summaries,
            "error_flag": flag_info,
            "params": {
                "samples": p.samples, "sigma": p.sigma, "aggregation": p.aggregation, "layer": p.layer,
                "seed": p.seed, "strong": p.fractions[0], "medium": p.fractions[1],
            },
            "artifacts_dir": f"{ARTIFACTS_DIRNAME}/{pair.image_id}/explain/{key}",
            "files": [f"explain/{key}/{f}" for f in files],
            "urls": [f"/msxai/artifacts/{pair.image_id}/explain/{key}/{f}" for f in files],
        }
        if p.ignored:
            result["ignored_params"] = p.ignored
        (tmp_dir / "summary.json").write_text(json.dumps(to_jsonable(result), indent=1))
        result["files"].append(f"explain/{key}/summary.json")
        result["urls"].append(f"/msxai/artifacts/{pair.image_id}/explain/{key}/summary.json")
        _replace_dir(tmp_dir, run_dir)
        return result


def _replace_dir(src: Path, dst: Path) -> None:
    import shutil

    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old.{os.getpid()}.{threading.get_ident()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _domain_key(domains: Mapping[str, np.ndarray]) -> str:
    names = list(domains)
    if len(names) == 1:
        return names[0].replace("_", "")
    if all(n.startswith("lesion_") for n in names):
        ids = [n.split("_", 1)[1] for n in names]
        s = "lesions" + "-".join(ids)
        return s if len(s) <= 40 else f"lesions{len(ids)}-" + hashlib.sha1(s.encode()).hexdigest()[:8]
    return "domains" + hashlib.sha1("|".join(names).encode()).hexdigest()[:8]


def _domain_display_name(domains: Mapping[str, np.ndarray]) -> str:
    names = list(domains)
    if len(names) == 1:
        return names[0].replace("_", " ")
    if all(n.startswith("lesion_") for n in names):
        return f"{len(names)} lesions"
    return "domains"


def _result_dtype(value):
    value = _first(value)
    if value in (None, ""):
        return None
    try:
        dt = np.dtype(str(value))
    except TypeError:
        raise InputError(f"result_dtype {value!r} is not a numpy dtype") from None
    if dt.kind not in "ui":
        raise InputError(f"result_dtype must be an integer type for a label map, got {value!r}")
    return dt.type


def explain_maps(bundle, prepared, domains: Mapping[str, np.ndarray], p: ExplainParams, device: str | None = None,
                 prob: np.ndarray | None = None, checkpoint=None) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Run the saliency engine (:func:`msxai.saliency.engine.explain`, the one ``msxai explain`` uses) for every
    domain; returns ``({name: [2, X, Y, Z] (SmoothGrad: FLAIR, MPRAGE) or [X, Y, Z] (Grad-CAM++)}, {name: summary})``
    in the order of ``domains``. The bundle's network is already on ``device``.

    ``checkpoint(info)`` is called after every chunk: with it, SmoothGrad explains one domain per engine call, so a
    chunk is one domain x one noise batch (each domain's map is the same as in a shared call: same noise copies);
    Grad-CAM++ after each domain (its first chunk includes the full-image pass)."""
    from msxai.saliency.engine import explain

    kwargs: dict[str, Any] = {"method": p.method, "seed": p.seed, "prob": prob, "affine": prepared.affine}
    if p.method == "smoothgrad":
        kwargs.update(aggregation=p.aggregation, n_samples=p.samples, sigma_fraction=p.sigma)
    else:
        kwargs.update(layer=p.layer)
    calls = [dict(domains)]
    if checkpoint is not None and p.method == "smoothgrad":
        kwargs["checkpoint"] = checkpoint
        calls = [{n: d} for n, d in domains.items()]
    maps: dict[str, np.ndarray] = {}
    summaries: dict[str, dict] = {}
    for e in (e for call in calls for e in explain(bundle, prepared.image, call, **kwargs)):
        if p.method == "smoothgrad":
            maps[e.name] = np.stack([e.maps[f"smoothgrad_{k}"] for k in SEQUENCE_KEYS]).astype(np.float32)
        else:
            maps[e.name] = np.asarray(e.maps["gradcampp"], dtype=np.float32)
            if checkpoint is not None:
                checkpoint({"domains": [e.name]})
        summaries[e.name] = e.summary
    order = [n for n in domains if n in maps]
    return {n: maps[n] for n in order}, {n: summaries[n] for n in order}
