"""The engine API and the `msxai explain` command: per-domain maps and summaries, files on the input grid,
refusals (unknown lesion id, empty domain, mismatched grid), and an end-to-end run with the real UNet bundle."""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer

from msxai import cli
from msxai.errors import EmptyDomainError, GeometryError, InputError, UnknownLesionError
from msxai.io import save_volume
from msxai.saliency.engine import explain, explain_to_files, lesion_domains
from msxai.saliency.gradcampp import gradcampp
from msxai.saliency.sliding import SlidingWindowSpec
from msxai.saliency.smoothgrad import instance_smoothgrad

from saliency_helpers import TinySegNet, random_image

torch.set_num_threads(1)
SHAPE = (14, 12, 10)


def fake_bundle(seed=0):
    """A bundle around a tiny network (its pre-processing chain keeps the FLAIR's grid: no orientation, spacing)."""
    from msxai.bundle import Bundle

    return Bundle(TinySegNet(seed), SlidingWindowInferer((8, 8, 8), overlap=0.25, mode="gaussian"), name="tiny",
                  gradcam_layer="mid")


@pytest.fixture()
def case(tmp_path):
    rng = np.random.default_rng(0)
    affine = np.array([[-1.2, 0, 0, 30], [0, 1.1, 0, -20], [0, 0, 1.5, 5], [0, 0, 0, 1]], float)
    flair = rng.uniform(0.5, 2.0, SHAPE).astype(np.float32)
    t1 = rng.uniform(0.5, 2.0, SHAPE).astype(np.float32)
    labels = np.zeros(SHAPE, np.int32)
    labels[2:5, 3:5, 2:4] = 1
    labels[9:11, 7:10, 5:7] = 3
    paths = {}
    for name, arr in (("flair", flair), ("t1", t1), ("lesions", labels)):
        paths[name] = save_volume(tmp_path / f"{name}.nii.gz", arr, affine)
    dom = np.zeros(SHAPE, np.uint8)
    dom[6:8, 1:3, 1:3] = 1
    paths["domain"] = save_volume(tmp_path / "domain.nii.gz", dom, affine)
    paths["empty"] = save_volume(tmp_path / "empty.nii.gz", np.zeros(SHAPE, np.uint8), affine)
    paths["other_grid"] = save_volume(tmp_path / "other.nii.gz", dom, affine * np.array([1, 1, 2, 1])[:, None])
    return SimpleNamespace(paths=paths, affine=affine, labels=labels, dom=dom > 0, tmp=tmp_path)


