"""The whole experiment pipeline on a tiny synthetic cohort (2 subjects, a hand-made network, N = 2 samples):
report files exist and the CSV tables agree with each other and with independent recomputations."""

import csv
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats as sps

from test_experiments_helpers import BlobNet, tiny_model, write_cohort

from msxai.experiments import run_experiments
from msxai.experiments.cohort import cohort_cases
from msxai.experiments.error_flag import ErrorFlagModel
from msxai.experiments.state import ExperimentConfig

torch.set_num_threads(1)
K = 2
CFG = dict(samples=2, max_lesions_per_class=K, n_tn=3, context_max_mm=4.0, context_step_mm=2.0, n_boot=200,
           randomization_lesions=1, progress=False)


def _zscored(flair_path, t1_path):
    """The network input of a canonical case, read and z-scored here (nibabel, numpy): the bundle chain's twin."""
    import nibabel as nib

    imgs = [nib.load(str(p)) for p in (flair_path, t1_path)]
    raw = np.stack([np.asarray(i.dataobj, np.float32) for i in imgs])
    brain = np.any(raw != 0, axis=0)
    image = np.zeros_like(raw)
    for c in range(2):
        v = raw[c][brain].astype(np.float64)
        image[c][brain] = (v - v.mean()) / v.std()
    return SimpleNamespace(image=image, affine=imgs[0].affine)


def rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    ds = write_cohort(root / "cohort", n=2)
    cases = cohort_cases(ds)
    light = tiny_model("tiny-ctx")
    light.network = BlobNet(gain=2.0).eval()
    path, results = run_experiments([tiny_model(), light], cases, root / "report", ExperimentConfig(**CFG),
                                    {"cohort": "tiny phantom"}, context_only=[light])
    return path, results, cases


def test_report_files(pipeline):
    path, results, _ = pipeline
    out = path.parent
    text = path.read_text()
    assert results[0].failures == [] and "experiment failed" not in text
    for heading in ("1. Mean (Eq. 2) vs max (Eq. 3)", "2. FLAIR vs MPRAGE", "3. Peak FLAIR saliency",
                    "4. Sanity checks", "5. Lesion transplant", "6. Context dilation", "Model randomisation",
                    "7. Beyond the paper", "Findings: paper vs ours", "noise samples N = 2 (paper: 50)"):
        assert heading in text, heading
    assert text.count("data:image/png;base64,") >= 5  # self-contained: the figures are embedded
    for name in ("segmentation", "lesions", "exp1_aggregation", "exp2_sign", "exp2_lesions", "exp3_peaks",
                 "exp3_mannwhitney", "exp4_sanity", "exp5_transplant", "exp6_context", "randomization",
                 "error_flag_scores", "error_flag_summary"):
        assert (out / f"{name}.csv").is_file(), name
    pngs = list(out.glob("*.png"))
    assert len(pngs) >= 5 and all(p.stat().st_size < 300_000 for p in pngs)
    assert json.loads((out / "settings.json").read_text())["config"]["samples"] == 2


