"""The three MONAI bundles: metadata against the project's schema (offline), `monai.bundle run` of inference on a
tiny volume, `msxai segment` giving the same outputs, the load_bundle contract, the pipeline against a direct
single-window twin, evaluate.json and train.json end to end on a tiny cohort."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from msxai.bundle import BUNDLE_NAMES, evaluate_bundle, load_bundle, train_bundle
from msxai.errors import InputError
from msxai.io import save_volume

torch.set_num_threads(1)
REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO_ROOT / "bundles"
SCHEMA = REPO_ROOT / "configs" / "bundle_schema.json"
SHAPE = (40, 44, 36)
AFFINE = np.array([[-1.0, 0, 0, 90.0], [0, 1.0, 0, -126.0], [0, 0, 1.0, -72.0], [0, 0, 0, 1]])


def _subject(rng, out: Path, sid: str, shape=SHAPE) -> dict:
    g = np.indices(shape).astype(float)
    c = (np.array(shape) - 1)[:, None, None, None] / 2
    brain = (((g - c) / (np.array(shape)[:, None, None, None] * 0.42)) ** 2).sum(0) < 1
    les = np.zeros(shape, np.int16)
    for k in range(3):
        p = rng.integers(12, 24, 3)
        les[p[0] : p[0] + 3, p[1] : p[1] + 3, p[2] : p[2] + 3] = k + 1
    les[~brain] = 0
    flair = brain * (100 + 5 * rng.standard_normal(shape)) + (les > 0) * 60
    t1 = brain * (80 + 5 * rng.standard_normal(shape)) - (les > 0) * 30
    files = {"flair": f"{sid}_FLAIR.nii.gz", "t1": f"{sid}_T1.nii.gz", "label": f"{sid}_lesions.nii.gz",
             "brain_mask": f"{sid}_brainmask.nii.gz"}
    save_volume(out / files["flair"], flair.astype(np.float32), AFFINE)
    save_volume(out / files["t1"], t1.astype(np.float32), AFFINE)
    save_volume(out / files["label"], les, AFFINE)
    save_volume(out / files["brain_mask"], brain.astype(np.uint8), AFFINE)
    return {"id": sid, **files}


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_cohort")
    rng = np.random.default_rng(0)
    subjects = [_subject(rng, out, f"tiny{i}") for i in range(4)]
    splits = {"train": ["tiny0", "tiny1"], "val": ["tiny2"], "test": ["tiny3"]}
    (out / "dataset.json").write_text(json.dumps({"subjects": subjects, "splits": splits}))
    return out


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_metadata_verifies_offline_against_project_schema(name, tmp_path):
    from monai.bundle import verify_metadata

    meta = BUNDLES_DIR / name / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta), filepath=str(SCHEMA))  # no download: the schema file exists
    m = json.loads(meta.read_text())
    fmt = m["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == 2
    assert fmt["inputs"]["image"]["channel_def"] == {"0": "FLAIR", "1": "MPRAGE"}
    assert fmt["outputs"]["pred"]["num_channels"] == 2 and fmt["outputs"]["pred"]["channel_def"]["1"] == "lesion"
    assert m["msxai"]["threshold"] == 0.3 and m["msxai"]["min_lesion_mm3"] == 5.0 and m["msxai"]["connectivity"] == 18
    # the schema does reject a metadata without the msxai block / with a wrong threshold
    for broken in ({k: v for k, v in m.items() if k != "msxai"}, {**m, "msxai": {**m["msxai"], "threshold": 3}}):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(broken))
        with pytest.raises(ValueError):
            verify_metadata(meta_file=str(bad), filepath=str(SCHEMA))


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_bundle_files_and_config_consistency(name):
    root = BUNDLES_DIR / name
    for rel in ("LICENSE", "docs/README.md", "configs/inference.json", "configs/train.json", "configs/evaluate.json",
                "configs/metadata.json", "models/model.pt"):
        assert (root / rel).is_file(), rel
    assert (root / "models" / "model.pt").stat().st_size <= 25 * 1024 * 1024
    inf = json.loads((root / "configs" / "inference.json").read_text())
    train = json.loads((root / "configs" / "train.json").read_text())
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert train["network_def"] == inf["network_def"]  # one architecture for training and inference
    assert inf["inferer"]["roi_size"] == [96, 96, 96] and inf["inferer"]["overlap"] == 0.25
    assert inf["inferer"]["mode"] == "gaussian"
    assert inf["gradcam_layer"] == meta["msxai"]["gradcam_layer"]
    assert inf["network_def"]["name"] == meta["msxai"]["network"]
    state = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert all(torch.is_tensor(v) for v in state.values())


@pytest.fixture(scope="module")
def bundles():
    return {name: load_bundle(BUNDLES_DIR / name) for name in BUNDLE_NAMES}


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_load_bundle_contract(bundles, name):
    from monai.inferers import SlidingWindowInferer

    b = bundles[name]
    assert b.name == name and b.path == (BUNDLES_DIR / name).resolve() and str(b.device) == "cpu"
    assert isinstance(b.network, torch.nn.Module) and not b.network.training
    assert isinstance(b.inferer, SlidingWindowInferer)
    assert tuple(b.inferer.roi_size) == (96, 96, 96) and b.inferer.overlap == 0.25
    assert b.threshold == 0.3 and b.min_volume_mm3 == 5.0
    assert b.gradcam_layer in dict(b.network.named_modules())
    state = torch.load(b.path / "models" / "model.pt", map_location="cpu", weights_only=True)
    for k, v in b.network.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_pipeline_matches_single_window_twin(bundles, tiny_cohort, name):
    """A volume smaller than one 96^3 window: the sliding window pads it (constant 0) into one window whose
    gaussian weight cancels, so prob must equal softmax(network(zero-padded image))[1] cropped back."""
    from msxai.lesions import lesion_instances

    b = bundles[name]
    prepared = b.prepare(tiny_cohort / "tiny3_FLAIR.nii.gz", tiny_cohort / "tiny3_T1.nii.gz")
    result = b.segment(prepared)
    assert result.prob.shape == SHAPE and result.prob.dtype == np.float32
    assert result.labels.dtype == np.int32 and np.allclose(result.affine, AFFINE)
    np.testing.assert_allclose(result.prob, single_window_prob(b.network, prepared.image), atol=2e-5)
    np.testing.assert_array_equal(result.labels, lesion_instances(result.prob, 0.3, 5.0, AFFINE))
    assert [r["id"] for r in result.table] == list(range(1, int(result.labels.max()) + 1))


def single_window_prob(network, image: np.ndarray) -> np.ndarray:
    """Lesion softmax of a volume smaller than one 96^3 window: zero-padded (centred) into one window, one forward
    pass, cropped back (what the gaussian-weighted sliding window gives for it)."""
    x = torch.from_numpy(image)[None]
    pads = [(96 - s) for s in image.shape[1:]]
    padded = torch.nn.functional.pad(x, [p for s in reversed(pads) for p in (s // 2, s - s // 2)])
    with torch.no_grad():
        logits = network(padded)
    sl = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, image.shape[1:]))
    return torch.softmax(logits, 1)[0, 1][sl].numpy()


def _read(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_monai_bundle_run_equals_msxai_segment(name, tiny_cohort, tmp_path):
    from msxai.cli import main

    flair, t1 = tiny_cohort / "tiny3_FLAIR.nii.gz", tiny_cohort / "tiny3_T1.nii.gz"
    out_monai, out_cli = tmp_path / "monai", tmp_path / "cli"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLES_DIR / name / "configs" / "inference.json"),
           "--flair", str(flair), "--t1", str(t1), "--output_dir", str(out_monai)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["segment", "--bundle", str(BUNDLES_DIR / name), "--flair", str(flair), "--t1", str(t1),
                 "--out", str(out_cli), "--threads", "1"]) == 0
    for fname in ("probability.nii.gz", "mask.nii.gz", "lesions.nii.gz"):
        a, aff_a = _read(out_monai / fname)
        c, aff_c = _read(out_cli / fname)
        assert a.shape == SHAPE and np.allclose(aff_a, AFFINE) and np.allclose(aff_c, AFFINE)
        np.testing.assert_array_equal(a, c)
    prob, _ = _read(out_monai / "probability.nii.gz")
    assert prob.dtype == np.float32 and prob.min() >= 0 and prob.max() <= 1
    assert json.loads((out_monai / "lesions.json").read_text()) == json.loads((out_cli / "lesions.json").read_text())
    assert (out_monai / "lesions.csv").read_text() == (out_cli / "lesions.csv").read_text()


def test_bundle_copied_elsewhere_runs_with_its_own_weights(tiny_cohort, tmp_path):
    """bundle_root is where the bundle is: a copy of msxai_unet with other weights, run by `python -m monai.bundle
    run` from another folder and by `msxai segment`, uses the copy's weights (not the repository's bundles/); a
    config read without a way to know its folder is refused with the way to pass it."""
    import shutil

    from monai.bundle import ConfigParser

    from msxai.cli import main

    copy = tmp_path / "elsewhere" / "my_unet"
    shutil.copytree(BUNDLES_DIR / "msxai_unet", copy, ignore=shutil.ignore_patterns("eval", "docs", "__pycache__"))
    state = torch.load(copy / "models" / "model.pt", map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, copy / "models" / "model.pt")
    flair, t1 = tiny_cohort / "tiny3_FLAIR.nii.gz", tiny_cohort / "tiny3_T1.nii.gz"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           str(copy / "configs" / "inference.json"), "--flair", str(flair), "--t1", str(t1),
                           "--output_dir", str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["segment", "--bundle", str(copy), "--flair", str(flair), "--t1", str(t1),
                 "--out", str(tmp_path / "cli"), "--threads", "1"]) == 0
    assert main(["segment", "--bundle", str(BUNDLES_DIR / "msxai_unet"), "--flair", str(flair), "--t1", str(t1),
                 "--out", str(tmp_path / "original"), "--threads", "1"]) == 0
    run, cli, original = (_read(tmp_path / d / "probability.nii.gz")[0] for d in ("run", "cli", "original"))
    np.testing.assert_array_equal(run, cli)
    assert np.abs(run - original).max() > 1e-3  # the copy's weights, not the repository's
    b = load_bundle(copy)
    assert b.path == copy.resolve() and torch.equal(b.network.state_dict()[next(iter(state))], next(iter(state.values())))
    parser = ConfigParser()
    parser.read_config(str(copy / "configs" / "inference.json"))
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("checkpoint")
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("bundle_root of msxai_unet is unknown" in c and "--bundle_root" in c for c in chain), chain


def test_inference_config_without_inputs_names_the_problem(tmp_path):
    from msxai.cli import main

    with pytest.raises(InputError, match="no FLAIR image given"):
        load_bundle(BUNDLES_DIR / "msxai_unet").run("", "", tmp_path)
    assert main(["segment", "--bundle", "unet", "--flair", str(tmp_path / "nope.nii.gz"), "--t1", "x",
                 "--out", str(tmp_path)]) == 2
    with pytest.raises(InputError, match="not an msxai bundle"):
        load_bundle(tmp_path)


def test_evaluate_bundle_matches_independent_metrics(bundles, tiny_cohort, tmp_path):
    """evaluate.json on the test split against a twin that shares none of the evaluation code: the probability from
    one zero-padded window, lesions by a python BFS (18-connected, >= 5 voxels = 5 mm^3 at 1 mm), the Shifts
    challenge's nDSC, lesion-wise counts by brute force."""
    from test_lesions import brute_force_classes, brute_force_instances
    from test_metrics import shifts_dice_norm_metric

    metrics = evaluate_bundle(BUNDLES_DIR / "msxai_unet", tiny_cohort, split="test", metrics_path=tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["n_cases"] == 1
    b = bundles["msxai_unet"]
    prob = single_window_prob(b.network, b.prepare(tiny_cohort / "tiny3_FLAIR.nii.gz",
                                                    tiny_cohort / "tiny3_T1.nii.gz").image)
    pred = brute_force_instances(prob > 0.3, 18, min_voxels=5)
    truth_given = np.asarray(nib.load(str(tiny_cohort / "tiny3_lesions.nii.gz")).dataobj) > 0
    truth = brute_force_instances(truth_given, 18, min_voxels=5)
    p, t = pred > 0, truth_given
    tp, fp, fn, detected = brute_force_classes(pred, truth)
    n_pred, n_truth = len(tp) + len(fp), len(detected) + len(fn)
    tpr = len(detected) / n_truth if n_truth else 1.0
    precision = len(tp) / n_pred if n_pred else 1.0
    twin = {"dice": 2 * (p & t).sum() / (p.sum() + t.sum()) if p.sum() + t.sum() else 1.0,
            "ndsc": shifts_dice_norm_metric(t.astype(np.uint8), p.astype(np.uint8)),
            "TPR": tpr, "FNR": len(fn) / n_truth if n_truth else 0.0, "FDR": len(fp) / n_pred if n_pred else 0.0,
            "F1": 2 * precision * tpr / (precision + tpr) if precision + tpr else 0.0}
    case = metrics["cases"][0]
    assert case["id"] == "tiny3" and n_truth >= 1
    for key, value in twin.items():
        assert case[key] == pytest.approx(value, abs=1e-9) and metrics["mean"][key] == pytest.approx(value, abs=1e-9)


@pytest.mark.parametrize("name,patch", [("msxai_unet", 32), ("msxai_dynunet", 32), ("msxai_swinunetr", 64)])
def test_train_config_runs_and_saves_best_checkpoint(name, patch, tiny_cohort, tmp_path):
    """One short epoch of train.json (MONAI SupervisedTrainer + evaluator + handlers), stopped by the time limit
    after its first iteration; the best checkpoint by validation Dice is a loadable plain state dict."""
    ckpt, logs = tmp_path / "models", tmp_path / "logs"
    summary = train_bundle(BUNDLES_DIR / name, tiny_cohort, epochs=3, max_minutes=1e-6, num_threads=1,
                           patch_size=[patch] * 3, samples_per_volume=1, batch_size=1, val_cases=0,
                           ckpt_dir=str(ckpt), log_dir=str(logs))
    assert summary["epochs"] == 1 and summary["stopped_by_time_limit"]
    assert len(summary["validations"]) == 1 and 0.0 <= summary["best_val_dice"] <= 1.0
    assert np.isfinite(summary["epoch_loss"][0])
    record = json.loads((logs / "training.json").read_text())
    assert record["best_epoch"] == 1
    state = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    initial = torch.load(BUNDLES_DIR / name / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state.keys() == initial.keys()
    b = load_bundle(BUNDLES_DIR / name, checkpoint=str(ckpt / "model.pt"))
    assert any(not torch.equal(b.network.state_dict()[k], initial[k]) for k in initial)


def test_train_keeps_periodic_checkpoints(tiny_cohort, tmp_path):
    """``save_every`` (``msxai train --save-every``) keeps the network of every N-th epoch; the last one is the
    final network, and they differ from each other (the weights moved between them)."""
    logs = tmp_path / "logs"
    train_bundle(BUNDLES_DIR / "msxai_unet", tiny_cohort, epochs=2, num_threads=1, save_every=1,
                 patch_size=[32] * 3, samples_per_volume=1, batch_size=1, val_cases=0, val_interval=2,
                 ckpt_dir=str(tmp_path / "models"), log_dir=str(logs))
    saved = sorted(p.name for p in (logs / "checkpoints").glob("*.pt"))
    assert saved == ["model_epoch=1.pt", "model_epoch=2.pt"]
    first, last = (torch.load(logs / "checkpoints" / n, map_location="cpu", weights_only=True) for n in saved)
    final = torch.load(logs / "model_final.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(last[k], final[k]) for k in final)
    assert any(not torch.equal(first[k], last[k]) for k in last)
    with pytest.raises(InputError, match="save_every"):
        train_bundle(BUNDLES_DIR / "msxai_unet", tiny_cohort, save_every=0)


@pytest.mark.parametrize("name,size", [("unet", 32), ("dynunet", 32), ("swinunetr", 64)])
def test_lesion_prior_init_sets_output_bias(name, size, tmp_path):
    from msxai.networks import build_network
    from msxai.training import initialize_weights, lesion_prior_init

    torch.manual_seed(0)
    net = lesion_prior_init(build_network(name), prior=0.01)
    heads = [m for m in net.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)) and m.out_channels == 2]
    assert heads
    for m in heads:
        assert m.bias[0].item() == 0.0 and m.bias[1].item() == pytest.approx(np.log(0.01 / 0.99))
    with torch.no_grad():
        prob = torch.softmax(net.eval()(torch.randn(1, 2, size, size, size)), 1)[:, 1]
    assert prob.median().item() < 0.1  # starts near the prior instead of 0.5
    # resuming from a checkpoint replaces the initialisation exactly
    torch.manual_seed(1)
    other = build_network(name)
    torch.save(other.state_dict(), tmp_path / "w.pt")
    resumed = initialize_weights(net, str(tmp_path / "w.pt"))
    assert resumed.training
    for k, v in other.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v)
    assert initialize_weights(net, "") is net
