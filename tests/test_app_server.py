"""The msxai MONAI Label app served for real: `monailabel start_server` in a subprocess on 127.0.0.1 with a small
synthetic studies folder (61x73x61 voxels: 3 mm subjects declared 1 mm), driven with monailabel's own client (MONAILabelClient).

Checked: /info and the datastore listing; every segmentation task against `msxai segment`; both explain tasks
against `msxai explain` with the same seed; a client-drawn domain (uploaded label, click points); bad input over
HTTP (4xx with a message, server keeps serving, no label lost); 8 concurrent explain requests (all complete,
same seed -> same maps, /info answered meanwhile; their latency and the server's memory are measured by
scripts/bench_app_server.py); without authentication, requests naming another host, from another site or through a
proxy refused; a saved label surviving a server restart. The server is started by tests/app_helpers.py.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from app_helpers import REPO, Server, write_like, write_small_studies

BUNDLES = {m: REPO / "bundles" / f"msxai_{m}" for m in ("unet", "dynunet", "swinunetr")}

# the server serves all three bundles: their weights are committed, a missing model.pt fails (never skips)
AVAILABLE = list(BUNDLES)
pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    d = write_small_studies(tmp_path_factory.mktemp("studies"))
    f = nib.load(str(d / "synth000_FLAIR.nii.gz"))
    flair = np.asarray(f.dataobj, np.float32)
    t1 = np.asarray(nib.load(str(d / "synth000_T1.nii.gz")).dataobj, np.float32)
    # a study without its T1
    write_like(d / "lonely_FLAIR.nii.gz", flair, f.affine)
    # a T1 whose field of view barely overlaps the FLAIR's (another grid is fine: it is resampled)
    write_like(d / "mis_FLAIR.nii.gz", flair, f.affine)
    far = f.affine.copy()
    far[:3, 3] += far[:3, :3] @ np.array([0.0, 0.7 * flair.shape[1], 0.0])
    write_like(d / "mis_T1.nii.gz", t1, far)
    # NaN voxels
    bad = flair.copy()
    bad[30, 30, 30] = np.nan
    write_like(d / "nan_FLAIR.nii.gz", bad, f.affine)
    write_like(d / "nan_T1.nii.gz", t1, f.affine)
    return d


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """A snapshot of the bundles for the server and the command lines alike (a bundle being retrained while the
    tests run must not make them compare different weights)."""
    d = tmp_path_factory.mktemp("bundles")
    for m in AVAILABLE:
        shutil.copytree(BUNDLES[m], d / f"msxai_{m}", ignore=shutil.ignore_patterns("eval", "logs", "__pycache__"))
    _error_flag_for_tests(d / "msxai_unet")
    return {m: d / f"msxai_{m}" for m in AVAILABLE}


def _error_flag_for_tests(bundle: Path) -> None:
    """A fitted error flag for the snapshot's weights and the settings test_explain_matches_cli uses with Eq. 3
    (N = 2, sigma 0.05), fitted on random features: the app must give the same scores as `msxai explain`."""
    from msxai.experiments.error_flag import SALIENCY_FEATURES, ErrorFlagModel, file_sha256

    rng = np.random.default_rng(0)
    feats = [{n: float(rng.normal()) for n in SALIENCY_FEATURES} for _ in range(20)]
    ErrorFlagModel.fit(feats, [i % 2 for i in range(20)], SALIENCY_FEATURES, info={
        "weights_sha256": file_sha256(bundle / "models" / "model.pt"), "method": "smoothgrad", "aggregation": "max",
        "samples": 2, "sigma_fraction": 0.05, "auc_oof": 0.9, "auc_oof_ci": [0.8, 0.97]}).save(
        bundle / "models" / "error_flag.json")


@pytest.fixture(scope="module")
def server(studies, bundles, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    s = Server(studies, log, models=",".join(AVAILABLE), bundles_dir=bundles["unet"].parent)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(server.url, tmpdir=str(server.log.parent))


def _get(url):
    with urllib.request.urlopen(url, timeout=600) as r:
        return r.status, r.read()


def _post(url, params: dict, files: dict | None = None):
    """POST /infer with multipart params like the clients do; returns (status, body bytes)."""
    import requests

    fs = {k: (Path(v).name, open(v, "rb")) for k, v in (files or {}).items()}
    try:
        r = requests.post(url, data={"params": json.dumps(params)}, files=fs or None, timeout=600)
    finally:
        for _, (_, fh) in fs.items():
            fh.close()
    return r.status_code, r.content


def _cli(*args):
    """Run an `msxai` command line in this process (the same parser and code as the console script, without
    paying a new interpreter's imports for every call)."""
    import torch

    from msxai.cli import main

    threads = torch.get_num_threads()
    try:
        assert main([str(a) for a in args]) == 0
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------ info
def test_info_lists_tasks_and_only_study_images(client, studies):
    info = client.info()
    models = info["models"]
    assert set(models) == {"segmentation_unet", "segmentation_dynunet", "segmentation_swinunetr",
                           "explain_smoothgrad", "explain_gradcampp"}
    for name, m in models.items():
        assert m["type"] == "segmentation", name  # Slicer and OHIF list only these types
        assert m["labels"], name
    assert models["segmentation_unet"]["labels"] == {"lesion": 1}
    assert info["labels"] == ["lesion"]  # the Slicer module makes one empty segment per app label
    assert sorted(models["explain_smoothgrad"]["labels"].values()) == [1, 2, 3, 4, 5]
    assert models["explain_smoothgrad"]["config"]["network"] == ["unet", "dynunet", "swinunetr"]
    assert models["explain_gradcampp"]["config"]["layer"] == ""  # "" = the chosen bundle's own layer
    ds = client.datastore()
    ids = sorted(ds["objects"])
    assert ids == ["lonely_FLAIR", "mis_FLAIR", "nan_FLAIR", "synth000_FLAIR", "synth001_FLAIR"]
    status, body = _get(client.get_server_url() + "/msxai/studies")
    rows = {r["image"]: r for r in json.loads(body)}
    assert rows["synth000_FLAIR"]["t1"] == "synth000_T1.nii.gz"
    assert "no T1/MPRAGE found" in rows["lonely_FLAIR"]["error"]


# ------------------------------------------------------------------------------------------------ segmentation
def _seg_cli(studies, bundles, model, out):
    _cli("segment", "--bundle", bundles[model], "--flair", studies / "synth000_FLAIR.nii.gz",
         "--t1", studies / "synth000_T1.nii.gz", "--out", out, "--threads", "1")
    return out


@pytest.fixture(scope="module")
def cli_seg(studies, bundles, tmp_path_factory):
    """`msxai segment` of synth000 with every bundle (what the segmentation tasks must reproduce)."""
    root = tmp_path_factory.mktemp("cli_seg")
    return {m: _seg_cli(studies, bundles, m, root / m) for m in AVAILABLE}


@pytest.mark.parametrize("model", list(BUNDLES))
def test_segmentation_matches_cli(client, cli_seg, model):
    assert model in AVAILABLE, f"bundles/msxai_{model}/models/model.pt is missing"
    f, params = client.infer(f"segmentation_{model}", "synth000_FLAIR", {})
    out = nib.load(f)
    ref = nib.load(str(cli_seg[model] / "lesions.nii.gz"))
    assert out.shape == ref.shape
    assert np.allclose(out.affine, ref.affine, atol=1e-4)
    ref_labels = np.asarray(ref.dataobj)
    assert np.array_equal(np.asarray(out.dataobj), ref_labels)
    table = json.loads((cli_seg[model] / "lesions.json").read_text())
    assert params["label_mode"] == "instances"
    assert params["n_lesions"] == len(table) == int(ref_labels.max())
    got = {r["id"]: r for r in params["lesions"]}
    for r in table:
        g = got[r["id"]]
        assert g["volume_mm3"] == pytest.approx(r["volume_mm3"])
        assert np.allclose(g["centroid_mm"], r["centroid_mm"], atol=1e-3)
        assert g["mean_probability"] == pytest.approx(r["mean_probability"], abs=1e-5)
    # label names: one per lesion, value = id (what Slicer maps label values to)
    assert sorted(params["label_names"].values()) == list(range(1, len(table) + 1))


def test_segmentation_ohif_request_gets_binary_nrrd_on_the_image_grid(client, cli_seg, studies):
    # what the OHIF v3 plugin sends (and the Slicer module sends .nrrd/uint8 too)
    f, params = client.infer("segmentation_unet", "synth000_FLAIR",
                             {"result_extension": ".nrrd", "result_dtype": "uint8", "restore_label_idx": False})
    from msxai.labelmaps import read_labelmap

    assert f.endswith(".nrrd")
    arr, aff = read_labelmap(f)
    assert arr.dtype == np.uint8 and params["label_mode"] == "binary" and params["label_names"] == {"lesion": 1}
    ref = nib.load(str(cli_seg["unet"] / "lesions.nii.gz"))
    assert np.array_equal(arr, (np.asarray(ref.dataobj) > 0).astype(np.uint8))
    assert np.allclose(aff, nib.load(str(studies / "synth000_FLAIR.nii.gz")).affine, atol=1e-4)
    # the second request was served from the cache
    assert params["cache"] in ("memory", "disk")


# ------------------------------------------------------------------------------------------------- explain
@pytest.fixture(scope="module")
def target(cli_seg, studies, tmp_path_factory):
    """What the explain tests explain: the smallest lesion the unet bundle found in synth000, or, when it found
    none (a model trained on 1 mm images may miss everything on this 3 mm study), the smallest true lesion given
    as a drawn domain (uploaded label in the app, --domain for the CLI)."""
    table = json.loads((cli_seg["unet"] / "lesions.json").read_text())
    if table:
        les = min(table, key=lambda r: (r["voxels"], r["id"]))
        k = les["id"]
        mask = np.asarray(nib.load(str(cli_seg["unet"] / "lesions.nii.gz")).dataobj) == k
        return {"kind": "lesion", "params": {"lesion": k}, "label_in": None, "cli": ["--lesions",
                cli_seg["unet"] / "lesions.nii.gz", "--lesion-id", k], "app_name": f"lesion_{k}",
                "cli_name": f"lesion_{k}", "display": f"lesion {k}", "mask": mask}
    truth_img = nib.load(str(studies / "synth000_lesions.nii.gz"))
    truth = np.asarray(truth_img.dataobj)
    ids, counts = np.unique(truth[truth > 0], return_counts=True)
    mask = truth == ids[np.argmin(counts)]
    path = tmp_path_factory.mktemp("target") / "drawn.nii.gz"
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), truth_img.affine), str(path))
    return {"kind": "domain", "params": {}, "label_in": str(path), "cli": ["--domain", path],
            "app_name": "client_label", "cli_name": "domain", "display": "client label", "mask": mask}


