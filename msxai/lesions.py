"""Lesion instances and their classes (Spagnolo et al., Sci Rep 2026).

* A *lesion* is an 18-connected component of the thresholded probability map (``prob > t``, ``t = 0.3``) whose
  volume is at least ``5 mm^3``; the volume is ``voxel count x voxel volume`` with the voxel volume taken from the
  affine (``|det A[:3, :3]|``), so anisotropic grids are handled (0.5x0.5x3 mm: 7 voxels = 5.25 mm^3 kept, 6 dropped).
* Instance ids are ``1..n`` and *stable*: components are numbered by the raster position of their first voxel,
  where "raster" is the C-order flattening of the ``[X, Y, Z]`` array (the last axis, Z, varies fastest). The same
  mask therefore always gets the same ids, whatever the labelling algorithm does internally.
* A predicted lesion is a TP when it has non-zero overlap with the truth, a FP otherwise; a true lesion with no
  overlap with any predicted lesion is a FN (and a "detected" lesion otherwise).
* TN regions are balls of ~93 mm^3 inside the brain that touch neither the truth nor the prediction.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from msxai import MIN_LESION_MM3, THRESHOLD
from msxai.errors import EmptyDomainError, GeometryError, InputError, UnknownLesionError
from msxai.io import voxel_spacing, voxel_volume_mm3

# scipy's structuring elements: rank-3 connectivity 1 = 6 faces, 2 = 18 (faces + edges), 3 = 26 (+ corners).
CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}
STRUCTURE_18 = ndimage.generate_binary_structure(3, 2)
TN_SPHERE_MM3 = 93.0
VOLUME_RTOL = 1e-9  # a component whose volume is within this relative distance below the minimum is kept
DISTANCE_TOL_MM = 1e-6  # distances within this of a ring's or ball's edge count as on the edge


def connectivity_structure(connectivity: int = 18) -> np.ndarray:
    """The 3x3x3 structuring element for 6-, 18- or 26-connectivity."""
    if connectivity not in CONNECTIVITY_RANK:
        raise InputError(f"connectivity must be one of 6, 18, 26, got {connectivity}")
    return ndimage.generate_binary_structure(3, CONNECTIVITY_RANK[connectivity])


def _check_3d(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 3:
        raise InputError(f"{name}: expected a 3-D [X, Y, Z] volume, got shape {tuple(array.shape)}")
    return array


def _check_finite(array: np.ndarray, name: str) -> None:
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise InputError(f"{name}: {bad} voxel(s) are NaN or infinite")


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise GeometryError(f"{name_a} and {name_b} are on different grids: shape {tuple(a.shape)} vs {tuple(b.shape)}")


def binarize(prob_or_mask: np.ndarray, threshold: float = THRESHOLD, name: str = "prediction") -> np.ndarray:
    """``prob > threshold`` as a bool volume; a bool input is returned as it is (the threshold is then unused)."""
    arr = _check_3d(prob_or_mask, name)
    if arr.dtype == bool:
        return arr
    _check_finite(arr, name)
    return arr > threshold


def relabel_by_raster_order(labels: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Renumber the non-zero labels of ``labels`` to ``1..n`` by the raster (C-order) position of their first voxel.

    ``keep`` (bool per old label value, indexed by the value) drops labels whose entry is False.
    """
    flat = labels.ravel()
    values, first = np.unique(flat, return_index=True)
    nonzero = values != 0
    values, first = values[nonzero], first[nonzero]
    if keep is not None:
        kept = keep[values]
        values, first = values[kept], first[kept]
    order = np.argsort(first, kind="stable")
    lut = np.zeros(int(flat.max()) + 1 if flat.size else 1, dtype=np.int32)
    lut[values[order]] = np.arange(1, len(values) + 1, dtype=np.int32)
    return lut[labels].astype(np.int32, copy=False)


def _min_voxels_kept(counts: np.ndarray, voxel_mm3: float, min_volume_mm3: float) -> np.ndarray:
    return counts * voxel_mm3 >= min_volume_mm3 * (1.0 - VOLUME_RTOL)


