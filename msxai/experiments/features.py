"""Per-lesion numbers read from instance saliency maps: peaks, masses, ring statistics and simple radiomics of the
map. They feed the experiments' tables and the saliency-based error flag (:mod:`msxai.experiments.error_flag`).

``maps`` is the instance SmoothGrad output ``[C, X, Y, Z]`` (channel 0 = FLAIR, 1 = MPRAGE/T1), ``domain`` the
lesion Ω (bool ``[X, Y, Z]``), ``prob`` the lesion probability, ``affine`` the voxel-to-world matrix.
"""

from __future__ import annotations

import numpy as np

from msxai import SEQUENCE_KEYS
from msxai.errors import GeometryError
from msxai.io import voxel_volume_mm3
from msxai.lesions import ring_mask

RING_MM = 3.0  # the ring around Ω: voxels within (0, 3] mm of the lesion
BAND_EDGES_MM = (0.0, 1.0, 2.0, 3.0, 5.0)


def _check(maps, domain):
    maps = np.asarray(maps)
    domain = np.asarray(domain, bool)
    if maps.ndim != 4 or maps.shape[1:] != domain.shape:
        raise GeometryError(f"saliency maps {maps.shape} and domain {domain.shape} are not on the same grid")
    return maps, domain


def _box(domain: np.ndarray, margin: int) -> tuple[slice, ...]:
    idx = np.argwhere(domain)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, domain.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def region_values(maps, domain, affine=None, ring_mm: float = RING_MM) -> dict:
    """Values of each map inside Ω and in the ring ``(0, ring_mm]`` around it: ``{seq: {"inside": v, "ring": v}}``
    (float64 1-D arrays, raster order)."""
    maps, domain = _check(maps, domain)
    from msxai.io import voxel_spacing

    sp = (1.0, 1.0, 1.0) if affine is None else voxel_spacing(affine)
    margin = int(np.ceil(ring_mm / min(sp))) + 2
    sl = _box(domain, margin)
    inside = domain[sl]
    ring = ring_mask(inside, affine, 0.0, ring_mm)
    out = {}
    for c, key in enumerate(SEQUENCE_KEYS[: maps.shape[0]]):
        m = maps[c][sl].astype(np.float64)
        out[key] = {"inside": m[inside], "ring": m[ring]}
    return out


def _radiomics(v: np.ndarray, prefix: str) -> dict:
    if v.size == 0:
        return {f"{prefix}_{k}": 0.0 for k in ("std", "skew", "kurt", "entropy", "pos_frac")}
    a = np.abs(v)
    hist, _ = np.histogram(a, bins=16, range=(0.0, float(a.max()) or 1.0))
    pk = hist[hist > 0] / hist.sum()
    std = float(v.std())
    flat = std <= 1e-9 * max(float(a.max()), 1e-30)  # (nearly) constant map: shape moments are undefined -> 0
    z = (v - v.mean()) / (std if not flat else 1.0)
    return {
        f"{prefix}_std": std,
        f"{prefix}_skew": float((z**3).mean()) if v.size > 2 and not flat else 0.0,
        f"{prefix}_kurt": float((z**4).mean() - 3.0) if v.size > 3 and not flat else 0.0,
        f"{prefix}_entropy": float(-(pk * np.log(pk)).sum()),
        f"{prefix}_pos_frac": float((v > 0).mean()),
    }


def saliency_features(maps, domain, prob=None, affine=None, ring_mm: float = RING_MM) -> dict:
    """A flat dict of per-lesion features (plain floats) from the instance maps of one lesion.

    Per sequence ``s`` (``flair``, ``mprage``): ``s_peak_max``/``s_peak_min`` (extremes inside Ω), ``s_mean_in``,
    ``s_mass_pos``/``s_mass_neg`` (sums of positive / negative values inside Ω times the voxel volume, mm^3 units),
    ``s_ring_mean``, ``s_ring_min``, ``s_ring_max``, ``s_ring_pos_frac``, ``s_abs_in_ring_ratio`` (mean |g| inside /
    mean |g| in the ring), the radiomics of the values inside Ω (``s_in_std``, ``_skew``, ``_kurt``, ``_entropy`` of
    the |g| histogram, ``_pos_frac``); and ``flair_share`` (FLAIR part of sum |g| over Ω and ring),
    ``log_volume_mm3``, with ``prob`` also ``mean_prob``/``max_prob`` in Ω.
    """
    maps, domain = _check(maps, domain)
    vox = 1.0 if affine is None else voxel_volume_mm3(affine)
    vals = region_values(maps, domain, affine, ring_mm)
    f: dict[str, float] = {"volume_mm3": float(domain.sum() * vox), "log_volume_mm3": float(np.log(domain.sum() * vox))}
    abs_tot = {}
    for key, r in vals.items():
        vin, vring = r["inside"], r["ring"]
        f[f"{key}_peak_max"] = float(vin.max())
        f[f"{key}_peak_min"] = float(vin.min())
        f[f"{key}_mean_in"] = float(vin.mean())
        f[f"{key}_mass_pos"] = float(vin[vin > 0].sum() * vox)
        f[f"{key}_mass_neg"] = float(vin[vin < 0].sum() * vox)
        f[f"{key}_ring_mean"] = float(vring.mean()) if vring.size else 0.0
        f[f"{key}_ring_min"] = float(vring.min()) if vring.size else 0.0
        f[f"{key}_ring_max"] = float(vring.max()) if vring.size else 0.0
        f[f"{key}_ring_pos_frac"] = float((vring > 0).mean()) if vring.size else 0.0
        ring_abs = float(np.abs(vring).mean()) if vring.size else 0.0
        f[f"{key}_abs_in_ring_ratio"] = float(np.abs(vin).mean() / ring_abs) if ring_abs > 0 else 0.0
        f.update(_radiomics(vin, f"{key}_in"))
        abs_tot[key] = float(np.abs(vin).sum() + np.abs(vring).sum())
    if len(abs_tot) == 2:
        tot = abs_tot["flair"] + abs_tot["mprage"]
        f["flair_share"] = abs_tot["flair"] / tot if tot > 0 else 0.5
    if prob is not None:
        p = np.asarray(prob)[domain]
        f["mean_prob"] = float(p.mean())
        f["max_prob"] = float(p.max())
    return f


def value_range(maps, domain) -> dict:
    """Min/max (and 1st/99th percentiles) of each map inside ``domain``."""
    maps, domain = _check(maps, domain)
    out = {}
    for c, key in enumerate(SEQUENCE_KEYS[: maps.shape[0]]):
        v = maps[c][domain]
        out.update({f"{key}_min": float(v.min()), f"{key}_max": float(v.max()),
                    f"{key}_p01": float(np.percentile(v, 1)), f"{key}_p99": float(np.percentile(v, 99))})
    return out