def _download(client, url, dest):
    status, body = _get(client.get_server_url() + url)
    assert status == 200
    dest.write_bytes(body)
    return dest


def _explain_cli(studies, bundles, target, out, method, **kw):
    args = ["explain", "--bundle", bundles["unet"], "--flair", studies / "synth000_FLAIR.nii.gz",
            "--t1", studies / "synth000_T1.nii.gz", *target["cli"], "--method", method, "--device", "cpu",
            "--no-progress", "--out", out]
    for k, v in kw.items():
        args += [f"--{k}", v]
    _cli(*args)
    return out


@pytest.mark.parametrize("method", ["smoothgrad", "gradcampp"])
def test_explain_matches_cli(client, studies, bundles, target, tmp_path, method):
    from msxai.labelmaps import saliency_bins

    voxels = int(target["mask"].sum())
    # the bundle parameter "network"; Grad-CAM++ sends its deprecated name "model" (moved off MONAI Label's task key by
    # the app's infer route): same answer plus a deprecation note
    old_name = method == "gradcampp"
    params = {"model" if old_name else "network": "unet", **target["params"]}
    cli_kw = {}
    if method == "smoothgrad":
        # Eq. 3 (max) costs one vector-Jacobian product per domain voxel and noise copy: keep it for small domains
        agg = "max" if voxels <= 40 else "mean"
        params.update(samples=2, seed=7, aggregation=agg, sigma=0.05)
        cli_kw = {"samples": 2, "seed": 7, "aggregation": agg, "sigma": 0.05}
    f, res = client.infer(f"explain_{method}", "synth000_FLAIR", params, label_in=target["label_in"])
    assert res["model"] == "unet"
    assert res.get("deprecated") == (["parameter 'model' is now 'network'; the old name is accepted until 0.2.0"]
                                     if old_name else None)
    ref_dir = _explain_cli(studies, bundles, target, tmp_path / "cli", method, **cli_kw)
    ref_json = json.loads((ref_dir / "saliency.json").read_text())["domains"][target["cli_name"]]
    name = target["app_name"]

    assert res["domains"] == {name: voxels}
    names = ["smoothgrad_flair", "smoothgrad_mprage"] if method == "smoothgrad" else ["gradcampp"]
    files = {Path(u).name: u for u in res["urls"]}
    # one explain-and-write path: the CLI's file names (<domain>_<map>.nii.gz) and the same bytes
    ref_files = sorted(f.name for f in ref_dir.glob("*.nii.gz"))
    assert ref_files == sorted(f"{target['cli_name']}_{n}.nii.gz" for n in names)
    assert sorted(f for f in files if f.startswith(f"{name}_") and not f.endswith("_domain.nii.gz")) == \
        sorted(f"{name}_{n}.nii.gz" for n in names)
    maps = {}
    for n in names:
        ours = f"{name}_{n}.nii.gz"
        got = _download(client, files[ours], tmp_path / ours)
        ref = ref_dir / f"{target['cli_name']}_{n}.nii.gz"
        assert got.read_bytes() == ref.read_bytes(), n
        b = np.asarray(nib.load(str(ref)).dataobj)
        assert np.abs(b).max() > 0
        maps[n] = b
        for key in ("peak_max", "peak_min", "peak_max_in_domain", "peak_min_in_domain", "positive_mass_in_domain",
                    "negative_mass_in_domain"):
            assert res["summary"][name]["maps"][n][key] == pytest.approx(ref_json["maps"][n][key], rel=1e-3,
                                                                         abs=1e-6)
    # the error score (P false positive) of the lesion: the same as `msxai explain`'s, or null with the same reason
    # (Grad-CAM++ maps, Eq. 2 maps, a drawn domain)
    for key in ("error_score", "error_flag", "error_flag_reason"):
        if key == "error_score" and ref_json[key] is not None:
            assert res["summary"][name][key] == pytest.approx(ref_json[key], rel=1e-3, abs=1e-6)
        else:
            assert res["summary"][name][key] == ref_json[key], key
    scored = method == "smoothgrad" and target["kind"] == "lesion" and params.get("aggregation") == "max"
    assert (ref_json["error_score"] is not None) == scored, ref_json["error_flag_reason"]
    assert res["error_flag"]["loaded"] is True
    # the label map is the binning of the FLAIR (or CAM) map with the domain outline, names carry the ranges
    lab_ref, names_ref, edges_ref = saliency_bins(maps[names[0]], target["mask"],
                                                  prefix="FLAIR" if method == "smoothgrad" else "CAM",
                                                  domain_name=target["display"])
    lab = np.asarray(nib.load(f).dataobj)
    assert np.array_equal(lab, lab_ref)
    assert res["label_names"] == names_ref
    assert res["bins"]["scale"] == pytest.approx(edges_ref["scale"], rel=1e-4)
    assert set(np.unique(lab)) <= {0, 1, 2, 3, 4, 5} and np.isin(lab[target["mask"]], [1, 2, 3, 4, 5]).any()


