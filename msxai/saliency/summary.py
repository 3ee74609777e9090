"""Per-lesion quantitative summary of saliency maps (JSON-serialisable).

For every map (one per input sequence for SmoothGrad, one for Grad-CAM++):

* ``peak_max`` / ``peak_min``: the largest / smallest value over the whole map;
* ``peak_max_in_domain`` / ``peak_min_in_domain``: the same inside the domain Ω;
* ``positive_mass_in_domain``: Σ_{v∈Ω} max(M(v), 0); ``negative_mass_in_domain``: Σ_{v∈Ω} min(M(v), 0);
* ``rings``: for consecutive radii ``r_i < r_{i+1}`` of ``ring_mm`` the voxels outside Ω whose distance to Ω (centre to
  centre, Euclidean, in mm from the voxel size) lies in ``(r_i, r_{i+1}]`` (:func:`msxai.lesions.ring_mask`, whose
  edges allow 1e-6 mm for voxel sizes read from float affines), with their count, negative mass Σ min(M, 0) and
  positive mass Σ max(M, 0).

Masses are plain sums of voxel values (multiply by ``voxel_volume_mm3`` for an integral over mm³).
Also: the domain's voxel count and volume, its centroid (voxel and world coordinates) and, with ``prob``, the mean
lesion softmax inside Ω.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from msxai import SEQUENCES
from msxai.errors import EmptyDomainError, GeometryError
from msxai.io import voxel_volume_mm3
from msxai.lesions import distance_mm, ring_mask


def _named_maps(maps, names: Sequence[str] | None) -> dict[str, np.ndarray]:
    if isinstance(maps, Mapping):
        return {str(k): np.asarray(v, dtype=np.float64) for k, v in maps.items()}
    arr = np.asarray(maps, dtype=np.float64)
    if arr.ndim == 3:
        return {(names or ["map"])[0]: arr}
    if arr.ndim != 4:
        raise GeometryError(f"saliency maps must be [X, Y, Z] or [C, X, Y, Z], got shape {arr.shape}")
    if names is None:
        names = list(SEQUENCES) if arr.shape[0] == len(SEQUENCES) else [f"channel{c}" for c in range(arr.shape[0])]
    if len(names) != arr.shape[0]:
        raise ValueError(f"{len(names)} names for {arr.shape[0]} maps")
    return {n: arr[c] for c, n in enumerate(names)}


def ring_bands(domain: np.ndarray, affine, ring_mm: Sequence[float]) -> list[tuple[float, float, np.ndarray]]:
    """``[(r_i, r_{i+1}, mask)]``: the rings (:func:`msxai.lesions.ring_mask`) of voxels outside Ω at a distance in
    ``(r_i, r_{i+1}]`` mm from Ω."""
    radii = [float(r) for r in ring_mm]
    if any(b <= a for a, b in zip(radii, radii[1:])):
        raise ValueError(f"ring_mm must increase, got {ring_mm}")
    dist = distance_mm(domain, affine)
    return [(a, b, ring_mask(domain, affine, a, b, distance=dist)) for a, b in zip(radii, radii[1:])]


def lesion_summary(maps, domain, prob=None, affine=None, ring_mm: Sequence[float] = (0, 2, 4, 6),
                   names: Sequence[str] | None = None) -> dict:
    """Summary of saliency ``maps`` ([C, X, Y, Z] with SEQUENCES names, [X, Y, Z], or a dict name -> [X, Y, Z]) for
    the domain Ω (bool [X, Y, Z]); ``prob``: lesion softmax [X, Y, Z]; ``affine``: voxel size/world coordinates
    (1 mm isotropic, identity when None)."""
    dom = np.asarray(domain).astype(bool)
    named = _named_maps(maps, names)
    for n, m in named.items():
        if m.shape != dom.shape:
            raise GeometryError(f"saliency map {n!r} has shape {m.shape}, the domain {dom.shape}")
    if not dom.any():
        raise EmptyDomainError("the domain is empty (no voxel)")
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    bands = ring_bands(dom, aff, ring_mm)
    idx = np.argwhere(dom)
    centroid = idx.mean(axis=0)
    world = aff[:3, :3] @ centroid + aff[:3, 3]
    out: dict = {
        "domain_voxels": int(dom.sum()),
        "domain_volume_mm3": float(dom.sum() * voxel_volume_mm3(aff)),
        "voxel_volume_mm3": float(voxel_volume_mm3(aff)),
        "centroid_voxel": [float(c) for c in centroid],
        "centroid_world_mm": [float(c) for c in world],
        "mean_probability": None,
        "ring_mm": [float(r) for r in ring_mm],
        "maps": {},
    }
    if prob is not None:
        p = np.asarray(prob, dtype=np.float64)
        if p.shape != dom.shape:
            raise GeometryError(f"probability map shape {p.shape} does not match the domain {dom.shape}")
        out["mean_probability"] = float(p[dom].mean())
    for name, m in named.items():
        inside = m[dom]
        rings = []
        for a, b, band in bands:
            vals = m[band]
            rings.append({
                "from_mm": a,
                "to_mm": b,
                "voxels": int(band.sum()),
                "negative_mass": float(np.minimum(vals, 0).sum()),
                "positive_mass": float(np.maximum(vals, 0).sum()),
            })
        out["maps"][name] = {
            "peak_max": float(m.max()),
            "peak_min": float(m.min()),
            "peak_max_in_domain": float(inside.max()),
            "peak_min_in_domain": float(inside.min()),
            "positive_mass_in_domain": float(np.maximum(inside, 0).sum()),
            "negative_mass_in_domain": float(np.minimum(inside, 0).sum()),
            "rings": rings,
        }
    return out


def summary_rows(name: str, summary: dict) -> list[dict]:
    """Flat CSV rows (one per map) of a :func:`lesion_summary` result (with the error score columns when the
    summary holds them: ``error_score``, ``error_flag``, ``error_flag_reason``, empty for null)."""
    rows = []
    for map_name, s in summary["maps"].items():
        row = {
            "domain": name,
            "map": map_name,
            "domain_voxels": summary["domain_voxels"],
            "domain_volume_mm3": summary["domain_volume_mm3"],
            "mean_probability": "" if summary["mean_probability"] is None else summary["mean_probability"],
        }
        for key in ("peak_max", "peak_min", "peak_max_in_domain", "peak_min_in_domain", "positive_mass_in_domain",
                    "negative_mass_in_domain"):
            row[key] = s[key]
        for ring in s["rings"]:
            tag = f"{ring['from_mm']:g}_{ring['to_mm']:g}mm"
            row[f"ring_{tag}_voxels"] = ring["voxels"]
            row[f"ring_{tag}_negative_mass"] = ring["negative_mass"]
            row[f"ring_{tag}_positive_mass"] = ring["positive_mass"]
        for key in ("error_score", "error_flag", "error_flag_reason"):
            if key in summary:
                row[key] = "" if summary[key] is None else summary[key]
        rows.append(row)
    return rows
