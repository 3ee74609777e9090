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
    """All metrics of one case.

    The prediction may be a probability map (thresholded at ``threshold``), a binary mask or an instance map; its
    lesions are the 18-connected components of at least ``min_volume_mm3`` (:func:`msxai.lesions.prediction_instances`).
    The truth may be a binary or instance mask (:func:`msxai.lesions.instances_from_mask`).
    Voxel metrics (``dice``, ``ndsc``) compare the lesion voxels of both sides, i.e. after the same post-processing
    (components below ``min_volume_mm3`` removed from the prediction *and* the truth), so that a truth compared
    with itself scores exactly 1 and the voxel and lesion metrics describe the same lesions.
    """
    pred = np.asarray(pred_labels_or_mask)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise GeometryError(
            f"prediction and truth are on different grids: shape {tuple(pred.shape)} vs {tuple(truth.shape)}"
        )
    pred_inst = prediction_instances(pred, affine=affine, threshold=threshold, min_volume_mm3=min_volume_mm3)
    truth_inst = instances_from_mask(truth, affine=affine, min_volume_mm3=min_volume_mm3)
    truth_mask = truth_inst > 0
    pred_mask = pred_inst > 0
    out = {
        "dice": dice(pred_mask, truth_mask),
        "ndsc": ndsc(pred_mask, truth_mask),
        "voxels_pred": int(pred_mask.sum()),
        "voxels_truth": int(truth_mask.sum()),
    }
    out.update(lesion_metrics(pred_inst, truth_inst))
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