def test_explain_client_domain_label_and_points(client, studies, cli_seg, tmp_path):
    """'Why was this missed?': explain a spot the model did not segment, given as an uploaded label or a click."""
    from msxai.labelmaps import ball, domain_outline

    img = nib.load(str(studies / "synth000_FLAIR.nii.gz"))
    pred = np.asarray(nib.load(str(cli_seg["unet"] / "lesions.nii.gz")).dataobj) > 0
    truth = np.asarray(nib.load(str(studies / "synth000_lesions.nii.gz")).dataobj)
    missed = [i for i in np.unique(truth) if i and not (pred & (truth == i)).any()]
    if missed:  # a true lesion the model missed (the paper's false negative)
        spot = truth == missed[0]
    else:  # no missed lesion: a small ball in brain tissue away from the prediction
        brain = np.asarray(nib.load(str(studies / "synth000_brainmask.nii.gz")).dataobj) > 0
        far = brain & ~ndimage.binary_dilation(pred, iterations=3)
        c = np.argwhere(far)[len(np.argwhere(far)) // 2]
        spot = ball(pred.shape, c, 4.0, img.affine) & far
    lab_path = tmp_path / "drawn.nii.gz"
    nib.save(nib.Nifti1Image(spot.astype(np.uint8), img.affine), str(lab_path))
    f, res = client.infer("explain_smoothgrad", "synth000_FLAIR",
                          {"network": "unet", "samples": 1, "seed": 3, "aggregation": "mean"}, label_in=str(lab_path))
    assert res["domain_source"] == "uploaded label" and res["domains"] == {"client_label": int(spot.sum())}
    lab = np.asarray(nib.load(f).dataobj)
    outline = domain_outline(spot)
    assert np.array_equal(lab == 1, outline & ~np.isin(lab, [2, 3, 4, 5]))  # bins win over the outline
    assert np.isin(lab[outline], [1, 2, 3, 4, 5]).all()
    s = res["summary"]["client_label"]
    assert s["domain_voxels"] == int(spot.sum()) and s["mean_probability"] is not None
    assert s["maps"]["smoothgrad_flair"]["peak_max"] > s["maps"]["smoothgrad_flair"]["peak_min"]

    # the same question with a click point: a ball of radius_mm around it
    c = [int(round(x)) for x in np.argwhere(spot).mean(axis=0)]
    f2, res2 = client.infer("explain_gradcampp", "synth000_FLAIR",
                            {"network": "unet", "foreground": [c], "radius_mm": 4.5})
    expected = ball(pred.shape, c, 4.5, img.affine)
    assert res2["domains"] == {"client_points": int(expected.sum())}
    assert res2["domain_source"].startswith("foreground points")
    lab2 = np.asarray(nib.load(f2).dataobj)
    assert np.array_equal(lab2 == 1, domain_outline(expected) & ~np.isin(lab2, [2, 3, 4, 5]))


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_input_answers_4xx_keeps_serving_and_keeps_labels(client, server, studies, tmp_path):
    url = server.url
    # a finished label that must survive everything below
    img = nib.load(str(studies / "synth001_FLAIR.nii.gz"))
    keep = np.zeros(img.shape, np.uint8)
    keep[20:24, 30:33, 25:28] = 1
    keep_path = tmp_path / "keep.nii.gz"
    nib.save(nib.Nifti1Image(keep, img.affine), str(keep_path))
    client.save_label("synth001_FLAIR", str(keep_path), tag="final")

    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(empty))
    wrong = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), img.affine), str(wrong))
    seg, sg, gc = "segmentation_unet", "explain_smoothgrad", "explain_gradcampp"
    cases = [
        (seg, "no_such_FLAIR", {}, None, 404, "not in the datastore"),
        (seg, "../synth000_FLAIR", {}, None, 400, "path separator"),
        (seg, "..", {}, None, 400, ".."),
        (seg, "a\\b", {}, None, 400, "path separator"),
        (seg, str(studies / "synth000_FLAIR.nii.gz"), {}, None, 400, "datastore image id"),
        (seg, "lonely_FLAIR", {}, None, 422, "no T1/MPRAGE found"),
        (seg, "mis_FLAIR", {}, None, 422, "overlap too little"),
        (seg, "nan_FLAIR", {}, None, 422, "NaN"),
        ("segmentation_resnet", "synth000_FLAIR", {}, None, 404, "no model"),
        (sg, "synth000_FLAIR", {"lesion": 999}, None, 404, "unknown lesion id 999"),
        (sg, "synth000_FLAIR", {"lesion": "x"}, None, 400, "lesion"),
        (sg, "synth000_FLAIR", {"samples": 10**9}, None, 400, "samples must be an integer in [1, 200]"),
        (sg, "synth000_FLAIR", {"samples": -1}, None, 400, "samples"),
        (sg, "synth000_FLAIR", {"sigma": "loud"}, None, 400, "sigma"),
        (sg, "synth000_FLAIR", {"network": "resnet"}, None, 400, "network must be one of"),
        (sg, "synth000_FLAIR", {"samples": 1}, {"label": empty}, 422, "empty"),
        (sg, "synth000_FLAIR", {"samples": 1}, {"label": wrong}, 422, "shape"),
        (sg, "synth000_FLAIR", {"foreground": [[999, 0, 0]]}, None, 400, "outside the image"),
        (gc, "synth000_FLAIR", {"layer": "no.such.layer", "foreground": [[30, 36, 30]]}, None, 400,
         "not a module of the network"),
        (gc, "synth000_FLAIR", {"device": "tpu"}, None, 400, "device"),
        (gc, "synth000_FLAIR", {"lesions_from": "final"}, None, 404, "no saved label with tag 'final'"),
        (gc, "synth001_FLAIR", {"lesions_from": "../x"}, None, 400, "lesions_from"),
    ]
    for model, image, params, files, status, msg in cases:
        code, body = _post(f"{url}/infer/{model}?image={urllib.request.quote(image, safe='')}", params, files)
        detail = body.decode(errors="replace")
        assert code == status, (model, image, params, code, detail)
        assert msg in json.loads(detail)["detail"], (model, image, params, detail)
        # the server keeps serving
        assert _get(url + "/info/")[0] == 200
    # nothing was lost, and no result was saved as a label for a refused request
    back = client.download_label("synth001_FLAIR", "final")
    assert np.array_equal(np.asarray(nib.load(back).dataobj), keep)
    ds = client.datastore()
    assert "final" in ds["objects"]["synth001_FLAIR"]["labels"]
    # after all that, a good request still works
    f, res = client.infer("segmentation_unet", "synth000_FLAIR", {})
    assert res["model"] == "unet"


