"""Metric conventions (voxel metrics against the truth as given, lesion-wise with the 5 mm^3 rule on both sides) and
the scoring of a region (held-out hemisphere) with unit-bootstrap CIs, each against a slow twin written from the
definitions (voxel loops, per-lesion loops, a Python loop over bootstrap resamples)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
from scipy import ndimage

from msxai.errors import GeometryError, InputError
from msxai.metrics import UNIT_COLUMNS, evaluate_case, evaluate_region, metrics_from_units, region_units

S18 = ndimage.generate_binary_structure(3, 2)


def components(mask, min_vox):
    """18-connected components with at least ``min_vox`` voxels, as a list of voxel-index sets (scipy's labelling,
    size filter by hand)."""
    lab, n = ndimage.label(mask, S18)
    out = []
    for i in range(1, n + 1):
        vox = {tuple(v) for v in np.argwhere(lab == i)}
        if len(vox) >= min_vox:
            out.append(vox)
    return out


def twin_case(prob, truth, threshold=0.3, min_vox=5, region=None):
    """Metrics from the definitions, by loops over voxels and lesions; ``region``: lesions by centroid, voxels
    inside, N = region size."""
    region = np.ones(truth.shape, bool) if region is None else region
    pred_l = components(prob > threshold, min_vox)
    truth_l = components(truth > 0, min_vox)

    def inside(les):
        c = np.rint(np.mean(np.array(sorted(les)), axis=0)).astype(int)
        return bool(region[tuple(c)])

    pred_kept = set().union(*pred_l) if pred_l else set()
    tp = fp = fn = 0
    n_vox = 0
    for v in np.ndindex(truth.shape):
        if not region[v]:
            continue
        n_vox += 1
        p, t = v in pred_kept, bool(truth[v] > 0)
        tp += p and t
        fp += p and not t
        fn += t and not p
    truth_all = {tuple(v) for v in np.argwhere(truth > 0)}
    truth_kept_vox = set().union(*truth_l) if truth_l else set()
    pr = [p for p in pred_l if inside(p)]
    tr = [t for t in truth_l if inside(t)]
    tp_l = sum(1 for p in pr if p & truth_kept_vox)
    det = sum(1 for t in tr if t & pred_kept)
    st, sp = tp + fn, tp + fp
    d = 1.0 if sp + st == 0 else 2 * tp / (sp + st)
    r = 0.001
    if st + sp == 0:
        nd = 1.0
    elif st == 0:
        nd = 0.0
    else:
        k = (1 - r) * st / (r * (n_vox - st))
        nd = 2 * tp / (k * fp + 2 * tp + fn)
    tpr = det / len(tr) if tr else 1.0
    prec = tp_l / len(pr) if pr else 1.0
    f1 = 2 * prec * tpr / (prec + tpr) if prec + tpr > 0 else 0.0
    assert truth_all  # the cases below always hold truth
    return {"dice": d, "ndsc": nd, "n_pred": len(pr), "n_truth": len(tr), "tp": tp_l, "detected": det,
            "TPR": tpr, "precision": prec, "F1": f1, "voxels_pred": sp, "voxels_truth": st}


def random_case(seed, shape=(14, 13, 12)):
    rng = np.random.default_rng(seed)
    truth = ndimage.binary_dilation(rng.random(shape) > 0.985, S18) | (rng.random(shape) > 0.97)
    prob = np.clip(ndimage.gaussian_filter(truth.astype(float), 0.8) + 0.25 * rng.random(shape), 0, 1)
    return prob.astype(np.float32), truth.astype(np.uint8)


@pytest.mark.parametrize("seed", range(5))
def test_evaluate_case_conventions_match_twin(seed):
    prob, truth = random_case(seed)
    m = evaluate_case(prob, truth, np.eye(4))
    ref = twin_case(prob, truth)
    assert ref["voxels_truth"] == int((truth > 0).sum())  # the truth as given
    for k, v in ref.items():
        assert m[k] == pytest.approx(v), k


@pytest.mark.parametrize("seed", range(5))
def test_evaluate_region_matches_twin(seed):
    prob, truth = random_case(10 + seed)
    region = np.zeros(truth.shape, bool)
    region[: truth.shape[0] // 2 + seed % 3] = True
    m = evaluate_region(prob, truth, region, np.eye(4), n_boot=50)
    ref = twin_case(prob, truth, region=region)
    for k, v in ref.items():
        assert m[k] == pytest.approx(v), k
    assert m["fp"] == ref["n_pred"] - ref["tp"] and m["fn"] == ref["n_truth"] - ref["detected"]
    assert m["n_voxels"] == int(region.sum())
    # the whole image as the region is evaluate_case
    whole = evaluate_region(prob, truth, np.ones(truth.shape, bool), np.eye(4), n_boot=0)
    case = evaluate_case(prob, truth, np.eye(4))
    for k in ("dice", "ndsc", "TPR", "precision", "F1", "n_pred", "n_truth", "tp", "fp", "fn"):
        assert whole[k] == pytest.approx(case[k]), k


def test_region_bootstrap_matches_loop_twin():
    prob, truth = random_case(3, shape=(18, 16, 14))
    region = np.zeros(truth.shape, bool)
    region[:9] = True
    m = evaluate_region(prob, truth, region, np.eye(4), n_boot=200, seed=5)
    units = region_units(prob, truth, region, np.eye(4))["units"]
    assert units.shape[1] == len(UNIT_COLUMNS) and len(units) == m["n_units"] > 3
    rng = np.random.default_rng(5)
    f1s, ndscs = [], []
    for _ in range(200):  # one resample at a time, metrics by hand from the summed counts
        pick = rng.integers(0, len(units), size=len(units))
        tp, fp, fn, n_pred, tp_l, n_truth, det = units[pick].sum(0)
        prec = tp_l / n_pred if n_pred else 1.0
        tpr = det / n_truth if n_truth else 1.0
        f1s.append(2 * prec * tpr / (prec + tpr) if prec + tpr else 0.0)
        st = tp + fn
        if st == 0:
            ndscs.append(1.0 if tp + fp == 0 else 0.0)
        else:
            k = 0.999 * st / (0.001 * (region.sum() - st))
            ndscs.append(2 * tp / (k * fp + 2 * tp + fn))
    assert m["ci"]["F1"] == pytest.approx(list(np.quantile(f1s, [0.025, 0.975])))
    assert m["ci"]["ndsc"] == pytest.approx(list(np.quantile(ndscs, [0.025, 0.975])))
    assert m["ci"]["F1"][0] <= m["F1"] <= m["ci"]["F1"][1]
    # vectorised metrics over a leading axis equal the per-resample values
    one = metrics_from_units(units, int(region.sum()))
    assert float(one["F1"]) == pytest.approx(m["F1"])


def test_region_lesions_go_by_centroid_and_bad_input():
    truth = np.zeros((20, 8, 8), np.uint8)
    truth[8:13, 2:5, 2:5] = 1  # centroid x = 10: right of the cut at 10 -> region x >= 10
    truth[2:4, 2:5, 2:5] = 1  # left lesion
    prob = np.zeros(truth.shape, np.float32)
    prob[8:11, 2:5, 2:5] = 0.9  # predicted part of the straddling lesion, centroid x = 9 -> not in the region
    region = np.zeros(truth.shape, bool)
    region[10:] = True
    m = evaluate_region(prob, truth, region, np.eye(4), n_boot=0)
    assert (m["n_truth"], m["detected"], m["n_pred"]) == (1, 1, 0)
    assert (m["voxels_truth"], m["voxels_pred"]) == (27, 9)  # voxels counted inside the region only
    with pytest.raises(GeometryError):
        evaluate_region(prob[:-1], truth, region)
    with pytest.raises(InputError, match="no voxel"):
        evaluate_region(prob, truth, np.zeros_like(region))
