"""The saliency-based error flag at explain time: a fitted model shipped in a bundle (models/error_flag.json) gives
`msxai explain` an error score per predicted lesion, equal to a slow twin's (naive reference maps, brute-force
features, the logistic score from the saved numbers); maps made with other settings, drawn domains, other weights, and missing/bad model files give null with a
reason (never a silently mismatched score)."""

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from test_experiments import _write_tiny_bundle
from test_experiments_helpers import BlobNet, write_cohort

from msxai.cli import main
from msxai.experiments.cohort import cohort_cases
from msxai.experiments.error_flag import (
    SALIENCY_FEATURES,
    ErrorFlagModel,
    file_sha256,
    incompatibility,
    load_bundle_flag,
)
from msxai.errors import InputError

torch.set_num_threads(1)


def fitted_flag(sha: str, samples: int = 2, aggregation: str = "max", seed: int = 0) -> ErrorFlagModel:
    """A model fitted on random feature vectors (what it predicts does not matter here, only that it is used)."""
    rng = np.random.default_rng(seed)
    feats = [{n: float(rng.normal()) for n in SALIENCY_FEATURES} for _ in range(20)]
    y = [i % 2 for i in range(20)]
    return ErrorFlagModel.fit(feats, y, SALIENCY_FEATURES, info={
        "model": "tiny_bundle", "weights_sha256": sha, "method": "smoothgrad", "aggregation": aggregation,
        "samples": samples, "sigma_fraction": 0.05, "cohort": ["test"], "auc_oof": 0.9, "auc_oof_ci": [0.8, 0.97]})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("flag")
    ds = write_cohort(root / "cohort", n=1)
    c = cohort_cases(ds)[0]
    subj = {"flair": c.flair, "t1": c.t1, "label": c.truth}
    bundle = _write_tiny_bundle(root)
    seg = root / "seg"
    assert main(["segment", "--bundle", str(bundle), "--flair", subj["flair"], "--t1", subj["t1"], "--out",
                 str(seg), "--threads", "1"]) == 0
    sha = file_sha256(bundle / "models" / "model.pt")
    fitted_flag(sha).save(bundle / "models" / "error_flag.json")
    return {"root": root, "bundle": bundle, "subj": subj, "lesions": seg / "lesions.nii.gz", "sha": sha}


def twin_features(maps, dom, affine, ring_mm=3.0) -> dict:
    """The error flag's features (msxai.experiments.features.SALIENCY_FEATURES) written out from their definitions:
    distances to Ω by brute force over voxel pairs (mm, from the voxel size), the ring (0, 3] mm around Ω."""
    sp = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    vox = float(abs(np.linalg.det(np.asarray(affine)[:3, :3])))
    pts = np.argwhere(dom) * sp
    allv = np.argwhere(np.ones(dom.shape, bool))
    dist = np.array([np.sqrt(((pts - v * sp) ** 2).sum(1)).min() for v in allv]).reshape(dom.shape)
    ring = (dist > 1e-6) & (dist <= ring_mm + 1e-6)
    f, tot = {"log_volume_mm3": float(np.log(dom.sum() * vox))}, {}
    for c, key in enumerate(("flair", "mprage")):
        vin, vr = maps[c][dom].astype(np.float64), maps[c][ring].astype(np.float64)
        f[f"{key}_peak_max"], f[f"{key}_peak_min"], f[f"{key}_mean_in"] = vin.max(), vin.min(), vin.mean()
        f[f"{key}_mass_pos"] = sum(v for v in vin if v > 0) * vox
        f[f"{key}_mass_neg"] = sum(v for v in vin if v < 0) * vox
        f[f"{key}_ring_mean"], f[f"{key}_ring_min"], f[f"{key}_ring_max"] = vr.mean(), vr.min(), vr.max()
        f[f"{key}_ring_pos_frac"] = float(np.mean(vr > 0))
        f[f"{key}_abs_in_ring_ratio"] = np.abs(vin).mean() / np.abs(vr).mean()
        sd = vin.std()
        f[f"{key}_in_std"] = sd
        f[f"{key}_in_skew"] = float(np.mean(((vin - vin.mean()) / sd) ** 3))
        counts = np.histogram(np.abs(vin), bins=16, range=(0.0, float(np.abs(vin).max())))[0]
        pk = counts[counts > 0] / counts.sum()
        f[f"{key}_in_entropy"] = float(-(pk * np.log(pk)).sum())
        f[f"{key}_in_pos_frac"] = float(np.mean(vin > 0))
        tot[key] = np.abs(vin).sum() + np.abs(vr).sum()
    f["flair_share"] = tot["flair"] / (tot["flair"] + tot["mprage"])
    return f