def test_engine_explain_matches_direct_calls():
    bundle = fake_bundle(1)
    img = random_image(SHAPE, seed=2)
    spec = SlidingWindowSpec.from_inferer(bundle.inferer)
    doms = {"a": np.zeros(SHAPE, bool), "b": np.zeros(SHAPE, bool)}
    doms["a"][2:4, 2:4, 2:4] = True
    doms["b"][10:12, 8:10, 6:8] = True
    got = {e.name: e for e in explain(bundle, img, doms, n_samples=2, seed=3)}
    assert set(got) == {"a", "b"}
    for n, d in doms.items():
        ref = instance_smoothgrad(bundle.network, img, d, spec, n_samples=2, seed=3)
        assert set(got[n].maps) == {"smoothgrad_flair", "smoothgrad_mprage"}
        np.testing.assert_allclose(got[n].maps["smoothgrad_flair"], ref[0], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(got[n].maps["smoothgrad_mprage"], ref[1], rtol=1e-6, atol=1e-9)
        s = got[n].summary
        assert s["domain_voxels"] == 8 and 0 <= s["mean_probability"] <= 1
        assert s["maps"]["smoothgrad_flair"]["peak_max"] == pytest.approx(float(ref[0].max()), rel=1e-6)
    cams = {e.name: e for e in explain(bundle.network, img, doms, method="gradcampp", spec=spec, layer="mid")}
    np.testing.assert_allclose(cams["a"].maps["gradcampp"], gradcampp(bundle.network, img, spec, "mid", domain=doms["a"]),
                               rtol=1e-6)
    with pytest.raises(InputError, match="method"):
        list(explain(bundle, img, doms, method="lime"))
    with pytest.raises(ValueError, match="SlidingWindowSpec"):
        list(explain(bundle.network, img, doms))


def test_lesion_domains():
    labels = np.zeros(SHAPE, np.int32)
    labels[1, 1, 1] = 2
    labels[5, 5, 5] = 7
    assert set(lesion_domains(labels, "all")) == {"lesion_2", "lesion_7"}
    assert set(lesion_domains(labels, "7")) == {"lesion_7"}
    assert set(lesion_domains(labels, "2,7")) == {"lesion_2", "lesion_7"}
    with pytest.raises(UnknownLesionError, match="valid ids: 2, 7"):
        lesion_domains(labels, 3)
    with pytest.raises(InputError, match="integer"):
        lesion_domains(labels, "two")
    with pytest.raises(EmptyDomainError):
        lesion_domains(np.zeros(SHAPE, np.int32), "all")


def test_explain_to_files_writes_maps_and_summaries(case):
    bundle = fake_bundle(2)
    out = case.tmp / "out"
    res = explain_to_files(bundle, case.paths["flair"], case.paths["t1"], out, lesions_path=case.paths["lesions"],
                           n_samples=2, progress=False)
    assert list(res["files"]) == ["lesion_1", "lesion_3"]
    for k in (1, 3):
        for seq in ("flair", "mprage"):
            img = nib.load(str(out / f"lesion_{k}_smoothgrad_{seq}.nii.gz"))
            assert img.shape == SHAPE and img.get_data_dtype() == np.float32
            np.testing.assert_allclose(img.affine, case.affine, atol=1e-5)
    # the written map is the engine's map of the prepared image
    prep = fake_bundle(0).prepare(case.paths["flair"], case.paths["t1"])
    spec = SlidingWindowSpec.from_inferer(bundle.inferer)
    ref = instance_smoothgrad(bundle.network, prep.image, case.labels == 3, spec, n_samples=2)
    got = np.asarray(nib.load(str(out / "lesion_3_smoothgrad_mprage.nii.gz")).dataobj)
    np.testing.assert_allclose(got, ref[1], rtol=1e-6, atol=1e-9)
    data = json.loads((out / "saliency.json").read_text())
    assert data["settings"]["method"] == "smoothgrad" and data["settings"]["aggregation"] == "max"
    assert data["domains"]["lesion_3"]["lesion_id"] == 3
    assert data["domains"]["lesion_1"]["domain_volume_mm3"] == pytest.approx(12 * 1.2 * 1.1 * 1.5)
    rows = list(csv.DictReader(open(out / "saliency.csv")))
    assert [(r["domain"], r["map"]) for r in rows] == [
        ("lesion_1", "smoothgrad_flair"), ("lesion_1", "smoothgrad_mprage"),
        ("lesion_3", "smoothgrad_flair"), ("lesion_3", "smoothgrad_mprage")]
    # Grad-CAM++ on one lesion, and a drawn domain
    explain_to_files(bundle, case.paths["flair"], case.paths["t1"], out, lesions_path=case.paths["lesions"],
                     lesion_ids="1", method="gradcampp", progress=False)
    assert (out / "lesion_1_gradcampp.nii.gz").is_file()
    res = explain_to_files(bundle, case.paths["flair"], case.paths["t1"], case.tmp / "dom",
                           domain_path=case.paths["domain"], n_samples=1, aggregation="mean", progress=False)
    assert list(res["files"]) == ["domain"]
    assert (case.tmp / "dom" / "domain_smoothgrad_flair.nii.gz").is_file()


def test_explain_refusals(case):
    bundle = fake_bundle(0)
    p = case.paths
    with pytest.raises(UnknownLesionError, match="unknown lesion id 2"):
        explain_to_files(bundle, p["flair"], p["t1"], case.tmp / "x", lesions_path=p["lesions"], lesion_ids="2",
                         n_samples=1, progress=False)
    with pytest.raises(EmptyDomainError, match="empty"):
        explain_to_files(bundle, p["flair"], p["t1"], case.tmp / "x", domain_path=p["empty"], progress=False)
    with pytest.raises(GeometryError, match="domain and FLAIR"):
        explain_to_files(bundle, p["flair"], p["t1"], case.tmp / "x", domain_path=p["other_grid"], progress=False)
    with pytest.raises(InputError, match="nothing to explain"):
        explain_to_files(bundle, p["flair"], p["t1"], case.tmp / "x", progress=False)
    with pytest.raises(InputError, match="not a module"):
        explain_to_files(bundle, p["flair"], p["t1"], case.tmp / "x", lesions_path=p["lesions"], method="gradcampp",
                         layer="nope", progress=False)


def test_cli_explain_with_injected_bundle(case, monkeypatch, capsys):
    import msxai.bundle

    monkeypatch.setattr(msxai.bundle, "load_bundle", lambda path, device="cpu": fake_bundle(0))
    p = case.paths
    out = case.tmp / "cli"
    base = ["explain", "--flair", str(p["flair"]), "--t1", str(p["t1"]), "--device", "cpu", "--no-progress"]
    rc = cli.main(base + ["--lesions", str(p["lesions"]), "--lesion-id", "3", "--samples", "2", "--out", str(out)])
    assert rc == 0
    assert (out / "lesion_3_smoothgrad_flair.nii.gz").is_file() and not (out / "lesion_1_smoothgrad_flair.nii.gz").exists()
    rc = cli.main(base + ["--lesions", str(p["lesions"]), "--lesion-id", "5", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown lesion id 5" in err and "valid ids: 1, 3" in err
    rc = cli.main(base + ["--domain", str(p["empty"]), "--out", str(out)])
    assert rc == 2 and "empty" in capsys.readouterr().err
    rc = cli.main(base + ["--domain", str(p["other_grid"]), "--out", str(out)])
    assert rc == 2 and "different" in capsys.readouterr().err


BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "msxai_unet"


def test_cli_explain_real_unet_bundle(case, capsys):
    """End to end with the real bundle (96^3 ROI: the small image is padded into one window)."""
    p = case.paths
    out = case.tmp / "real"
    base = ["explain", "--bundle", str(BUNDLE), "--flair", str(p["flair"]), "--t1", str(p["t1"]), "--device", "cpu",
            "--lesions", str(p["lesions"]), "--lesion-id", "1", "--no-progress", "--out", str(out)]
    assert cli.main(base + ["--samples", "1", "--aggregation", "mean"]) == 0
    assert cli.main(base + ["--method", "gradcampp"]) == 0
    data = json.loads((out / "saliency.json").read_text())
    assert data["settings"]["layer"] == "model.1.submodule.2"
    assert data["settings"]["sliding_window"]["roi_size"] == [96, 96, 96]
    for name in ("lesion_1_smoothgrad_flair", "lesion_1_smoothgrad_mprage", "lesion_1_gradcampp"):
        arr = np.asarray(nib.load(str(out / f"{name}.nii.gz")).dataobj)
        assert arr.shape == SHAPE and np.isfinite(arr).all()
    flair_map = np.asarray(nib.load(str(out / "lesion_1_smoothgrad_flair.nii.gz")).dataobj)
    assert np.abs(flair_map).max() > 0
