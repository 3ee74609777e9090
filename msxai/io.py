"""NIfTI input/output and FLAIR/T1 pair loading with the checks every entry point shares; the one file hasher
(:func:`file_sha256`) and the one numpy-to-JSON conversion (:func:`json_default`, :func:`to_jsonable`).

Arrays are kept in the NIfTI's own voxel order (i, j, k) = nibabel's ``get_fdata()`` order, so a saved map
lies on the input grid with the input affine.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from msxai.errors import EmptyDomainError, GeometryError, InputError

AFFINE_ATOL = 1e-3  # mm; grids closer than this are the same grid


@dataclass
class Volume:
    """A 3-D image with its voxel-to-world affine."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        return voxel_spacing(self.affine)


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis."""
    return tuple(float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def voxel_volume_mm3(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3])))


def load_volume(path: str | Path, name: str | None = None, dtype=np.float32, require_orientation: bool = False) -> Volume:
    """Load a 3-D NIfTI (a trailing singleton 4th axis is dropped). Errors name the file.

    ``require_orientation``: refuse a NIfTI whose header holds no orientation (``qform_code == sform_code == 0``:
    nibabel then makes up an affine from the voxel size alone) and a degenerate affine (:func:`check_orientation`).
    """
    path = Path(path)
    label = name or path.name
    if not path.exists():
        raise InputError(f"{label}: file not found: {path}")
    if path.is_dir():
        raise InputError(f"{label}: {path} is a folder, not a NIfTI file (a DICOM series folder is read by "
                         "msxai.io.load_sequence)")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=dtype)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{label}: cannot read {path} as NIfTI ({exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    check_3d(data.shape, f"{label} ({path.name})")
    if require_orientation:
        header = getattr(img, "header", None)
        if header is not None and hasattr(header, "get_sform"):
            if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
                raise GeometryError(
                    f"{label}: {path.name} has no orientation (qform_code = sform_code = 0): where the voxels lie in "
                    "the patient is unknown; write the NIfTI with its scanner orientation (e.g. dcm2niix) or give "
                    "the DICOM series"
                )
        check_orientation(img.affine, label)
    return Volume(np.ascontiguousarray(data), np.asarray(img.affine, dtype=np.float64))


def check_3d(shape, label: str) -> None:
    """Refuse anything but a 3-D volume with at least 2 voxels along every axis (2-D images, single slices and
    4-D series are named as such)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4:
        raise InputError(f"{label}: a 4-D image ({shape[3]} volumes of {shape[:3]}); give one 3-D volume")
    if len(shape) < 3 or (len(shape) == 3 and min(shape) < 2):
        raise InputError(f"{label}: a 2-D image (shape {shape}); a 3-D volume of several slices is needed")
    if len(shape) != 3:
        raise InputError(f"{label}: expected a 3-D volume, got shape {shape}")


def check_orientation(affine, label: str) -> None:
    """Refuse a voxel-to-world affine that cannot place the voxels: non-finite, a zero-length voxel axis, or axes
    (nearly) parallel to each other (a degenerate orientation)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise GeometryError(f"{label}: the voxel-to-world affine is missing or not finite")
    norms = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    if np.any(norms < 1e-6):
        raise GeometryError(f"{label}: degenerate orientation (a voxel axis of length {norms.min():.3g} mm)")
    volume = abs(float(np.linalg.det(a[:3, :3])))
    if volume < 0.1 * float(np.prod(norms)):
        raise GeometryError(
            f"{label}: degenerate orientation (the voxel axes are nearly parallel: |det| / product of voxel sizes = "
            f"{volume / float(np.prod(norms)):.3g})"
        )


RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def load_dicom_series(folder: str | Path, name: str | None = None) -> Volume:
    """The one DICOM series of ``folder`` as a 3-D volume (read with SimpleITK/GDCM: slices sorted along their normal,
    rescale slope/intercept applied) with its RAS affine (DICOM patient coordinates are LPS)."""
    import SimpleITK as sitk

    folder = Path(folder)
    label = name or folder.name
    reader = sitk.ImageSeriesReader()
    try:
        series = list(reader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as exc:
        raise InputError(f"{label}: cannot list DICOM series in {folder} ({exc})") from exc
    if not series:
        raise InputError(f"{label}: no DICOM series in the folder {folder} (expected a NIfTI file or a folder of one "
                         "DICOM series)")
    if len(series) > 1:
        raise InputError(f"{label}: {len(series)} DICOM series in {folder} ({', '.join(series[:4])}); give a folder "
                         "holding one series")
    files = list(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    try:
        if len(files) == 1:
            img = sitk.ReadImage(files[0])
        else:
            reader.SetFileNames(files)
            img = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{label}: cannot read the DICOM series in {folder} ({exc})") from exc
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{label}: the DICOM series in {folder} is not a grey-level image")
    size = tuple(int(s) for s in img.GetSize())
    check_3d(size, f"{label} (DICOM series in {folder.name})")
    array = np.ascontiguousarray(sitk.GetArrayFromImage(img).transpose(2, 1, 0)).astype(np.float32)
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3) * np.array(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    affine = RAS_FROM_LPS @ lps
    check_orientation(affine, label)
    return Volume(array, affine)


def load_sequence(path: str | Path, name: str | None = None, allow_empty: bool = False) -> Volume:
    """One MR sequence as the bundles take it: a NIfTI file (with its orientation) or a folder holding one DICOM
    series; refuses 2-D and 4-D images, a missing or degenerate orientation, NaN/inf voxels and (unless
    ``allow_empty``, e.g. a label without lesions) all-zero volumes."""
    if path is None or str(path).strip() == "":
        raise InputError(f"no {name or 'image'} given")
    p = Path(str(path))
    label = name or p.name
    if not p.exists():
        raise InputError(f"{label}: file not found: {p}")
    vol = load_dicom_series(p, label) if p.is_dir() else load_volume(p, label, require_orientation=True)
    check_finite(vol.array, label)
    if not allow_empty:
        check_not_empty(vol.array, label)
    return vol


def save_volume(path: str | Path, array: np.ndarray, affine: np.ndarray, dtype=None) -> Path:
    """Write ``array`` as NIfTI with ``affine`` (sform and qform set). Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(array)
    if dtype is not None:
        arr = arr.astype(dtype)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.set_sform(np.asarray(affine), code=1)
    img.set_qform(np.asarray(affine), code=1)
    nib.save(img, str(path))
    return path