def test_selection_and_segmentation_tables(pipeline):
    path, results, cases = pipeline
    out = path.parent
    seg = rows(out / "segmentation.csv")
    les = rows(out / "lesions.csv")
    avail = {"TP": sum(int(r["tp"]) for r in seg), "FP": sum(int(r["fp"]) for r in seg),
             "FN": sum(int(r["fn"]) for r in seg), "TN": sum(int(r["n_tn_spheres"]) for r in seg)}
    e1 = rows(out / "exp1_aggregation.csv")
    for cls, n in avail.items():
        got = sum(1 for r in les if r["cls"] == cls)
        if cls == "TP":  # Eq. 3 bulk maps: experiment 1's lesions join the TP set (their maps are computed anyway)
            picked = {(r["case"], r["lesion_id"]) for r in les if r["cls"] == "TP"}
            large = {(r["case"], r["lesion_id"]) for r in e1 if r["lesion"] == "large"}
            assert large <= picked and min(n, K) <= got <= min(n, K) + len(large)
        else:
            assert got == min(n, K), cls
    assert all(n > 0 for n in avail.values())  # the phantom has every class
    # segmentation metrics recomputed independently with MONAI's own sliding-window inferer
    from msxai.lesions import instances_from_mask, lesion_instances
    from msxai.io import load_volume
    from msxai.metrics import lesion_metrics
    model = tiny_model()
    inferer = model.spec.to_inferer()
    for case, r in zip(cases, seg):
        prep = _zscored(case.flair, case.t1)
        with torch.no_grad():
            logits = inferer(torch.as_tensor(prep.image)[None], BlobNet().eval())
        prob = torch.softmax(logits[0], 0)[1].numpy()
        pred = lesion_instances(prob, 0.3, 5.0, prep.affine)
        truth = instances_from_mask(load_volume(case.truth).array, prep.affine)
        m = lesion_metrics(pred, truth)
        for key in ("n_pred", "n_truth", "tp", "fp", "fn"):
            assert int(r[key]) == m[key], (case.id, key)
    # TP/FP domains are predicted lesions: their mean probability is above the threshold somewhere
    for r in les:
        if r["cls"] in ("TP", "FP"):
            assert float(r["max_prob"]) > 0.3


def test_peak_statistics_agree_with_the_lesion_table(pipeline):
    path, _, _ = pipeline
    out = path.parent
    les = rows(out / "lesions.csv")
    peaks = rows(out / "exp3_peaks.csv")
    tests = rows(out / "exp3_mannwhitney.csv")
    vals = {(s, c): np.array([float(r[s]) for r in les if r["cls"] == c])
            for s in ("flair_peak_max", "flair_peak_min") for c in ("TP", "FP", "FN", "TN")}
    for r in peaks:
        if r["statistic"] not in ("flair_peak_max", "flair_peak_min"):
            continue
        v = vals[(r["statistic"], r["cls"])]
        assert int(r["n"]) == v.size
        if v.size:
            assert float(r["median"]) == pytest.approx(np.median(v), rel=1e-5)
            assert float(r["ci_lo"]) <= float(r["median"]) + 1e-12 <= float(r["ci_hi"]) + 2e-12
    checked = 0
    for t in tests:
        if t["statistic"] not in ("flair_peak_max", "flair_peak_min"):
            continue
        a, b = vals[(t["statistic"], t["a"])], vals[(t["statistic"], t["b"])]
        if a.size and b.size:
            ref = sps.mannwhitneyu(a, b, alternative="two-sided")
            assert float(t["p"]) == pytest.approx(ref.pvalue, rel=1e-4)
            assert float(t["U"]) == pytest.approx(ref.statistic)
            checked += 1
    assert checked == 12  # 6 pairs x 2 statistics
    # TN spheres lie away from lesions: the hand-made network gives them lower FLAIR peaks than TP lesions
    assert np.median(vals[("flair_peak_max", "TN")]) < np.median(vals[("flair_peak_max", "TP")])


def test_sign_table_counts(pipeline):
    path, results, _ = pipeline
    out = path.parent
    les = rows(out / "lesions.csv")
    sign = rows(out / "exp2_sign.csv")
    tp_voxels = sum(int(r["voxels"]) for r in les if r["cls"] == "TP")
    for r in sign:
        assert int(r["n_kept"]) <= int(r["n_values"])
        if r["region"] == "inside":
            assert int(r["n_values"]) == tp_voxels
        if int(r["n_kept"]):
            assert 0.0 <= float(r["frac_positive"]) <= 1.0
    res = results[0]
    kept = res.exp2_values["flair"]["inside"]
    assert np.all(np.abs(kept) >= 0.1)