# ------------------------------------------------------------------------------------------------------ load
def test_eight_concurrent_explain_requests(client, server, target):
    """8 explain requests at once: all complete without error, the same request gives the same maps, different seeds
    different ones, and /info keeps answering while they queue (model runs are serialised). How long they take,
    how long /info waits and the server's memory (8 queued vs one alone) are measured by
    scripts/bench_app_server.py, not asserted here."""
    from monailabel.client import MONAILabelClient

    name = target["app_name"]
    reqs = []
    for i in range(8):
        if i % 2 == 0:
            reqs.append(("explain_smoothgrad", {"network": "unet", **target["params"], "samples": 1,
                                                "aggregation": "mean", "seed": 11 + (i % 4 == 0)}))
        else:
            reqs.append(("explain_gradcampp", {"network": "unet", **target["params"]}))
    results: dict[int, tuple] = {}
    errors: list = []

    def run(i):
        try:
            c = MONAILabelClient(server.url, tmpdir=str(server.log.parent / f"c{i}"))
            os.makedirs(server.log.parent / f"c{i}", exist_ok=True)
            f, res = c.infer(reqs[i][0], "synth000_FLAIR", reqs[i][1], label_in=target["label_in"])
            results[i] = (np.asarray(nib.load(f).dataobj).copy(), res)
        except Exception as exc:  # collected and reported below
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    # the server keeps answering other requests while the explanations queue
    while any(t.is_alive() for t in threads):
        assert _get(server.url + "/info/")[0] == 200
        time.sleep(1.0)
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 8
    # same request -> same label map and the same numbers
    groups: dict[str, list[int]] = {}
    for i, (model, params) in enumerate(reqs):
        groups.setdefault(json.dumps([model, params], sort_keys=True), []).append(i)
    assert any(len(g) > 1 for g in groups.values())
    for g in groups.values():
        for j in g[1:]:
            assert np.array_equal(results[g[0]][0], results[j][0])
            assert results[g[0]][1]["summary"] == results[j][1]["summary"]
            assert results[g[0]][1]["label_names"] == results[j][1]["label_names"]
    # different seeds give different SmoothGrad maps
    a = results[0][1]["summary"][name]["maps"]["smoothgrad_flair"]["peak_max"]
    b = results[2][1]["summary"][name]["maps"]["smoothgrad_flair"]["peak_max"]
    assert reqs[0][1]["seed"] != reqs[2][1]["seed"] and a != b


