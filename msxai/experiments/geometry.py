"""Geometric operations of the experiments: dilation in mm, lesion transplants and the context-restoration images
of the context-dilation experiment.

Distances and rings around a lesion are :func:`msxai.lesions.distance_mm` and :func:`msxai.lesions.ring_mask`
(centre-to-centre Euclidean distances in mm through the voxel size of the affine; anisotropic grids are handled); the
tests compare them with a brute-force loop over voxel pairs.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from msxai.errors import GeometryError, InputError
from msxai.lesions import DISTANCE_TOL_MM, check_domain, distance_mm


def dilate_mm(domain: np.ndarray, affine=None, radius_mm: float = 3.0) -> np.ndarray:
    """``domain`` plus every voxel within ``radius_mm`` of it."""
    d = distance_mm(domain, affine)
    return d <= radius_mm + DISTANCE_TOL_MM


def centre_of_mass_voxel(domain: np.ndarray) -> tuple[int, int, int]:
    """The voxel of ``domain`` nearest to its centre of mass (the centre of mass itself may lie outside a
    non-convex lesion); ties go to the first voxel in raster order."""
    m = check_domain(domain)
    idx = np.argwhere(m)
    com = idx.mean(axis=0)
    k = int(np.argmin(((idx - com) ** 2).sum(axis=1)))
    return tuple(int(v) for v in idx[k])


def shift_mask(mask: np.ndarray, offset) -> np.ndarray:
    """``mask`` moved by the integer voxel ``offset``; raises GeometryError when part of it would leave the grid."""
    m = np.asarray(mask, dtype=bool)
    off = np.asarray(offset, dtype=int)
    idx = np.argwhere(m) + off
    if idx.size and (idx.min() < 0 or np.any(idx.max(axis=0) >= np.array(m.shape))):
        raise GeometryError(f"shifting the mask by {tuple(off)} moves it outside the grid {m.shape}")
    out = np.zeros_like(m)
    out[tuple(idx.T)] = True
    return out


def transplant(image: np.ndarray, patch: np.ndarray, offset) -> tuple[np.ndarray, np.ndarray]:
    """Copy the voxels of ``patch`` (all channels of ``image [C, X, Y, Z]``) to ``patch + offset``.

    Returns ``(new_image, moved_patch)``; voxels outside the moved patch keep their values (the source location is
    left as it is). Raises GeometryError when the moved patch leaves the grid.
    """
    img = np.asarray(image)
    if img.ndim != 4:
        raise InputError(f"transplant: expected a [C, X, Y, Z] image, got shape {img.shape}")
    p = check_domain(patch, "patch")
    if p.shape != img.shape[1:]:
        raise GeometryError(f"patch shape {p.shape} does not match the image grid {img.shape[1:]}")
    src = np.argwhere(p)
    dst = src + np.asarray(offset, dtype=int)
    moved = shift_mask(p, offset)
    out = img.copy()
    out[(slice(None), *dst.T)] = img[(slice(None), *src.T)]
    return out, moved


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


def find_target(patch: np.ndarray, allowed: np.ndarray, score: np.ndarray | None = None,
                quantile: float = 0.0, prefer_near=None) -> tuple[int, int, int] | None:
    """An integer offset moving ``patch`` so that it lies fully inside ``allowed``.

    Among the offsets that fit, those whose ``score`` (evaluated at the moved patch's anchor voxel, see below) is at
    least the ``quantile`` of the fitting scores are kept and the one whose moved centroid is nearest to
    ``prefer_near`` (a voxel position; default: the patch's own centroid) is returned; ``None`` when nothing fits.
    The anchor is the first voxel of the patch's bounding box; ``score`` should be a map of the target
    neighbourhood quality (e.g. a local mean intensity).
    """
    p = check_domain(patch, "patch")
    allowed = np.asarray(allowed, dtype=bool)
    sl = ndimage.find_objects(p.astype(np.int8))[0]
    fp = p[sl]
    anchor = np.array([s.start for s in sl])
    fits = _corner_fits(allowed, fp)  # fits[a]: fp placed with its box corner at a lies inside `allowed`
    corners = np.argwhere(fits)
    if corners.size == 0:
        return None
    if score is not None and quantile > 0:
        vals = np.asarray(score)[tuple((corners + np.array(fp.shape) // 2).T.clip(0))]
        keep = vals >= np.quantile(vals, quantile)
        corners = corners[keep]
    centre_offset = _centroid(fp)
    target_centres = corners + centre_offset
    near = _centroid(p) if prefer_near is None else np.asarray(prefer_near, dtype=float)
    k = int(np.argmin(((target_centres - near) ** 2).sum(axis=1)))
    return tuple(int(v) for v in corners[k] - anchor)


def _corner_fits(allowed: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """``fits[a]``: the footprint ``fp`` with its box corner at voxel ``a`` lies inside ``allowed`` (and the grid).

    Counts the footprint voxels that fall on not-allowed voxels (outside the grid counts as not allowed) with an FFT
    correlation; a count below 0.5 (FFT round-off) means none."""
    from scipy.signal import fftconvolve

    bad = (~np.asarray(allowed, bool)).astype(np.float32)
    pad = [(0, int(s) - 1) for s in fp.shape]
    badp = np.pad(bad, pad, constant_values=1.0)
    kernel = fp[::-1, ::-1, ::-1].astype(np.float32)
    cnt = fftconvolve(badp, kernel, mode="valid")  # cnt[a] = sum_k fp[k] * badp[a + k]
    return cnt < 0.5


def background_value(image: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
    """Per channel, the value of the image background: the median of the voxels outside ``brain_mask`` (the minimum
    of the channel when the brain fills the grid)."""
    img = np.asarray(image)
    out = np.empty(img.shape[0], dtype=np.float64)
    outside = ~np.asarray(brain_mask, dtype=bool)
    for c in range(img.shape[0]):
        out[c] = float(np.median(img[c][outside])) if outside.any() else float(img[c].min())
    return out


def context_image(image: np.ndarray, distance: np.ndarray, radius_mm: float, background: np.ndarray) -> np.ndarray:
    """The image with every voxel farther than ``radius_mm`` from the lesion set to the background value
    (``distance`` = :func:`distance_mm` of the lesion; ``radius_mm = 0`` keeps the lesion only)."""
    img = np.asarray(image)
    keep = np.asarray(distance) <= radius_mm + DISTANCE_TOL_MM
    bg = np.asarray(background, dtype=img.dtype).reshape(-1, 1, 1, 1)
    return np.where(keep[None], img, bg).astype(img.dtype, copy=False)


def radii(max_mm: float = 35.0, step_mm: float = 1.0) -> list[float]:
    """``0, step, 2 step, ..., max`` (the context-dilation steps)."""
    n = int(math.floor(max_mm / step_mm + 1e-9))
    return [round(i * step_mm, 6) for i in range(n + 1)]