def test_aggregation_sanity_transplant_context_randomisation(pipeline):
    path, results, _ = pipeline
    out = path.parent
    e1 = rows(out / "exp1_aggregation.csv")
    assert {r["aggregation"] for r in e1} == {"max", "mean"} and {r["lesion"] for r in e1} <= {"large", "small", "single"}
    e4 = rows(out / "exp4_sanity.csv")
    assert e4[0]["domain"].startswith("TP lesion") and float(e4[0]["flair_range_vs_tp"]) == 1.0
    assert any(r["domain"].startswith("single voxel") and int(r["voxels"]) == 1 for r in e4)
    e5 = rows(out / "exp5_transplant.csv")
    conds = {r["condition"]: r for r in e5}
    assert set(conds) == {"original", "healthy WM", "background", "background + 3 mm"}
    assert conds["original"]["detected"] == "True"
    assert all(r["status"] == "ok" for r in e5)
    e6 = rows(out / "exp6_context.csv")
    by_lesion = {}
    for r in e6:
        by_lesion.setdefault((r["model"], r["case"], r["lesion_id"]), []).append(r)
    assert len(by_lesion) == 4  # 2 lesions x (the full model, the context-only model)
    assert {k[1:] for k in by_lesion if k[0] == "tiny"} == {k[1:] for k in by_lesion if k[0] == "tiny-ctx"}
    for steps in by_lesion.values():
        assert [float(r["radius_mm"]) for r in steps] == [0.0, 2.0, 4.0]
        # the hand-made network sees 1 voxel (2 mm) around each output voxel: with 4 mm of context restored the
        # probability inside the lesion is exactly the full-image one
        assert float(steps[-1]["mean_prob"]) == pytest.approx(float(steps[-1]["full_context_mean_prob"]), abs=1e-5)
        assert steps[-1]["detected"] == steps[-1]["full_context_detected"]
    # the full-context probability (windows covering Ω only) equals MONAI's full-image inference
    from msxai.io import load_volume
    from msxai.lesions import instances_from_mask, lesion_instances

    specs = {c.id: c for c in pipeline[2]}
    for (model, cid, tid), steps in by_lesion.items():
        net = BlobNet().eval() if model == "tiny" else BlobNet(gain=2.0).eval()
        prep = _zscored(specs[cid].flair, specs[cid].t1)
        with torch.no_grad():
            prob = torch.softmax(tiny_model().spec.to_inferer()(torch.as_tensor(prep.image)[None], net)[0], 0)[1]
        truth = instances_from_mask(load_volume(specs[cid].truth).array, prep.affine)
        # Ω = this architecture's own predicted lesion overlapping the true lesion (full-image inference here)
        pred = lesion_instances(prob.numpy(), 0.3, 5.0, prep.affine)
        ids, counts = np.unique(pred[truth == int(tid)], return_counts=True)
        assert (ids > 0).any()
        omega = pred == ids[ids > 0][np.argmax(counts[ids > 0])]
        ref = float(prob.numpy()[omega].mean())
        assert float(steps[0]["full_context_mean_prob"]) == pytest.approx(ref, abs=1e-5)
        assert float(steps[0]["volume_mm3"]) == pytest.approx(omega.sum() * 8.0)  # 2 mm voxels
    assert results[1].kind == "context" and not results[1].lesions
    assert "Context dilation only" in path.read_text()
    rnd = rows(out / "randomization.csv")
    assert len(rnd) == 1 and abs(float(rnd[0]["flair_spearman"])) < 0.99


def test_error_flag_outputs(pipeline):
    path, results, _ = pipeline
    out = path.parent
    res = results[0]
    summ = rows(out / "error_flag_summary.csv")[0]
    assert summ["status"] == "ok", summ
    scores = rows(out / "error_flag_scores.csv")
    les = rows(out / "lesions.csv")
    assert len(scores) == sum(1 for r in les if r["cls"] in ("TP", "FP"))
    assert all(0.0 <= float(r["error_score_oof"]) <= 1.0 for r in scores)
    model = ErrorFlagModel.load(out / "error_flag_tiny.json")
    for r in res.lesions:
        if r["cls"] in ("TP", "FP"):
            assert model.error_score(r["features"]) == pytest.approx(res.error_flag_model.error_score(r["features"]))
    seg = rows(out / "segmentation.csv")
    tp, n_pred = sum(int(r["tp"]) for r in seg), sum(int(r["n_pred"]) for r in seg)
    det, n_truth = sum(int(r["detected"]) for r in seg), sum(int(r["n_truth"]) for r in seg)
    p, rec = tp / n_pred, det / n_truth
    assert float(summ["f1_before"]) == pytest.approx(2 * p * rec / (p + rec))  # cohort F1 from summed counts
    assert float(summ["f1_gain"]) == pytest.approx(float(summ["f1_after"]) - float(summ["f1_before"]))