# ------------------------------------------------------------------------------------------ loopback only
def test_without_auth_only_same_machine_requests_are_served(server):
    """No authentication: the app answers loopback clients of this machine only. A request naming another host
    (DNS rebinding), coming from another site's page (Origin) or relayed by a proxy is refused with the reason."""
    import requests

    url = server.url
    assert requests.get(url + "/info/", timeout=60).status_code == 200
    assert requests.get(url + "/auth/", timeout=60).json()["enabled"] is False
    for headers, why in [({"Host": "evil.example"}, "not a loopback name"),
                         ({"Origin": "http://evil.example"}, "cross-site"),
                         ({"Origin": "null"}, "cross-site"),
                         # uvicorn takes the client address from X-Forwarded-For when the peer is 127.0.0.1
                         ({"X-Forwarded-For": "203.0.113.9"}, "serves this machine only")]:
        r = requests.get(url + "/info/", headers=headers, timeout=60)
        assert r.status_code == 403 and why in r.json()["detail"], (headers, r.text)
    r = requests.delete(url + "/datastore/label?id=synth000_FLAIR&tag=final",
                        headers={"Origin": "http://evil.example"}, timeout=60)
    assert r.status_code == 403
    ok = requests.get(url + "/info/", headers={"Host": f"localhost:{server.port}",
                                               "Origin": f"http://127.0.0.1:{server.port}"}, timeout=60)
    assert ok.status_code == 200