def lesion_instances(
    prob_or_mask: np.ndarray,
    threshold: float = THRESHOLD,
    min_volume_mm3: float = MIN_LESION_MM3,
    affine: np.ndarray | None = None,
    connectivity: int = 18,
) -> np.ndarray:
    """Lesion instance ids (``int32 [X, Y, Z]``, 0 = background, lesions ``1..n``) from a probability map or a mask.

    ``prob > threshold`` (a bool mask is taken as it is; for a 0/1 float mask any threshold in ``[0, 1)`` works),
    ``connectivity``-connected components (18 by default, the paper's), components below ``min_volume_mm3`` dropped
    (voxel volume from ``affine``; ``None`` = 1 mm^3 voxels), ids ordered by the raster position of each component's
    first voxel.
    """
    mask = binarize(prob_or_mask, threshold)
    if min_volume_mm3 < 0:
        raise InputError(f"min_volume_mm3 must be >= 0, got {min_volume_mm3}")
    voxel_mm3 = 1.0 if affine is None else voxel_volume_mm3(affine)
    labels, n = ndimage.label(mask, structure=connectivity_structure(connectivity))
    if n == 0:
        return labels.astype(np.int32)
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    keep = _min_voxels_kept(counts, voxel_mm3, min_volume_mm3)
    keep[0] = False
    return relabel_by_raster_order(labels, keep)


def instances_from_mask(
    mask: np.ndarray,
    affine: np.ndarray | None = None,
    min_volume_mm3: float = MIN_LESION_MM3,
    connectivity: int = 18,
) -> np.ndarray:
    """Lesion instances from a ground-truth label map, binary or instance-labelled.

    * binary (bool, or values in {0, 1}; a float mask with other values in [0, 1] is thresholded at 0.5):
      the 18-connected components, as for a prediction;
    * instance map (non-negative integers with a value above 1): each label value is one lesion as given (even if
      it is not connected); lesions below ``min_volume_mm3`` are dropped and the rest renumbered ``1..n`` by the
      raster position of their first voxel, like :func:`lesion_instances`.
    """
    arr = _check_3d(mask, "truth")
    if arr.dtype == bool:
        return lesion_instances(arr, affine=affine, min_volume_mm3=min_volume_mm3, connectivity=connectivity)
    _check_finite(arr, "truth")
    if arr.size and arr.min() < 0:
        raise InputError(f"truth: label map has negative values (min {arr.min()})")
    integral = arr.dtype.kind in "iub" or bool(np.all(arr == np.round(arr)))
    if not integral or arr.max(initial=0) <= 1:
        return lesion_instances(arr > 0.5 if not integral else arr > 0, affine=affine,
                                min_volume_mm3=min_volume_mm3, connectivity=connectivity)
    labels = arr.astype(np.int64)
    voxel_mm3 = 1.0 if affine is None else voxel_volume_mm3(affine)
    counts = np.bincount(labels.ravel())
    keep = _min_voxels_kept(counts, voxel_mm3, min_volume_mm3)
    keep[0] = False
    return relabel_by_raster_order(labels, keep)


def prediction_instances(
    pred: np.ndarray,
    affine: np.ndarray | None = None,
    threshold: float = THRESHOLD,
    min_volume_mm3: float = MIN_LESION_MM3,
) -> np.ndarray:
    """Lesion instances from whatever a segmentation tool wrote: a probability map in [0, 1] (thresholded at
    ``threshold``), a binary mask (bool or 0/1) or an instance label map (integers, some above 1).

    Anything else (negative values, non-integer values above 1 such as logits) is refused with an InputError.
    """
    arr = _check_3d(pred, "prediction")
    if arr.dtype == bool:
        return lesion_instances(arr, affine=affine, min_volume_mm3=min_volume_mm3)
    _check_finite(arr, "prediction")
    if arr.size == 0:
        raise InputError("prediction: the volume has no voxels")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0:
        raise InputError(
            f"prediction: values must be probabilities in [0, 1], a binary mask or an instance label map; "
            f"found negative values (min {lo:.4g}) - are these logits?"
        )
    if hi <= 1.0:
        return lesion_instances(arr, threshold=threshold, affine=affine, min_volume_mm3=min_volume_mm3)
    if arr.dtype.kind in "iu" or bool(np.all(arr == np.round(arr))):
        return instances_from_mask(arr, affine=affine, min_volume_mm3=min_volume_mm3)
    raise InputError(
        f"prediction: values must be probabilities in [0, 1], a binary mask or an instance label map; found "
        f"non-integer values up to {hi:.4g}"
    )


