"""Label maps that an unmodified MONAI Label client (3D Slicer module, OHIF v3 plugin) can show.

A client renders a result as one label map whose values are named segments. So the app sends:

* for a segmentation: lesion instance ids ``1..n`` named ``"lesion k (v mm3)"`` (:func:`instance_label_names`), or
  the binary lesion mask (value 1 = ``"lesion"``) for clients that map values through a fixed label list (OHIF);
* for an explanation: a fixed layout of :data:`SALIENCY_LAYOUT` values, whatever the map:

  ====== =====================================================================
  value  meaning
  ====== =====================================================================
  1      outline of the explained domain Omega (its inner boundary voxels)
  2      strong positive saliency   ``s >= f_strong * S``
  3      medium positive saliency   ``f_medium * S <= s < f_strong * S``
  4      medium negative saliency   ``-f_strong * S < s <= -f_medium * S``
  5      strong negative saliency   ``s <= -f_strong * S``
  ====== =====================================================================

  with ``S = max |s|`` over the volume (or a given scale), ``f_strong = 0.5``, ``f_medium = 0.2`` by default.
  The bins win over the outline (most MS lesions are so small that their inner boundary is the whole lesion, and
  its saliency is what the map is for): outline voxels show where the saliency is below the medium bin. The names sent with a result carry the value
  ranges (``"FLAIR+ strong [0.0123, 0.0246]"``), the static names in ``/info`` do not (OHIF only sees those).

Domains that the client gives instead of a lesion id (the "why was this missed?" case) are built by
:func:`domain_from_label` (an uploaded label) and :func:`domain_from_points` (a ball, or a bounded region grown
over the FLAIR, around foreground click points).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from msxai.errors import EmptyDomainError, GeometryError, InputError
from msxai.io import voxel_spacing

OUTLINE, POS_STRONG, POS_MEDIUM, NEG_MEDIUM, NEG_STRONG = 1, 2, 3, 4, 5
SALIENCY_LAYOUT = {
    OUTLINE: "outline",
    POS_STRONG: "+ strong",
    POS_MEDIUM: "+ medium",
    NEG_MEDIUM: "- medium",
    NEG_STRONG: "- strong",
}
DEFAULT_FRACTIONS = (0.5, 0.2)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def static_saliency_names(prefix: str = "saliency") -> dict[str, int]:
    """The value layout with names that carry no numbers (what ``/info`` lists as the task's labels)."""
    out = {"domain outline": OUTLINE}
    for v in (POS_STRONG, POS_MEDIUM, NEG_MEDIUM, NEG_STRONG):
        out[f"{prefix}{SALIENCY_LAYOUT[v]}"] = v
    return out


def domain_outline(domain: np.ndarray) -> np.ndarray:
    """Voxels of ``domain`` with at least one face neighbour outside it (the whole domain when it is thin)."""
    domain = np.asarray(domain, dtype=bool)
    if not domain.any():
        return domain.copy()
    eroded = ndimage.binary_erosion(domain, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
    return domain & ~eroded


def saliency_bins(
    saliency: np.ndarray,
    domain: np.ndarray | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    scale: float | None = None,
    prefix: str = "saliency",
    domain_name: str = "domain",
) -> tuple[np.ndarray, dict[str, int], dict]:
    """Bin a signed saliency map into the fixed label layout (module docstring).

    Returns ``(labelmap uint8 [X,Y,Z], label_names {name: value}, edges)`` where ``edges`` holds the scale ``S``,
    the fractions and the ``[low, high]`` value range of every bin (``None`` for a bin that no voxel reaches).
    Every value of the layout is named (also empty bins), so a client maps values to names by position.
    """
    s = np.asarray(saliency, dtype=np.float64)
    if s.ndim != 3:
        raise InputError(f"saliency map must be 3-D [X, Y, Z], got shape {tuple(s.shape)}")
    if not np.all(np.isfinite(s)):
        raise InputError("saliency map has NaN or infinite values")
    f_strong, f_medium = (float(f) for f in fractions)
    if not (0.0 < f_medium < f_strong <= 1.0):
        raise InputError(f"bin fractions must satisfy 0 < medium < strong <= 1, got strong={f_strong}, medium={f_medium}")
    if domain is not None:
        domain = np.asarray(domain, dtype=bool)
        if domain.shape != s.shape:
            raise GeometryError(f"domain shape {tuple(domain.shape)} differs from the saliency map's {tuple(s.shape)}")
    S = float(np.abs(s).max()) if scale is None else float(scale)
    if not math.isfinite(S) or S < 0:
        raise InputError(f"saliency scale must be a finite non-negative number, got {scale}")

    lab = np.zeros(s.shape, dtype=np.uint8)
    ranges: dict[int, list[float] | None] = {}
    if S > 0:
        masks = {
            POS_STRONG: s >= f_strong * S,
            POS_MEDIUM: (s >= f_medium * S) & (s < f_strong * S),
            NEG_MEDIUM: (s <= -f_medium * S) & (s > -f_strong * S),
            NEG_STRONG: s <= -f_strong * S,
        }
    else:
        masks = {v: np.zeros(s.shape, dtype=bool) for v in (POS_STRONG, POS_MEDIUM, NEG_MEDIUM, NEG_STRONG)}
    for v, m in masks.items():
        lab[m] = v
        ranges[v] = [float(s[m].min()), float(s[m].max())] if m.any() else None
    if domain is not None:
        lab[domain_outline(domain) & (lab == 0)] = OUTLINE

    nominal = {
        POS_STRONG: f"[{_fmt(f_strong * S)}, {_fmt(max(S, f_strong * S))}]",
        POS_MEDIUM: f"[{_fmt(f_medium * S)}, {_fmt(f_strong * S)})",
        NEG_MEDIUM: f"({_fmt(-f_strong * S)}, {_fmt(-f_medium * S)}]",
        NEG_STRONG: f"[{_fmt(-max(S, f_strong * S))}, {_fmt(-f_strong * S)}]",
    }
    names = {f"{domain_name} outline": OUTLINE}
    for v in (POS_STRONG, POS_MEDIUM, NEG_MEDIUM, NEG_STRONG):
        names[f"{prefix}{SALIENCY_LAYOUT[v]} {nominal[v]}"] = v
    edges = {
        "scale": S,
        "scale_definition": "max |saliency| over the volume" if scale is None else "given",
        "fractions": {"strong": f_strong, "medium": f_medium},
        "bins": {
            SALIENCY_LAYOUT[v]: {
                "value": v,
                "nominal": nominal[v],
                "observed": ranges[v],
                "voxels": int(masks[v].sum()),
            }
            for v in (POS_STRONG, POS_MEDIUM, NEG_MEDIUM, NEG_STRONG)
        },
        "outline_voxels": int((lab == OUTLINE).sum()),
    }
    return lab, names, edges


def combine_signed_max(maps: Iterable[np.ndarray]) -> np.ndarray:
    """Per voxel the value of largest magnitude among ``maps`` (keeping its sign): one display map for several
    lesions' explanations."""
    out = None
    for m in maps:
        m = np.asarray(m, dtype=np.float32)
        if out is None:
            out = m.copy()
        else:
            take = np.abs(m) > np.abs(out)
            out[take] = m[take]
    if out is None:
        raise InputError("no maps to combine")
    return out


# ------------------------------------------------------------------------------------------------ segmentation
def instance_label_names(labels: np.ndarray, table: Sequence[Mapping] | None = None) -> dict[str, int]:
    """``{"lesion k (v mm3)": k}`` for every lesion id in ``labels`` (volumes from ``table`` when given)."""
    vols = {int(r["id"]): float(r.get("volume_mm3", float("nan"))) for r in (table or [])}
    ids = [int(i) for i in np.unique(np.asarray(labels)) if i != 0]
    out = {}
    for i in ids:
        v = vols.get(i)
        out[f"lesion {i} ({v:.1f} mm3)" if v is not None and math.isfinite(v) else f"lesion {i}"] = i
    return out


# ------------------------------------------------------------------------------------------------------ domains
def domain_from_label(label: np.ndarray, shape: Sequence[int], value: int | None = None) -> np.ndarray:
    """A domain from a label map uploaded by the client: its non-zero voxels, or those equal to ``value``."""
    arr = np.asarray(label)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if tuple(arr.shape) != tuple(shape):
        raise GeometryError(
            f"uploaded label has shape {tuple(arr.shape)} but the image has {tuple(shape)}; draw it on the study's FLAIR"
        )
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise InputError("uploaded label has NaN or infinite values")
    dom = (arr == value) if value is not None else (arr != 0)
    if not dom.any():
        what = f"no voxel with value {value}" if value is not None else "no non-zero voxel"
        raise EmptyDomainError(f"uploaded label has {what}: the domain to explain is empty")
    return dom


def _check_points(points, shape) -> list[tuple[int, int, int]]:
    if not isinstance(points, (list, tuple)) or not points:
        raise InputError("foreground must be a non-empty list of [i, j, k] voxel coordinates")
    out = []
    for p in points:
        if not isinstance(p, (list, tuple)) or len(p) != 3:
            raise InputError(f"foreground point {p!r}: expected [i, j, k] voxel coordinates")
        try:
            f = [float(c) for c in p]
        except (TypeError, ValueError) as exc:
            raise InputError(f"foreground point {p!r}: coordinates must be numbers") from exc
        if any(not math.isfinite(c) for c in f):
            raise InputError(f"foreground point {p!r}: coordinates must be finite")
        q = tuple(int(round(c)) for c in f)
        if any(c < 0 or c >= n for c, n in zip(q, shape)):
            raise InputError(f"foreground point {list(q)} is outside the image (shape {list(shape)})")
        out.append(q)
    return out


def ball(shape: Sequence[int], center: Sequence[int], radius_mm: float, affine: np.ndarray) -> np.ndarray:
    """Voxels whose centre is within ``radius_mm`` of ``center`` (voxel coordinates), with the grid's spacing."""
    sp = np.asarray(voxel_spacing(affine))
    r_vox = np.ceil(radius_mm / sp).astype(int)
    lo = [max(0, c - r) for c, r in zip(center, r_vox)]
    hi = [min(n, c + r + 1) for c, r, n in zip(center, r_vox, shape)]
    grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, center, sp))
    out = np.zeros(tuple(shape), dtype=bool)
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = d2 <= radius_mm ** 2 + 1e-9
    return out