# --------------------------------------------------------------------------------------------------- restart
def test_saved_label_and_cache_survive_restart(client, server, studies, bundles, tmp_path, tmp_path_factory):
    img = nib.load(str(studies / "synth000_FLAIR.nii.gz"))
    lab = np.zeros(img.shape, np.uint8)
    lab[25:30, 30:34, 28:31] = 1
    p = tmp_path / "corrected.nii.gz"
    nib.save(nib.Nifti1Image(lab, img.affine), str(p))
    r = client.save_label("synth000_FLAIR", str(p), tag="final", params={"comment": "corrected"})
    assert r["label"] == "synth000_FLAIR"
    server.stop()
    log = tmp_path_factory.mktemp("logs2") / "server.log"
    s2 = Server(studies, log, models=",".join(AVAILABLE), bundles_dir=bundles["unet"].parent)
    try:
        from monailabel.client import MONAILabelClient

        c2 = MONAILabelClient(s2.url, tmpdir=str(log.parent))
        back = c2.download_label("synth000_FLAIR", "final")
        assert np.array_equal(np.asarray(nib.load(back).dataobj), lab)
        assert "final" in c2.datastore()["objects"]["synth000_FLAIR"]["labels"]
        # the segmentation computed before the restart is reused from the datastore
        f, res = c2.infer("segmentation_unet", "synth000_FLAIR", {})
        assert res["cache"] == "disk"
        # explain a lesion of the corrected label (e.g. one the model missed)
        f, res = c2.infer("explain_gradcampp", "synth000_FLAIR", {"network": "unet", "lesions_from": "final",
                                                                  "lesion": "all"})
        assert res["domains"] == {"lesion_1": int(lab.sum())}
        assert res["domain_source"] == "lesion 1 of the saved 'final' label"
    finally:
        s2.stop()