def as_label_map(labels: np.ndarray, name: str = "lesion labels") -> np.ndarray:
    """An instance map as a 3-D integer array (a float map must hold non-negative whole numbers)."""
    labels = _check_3d(labels, name)
    if labels.dtype.kind in "iu":
        return labels
    if labels.dtype == bool:
        return labels.astype(np.int32)
    _check_finite(labels, name)
    if labels.size and (labels.min() < 0 or not np.all(labels == np.round(labels))):
        raise InputError(f"{name}: an instance label map must hold non-negative whole numbers")
    return labels.astype(np.int32)


def lesion_ids(labels: np.ndarray) -> list[int]:
    """The lesion ids present in an instance map, sorted."""
    ids = np.unique(np.asarray(labels))
    return [int(i) for i in ids if i != 0]


def _ids_text(ids: list[int], limit: int = 30) -> str:
    if not ids:
        return "none (the map holds no lesion)"
    if len(ids) > limit:
        return ", ".join(map(str, ids[:limit])) + f", ... ({len(ids)} lesions)"
    return ", ".join(map(str, ids))


def lesion_domain(labels: np.ndarray, lesion_id: int) -> np.ndarray:
    """Bool mask of lesion ``lesion_id``; an id not in the map raises UnknownLesionError naming the valid ids."""
    labels = as_label_map(labels)
    try:
        lid = int(lesion_id)
    except (TypeError, ValueError):
        raise UnknownLesionError(f"lesion id must be an integer, got {lesion_id!r}") from None
    domain = labels == lid
    if lid == 0 or lid != lesion_id or not domain.any():
        raise UnknownLesionError(f"unknown lesion id {lesion_id!r}; valid ids: {_ids_text(lesion_ids(labels))}")
    return domain