def _write_tiny_bundle(root):
    """A bundle folder whose inference.json builds the hand-made network through msxai.inference."""
    b = root / "tiny_bundle"
    (b / "configs").mkdir(parents=True)
    (b / "models").mkdir()
    torch.save(BlobNet().state_dict(), b / "models" / "model.pt")
    cfg = {
        "imports": ["$import torch", "$import msxai", "$import msxai.networks", "$import msxai.inference"],
        "bundle_root": str(b),
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "device": "$torch.device('cpu')",
        "threshold": 0.3,
        "min_volume_mm3": 5.0,
        "gradcam_layer": "c1",
        "network_def": {"_target_": "test_experiments_helpers.BlobNet"},
        "network": "$msxai.networks.load_weights(@network_def, @checkpoint, @device)",
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 1,
                    "overlap": 0.25, "mode": "gaussian", "sigma_scale": 0.125, "padding_mode": "constant",
                    "cval": 0.0},
        "segmenter": {"_target_": "msxai.bundle.Bundle", "network": "@network",
                      "inferer": "@inferer", "threshold": "@threshold", "min_volume_mm3": "@min_volume_mm3",
                      "device": "@device"},
    }
    (b / "configs" / "inference.json").write_text(json.dumps(cfg))
    return b


def test_command_line_with_a_bundle(tmp_path, capsys):
    from msxai.cli import main

    ds = write_cohort(tmp_path / "cohort", n=2)
    bundle = _write_tiny_bundle(tmp_path)
    out = tmp_path / "report"
    rc = main(["experiments", "--bundle", str(bundle), "--cohort", str(ds), "--out", str(out), "--samples", "1",
               "--max-lesions-per-class", "1", "--context-max-mm", "2", "--context-step-mm", "2", "--n-boot", "50",
               "--randomization-lesions", "1", "--no-progress"])
    assert rc == 0
    assert (out / "report.html").is_file()
    les = rows(out / "lesions.csv")
    assert {r["cls"] for r in les} == {"TP", "FP", "FN", "TN"}
    assert sum(r["cls"] != "TP" for r in les) == 3 and 1 <= sum(r["cls"] == "TP" for r in les) <= 2  # + exp. 1's large TP
    assert "report:" in capsys.readouterr().out
    assert "sha256" in (out / "report.html").read_text()  # the weights used are identified