def _explain(s, out, *extra):
    return main(["explain", "--bundle", str(s["bundle"]), "--flair", s["subj"]["flair"], "--t1", s["subj"]["t1"],
                 "--device", "cpu", "--no-progress", "--out", str(out), *extra])


def test_explain_scores_every_predicted_lesion_like_the_slow_twin(setup, capsys):
    s = setup
    out = s["root"] / "scored"
    assert _explain(s, out, "--lesions", str(s["lesions"]), "--samples", "2") == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "saliency.json").read_text())
    info = doc["settings"]["error_flag"]
    assert info["loaded"] and info["fitted_for"]["samples"] == 2 and info["reason"] is None
    assert info["model_file"].endswith("models/error_flag.json")
    # slow twin, sharing no code with the flag: maps by the naive reference (MONAI's sliding-window inference, one
    # autograd.grad per lesion voxel), features by brute force, the logistic score from the saved JSON's numbers
    from saliency_helpers import naive_instance_smoothgrad

    from msxai.bundle import load_bundle

    b = load_bundle(str(s["bundle"]))
    prep = b.prepare(s["subj"]["flair"], s["subj"]["t1"])
    labels = np.asarray(nib.load(str(s["lesions"])).dataobj).astype(int)
    saved = json.loads((s["bundle"] / "models" / "error_flag.json").read_text())
    assert doc["domains"], "the tiny bundle found no lesion"
    for name, d in doc["domains"].items():
        dom = labels == d["lesion_id"]
        maps = naive_instance_smoothgrad(b.network, prep.image, dom, b.inferer, n_samples=2, seed=0)
        feats = twin_features(maps, dom, prep.affine)
        z = (np.array([feats[n] for n in saved["feature_names"]]) - saved["mean"]) / np.array(saved["scale"])
        ref = 1.0 / (1.0 + np.exp(-(z @ np.array(saved["coef"]) + saved["intercept"])))
        assert d["error_score"] == pytest.approx(ref, rel=1e-4, abs=1e-6), name
        assert d["error_flag"] == (ref > saved["threshold"]) and d["error_flag_reason"] is None
        assert f"{name}: error score" in printed
    rows = list(csv.DictReader(open(out / "saliency.csv")))
    assert {"error_score", "error_flag", "error_flag_reason"} <= set(rows[0])
    for r in rows:
        assert float(r["error_score"]) == pytest.approx(doc["domains"][r["domain"]]["error_score"])


@pytest.mark.parametrize("extra, reason", [
    (["--samples", "1"], "N = 2 noise samples, these have N = 1"),
    (["--samples", "2", "--aggregation", "mean"], "fitted on Eq. 3 (max) maps, these are Eq. 2 (mean)"),
    (["--samples", "2", "--sigma", "0.1"], "sigma"),
    (["--method", "gradcampp"], "gradcampp maps are not scored"),
])
def test_mismatched_settings_give_null_and_a_reason(setup, extra, reason, capsys):
    s = setup
    out = s["root"] / f"mismatch_{abs(hash(tuple(extra)))}"
    assert _explain(s, out, "--lesions", str(s["lesions"]), "--lesion-id", "all", *extra) == 0
    assert reason in capsys.readouterr().out
    doc = json.loads((out / "saliency.json").read_text())
    for d in doc["domains"].values():
        assert d["error_score"] is None and d["error_flag"] is None and reason in d["error_flag_reason"]