def parse_lesion_ids(value) -> list[int] | str:
    """Which lesions to explain, as the CLI (``--lesion-id``) and the app (``lesion``) take it: ``"all"`` (any case)
    -> ``"all"``; an id (``3``, ``"3"``) or several (``[1, 3]``, ``"1,3"``, ``"1 3"``) -> the ids, integers >= 1 in
    the order given, repeats dropped. Anything else raises :class:`InputError` naming the value."""
    if isinstance(value, str):
        v = value.strip()
        if v.lower() == "all":
            return "all"
        parts = [p for p in re.split(r"[,\s]+", v) if p]
        if not parts:
            raise InputError("lesion must be an id, a list of ids or 'all', got an empty string")
        value = parts
    if isinstance(value, (int, float, np.integer)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise InputError(f"lesion must be an id, a list of ids or 'all', got {value!r}")
    ids: list[int] = []
    for v in value:
        try:
            f = float(v) if not isinstance(v, bool) else math.nan
        except (TypeError, ValueError):
            f = math.nan
        if not math.isfinite(f) or f != int(f) or not 1 <= f <= 2**31 - 1:
            raise InputError(f"lesion must be an id (integer >= 1), a list of ids or 'all', got {v!r}")
        if int(f) not in ids:
            ids.append(int(f))
    return ids


def check_domain(domain, name: str = "domain") -> np.ndarray:
    """``domain`` as a bool 3-D mask; InputError when it is not 3-D, EmptyDomainError when it holds no voxel."""
    m = np.asarray(domain).astype(bool)
    if m.ndim != 3:
        raise InputError(f"{name}: expected a 3-D mask, got shape {m.shape}")
    if not m.any():
        raise EmptyDomainError(f"{name}: the mask is empty")
    return m


def distance_mm(domain: np.ndarray, affine=None) -> np.ndarray:
    """Per voxel, the distance in mm from its centre to the centre of the nearest voxel of ``domain`` (0 inside):
    Euclidean through the voxel size of ``affine`` (1 mm isotropic when None), so anisotropic grids are handled."""
    m = check_domain(domain)
    spacing = (1.0, 1.0, 1.0) if affine is None else voxel_spacing(affine)
    return ndimage.distance_transform_edt(~m, sampling=spacing).astype(np.float64)


def ring_mask(domain: np.ndarray, affine=None, inner_mm: float = 0.0, outer_mm: float = 3.0,
              distance: np.ndarray | None = None) -> np.ndarray:
    """The ring around the lesion domain Ω: voxels outside ``domain`` whose distance to it lies in
    ``(inner_mm, outer_mm]`` (``inner_mm = 0``: the ring touching Ω).

    Both edges allow :data:`DISTANCE_TOL_MM`: a voxel exactly ``r`` mm away (2 voxels at 1 mm) is at ``r`` even when
    the voxel size read from a float affine is 1.0000001 mm, so it belongs to ``(.., r]`` and not to ``(r, ..]``.
    ``distance``: :func:`distance_mm` of ``domain`` when already computed (several rings from one transform)."""
    if outer_mm <= inner_mm or inner_mm < 0:
        raise InputError(f"ring: need 0 <= inner < outer, got inner={inner_mm}, outer={outer_mm}")
    d = distance_mm(domain, affine) if distance is None else np.asarray(distance)
    return (d > inner_mm + DISTANCE_TOL_MM) & (d <= outer_mm + DISTANCE_TOL_MM)


def _world(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    return points @ affine[:3, :3].T + affine[:3, 3]


def lesion_table(
    labels: np.ndarray,
    affine: np.ndarray | None = None,
    prob: np.ndarray | None = None,
    truth: np.ndarray | None = None,
) -> list[dict]:
    """One row per lesion (JSON-serialisable plain python values), in id order.

    Keys: ``id``, ``voxels``, ``volume_mm3``, ``centroid_vox`` (3 floats), ``centroid_mm`` (world coordinates of the
    centroid through ``affine``), ``bbox_min``/``bbox_max`` (inclusive voxel indices); with ``prob``:
    ``mean_probability``, ``max_probability``; with ``truth`` (any mask/label map, non-zero = lesion):
    ``class`` ("TP" when the lesion overlaps the truth, "FP" otherwise) and ``overlap_voxels``.
    """
    labels = as_label_map(labels)
    if affine is None:
        affine = np.eye(4)
    ids = np.array(lesion_ids(labels), dtype=np.int64)
    if prob is not None:
        prob = _check_3d(prob, "probability")
        _check_same_shape(labels, prob, "lesion labels", "probability")
        _check_finite(prob, "probability")
    if truth is not None:
        truth = _check_3d(truth, "truth")
        _check_same_shape(labels, truth, "lesion labels", "truth")
    if len(ids) == 0:
        return []
    voxel_mm3 = voxel_volume_mm3(affine)
    slices = ndimage.find_objects(labels.astype(np.int32, copy=False))
    rows = []
    for lid in ids:
        sl = slices[lid - 1]
        domain = labels[sl] == lid
        idx = np.argwhere(domain)
        centroid = idx.mean(axis=0) + np.array([s.start for s in sl], dtype=np.float64)
        count = int(idx.shape[0])
        row = {
            "id": int(lid),
            "voxels": count,
            "volume_mm3": float(count * voxel_mm3),
            "centroid_vox": [float(c) for c in centroid],
            "centroid_mm": [float(c) for c in _world(affine, centroid[None])[0]],
            "bbox_min": [int(s.start) for s in sl],
            "bbox_max": [int(s.stop - 1) for s in sl],
        }
        if prob is not None:
            values = np.asarray(prob[sl][domain], dtype=np.float64)
            row["mean_probability"] = float(values.mean())
            row["max_probability"] = float(values.max())
        if truth is not None:
            ov = int(np.count_nonzero(np.asarray(truth[sl])[domain]))
            row["class"] = "TP" if ov > 0 else "FP"
            row["overlap_voxels"] = ov
        rows.append(row)
    return rows


def _flatten_row(row: dict) -> dict:
    flat = {}
    for key, value in row.items():
        if isinstance(value, (list, tuple)):
            for axis, v in zip("xyz", value):
                flat[f"{key}_{axis}"] = v
        else:
            flat[key] = value
    return flat


def write_lesion_table(rows: list[dict], path_json: str | Path, path_csv: str | Path | None = None) -> None:
    """Write the rows as a JSON list and, when ``path_csv`` is given, as CSV (list columns split into _x/_y/_z)."""
    path_json = Path(path_json)
    path_json.parent.mkdir(parents=True, exist_ok=True)
    path_json.write_text(json.dumps(rows, indent=2) + "\n")
    if path_csv is not None:
        path_csv = Path(path_csv)
        path_csv.parent.mkdir(parents=True, exist_ok=True)
        flat = [_flatten_row(r) for r in rows]
        columns: list[str] = []
        for r in flat:
            columns += [c for c in r if c not in columns]
        if not columns:
            columns = ["id", "voxels", "volume_mm3"]
        with path_csv.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(flat)


def format_lesion_table(rows: list[dict]) -> str:
    """A fixed-width text table of the rows (for the CLI)."""
    if not rows:
        return "no lesions"
    header = ["id", "voxels", "vol_mm3", "centroid_vox (x, y, z)"]
    has_prob = "mean_probability" in rows[0]
    has_class = "class" in rows[0]
    if has_prob:
        header += ["mean_p", "max_p"]
    if has_class:
        header += ["class"]
    lines = []
    for r in rows:
        cells = [str(r["id"]), str(r["voxels"]), f"{r['volume_mm3']:.1f}",
                 "(" + ", ".join(f"{c:.1f}" for c in r["centroid_vox"]) + ")"]
        if has_prob:
            cells += [f"{r['mean_probability']:.3f}", f"{r['max_probability']:.3f}"]
        if has_class:
            cells += [r["class"]]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in lines]
    return "\n".join(out)


@dataclass
class LesionClasses:
    """Lesion-wise classes of a prediction against the truth (ids are sorted lists of ints).

    ``tp``/``fp``: predicted lesion ids with non-zero / zero overlap with the truth; ``fn``: truth ids that no
    predicted lesion overlaps; ``detected``: truth ids that some predicted lesion overlaps; ``pairs``: the
    overlapping (predicted id, truth id) pairs.
    """

    tp: list[int]
    fp: list[int]
    fn: list[int]
    detected: list[int]
    pairs: list[tuple[int, int]] = field(default_factory=list)


def classify_lesions(pred_labels: np.ndarray, truth_labels: np.ndarray) -> LesionClasses:
    """TP/FP predicted lesions and FN/detected true lesions from two instance maps on the same grid."""
    pred = as_label_map(pred_labels, "predicted lesions")
    truth = as_label_map(truth_labels, "true lesions")
    _check_same_shape(pred, truth, "predicted lesions", "true lesions")
    both = (pred > 0) & (truth > 0)
    pairs = np.unique(np.stack([pred[both].astype(np.int64), truth[both].astype(np.int64)], axis=1), axis=0)
    pairs = pairs.reshape(-1, 2)
    tp = sorted({int(p) for p in pairs[:, 0]})
    detected = sorted({int(t) for t in pairs[:, 1]})
    tp_set, det_set = set(tp), set(detected)
    return LesionClasses(
        tp=tp,
        fp=[i for i in lesion_ids(pred) if i not in tp_set],
        fn=[i for i in lesion_ids(truth) if i not in det_set],
        detected=detected,
        pairs=[(int(a), int(b)) for a, b in pairs],
    )


def tn_sphere_radius_mm(volume_mm3: float = TN_SPHERE_MM3) -> float:
    """Radius of a ball of ``volume_mm3``: ``(3 V / 4 pi)^(1/3)`` (93 mm^3 -> 2.81 mm)."""
    return float((3.0 * volume_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0))


def ball_structure(radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Bool kernel of the voxels whose centres lie within ``radius_mm`` (in mm, through ``spacing``) of the centre
    voxel; odd-sized along every axis, centred."""
    half = [int(math.floor(radius_mm / s + 1e-9)) for s in spacing]
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    return (grids[0] ** 2 + grids[1] ** 2 + grids[2] ** 2) <= radius_mm**2 + 1e-9


def sample_tn_spheres(
    brain_mask: np.ndarray,
    truth_mask: np.ndarray,
    pred_mask: np.ndarray,
    affine: np.ndarray | None = None,
    n: int = 10,
    volume_mm3: float = TN_SPHERE_MM3,
    seed: int = 0,
    max_tries: int = 10000,
) -> list[np.ndarray]:
    """``n`` random true-negative balls (bool masks) of about ``volume_mm3`` each.

    The three masks count their non-zero voxels as foreground (pass ``prob > t``, not a probability map). At 1 mm
    the voxelised 93 mm^3 ball (radius 2.81 mm) holds 81 voxels.

    Each ball (the voxels within radius ``(3V/4pi)^(1/3)`` mm of its centre, in mm through the voxel size) lies fully
    inside ``brain_mask``, touches neither ``truth_mask`` nor ``pred_mask`` (these are dilated by one voxel, 26-
    neighbourhood, so a ball is not even adjacent to a lesion) and does not overlap the other balls. Centres are
    drawn with ``numpy.random.default_rng(seed)`` from the voxels where a ball fits; after ``max_tries`` draws, or
    when no ball fits at all, an EmptyDomainError says how many could be placed.
    """
    brain = _check_3d(brain_mask, "brain mask") > 0
    truth = _check_3d(truth_mask, "truth mask") > 0
    pred = _check_3d(pred_mask, "prediction mask") > 0
    _check_same_shape(brain, truth, "brain mask", "truth mask")
    _check_same_shape(brain, pred, "brain mask", "prediction mask")
    if n < 0:
        raise InputError(f"number of TN spheres must be >= 0, got {n}")
    if n == 0:
        return []
    spacing = (1.0, 1.0, 1.0) if affine is None else voxel_spacing(affine)
    ball = ball_structure(tn_sphere_radius_mm(volume_mm3), spacing)
    lesions = ndimage.binary_dilation(truth | pred, structure=np.ones((3, 3, 3), bool))
    allowed = brain & ~lesions
    # centres where the whole ball lies in `allowed` (outside the array counts as not allowed)
    centres = ndimage.binary_erosion(allowed, structure=ball, border_value=0)
    candidates = np.flatnonzero(centres)
    if candidates.size == 0:
        raise EmptyDomainError(
            f"no TN sphere of {volume_mm3:g} mm^3 fits inside the brain away from the truth and the prediction "
            f"(brain mask {int(brain.sum())} voxels, {int(allowed.sum())} of them lesion-free)"
        )
    rng = np.random.default_rng(seed)
    half = np.array(ball.shape) // 2
    occupied = np.zeros(brain.shape, dtype=bool)
    spheres: list[np.ndarray] = []
    for _ in range(max_tries):
        if len(spheres) == n:
            break
        centre = np.array(np.unravel_index(int(candidates[rng.integers(candidates.size)]), brain.shape))
        lo = centre - half
        sl = tuple(slice(int(a), int(a) + s) for a, s in zip(lo, ball.shape))
        if np.any(occupied[sl] & ball):
            continue
        sphere = np.zeros(brain.shape, dtype=bool)
        sphere[sl] = ball
        occupied |= sphere
        spheres.append(sphere)
    if len(spheres) < n:
        raise EmptyDomainError(
            f"only {len(spheres)} of {n} non-overlapping TN spheres of {volume_mm3:g} mm^3 could be placed inside the "
            f"brain away from the truth and the prediction after {max_tries} tries"
        )
    return spheres
