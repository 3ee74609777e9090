"""Dice, nDSC, lesion-wise metrics, evaluate_case/aggregate and the `msxai evaluate` / `msxai lesions` commands."""

from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

from msxai.cli import main
from msxai.data import REAL_PATIENT_MISSING_REASON, real_patient_paths
from msxai.errors import GeometryError, InputError
from msxai.io import load_volume, save_volume
from msxai.lesions import classify_lesions, instances_from_mask, lesion_instances, lesion_table
from msxai.metrics import aggregate, dice, evaluate_case, lesion_metrics, ndsc


# ------------------------------------------------------------------------------------------------ twins
def shifts_dice_norm_metric(ground_truth, predictions):
    """Verbatim logic of the Shifts 2022 challenge's ``dice_norm_metric`` (Raina et al. 2023), numpy only."""
    gt = ground_truth.astype(float)
    seg = predictions.astype(float)
    r = 0.001
    if np.sum(gt) + np.sum(seg) == 0:
        return 1.0
    k = (1 - r) * np.sum(gt) / (r * (len(gt.flatten()) - np.sum(gt)))
    tp = np.sum(seg[gt == 1])
    fp = np.sum(seg[gt == 0])
    fn = np.sum(gt[seg == 0])
    fp_scaled = k * fp
    return 2.0 * tp / (fp_scaled + 2.0 * tp + fn)


def loop_dice(pred, truth):
    inter = sp = st = 0
    for p, t in zip(pred.ravel(), truth.ravel()):
        inter += bool(p) and bool(t)
        sp += bool(p)
        st += bool(t)
    return 1.0 if sp + st == 0 else 2 * inter / (sp + st)


# ------------------------------------------------------------------------------------------------ dice / nDSC
def test_dice_hand_built():
    pred = np.zeros((4, 4, 4), bool)
    truth = np.zeros_like(pred)
    pred[0, 0, :4] = True  # 4 voxels
    truth[0, 0, 1:4] = True
    truth[1, 1, 1:4] = True  # 6 voxels, 3 shared
    assert dice(pred, truth) == pytest.approx(0.6)
    assert dice(np.zeros_like(pred), np.zeros_like(pred)) == 1.0
    assert dice(pred, np.zeros_like(pred)) == 0.0
    assert dice(pred, pred) == 1.0
    with pytest.raises(GeometryError):
        dice(pred, truth[:-1])


def test_ndsc_hand_built():
    truth = np.zeros((10, 10, 10), bool)
    pred = np.zeros_like(truth)
    truth[0, 0, :10] = True  # |T| = 10 of N = 1000
    pred[0, 0, 2:10] = True  # tp = 8, fn = 2
    pred[5, 5, :4] = True  # fp = 4
    # k = 0.999 * 10 / (0.001 * 990) = 111/11; nDSC = 16 / (4k + 16 + 2) = 88/321
    assert ndsc(pred, truth) == pytest.approx(88 / 321, rel=1e-12)
    assert ndsc(truth, truth) == 1.0
    assert ndsc(np.zeros_like(truth), np.zeros_like(truth)) == 1.0
    assert ndsc(pred, np.zeros_like(truth)) == 0.0  # Shifts gives 0/0 here; documented as 0
    assert ndsc(np.zeros_like(truth), truth) == 0.0
    # at the reference lesion load r = |T| / N, nDSC is the plain Dice
    assert ndsc(pred, truth, r=10 / 1000) == pytest.approx(dice(pred, truth))


@pytest.mark.parametrize("seed", range(5))
def test_dice_and_ndsc_match_reference_twins(seed):
    rng = np.random.default_rng(seed)
    truth = rng.random((12, 11, 10)) > 0.9
    pred = rng.random((12, 11, 10)) > (0.85 if seed % 2 else 0.97)
    assert dice(pred, truth) == pytest.approx(loop_dice(pred, truth), rel=1e-12)
    assert ndsc(pred, truth) == pytest.approx(shifts_dice_norm_metric(truth, pred), rel=1e-12)


