"""What the app accepts from a client before anything is written: label files on the study image's grid, image
uploads that are usable studies, label tags, and the HTTP status of every refusal.

Every check raises an :class:`msxai.errors.InputError` subclass whose message names the problem; :func:`status_for`
maps it to a 4xx code. Nothing here writes to the datastore.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO

import numpy as np

from msxai.errors import EmptyDomainError, GeometryError, InputError, UnknownLesionError
from msxai.studies import (
    AmbiguousSequenceError,
    InvalidImageIdError,
    MissingSequenceError,
    UnknownImageError,
    split_nifti_name,
)

TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
LABEL_EXTENSIONS = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd")
IMAGE_EXTENSIONS = (".nii.gz", ".nii")
LABEL_AFFINE_ATOL = 1e-2  # mm: what explain accepts for an uploaded label (lib.service._read_label_on_grid)
MAX_UPLOAD_BYTES = 1 << 30  # 1 GiB: a 1 mm brain label map is a few MB, a FLAIR a few tens
MAX_IMAGE_VOXELS = 1024**3 // 2
MAX_IMAGE_DIM = 2048


class LabelContentError(InputError):
    """An upload that is not a usable label map (unreadable, NaN, fractional or negative values)."""


class InvalidTagError(InputError):
    """A label tag outside the strict pattern (path separators, dots, ...)."""


class LabelNotFoundError(InputError):
    """A label (image id + tag) the datastore does not hold."""


class ConflictError(InputError):
    """A write that would replace something that must be removed explicitly first (an existing image)."""


class UnsupportedFormatError(InputError):
    """An upload whose file name has no accepted extension."""


class UploadTooLargeError(InputError):
    """An upload above :data:`MAX_UPLOAD_BYTES`."""


class JobCancelledError(InputError):
    """A job cancelled by a user, or by the server shutting down (``shutdown`` = True)."""

    def __init__(self, msg: str, shutdown: bool = False):
        super().__init__(msg)
        self.shutdown = shutdown


class TooExpensiveError(InputError):
    """A request whose estimated cost exceeds the server's budget (the message says how to narrow it)."""


def status_for(exc: InputError) -> int:
    """404 for things that do not exist, 400 for malformed ids/parameters, 409 for conflicts and cancelled jobs,
    413 for uploads too large, 415 for unsupported file types, 422 for unusable content and requests over the
    cost budget, 503 for jobs cancelled by a shutdown."""
    if isinstance(exc, JobCancelledError):
        return 503 if exc.shutdown else 409
    if isinstance(exc, (UnknownImageError, UnknownLesionError, LabelNotFoundError)):
        return 404
    if isinstance(exc, (InvalidImageIdError, InvalidTagError)):
        return 400
    if isinstance(exc, ConflictError):
        return 409
    if isinstance(exc, UploadTooLargeError):
        return 413
    if isinstance(exc, UnsupportedFormatError):
        return 415
    if isinstance(exc, (GeometryError, EmptyDomainError, MissingSequenceError, AmbiguousSequenceError,
                        TooExpensiveError, LabelContentError)):
        return 422
    msg = str(exc)
    if "NaN" in msg or "empty" in msg or "cannot read" in msg:
        return 422
    return 400


def validate_tag(tag) -> str:
    """A label tag: 1-64 characters of ``[A-Za-z0-9_-]``, starting with a letter or digit (so never a path)."""
    if not isinstance(tag, str) or not TAG_RE.match(tag):
        raise InvalidTagError(
            f"label tag {tag!r} is not allowed: use 1-64 characters of letters, digits, '_' or '-' (e.g. 'final')"
        )
    return tag


def extension_of(filename: str, accepted=LABEL_EXTENSIONS) -> str:
    """The accepted extension ``filename`` ends with (case-insensitive, longest first), else refuse."""
    low = (filename or "").lower()
    for ext in sorted(accepted, key=len, reverse=True):
        if low.endswith(ext):
            return ext
    raise UnsupportedFormatError(
        f"file {os.path.basename(filename or '') or '(no name)'!r}: expected {' or '.join(accepted)}"
    )


def copy_upload(src: BinaryIO, dest: str | Path, max_bytes: int = MAX_UPLOAD_BYTES) -> int:
    """Copy an uploaded stream to ``dest``, refusing more than ``max_bytes``; returns the size."""
    n = 0
    with open(dest, "wb") as out:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            n += len(chunk)
            if n > max_bytes:
                raise UploadTooLargeError(f"upload larger than {max_bytes // 2**20} MiB refused")
            out.write(chunk)
    return n


