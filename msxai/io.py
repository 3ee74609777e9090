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


def load_volume(path: str | Path, name: str | None = None, dtype=np.float32) -> Volume:
    """Load a 3-D NIfTI (a trailing singleton 4th axis is dropped). Errors name the file."""
    path = Path(path)
    label = name or path.name
    if not path.exists():
        raise InputError(f"{label}: file not found: {path}")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=dtype)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{label}: cannot read {path} as NIfTI ({exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{label}: expected a 3-D volume, got shape {tuple(data.shape)} in {path}")
    return Volume(np.ascontiguousarray(data), np.asarray(img.affine, dtype=np.float64))


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
