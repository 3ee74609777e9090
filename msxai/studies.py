"""The rules of multi-sequence MS study data: which file is a study's image, where its T1 is (NIfTI naming rule,
DICOM series pairing), which image ids are valid, and where what is computed for a study is kept (artefact layout).
The MONAI Label app (``apps/msxai/lib/service.py``) serves studies by these rules.

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

Artefacts live in ``<studies>/msxai/<image_id>/`` (see :func:`artifact_dir`): the cached segmentation of each
model (``seg_<model>/``) and the exact float saliency maps of each explain request (``explain/<run>/``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from msxai.errors import InputError

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