def check_finite(array: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise InputError(f"{name}: {bad} voxel(s) are NaN or infinite")


def check_not_empty(array: np.ndarray, name: str) -> None:
    if array.size == 0:
        raise EmptyDomainError(f"{name}: the volume has no voxels (shape {tuple(array.shape)})")
    if not np.any(array):
        raise EmptyDomainError(f"{name}: the volume is empty (all voxels are zero)")


def check_same_grid(a: Volume, b: Volume, name_a: str = "FLAIR", name_b: str = "T1", atol: float = AFFINE_ATOL) -> None:
    """Raise ``GeometryError`` naming the first difference between the two grids."""
    if a.array.shape != b.array.shape:
        raise GeometryError(
            f"{name_a} and {name_b} are on different grids: shape {tuple(a.array.shape)} vs {tuple(b.array.shape)}"
            " (register/resample them first, e.g. `--register`)"
        )
    sa, sb = np.array(a.spacing), np.array(b.spacing)
    if not np.allclose(sa, sb, atol=atol):
        raise GeometryError(
            f"{name_a} and {name_b} have different voxel sizes: {tuple(np.round(sa, 4))} vs {tuple(np.round(sb, 4))} mm"
        )
    if not np.allclose(a.affine, b.affine, atol=atol):
        diff = float(np.abs(a.affine - b.affine).max())
        raise GeometryError(
            f"{name_a} and {name_b} have different orientation/origin (affines differ by up to {diff:.4g} mm)"
        )


def load_pair(flair_path: str | Path, t1_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load FLAIR and T1 (MPRAGE) as a ``[2, X, Y, Z]`` float32 array (channel 0 = FLAIR) and the shared affine.

    Refuses missing files, non-3-D images, NaN/inf voxels, all-zero volumes and mismatched grids, each with a
    message naming the sequence and the problem.
    """
    flair = load_volume(flair_path, "FLAIR")
    t1 = load_volume(t1_path, "T1")
    for vol, name in ((flair, "FLAIR"), (t1, "T1")):
        check_finite(vol.array, name)
        check_not_empty(vol.array, name)
    check_same_grid(flair, t1)
    return np.stack([flair.array, t1.array]).astype(np.float32), flair.affine


# ------------------------------------------------------------------------------------------------ files and JSON
_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB chunks; remembered per resolved path, size and modification time
    (in ns), so weights are read once per process, and read again as soon as they change."""
    p = Path(path).resolve()
    st = os.stat(p)
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def json_default(o):
    """``json.dumps(..., default=json_default)``: numpy scalars -> Python numbers, arrays -> lists, paths -> str."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_jsonable(obj):
    """Deep-convert numpy scalars/arrays and paths so ``json.dumps`` accepts ``obj``."""
    return json.loads(json.dumps(obj, default=json_default))


def fov_coverage(affine_a: np.ndarray, shape_a, affine_b: np.ndarray, shape_b, max_points: int = 200_000) -> float:
    """Fraction of the field of view of grid A (its voxel centres, sampled evenly) that lies inside the field of view
    of grid B (voxel index ``-0.5 .. n - 0.5`` along each axis)."""
    shape_a = [int(s) for s in shape_a]
    step = max(1, int(np.ceil((np.prod(shape_a) / max_points) ** (1 / 3))))
    axes = [np.arange(0, n, step, dtype=np.float64) for n in shape_a]
    ijk = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    to_b = np.linalg.inv(np.asarray(affine_b, np.float64)) @ np.asarray(affine_a, np.float64)
    idx = ijk @ to_b[:3, :3].T + to_b[:3, 3]
    inside = np.all((idx >= -0.5) & (idx <= np.asarray(shape_b, np.float64) - 0.5), axis=1)
    return float(inside.mean())


def publish_dir(tmp: str | Path, final: str | Path) -> None:
    """Put the complete folder ``tmp`` in place of ``final``: a reader never sees a half-written folder, and an older
    ``final`` is replaced only once the new one is complete (renamed aside, then removed)."""
    import shutil
    import socket
    import threading

    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}~old~{socket.gethostname()}~{os.getpid()}~{threading.get_ident()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