def test_command_line_errors(tmp_path, capsys):
    from msxai.cli import main

    bundle = _write_tiny_bundle(tmp_path)
    assert main(["experiments", "--bundle", str(bundle), "--out", str(tmp_path / "o")]) == 2
    assert "no cases" in capsys.readouterr().err
    assert main(["experiments", "--bundle", str(bundle), "--cohort", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "dataset.json not found" in capsys.readouterr().err
    ds = write_cohort(tmp_path / "cohort", n=1)
    assert main(["experiments", "--bundle", str(bundle), "--cohort", str(ds), "--split", "val",
                 "--out", str(tmp_path / "o")]) == 2
    assert "split 'val' is empty" in capsys.readouterr().err
    assert main(["experiments", "--bundle", str(tmp_path / "nobundle"), "--cohort", str(ds),
                 "--out", str(tmp_path / "o")]) == 2


def test_partial_run_and_included_results(tmp_path, capsys):
    """A cheap run (TP/FP only, no other experiment) pickles its results; a later report includes them, and a
    context-only run of the same bundle replaces their (absent) context-dilation rows."""
    import shutil

    from msxai.cli import main

    ds = write_cohort(tmp_path / "cohort", n=2)
    first = _write_tiny_bundle(tmp_path)
    other = tmp_path / "other_bundle"
    shutil.copytree(first, other)
    cfg = json.loads((other / "configs" / "inference.json").read_text())
    cfg["bundle_root"] = str(other)
    (other / "configs" / "inference.json").write_text(json.dumps(cfg))
    common = ["--cohort", str(ds), "--samples", "1", "--max-lesions-per-class", "1", "--context-max-mm", "2",
              "--context-step-mm", "2", "--n-boot", "50", "--no-progress"]
    assert main(["experiments", "--bundle", str(first), "--out", str(tmp_path / "r1"), "--classes", "TP,FP",
                 "--skip", "exp1", "--skip", "exp4", "--skip", "exp5", "--skip", "exp6", "--skip", "randomization",
                 "--results-dir", str(tmp_path / "pk"), *common]) == 0
    les1 = rows(tmp_path / "r1" / "lesions.csv")
    assert {r["cls"] for r in les1} == {"TP", "FP"}
    assert rows(tmp_path / "r1" / "exp6_context.csv") == []
    pkl = tmp_path / "pk" / "results_tiny_bundle.pkl"
    assert pkl.is_file()
    # context dilation alone (no full bundle): the true lesions are picked from the truth, like a full run does
    assert main(["experiments", "--context-only-bundle", str(first), "--context-lesions", "2", "--results-dir",
                 str(tmp_path / "pk_ctx"), "--out", str(tmp_path / "r0"), *common]) == 0
    ctx_pkl = tmp_path / "pk_ctx" / "results_tiny_bundle.pkl"
    assert main(["experiments", "--bundle", str(other), "--context-lesions", "2", "--include-results", str(pkl),
                 "--include-results", str(ctx_pkl), "--out", str(tmp_path / "r2"), *common]) == 0
    les2 = rows(tmp_path / "r2" / "lesions.csv")
    assert [r for r in les2 if r["model"] == "tiny_bundle"] == les1  # the included rows, unchanged
    e6 = rows(tmp_path / "r2" / "exp6_context.csv")
    assert {r["model"] for r in e6} == {"tiny_bundle", "other_bundle"}
    lesions_of = {m: {(r["case"], r["lesion_id"]) for r in e6 if r["model"] == m} for m in ("tiny_bundle", "other_bundle")}
    assert lesions_of["tiny_bundle"] == lesions_of["other_bundle"] and len(lesions_of["tiny_bundle"]) == 2
    text = (tmp_path / "r2" / "report.html").read_text()
    assert "included results" in text and "experiments not run (CPU budget)" in text
    assert text.count("Model tiny_bundle") == 1  # the context-only results merged into the full ones
    # report only: the same results, no model run
    assert main(["experiments", "--include-results", str(pkl), "--include-results", str(ctx_pkl), "--out",
                 str(tmp_path / "r4"), "--no-progress"]) == 0
    assert rows(tmp_path / "r4" / "lesions.csv") == les1
    assert {r["model"] for r in rows(tmp_path / "r4" / "exp6_context.csv")} == {"tiny_bundle"}
    assert "computed by:" in (tmp_path / "r4" / "report.html").read_text()
    # experiments 4, 5 and the randomisation check from a second run of the same model fill the first one's gaps
    assert main(["experiments", "--bundle", str(first), "--classes", "TP", "--bulk-minutes", "0.0001", "--skip",
                 "exp1", "--skip", "exp6", "--results-dir", str(tmp_path / "pk2"), "--out", str(tmp_path / "r5"),
                 *common]) == 0
    assert main(["experiments", "--include-results", str(pkl), "--include-results", str(tmp_path / "pk2" / pkl.name),
                 "--include-results", str(ctx_pkl), "--out", str(tmp_path / "r6"), "--no-progress"]) == 0
    assert rows(tmp_path / "r6" / "lesions.csv") == les1  # the bulk maps of the first run only
    for name in ("exp4_sanity", "exp5_transplant", "randomization", "exp6_context"):
        assert rows(tmp_path / "r6" / f"{name}.csv"), name
    text = (tmp_path / "r6" / "report.html").read_text()
    assert text.count("Model tiny_bundle") == 1 and "from another run of this model" in text
    assert main(["experiments", "--bundle", str(other), "--include-results", str(tmp_path / "nope.pkl"),
                 "--out", str(tmp_path / "r3"), *common]) == 2
    assert "results file not found" in capsys.readouterr().err
