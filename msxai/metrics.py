"""Segmentation metrics: voxel-wise Dice and normalised Dice (nDSC), lesion-wise TPR/FNR/FDR/precision/F1.

Conventions for empty cases (so every metric is a finite number that JSON can hold):

* ``dice``: both masks empty -> 1.0.
* ``ndsc``: both empty -> 1.0 (as in the Shifts code); truth empty but prediction not -> 0.0 (the Shifts formula
  gives 0/0 = NaN there because k = 0; every predicted voxel is then a false positive, so 0 is the honest score).
* lesion-wise, with vacuous truths: no true lesion -> TPR 1, FNR 0; no predicted lesion -> FDR 0, precision 1;
  F1 = 2 P R / (P + R) with F1 = 0 when P + R = 0. Hence both empty -> everything perfect; a prediction with no truth
  -> precision 0, FDR 1, F1 0; no prediction with some truth -> TPR 0, FNR 1, F1 0.
"""

from __future__ import annotations

import numpy as np

from msxai import MIN_LESION_MM3, THRESHOLD
from msxai.errors import GeometryError, InputError
from msxai.lesions import (
    as_label_map,
    classify_lesions,
    instances_from_mask,
    lesion_ids,
    prediction_instances,
)

NDSC_R = 0.001  # the reference lesion load of Raina et al. 2023 (0.1 % of the volume)

LESION_KEYS = ("n_pred", "n_truth", "tp", "fp", "fn", "detected", "TPR", "FNR", "FDR", "precision", "F1")


