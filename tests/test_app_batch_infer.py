"""MONAI Label batch infer (``POST /batch/infer/{task}``) with the real server on 127.0.0.1.

MONAI Label 0.8.5 runs it in a subprocess that re-creates the app (bundles loaded again), bypasses the server's
model worker and saves each result with tag ``original``. Checked: bad requests answered 4xx before any subprocess;
the route's defaults (``device=cuda``, ``multi_gpu=true``) work on a CPU machine; every study gets its label, equal
to ``msxai segment`` and on the image grid, while the server segments the same studies at the same time (shared
segmentation cache: one computation at a time per study and model, entries renamed into place complete); a study
that cannot be segmented (no T1) does not stop the batch; the server (datastore without auto-reload) lists the new
labels; the synchronous mode runs through the server's own worker."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import nibabel as nib
import numpy as np
import pytest
import requests

from app_helpers import ENV, PY, REPO, Server, write_like as _write_like  # noqa: E402
from test_app_server import _cli  # noqa: E402

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    import subprocess

    d = tmp_path_factory.mktemp("batch_studies")
    subprocess.run([PY, "-m", "msxai", "synth", "--out", str(d), "--n", "2", "--seed", "5", "--voxel-size", "3",
                    "--no-progress"], check=True, env=ENV, cwd=str(REPO), capture_output=True)
    f = nib.load(str(d / "synth000_FLAIR.nii.gz"))
    _write_like(d / "lonely_FLAIR.nii.gz", np.asarray(f.dataobj, np.float32), f.affine)  # no T1: cannot be segmented
    return d


@pytest.fixture(scope="module")
def server(studies, tmp_path_factory):
    import shutil

    bundles = tmp_path_factory.mktemp("batch_bundles")
    shutil.copytree(REPO / "bundles" / "msxai_unet", bundles / "msxai_unet",
                    ignore=shutil.ignore_patterns("eval", "logs", "__pycache__"))
    s = Server(studies, tmp_path_factory.mktemp("batch_logs") / "server.log", models="unet", bundles_dir=bundles)
    s.bundle = bundles / "msxai_unet"
    yield s
    s.stop()


def _json(url, method="GET", **kw):
    r = requests.request(method, url, timeout=600, **kw)
    return r.status_code, (r.json() if r.content else None)


def test_bad_batch_requests_are_refused_before_any_subprocess(server):
    u = server.url
    for model, params, status, words in (
        ("explain_smoothgrad", None, 400, "segmentation tasks only"),
        ("segmentation_nope", None, 404, "no task"),
        ("segmentation_unet", {"label_tag": "final"}, 400, "never overwrites 'final'"),
        ("segmentation_unet", {"label_tag": "../../x"}, 400, "plain name"),
    ):
        code, body = _json(f"{u}/batch/infer/{model}", "POST", json=params)
        assert code == status and words in body["detail"], (model, code, body)
    code, body = _json(f"{u}/batch/infer")
    assert code == 404  # no batch task was started


def test_batch_infer_saves_every_label_while_the_server_segments_the_same_studies(server, studies, tmp_path):
    u = server.url
    code, task = _json(f"{u}/batch/infer/segmentation_unet", "POST")  # MONAI Label's defaults: cuda, multi_gpu
    assert code == 200 and task["status"] in ("SUBMITTED", "RUNNING"), task
    answers = {}

    def segment(image):  # the server's own worker, at the same time as the batch subprocess
        r = requests.post(f"{u}/infer/segmentation_unet?image={image}&output=all",
                          data={"params": json.dumps({"label_mode": "instances"})}, timeout=600)
        answers[image] = r.status_code

    threads = [threading.Thread(target=segment, args=(i,)) for i in ("synth001_FLAIR", "synth000_FLAIR")]
    for t in threads:
        t.start()
    deadline = time.time() + 1500  # generous: the CI machine may be shared
    while time.time() < deadline:
        code, running = _json(f"{u}/batch/infer?check_if_running=true")
        if code == 404:
            break
        time.sleep(2)
    for t in threads:
        t.join(300)
    code, last = _json(f"{u}/batch/infer")
    assert code == 200 and last["status"] == "DONE", "\n".join(last.get("details") or [])
    assert answers == {"synth001_FLAIR": 200, "synth000_FLAIR": 200}
    # the server lists the labels the subprocess saved (its datastore does not auto-reload here)
    code, ds = _json(f"{u}/datastore/?output=all")
    labels = {i: sorted(o.get("labels", {})) for i, o in ds["objects"].items()}
    assert labels == {"synth000_FLAIR": ["original"], "synth001_FLAIR": ["original"], "lonely_FLAIR": []}
    for image in ("synth000_FLAIR", "synth001_FLAIR"):
        saved = nib.load(str(studies / "labels" / "original" / f"{image}.nii.gz"))
        flair = nib.load(str(studies / f"{image}.nii.gz"))
        assert saved.shape == flair.shape and np.allclose(saved.affine, flair.affine, atol=1e-3)
        out = tmp_path / image
        _cli("segment", "--bundle", server.bundle, "--flair", studies / f"{image}.nii.gz",
             "--t1", studies / f"{image.replace('FLAIR', 'T1')}.nii.gz", "--out", out, "--threads", "1")
        cli = np.asarray(nib.load(str(out / "lesions.nii.gz")).dataobj)
        assert np.array_equal(np.asarray(saved.dataobj), cli), image
        art = studies / "msxai" / image
        assert np.array_equal(np.asarray(nib.load(str(art / "seg_unet" / "labels.nii.gz")).dataobj), cli)
        assert json.loads((art / "seg_unet" / "meta.json").read_text())["model"] == "unet"
        assert not [p.name for p in art.iterdir() if "~tmp~" in p.name]  # no half-written entry left
    with urllib.request.urlopen(u + "/info/", timeout=30) as r:
        assert r.status == 200


def test_synchronous_batch_infer_runs_in_the_server(server, studies):
    code, res = _json(f"{server.url}/batch/infer/segmentation_unet?run_sync=true", "POST",
                      json={"label_tag": "original", "device": "cuda", "multi_gpu": True, "max_workers": 1})
    assert code == 200 and sorted(res) == ["lonely_FLAIR", "synth000_FLAIR", "synth001_FLAIR"], res
    assert "no T1/MPRAGE found" in res["lonely_FLAIR"]["error"]  # reported, and the others were done
    assert all(res[i]["label"] == i and res[i]["params"]["cache"] in ("memory", "disk")
               for i in ("synth000_FLAIR", "synth001_FLAIR"))