def test_drawn_domain_other_weights_and_missing_or_bad_files(setup, capsys, tmp_path):
    s = setup
    subj = s["subj"]
    # a drawn domain (here: the truth mask) is not a lesion the bundle predicted
    assert _explain(s, tmp_path / "dom", "--domain", subj["label"], "--samples", "2") == 0
    d = json.loads((tmp_path / "dom" / "saliency.json").read_text())["domains"]["domain"]
    assert d["error_score"] is None and "drawn domain" in d["error_flag_reason"]
    # --error-flag none: no score fields at all
    assert _explain(s, tmp_path / "none", "--lesions", str(s["lesions"]), "--samples", "2", "--error-flag",
                    "none") == 0
    d = next(iter(json.loads((tmp_path / "none" / "saliency.json").read_text())["domains"].values()))
    assert "error_score" not in d
    # an explicit model file that is missing or not a model: refused before any map is computed
    capsys.readouterr()
    assert _explain(s, tmp_path / "x", "--lesions", str(s["lesions"]), "--error-flag", str(tmp_path / "no.json")) == 2
    assert "error-flag model not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert _explain(s, tmp_path / "x", "--lesions", str(s["lesions"]), "--error-flag", str(bad)) == 2
    assert "not a valid error-flag model" in capsys.readouterr().err
    bare = tmp_path / "bare.json"
    m = fitted_flag(s["sha"])
    m.info = {}
    m.save(bare)
    assert _explain(s, tmp_path / "x", "--lesions", str(s["lesions"]), "--error-flag", str(bare)) == 2
    assert "does not record" in capsys.readouterr().err
    # the bundle's own file: other weights, corrupted, absent -> explain still runs, null + reason
    other = tmp_path / "other_bundle"
    shutil.copytree(s["bundle"], other)
    cfg = json.loads((other / "configs" / "inference.json").read_text())
    cfg["bundle_root"] = str(other)
    (other / "configs" / "inference.json").write_text(json.dumps(cfg))
    torch.save(BlobNet(gain=2.0).state_dict(), other / "models" / "model.pt")
    cases = [("retrained", "(retrained)"), ("corrupt", "unreadable"), ("absent", "ships no fitted error flag")]
    for kind, reason in cases:
        if kind == "corrupt":
            (other / "models" / "error_flag.json").write_text("[]")
        if kind == "absent":
            (other / "models" / "error_flag.json").unlink()
        out = tmp_path / kind
        assert main(["explain", "--bundle", str(other), "--flair", subj["flair"], "--t1", subj["t1"], "--device",
                     "cpu", "--no-progress", "--out", str(out), "--lesions", str(s["lesions"]), "--samples",
                     "2"]) == 0
        doc = json.loads((out / "saliency.json").read_text())
        for name, d in doc["domains"].items():
            if d["error_flag_reason"] and "mean softmax" in d["error_flag_reason"]:
                continue  # the other weights do not predict this lesion: that reason comes first
            assert d["error_score"] is None and reason in d["error_flag_reason"], (kind, d["error_flag_reason"])
        assert reason in doc["settings"]["error_flag"]["reason"]


def test_incompatibility_and_loading_rules(tmp_path):
    m = fitted_flag("abc", samples=4)
    ok = dict(method="smoothgrad", aggregation="max", n_samples=4, sigma_fraction=0.05, weights_sha256="abc")
    assert incompatibility(m, **ok) is None
    assert "N = 4" in incompatibility(m, **{**ok, "n_samples": 50})
    assert "retrained" in incompatibility(m, **{**ok, "weights_sha256": "def"})
    assert "absolute noise sigma" in incompatibility(m, **ok, sigma_abs=0.3)
    assert "interpolated" in incompatibility(m, **ok, on_network_grid=False)
    assert load_bundle_flag(tmp_path).reason.startswith(f"bundle {tmp_path.name} ships no fitted error flag")
    with pytest.raises(InputError, match="not found"):
        load_bundle_flag(tmp_path, tmp_path / "missing.json")