# ------------------------------------------------------------------------------------------------ lesion-wise
def hand_built_maps():
    pred = np.zeros((10, 10, 10), np.int32)
    truth = np.zeros_like(pred)
    truth[1:3, 1:3, 1:3] = 1
    truth[5, 5, 5] = 2
    truth[5, 5, 7] = 3
    truth[8:10, 8:10, 8:10] = 4  # missed
    pred[2:4, 2:4, 2:4] = 1  # TP (truth 1)
    pred[0, 9, 0] = 2  # FP
    pred[5, 5, 5:8] = 3  # TP (truths 2 and 3)
    return pred, truth


def test_lesion_metrics_hand_built():
    pred, truth = hand_built_maps()
    m = lesion_metrics(pred, truth)
    assert {k: m[k] for k in ("n_pred", "n_truth", "tp", "fp", "fn", "detected")} == dict(
        n_pred=3, n_truth=4, tp=2, fp=1, fn=1, detected=3
    )
    assert m["TPR"] == pytest.approx(0.75) and m["FNR"] == pytest.approx(0.25)
    assert m["FDR"] == pytest.approx(1 / 3) and m["precision"] == pytest.approx(2 / 3)
    assert m["F1"] == pytest.approx(12 / 17)


def test_lesion_metrics_empty_cases():
    empty = np.zeros((5, 5, 5), np.int32)
    one = empty.copy()
    one[2, 2, 2] = 1
    both = lesion_metrics(empty, empty)
    assert (both["TPR"], both["FNR"], both["FDR"], both["precision"], both["F1"]) == (1.0, 0.0, 0.0, 1.0, 1.0)
    only_pred = lesion_metrics(one, empty)
    assert (only_pred["TPR"], only_pred["FNR"], only_pred["FDR"], only_pred["precision"], only_pred["F1"]) == (
        1.0, 0.0, 1.0, 0.0, 0.0)
    only_truth = lesion_metrics(empty, one)
    assert (only_truth["TPR"], only_truth["FNR"], only_truth["FDR"], only_truth["precision"], only_truth["F1"]) == (
        0.0, 1.0, 0.0, 1.0, 0.0)
    assert only_truth["fn"] == 1 and only_pred["fp"] == 1


@pytest.mark.parametrize("seed", range(4))
def test_lesion_metrics_match_brute_force_counts(seed):
    rng = np.random.default_rng(100 + seed)
    pred = lesion_instances(rng.random((10, 9, 8)) > 0.82, min_volume_mm3=0)
    truth = lesion_instances(rng.random((10, 9, 8)) > 0.86, min_volume_mm3=0)
    m = lesion_metrics(pred, truth)
    pred_ids = [i for i in range(1, pred.max() + 1)]
    truth_ids = [i for i in range(1, truth.max() + 1)]
    tp = 0
    for p in pred_ids:  # python loop over voxels of each predicted lesion
        tp += any(truth[v] > 0 for v in zip(*np.nonzero(pred == p)))
    det = 0
    for t in truth_ids:
        det += any(pred[v] > 0 for v in zip(*np.nonzero(truth == t)))
    assert (m["n_pred"], m["n_truth"], m["tp"], m["fp"], m["detected"], m["fn"]) == (
        len(pred_ids), len(truth_ids), tp, len(pred_ids) - tp, det, len(truth_ids) - det)
    prec, tpr = tp / len(pred_ids), det / len(truth_ids)
    assert m["F1"] == pytest.approx(2 * prec * tpr / (prec + tpr))


# ------------------------------------------------------------------------------------------------ evaluate_case
def synthetic_case():
    truth = np.zeros((16, 16, 16), np.uint8)
    truth[2:5, 2:5, 2:5] = 1  # 27 voxels, detected
    truth[10:12, 10:12, 10:12] = 1  # 8 voxels, missed
    truth[14, 1, 1] = 1  # 1 voxel: below 5 mm^3, not a lesion
    prob = np.zeros(truth.shape, np.float32)
    prob[3:6, 2:5, 2:5] = 0.7  # 27 voxels, 18 on the truth
    prob[8:10, 1:4, 12] = 0.35  # 6 voxels, FP
    prob[0, 14, 14] = 0.9  # 1 voxel: dropped
    prob[12:14, 2:4, 2:4] = 0.3  # not above t
    return prob, truth