def domain_from_points(
    points,
    shape: Sequence[int],
    affine: np.ndarray,
    radius_mm: float = 3.0,
    mode: str = "ball",
    flair: np.ndarray | None = None,
    grow_fraction: float = 0.8,
) -> np.ndarray:
    """A domain around foreground click points (voxel coordinates ``[i, j, k]`` in the image's own grid).

    * ``mode="ball"``: the union of balls of ``radius_mm`` around the points;
    * ``mode="grow"``: from each point, the 6-connected region of voxels whose FLAIR is at least
      ``grow_fraction`` x the FLAIR at the point (a hyperintense spot), kept inside the ball of ``radius_mm``
      (so it cannot leak into the whole white matter); the point itself is always in.
    """
    pts = _check_points(points, shape)
    if not (isinstance(radius_mm, (int, float)) and math.isfinite(radius_mm) and 0 < radius_mm <= 50):
        raise InputError(f"radius_mm must be a number in (0, 50], got {radius_mm!r}")
    if mode not in ("ball", "grow"):
        raise InputError(f"domain mode must be 'ball' or 'grow', got {mode!r}")
    dom = np.zeros(tuple(shape), dtype=bool)
    for p in pts:
        b = ball(shape, p, float(radius_mm), affine)
        if mode == "ball":
            dom |= b
            continue
        if flair is None:
            raise InputError("domain mode 'grow' needs the FLAIR")
        f = np.asarray(flair, dtype=np.float32)
        seed_val = float(f[p])
        cand = b & (f >= grow_fraction * seed_val if seed_val > 0 else f >= seed_val)
        cand[p] = True
        lab, _ = ndimage.label(cand, structure=ndimage.generate_binary_structure(3, 1))
        dom |= lab == lab[p]
    if not dom.any():
        raise EmptyDomainError("the domain built from the foreground points is empty")
    return dom