def test_a_flag_whose_auc_interval_reaches_half_is_not_validated(tmp_path):
    """A flag whose cross-validated AUC interval reaches 0.5 (the shipped 0.2.0 flag: 0.25 [0, 0.56]) or that
    records none is not used for scores: no model, and the reason says "not validated" and why."""
    (tmp_path / "models").mkdir()
    f = tmp_path / "models" / "error_flag.json"
    for ci, expect in (([0.0, 0.5556], "[0.00, 0.56]"), ([0.5, 0.9], "[0.50, 0.90]"), (None, "no cross-validated")):
        m = fitted_flag("abc")
        m.info["auc_oof"] = 0.25
        if ci is None:
            m.info.pop("auc_oof_ci")
        else:
            m.info["auc_oof_ci"] = ci
        m.save(f)
        for loaded in (load_bundle_flag(tmp_path), load_bundle_flag(tmp_path, f)):
            assert loaded.model is None and loaded.reason.startswith("not validated"), loaded.reason
            assert expect in loaded.reason and loaded.describe()["loaded"] is False
    m = fitted_flag("abc")
    m.save(f)
    assert load_bundle_flag(tmp_path).model is not None  # interval above 0.5: used


def test_monai_label_explain_json_carries_the_same_scores(setup, tmp_path):
    """The MONAI Label explain task's service (lib.service.StudyService, in process): the result JSON holds the
    error score of each lesion (same as `msxai explain`), the model's provenance, and null + reason for drawn
    domains and for lesions of a saved label."""
    from lib.service import StudyService  # the app's (apps/msxai on sys.path: tests/conftest.py)

    s = setup
    studies = tmp_path / "studies"
    studies.mkdir()
    flair = studies / "tiny00_FLAIR.nii.gz"
    shutil.copy(s["subj"]["flair"], flair)
    shutil.copy(s["subj"]["t1"], studies / "tiny00_T1.nii.gz")
    svc = StudyService(studies, {"tiny": s["bundle"]})
    req = {"image": str(flair), "image_id": "tiny00_FLAIR", "network": "tiny", "lesion": "all", "samples": 2,
           "seed": 0, "aggregation": "max", "sigma": 0.05}
    res = svc.explain_request("smoothgrad", req, tmp_path / "out.nii.gz")
    assert _explain(s, tmp_path / "cli", "--lesions", str(s["lesions"]), "--samples", "2") == 0
    cli_doc = json.loads((tmp_path / "cli" / "saliency.json").read_text())
    assert res["error_flag"]["loaded"] and res["error_flag"]["fitted_for"]["weights_sha256"] == s["sha"]
    assert set(res["summary"]) == set(cli_doc["domains"])
    for name, d in res["summary"].items():
        ref = cli_doc["domains"][name]
        assert d["error_score"] == pytest.approx(ref["error_score"], rel=1e-4, abs=1e-6)
        assert d["error_flag"] == ref["error_flag"] and d["error_flag_reason"] is None
    summary_file = studies / res["artifacts_dir"] / "summary.json"
    assert json.loads(summary_file.read_text())["error_flag"]["loaded"]
    # one explain-and-write path: the app's run folder holds the CLI's map files, byte for byte
    cli_maps = sorted(f.name for f in (tmp_path / "cli").glob("*.nii.gz"))
    assert cli_maps == sorted(f"{n}_smoothgrad_{k}.nii.gz" for n in cli_doc["domains"] for k in ("flair", "mprage"))
    app_maps = sorted(Path(f).name for f in res["files"] if not f.endswith(("_domain.nii.gz", "labelmap.nii.gz"))
                      and f.endswith(".nii.gz"))
    assert app_maps == cli_maps
    for f in cli_maps:
        assert (summary_file.parent / f).read_bytes() == (tmp_path / "cli" / f).read_bytes(), f
    # N differs from the fitted model: null + reason, the maps are still served
    res = svc.explain_request("smoothgrad", {**req, "samples": 1}, tmp_path / "out1.nii.gz")
    assert all(d["error_score"] is None and "N = 2" in d["error_flag_reason"] for d in res["summary"].values())
    # a drawn domain (uploaded label) and the lesions of a saved label
    res = svc.explain_request("smoothgrad", {**req, "label": s["subj"]["label"]}, tmp_path / "out2.nii.gz")
    assert "drawn domain" in res["summary"]["client_label"]["error_flag_reason"]
    res = svc.explain_request("smoothgrad", {**req, "lesions_label": str(s["lesions"])}, tmp_path / "out3.nii.gz")
    assert all("not the model's own" in d["error_flag_reason"] for d in res["summary"].values())