def _binary_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise GeometryError(f"prediction and truth are on different grids: shape {pred.shape} vs {truth.shape}")
    for arr, name in ((pred, "prediction"), (truth, "truth")):
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise InputError(f"{name}: {int(arr.size - np.isfinite(arr).sum())} voxel(s) are NaN or infinite")
    return pred > 0, truth > 0


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice similarity ``2 |P & T| / (|P| + |T|)`` of two masks (non-zero = foreground); both empty -> 1.0."""
    p, t = _binary_pair(pred, truth)
    sp, st = int(p.sum()), int(t.sum())
    if sp + st == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & t)) / (sp + st)


def ndsc(pred: np.ndarray, truth: np.ndarray, r: float = NDSC_R) -> float:
    """Normalised Dice (Raina et al. 2023), as in the Shifts challenge code.

    ``k = (1 - r) |T| / (r (N - |T|))`` with ``N`` the number of voxels; ``nDSC = 2 tp / (k fp + 2 tp + fn)``.
    It is the Dice the segmentation would have if the truth occupied the fraction ``r`` of the volume.
    """
    p, t = _binary_pair(pred, truth)
    n_vox = p.size
    st, sp = int(t.sum()), int(p.sum())
    if st + sp == 0:
        return 1.0
    if st == 0:
        return 0.0
    tp = int(np.count_nonzero(p & t))
    fp = sp - tp
    fn = st - tp
    k = (1.0 - r) * st / (r * (n_vox - st)) if n_vox > st else 0.0  # N == |T| leaves no room for a fp
    return 2.0 * tp / (k * fp + 2.0 * tp + fn)


def _ratio(num: int, den: int, empty: float) -> float:
    return float(num) / den if den else float(empty)


def lesion_metrics(pred_labels: np.ndarray, truth_labels: np.ndarray) -> dict:
    """Lesion-wise detection metrics of two instance maps (see the module notes for the empty cases).

    ``tp``/``fp``: predicted lesions with / without overlap with the truth; ``fn``: true lesions with no overlap;
    ``detected``: true lesions overlapped; TPR = detected / n_truth, FNR = fn / n_truth, FDR = fp / n_pred,
    precision = tp / n_pred, F1 = harmonic mean of precision and TPR.
    """
    pred = as_label_map(pred_labels, "predicted lesions")
    truth = as_label_map(truth_labels, "true lesions")
    classes = classify_lesions(pred, truth)
    n_pred, n_truth = len(lesion_ids(pred)), len(lesion_ids(truth))
    tp, fp, fn, det = len(classes.tp), len(classes.fp), len(classes.fn), len(classes.detected)
    tpr = _ratio(det, n_truth, 1.0)
    precision = _ratio(tp, n_pred, 1.0)
    f1 = 2.0 * precision * tpr / (precision + tpr) if precision + tpr > 0 else 0.0
    return {
        "n_pred": n_pred,
        "n_truth": n_truth,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "detected": det,
        "TPR": tpr,
        "FNR": _ratio(fn, n_truth, 0.0),
        "FDR": _ratio(fp, n_pred, 0.0),
        "precision": precision,
        "F1": f1,
    }


def evaluate_case(
    pred_labels_or_mask: np.ndarray,
    truth: np.ndarray,
    affine: np.ndarray | None = None,
    threshold: float = THRESHOLD,
    min_volume_mm3: float = MIN_LESION_MM3,
) -> dict:
    """All metrics of one case, with the conventions of the literature (Shifts, MSSEG, Raina et al. 2023):

    * the prediction may be a probability map (thresholded at ``threshold``), a binary mask or an instance map; its
      lesions are the 18-connected components of at least ``min_volume_mm3``
      (:func:`msxai.lesions.prediction_instances`) - what the tool outputs;
    * voxel metrics (``dice``, ``ndsc``, ``voxels_truth``) compare those kept lesions with the truth **as given**
      (every non-zero truth voxel, small components included), so a tool is not credited for voxels the
      annotators marked and it dropped;
    * lesion-wise metrics (TPR/FDR/FNR/precision/F1) keep the ``min_volume_mm3`` rule on **both** sides: true
      lesions are the truth's 18-connected components of at least ``min_volume_mm3``
      (:func:`msxai.lesions.instances_from_mask`).

    A truth compared with itself therefore scores lesion F1 1 and voxel Dice 1 exactly when the truth holds no
    component below ``min_volume_mm3`` (the prediction side drops them)."""
    pred = np.asarray(pred_labels_or_mask)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise GeometryError(
            f"prediction and truth are on different grids: shape {tuple(pred.shape)} vs {tuple(truth.shape)}"
        )
    pred_inst = prediction_instances(pred, affine=affine, threshold=threshold, min_volume_mm3=min_volume_mm3)
    truth_inst = instances_from_mask(truth, affine=affine, min_volume_mm3=min_volume_mm3)
    truth_mask = truth_as_given(truth, affine)
    pred_mask = pred_inst > 0
    out = {
        "dice": dice(pred_mask, truth_mask),
        "ndsc": ndsc(pred_mask, truth_mask),
        "voxels_pred": int(pred_mask.sum()),
        "voxels_truth": int(truth_mask.sum()),
    }
    out.update(lesion_metrics(pred_inst, truth_inst))
    return out


def truth_as_given(truth: np.ndarray, affine: np.ndarray | None = None) -> np.ndarray:
    """Bool mask of every truth voxel (no size rule): non-zero voxels of a binary or instance map, ``> 0.5`` of a
    soft mask (the binarisation of :func:`msxai.lesions.instances_from_mask`)."""
    return instances_from_mask(truth, affine=affine, min_volume_mm3=0.0) > 0


# ---------------------------------------------------------------------------------------------- region scoring
def _centroids(labels: np.ndarray) -> np.ndarray:
    """``[n, 3]`` voxel centroids of instances 1..n (n = max label)."""
    from scipy import ndimage

    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return np.zeros((0, 3))
    return np.asarray(ndimage.center_of_mass(np.ones(labels.shape), labels, np.arange(1, n + 1)), dtype=float)


def _in_region(centroids: np.ndarray, region: np.ndarray) -> np.ndarray:
    idx = np.clip(np.rint(centroids).astype(np.int64), 0, np.array(region.shape) - 1)
    return region[tuple(idx.T)] if len(idx) else np.zeros(0, bool)


def region_units(
    pred_labels_or_mask: np.ndarray,
    truth: np.ndarray,
    region: np.ndarray,
    affine: np.ndarray | None = None,
    threshold: float = THRESHOLD,
    min_volume_mm3: float = MIN_LESION_MM3,
) -> dict:
    """The bookkeeping of :func:`evaluate_region`: the case cut into independent *units* for the bootstrap.

    Lesions are found on the whole image (prediction: kept components; truth: components >= ``min_volume_mm3``);
    a lesion belongs to the region when its centroid (rounded to a voxel) lies in ``region``. Voxel counts are
    taken inside ``region`` only (prediction: kept lesions; truth: as given). A unit is one 18-connected component
    of (kept prediction | truth as given); per unit: ``tp``/``fp``/``fn`` voxels in the region, the region's
    predicted lesions in it (``n_pred``, of which ``tp_lesions`` overlap a true lesion of any size >= the rule)
    and the region's true lesions in it (``n_truth``, of which ``detected``). Returns ``{"units": [n, 7] int
    array (columns as :data:`UNIT_COLUMNS`), "n_voxels": voxels in the region}``."""
    from msxai.lesions import connectivity_structure
    from scipy import ndimage

    pred = np.asarray(pred_labels_or_mask)
    truth = np.asarray(truth)
    region = np.asarray(region).astype(bool)
    if not (pred.shape == truth.shape == region.shape):
        raise GeometryError(f"prediction {tuple(pred.shape)}, truth {tuple(truth.shape)} and region "
                            f"{tuple(region.shape)} must share one grid")
    if not region.any():
        raise InputError("region scoring: the region holds no voxel")
    pred_inst = prediction_instances(pred, affine=affine, threshold=threshold, min_volume_mm3=min_volume_mm3)
    truth_inst = instances_from_mask(truth, affine=affine, min_volume_mm3=min_volume_mm3)
    pm, tm = pred_inst > 0, truth_as_given(truth, affine)
    units, n_units = ndimage.label(pm | tm, connectivity_structure(18))
    rows = np.zeros((n_units + 1, len(UNIT_COLUMNS)), dtype=np.int64)
    for col, mask in ((0, pm & tm & region), (1, pm & ~tm & region), (2, ~pm & tm & region)):
        rows[:, col] = np.bincount(units[mask], minlength=n_units + 1)
    classes = classify_lesions(pred_inst, truth_inst)
    tp_set, det_set = set(classes.tp), set(classes.detected)
    for labels, ids_col, hit_col, hits in ((pred_inst, 3, 4, tp_set), (truth_inst, 5, 6, det_set)):
        ids, first = np.unique(labels.ravel(), return_index=True)
        unit_of = dict(zip(ids.tolist(), units.ravel()[first].tolist()))  # a lesion lies in one unit
        inside = _in_region(_centroids(labels), region)
        for i in np.arange(1, int(labels.max()) + 1)[inside]:
            rows[unit_of[int(i)], ids_col] += 1
            rows[unit_of[int(i)], hit_col] += int(i) in hits
    rows = rows[1:]
    keep = rows.sum(1) > 0  # units with nothing in the region are not part of it
    return {"units": rows[keep], "n_voxels": int(region.sum())}


UNIT_COLUMNS = ("tp_voxels", "fp_voxels", "fn_voxels", "n_pred", "tp_lesions", "n_truth", "detected")


def metrics_from_units(units: np.ndarray, n_voxels: int, r: float = NDSC_R) -> dict:
    """Dice, nDSC and lesion-wise metrics from summed unit counts (:func:`region_units`), with the module's
    empty-case conventions; vectorised over leading axes (``units[..., n, 7]`` -> arrays)."""
    u = np.asarray(units, dtype=np.float64)
    tp, fp, fn, n_pred, tp_l, n_truth, det = (u[..., k].sum(-1) for k in range(len(UNIT_COLUMNS)))
    st, sp = tp + fn, tp + fp
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(sp + st == 0, 1.0, 2 * tp / np.maximum(sp + st, 1e-300))
        k = np.where(n_voxels > st, (1.0 - r) * st / (r * np.maximum(n_voxels - st, 1e-300)), 0.0)
        nd = np.where(st + sp == 0, 1.0, np.where(st == 0, 0.0, 2 * tp / np.maximum(k * fp + 2 * tp + fn, 1e-300)))
        tpr = np.where(n_truth > 0, det / np.maximum(n_truth, 1), 1.0)
        prec = np.where(n_pred > 0, tp_l / np.maximum(n_pred, 1), 1.0)
        f1 = np.where(prec + tpr > 0, 2 * prec * tpr / np.maximum(prec + tpr, 1e-300), 0.0)
    return {"dice": d, "ndsc": nd, "TPR": tpr, "precision": prec, "F1": f1, "n_pred": n_pred, "n_truth": n_truth,
            "tp": tp_l, "detected": det, "voxels_pred": sp, "voxels_truth": st}


def evaluate_region(
    pred_labels_or_mask: np.ndarray,
    truth: np.ndarray,
    region: np.ndarray,
    affine: np.ndarray | None = None,
    threshold: float = THRESHOLD,
    min_volume_mm3: float = MIN_LESION_MM3,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict:
    """Metrics of a prediction restricted to a region of the image (e.g. a held-out hemisphere), with bootstrap
    confidence intervals.

    The prediction is made on the whole image; lesions are assigned to the region by centroid and voxels are
    counted inside it (:func:`region_units`); Dice/nDSC treat the region as the image (``N`` = its voxels) and
    compare kept predicted lesions with the truth as given, lesion-wise metrics use the >= ``min_volume_mm3`` rule
    on both sides (as :func:`evaluate_case`). CIs: percentile bootstrap over units (connected components of
    prediction | truth, resampled with replacement, ``n_boot`` times, ``seed``) - a lesion and whatever overlaps it
    move together. Returns the point metrics, ``ci`` ``{metric: [lo, hi]}``, ``n_units`` and ``n_voxels``."""
    from msxai.experiments.stats import bootstrap_indices

    bk = region_units(pred_labels_or_mask, truth, region, affine, threshold, min_volume_mm3)
    units, n_vox = bk["units"], bk["n_voxels"]
    point = {k: float(v) for k, v in metrics_from_units(units, n_vox).items()}
    for k in ("n_pred", "n_truth", "tp", "detected", "voxels_pred", "voxels_truth"):
        point[k] = int(point[k])
    point["fp"] = point["n_pred"] - point["tp"]
    point["fn"] = point["n_truth"] - point["detected"]
    out = {**point, "n_units": int(len(units)), "n_voxels": n_vox, "ci_level": ci, "n_boot": int(n_boot)}
    if len(units) and n_boot > 0:
        idx = bootstrap_indices(len(units), n_boot, seed)
        boot = metrics_from_units(units[idx], n_vox)
        a = (1.0 - ci) / 2.0
        out["ci"] = {k: [float(x) for x in np.quantile(boot[k], [a, 1 - a])]
                     for k in ("dice", "ndsc", "TPR", "precision", "F1")}
    else:
        out["ci"] = {}
    return out


def aggregate(cases: list[dict]) -> dict:
    """Mean (and standard deviation, ddof 0) over cases of every numeric metric, plus the per-case list.

    Returns ``{"n_cases": n, "mean": {...}, "std": {...}, "cases": cases}``; non-numeric fields (e.g. a case name)
    are carried in ``cases`` only.
    """
    if not cases:
        raise InputError("aggregate: no cases to aggregate")
    keys: list[str] = []
    for case in cases:
        for key, value in case.items():
            if key not in keys and isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
                keys.append(key)
    mean, std = {}, {}
    for key in keys:
        values = [float(c[key]) for c in cases if key in c]
        mean[key] = float(np.mean(values))
        std[key] = float(np.std(values))
    return {"n_cases": len(cases), "mean": mean, "std": std, "cases": list(cases)}


def format_metrics_table(metrics: dict) -> str:
    """A two-column text table of one case's metrics (for the CLI)."""
    lines = []
    width = max(len(k) for k in metrics) if metrics else 0
    for key, value in metrics.items():
        if isinstance(value, float):
            text = f"{value:.4f}"
        else:
            text = str(value)
        lines.append(f"{key.ljust(width)}  {text}")
    return "\n".join(lines)