# ---------------------------------------------------------------------------------------------------- writing
def write_labelmap(path: str | Path, array: np.ndarray, affine: np.ndarray, dtype=None) -> Path:
    """Write a label map on the image's grid as NIfTI (``.nii``/``.nii.gz``) or NRRD (``.nrrd``, LPS space as
    Slicer and OHIF read it). ``dtype`` defaults to uint8 when the values fit, else uint16/int32."""
    path = Path(path)
    arr = np.asarray(array)
    if dtype is None:
        mx = int(arr.max()) if arr.size else 0
        dtype = np.uint8 if mx <= 255 else (np.uint16 if mx <= 65535 else np.int32)
    dtype = np.dtype(dtype)
    if arr.size and dtype.kind in "ui" and int(arr.max()) > np.iinfo(dtype).max:
        raise InputError(f"label values up to {int(arr.max())} do not fit in {dtype.name}")
    arr = arr.astype(dtype)
    name = path.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        from msxai.io import save_volume

        return save_volume(path, arr, affine)
    if name.endswith(".nrrd"):
        import SimpleITK as sitk

        A = np.asarray(affine, dtype=np.float64)
        lps = np.diag([-1.0, -1.0, 1.0]) @ A[:3, :3]
        spacing = np.sqrt((lps ** 2).sum(axis=0))
        direction = lps / spacing
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))  # sitk wants [Z, Y, X]
        img.SetSpacing([float(x) for x in spacing])
        img.SetOrigin([float(-A[0, 3]), float(-A[1, 3]), float(A[2, 3])])
        img.SetDirection([float(x) for x in direction.ravel()])
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(path), False)
        return path
    raise InputError(f"result extension of {path.name!r} not supported: use .nii.gz, .nii or .nrrd")


def read_labelmap(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a label map written by :func:`write_labelmap` (or uploaded by a client) as ``(array [X,Y,Z], RAS
    affine)``; NRRD/other ITK formats go through SimpleITK."""
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith(".nii") or name.endswith(".nii.gz"):
            import nibabel as nib

            img = nib.load(str(path))
            return np.asarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
        import SimpleITK as sitk

        img = sitk.ReadImage(str(path))
    except Exception as exc:
        raise InputError(f"cannot read label file {path.name} ({exc})") from exc
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim != 3:
        raise InputError(f"label file {path.name}: expected a 3-D label map, got shape {tuple(arr.shape)}")
    arr = arr.transpose(2, 1, 0)
    d = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    A = np.eye(4)
    A[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ (d * np.asarray(img.GetSpacing()))
    o = np.asarray(img.GetOrigin(), dtype=np.float64)
    A[:3, 3] = [-o[0], -o[1], o[2]]
    return arr, A