def test_evaluate_case_probability_input():
    prob, truth = synthetic_case()
    m = evaluate_case(prob, truth, np.eye(4))
    # voxels: kept predicted lesions (33) against the truth as given (36, the 1-voxel speck included)
    assert m["voxels_pred"] == 33 and m["voxels_truth"] == 36
    assert m["dice"] == pytest.approx(2 * 18 / (33 + 36))
    assert m["ndsc"] == pytest.approx(shifts_dice_norm_metric(truth > 0, lesion_instances(prob) > 0))
    assert (m["n_pred"], m["n_truth"], m["tp"], m["fp"], m["fn"], m["detected"]) == (2, 2, 1, 1, 1, 1)
    assert m["TPR"] == 0.5 and m["FDR"] == 0.5 and m["F1"] == pytest.approx(0.5)
    # the same prediction given as a mask or as an instance map scores the same
    assert evaluate_case(prob > 0.3, truth, np.eye(4)) == m
    assert evaluate_case(lesion_instances(prob).astype(np.float32) * 2, truth, np.eye(4)) == m
    # a higher threshold removes the FP lesion
    assert evaluate_case(prob, truth, np.eye(4), threshold=0.5)["fp"] == 0
    json.dumps(m)


def test_evaluate_case_refuses_bad_input():
    prob, truth = synthetic_case()
    with pytest.raises(GeometryError, match="different grids"):
        evaluate_case(prob[:, :, :-1], truth, np.eye(4))
    bad = prob.copy()
    bad[1, 1, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        evaluate_case(bad, truth, np.eye(4))


def test_aggregate():
    cases = [{"name": "a", "dice": 0.5, "tp": 2}, {"name": "b", "dice": 1.0, "tp": 4}]
    agg = aggregate(cases)
    assert agg["n_cases"] == 2 and agg["mean"] == {"dice": 0.75, "tp": 3.0}
    assert agg["std"] == {"dice": 0.25, "tp": 1.0} and agg["cases"] == cases
    with pytest.raises(InputError):
        aggregate([])


# ------------------------------------------------------------------------------------------------ commands
def write_case(tmp_path, prob, truth, affine=np.eye(4)):
    p = save_volume(tmp_path / "prob.nii.gz", prob, affine)
    t = save_volume(tmp_path / "truth.nii.gz", truth, affine, dtype=np.uint8)
    return p, t


def test_cli_evaluate(tmp_path, capsys):
    prob, truth = synthetic_case()
    p, t = write_case(tmp_path, prob, truth)
    out = tmp_path / "m" / "metrics.json"
    assert main(["evaluate", "--pred", str(p), "--truth", str(t), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dice" in text and "F1" in text and "0.5217" in text  # 36/69
    report = json.loads(out.read_text())
    assert report["metrics"] == evaluate_case(prob, truth, np.eye(4))
    assert main(["evaluate", "--pred", str(p), "--truth", str(t), "--threshold", "0.5"]) == 0
    assert "fp" in capsys.readouterr().out


def test_cli_evaluate_errors(tmp_path, capsys):
    prob, truth = synthetic_case()
    p, t = write_case(tmp_path, prob, truth)
    assert main(["evaluate", "--pred", str(tmp_path / "nope.nii.gz"), "--truth", str(t)]) == 2
    assert "file not found" in capsys.readouterr().err
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    t2 = save_volume(tmp_path / "truth_shifted.nii.gz", truth, shifted)
    assert main(["evaluate", "--pred", str(p), "--truth", str(t2)]) == 2
    assert "orientation/origin" in capsys.readouterr().err
    t3 = save_volume(tmp_path / "truth_small.nii.gz", truth[:-1], np.eye(4))
    assert main(["evaluate", "--pred", str(p), "--truth", str(t3)]) == 2
    assert "different grids" in capsys.readouterr().err
    bad = prob.copy()
    bad[0, 0, 0] = np.nan
    p2 = save_volume(tmp_path / "nan.nii.gz", bad, np.eye(4))
    assert main(["evaluate", "--pred", str(p2), "--truth", str(t)]) == 2
    assert "NaN" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(p)]) == 2
    assert "--truth" in capsys.readouterr().err


def test_cli_lesions(tmp_path, capsys):
    prob, truth = synthetic_case()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    p, t = write_case(tmp_path, prob, truth, affine)
    out = tmp_path / "les"
    assert main(["lesions", "--prob", str(p), "--out", str(out), "--truth", str(t)]) == 0
    text = capsys.readouterr().out
    assert "2 lesion(s)" in text and "TP" in text and "FP" in text
    labels = load_volume(out / "lesions.nii.gz", dtype=np.int32).array
    np.testing.assert_array_equal(labels, lesion_instances(prob))
    rows = json.loads((out / "lesions.json").read_text())
    assert rows == lesion_table(lesion_instances(prob), affine, prob=prob, truth=truth)
    assert (out / "lesions.csv").read_text().startswith("id,voxels,volume_mm3,centroid_vox_x")
    # a binary mask works too; --min-volume in mm^3 drops the 6-voxel lesion
    m = save_volume(tmp_path / "mask.nii.gz", (prob > 0.3).astype(np.uint8), affine, dtype=np.uint8)
    assert main(["lesions", "--prob", str(m), "--min-volume", "7", "--out", str(tmp_path / "m")]) == 0
    assert "1 lesion(s)" in capsys.readouterr().out
    mask_rows = json.loads((tmp_path / "m" / "lesions.json").read_text())
    assert len(mask_rows) == 1 and "mean_probability" not in mask_rows[0]
    assert main(["lesions", "--prob", str(tmp_path / "missing.nii.gz"), "--out", str(out)]) == 2
    assert "file not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ real patient
@pytest.fixture(scope="module")
def real_truth():
    paths = real_patient_paths()
    if paths is None:
        pytest.skip(REAL_PATIENT_MISSING_REASON)
    return paths["truth"], load_volume(paths["truth"]), load_volume(paths["flair"])


@pytest.mark.realdata
def test_real_patient_truth_against_itself(real_truth):
    path, truth, _ = real_truth
    from msxai.commands.evaluate import evaluate_files

    m = evaluate_files(path, path)
    # lesion-wise perfect; voxel-wise the prediction side drops the truth's 10 voxels in components < 5 mm^3
    raw = int((truth.array > 0).sum())
    kept = int((instances_from_mask(truth.array, truth.affine) > 0).sum())
    assert (raw, kept) == (8227, 8217)
    assert m["dice"] == pytest.approx(2 * kept / (kept + raw)) and m["voxels_truth"] == raw
    assert (m["n_pred"], m["n_truth"], m["tp"], m["fp"], m["fn"]) == (16, 16, 16, 0, 0)
    assert m["TPR"] == m["precision"] == m["F1"] == 1.0 and m["FDR"] == m["FNR"] == 0.0


@pytest.mark.realdata
def test_real_patient_corrupted_copy_gives_known_counts(real_truth):
    _, truth, flair = real_truth
    labels = instances_from_mask(truth.array, truth.affine)
    pred = labels > 0
    for lid in (1, 2, 3):  # three missed lesions
        pred[labels == lid] = False
    kept = int(pred.sum())
    brain = flair.array != 0
    from scipy import ndimage

    far = brain & ~ndimage.binary_dilation(truth.array > 0, iterations=4)
    far = ndimage.binary_erosion(far, iterations=2)
    centres = np.argwhere(far)
    added = 0
    for c in (centres[0], centres[len(centres) // 2]):  # two false-positive 3x3x3 cubes away from every lesion
        sl = tuple(slice(int(x) - 1, int(x) + 2) for x in c)
        added += int((~pred[sl]).sum())
        pred[sl] = True
    pred[tuple(centres[-1])] = True  # a single-voxel speck: below 5 mm^3, not a lesion
    m = evaluate_case(pred, truth.array, truth.affine)
    assert added == 54
    assert (m["n_pred"], m["n_truth"], m["tp"], m["fp"], m["fn"], m["detected"]) == (15, 16, 13, 2, 3, 13)
    assert m["TPR"] == pytest.approx(13 / 16) and m["FDR"] == pytest.approx(2 / 15)
    assert m["voxels_pred"] == kept + 54
    assert m["dice"] == pytest.approx(2 * kept / (kept + 54 + int((truth.array > 0).sum())))
    c = classify_lesions(lesion_instances(pred, affine=truth.affine), labels)
    assert c.fn == [1, 2, 3]