# ------------------------------------------------------------------------------------------------------ grids
def image_grid(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of a study image (header only)."""
    import nibabel as nib

    img = nib.load(str(path))
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    return shape, np.asarray(img.affine, dtype=np.float64)


def _label_header(path: Path, ext: str) -> tuple[tuple[int, ...], int]:
    """Shape (3-D after dropping a singleton 4th axis) and components per voxel, from the header only (an upload
    that claims a huge grid is refused before its data are decompressed)."""
    try:
        if ext in (".nii.gz", ".nii"):
            import nibabel as nib

            shape = tuple(int(s) for s in nib.load(str(path)).shape)
            comps = 1
        else:
            import SimpleITK as sitk

            r = sitk.ImageFileReader()
            r.SetFileName(str(path))
            r.ReadImageInformation()
            shape = tuple(int(s) for s in r.GetSize())
            comps = int(r.GetNumberOfComponents())
    except Exception as exc:
        why = str(exc).replace(str(path), "the upload")
        raise LabelContentError(f"cannot read the label file as an image ({type(exc).__name__}: {why})"[:400]) from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    return shape, comps


def check_label_file(path: str | Path, ext: str, image_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an uploaded label (``ext`` one of :data:`LABEL_EXTENSIONS`) and check it against the study image:
    a 3-D single-component image, the image's shape, its affine within :data:`LABEL_AFFINE_ATOL` mm, finite
    non-negative integer values. Returns ``(array, affine)``."""
    from msxai.labelmaps import read_labelmap

    path = Path(path)
    shape, affine = image_grid(image_path)
    got, comps = _label_header(path, ext)
    if comps != 1:
        raise GeometryError(f"label has {comps} components per voxel; send one label map (one value per voxel)")
    if len(got) != 3:
        raise GeometryError(f"label must be a 3-D label map, got shape {got}")
    if got != shape:
        raise GeometryError(f"label has shape {got} but the image has {shape}; draw it on the study's image")
    # read_labelmap picks its reader by the file name; the upload's temp name carries the client's extension
    arr, aff = read_labelmap(path)
    arr = np.asarray(arr)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if tuple(arr.shape) != shape:
        raise GeometryError(f"label has shape {tuple(arr.shape)} but the image has {shape}")
    if not np.allclose(aff, affine, atol=LABEL_AFFINE_ATOL):
        diff = float(np.abs(np.asarray(aff) - affine).max())
        raise GeometryError(
            f"label is not on the image's grid: its orientation/origin/spacing differ by up to {diff:.4g} mm "
            f"(tolerance {LABEL_AFFINE_ATOL} mm)"
        )
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise LabelContentError("label has NaN or infinite values; a label map holds integers")
        if not np.array_equal(arr, np.round(arr)):
            raise LabelContentError("label has non-integer values; a label map holds integers (0 = background)")
    elif arr.dtype.kind not in "iu":
        raise LabelContentError(f"label has values of type {arr.dtype}; a label map holds integers")
    if arr.size and arr.min() < 0:
        raise LabelContentError(f"label has negative values (min {arr.min()}); label values are >= 0")
    if arr.size and arr.max() > np.iinfo(np.int32).max:
        raise LabelContentError("label values above 2^31 - 1")
    return arr, aff


def label_bytes(path: str | Path, ext: str, arr: np.ndarray, image_affine: np.ndarray) -> bytes:
    """The bytes stored for a checked label, always a ``.nii.gz``: a ``.nii.gz`` upload byte for byte, a ``.nii``
    gzip-compressed as it is, an NRRD re-written as NIfTI on the image's own affine (smallest integer type)."""
    if ext == ".nii.gz":
        return Path(path).read_bytes()
    if ext == ".nii":
        return gzip.compress(Path(path).read_bytes(), compresslevel=6)
    import nibabel as nib

    mx = int(arr.max()) if arr.size else 0
    dtype = np.uint8 if mx <= 255 else np.uint16 if mx <= 65535 else np.int32
    img = nib.Nifti1Image(np.asarray(arr).astype(dtype), np.asarray(image_affine, dtype=np.float64))
    img.set_sform(image_affine, code=1)
    img.set_qform(image_affine, code=1)
    buf = io.BytesIO()
    file_map = img.make_file_map({"image": buf, "header": buf})
    img.to_file_map(file_map)
    return gzip.compress(buf.getvalue(), compresslevel=6)


# ----------------------------------------------------------------------------------------------------- images
def check_image_file(path: str | Path, name: str) -> tuple[tuple[int, ...], np.ndarray]:
    """An image upload must be usable as a study (or as the T1 of one): a 3-D NIfTI of sane size with finite values
    that are not all the same. Returns ``(shape, affine)``."""
    import nibabel as nib

    from msxai.io import check_finite, load_volume

    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as exc:
        why = str(exc).replace(str(path), "the upload")
        raise InputError(f"{name}: cannot read the upload as NIfTI ({type(exc).__name__}: {why})"[:400]) from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise GeometryError(f"{name}: expected a 3-D image, got shape {shape}")
    if any(s < 2 or s > MAX_IMAGE_DIM for s in shape) or int(np.prod(shape)) > MAX_IMAGE_VOXELS:
        raise GeometryError(f"{name}: shape {shape} is outside what the app serves (2..{MAX_IMAGE_DIM} per axis)")
    vol = load_volume(path, name)
    check_finite(vol.array, name)
    if float(vol.array.max()) == float(vol.array.min()):
        raise EmptyDomainError(f"{name}: the image is empty (every voxel is {float(vol.array.min())})")
    if not np.all(np.isfinite(vol.affine)) or abs(np.linalg.det(vol.affine[:3, :3])) < 1e-9:
        raise GeometryError(f"{name}: the image has a degenerate affine (no usable voxel size/orientation)")
    return vol.array.shape, vol.affine


def image_id_from_upload(image_id: str | None, filename: str) -> tuple[str, str]:
    """``(image id, extension)`` of an upload: the id given, else the file name without its NIfTI extension."""
    ext = extension_of(filename, IMAGE_EXTENSIONS)
    if not image_id:
        image_id = split_nifti_name(os.path.basename(filename))[0]
    return image_id, ext


def fsync_dir(path: str | Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(dest: str | Path, data: bytes, tmp_prefix: str = ".") -> None:
    """Write ``data`` to ``dest`` by a temp file in the same folder, fsync, rename, fsync of the folder: a reader
    (or a crash at any moment) sees the old bytes or the new ones, never a mix."""
    import threading

    dest = Path(dest)
    tmp = dest.with_name(f"{tmp_prefix}{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(dest.parent)


def copy_file_durably(src: str | Path, dest: str | Path) -> None:
    """Copy ``src`` to a new file ``dest`` (temp + fsync + rename)."""
    import threading

    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
            fo.flush()
            os.fsync(fo.fileno())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(dest.parent)
