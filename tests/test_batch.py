"""``msxai batch``: a cohort over torch.distributed (gloo ranks under torchrun on 127.0.0.1) gives the same results
as one process; cases are claimed dynamically (a heavy case keeps one rank while the others take the rest, read
from the done-markers); a corrupt case is recorded and the rest complete; more ranks than cases finish; a worker
killed with SIGKILL leaves its case to the next run, which computes only the missing cases; the bundle way
(``monai.bundle run`` with ``batch_inference.json``) is the same run. Slow twins: the label maps against the
bundle's own segmentation, a saliency map against ``msxai explain``, the metrics against ``evaluate_case`` and the
experiment tables against numpy on the NIfTI maps."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from batch_helpers import write_case, write_datalist, write_tiny_bundle
from msxai.cli import main as cli_main

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO_ROOT / "bundles"

torch.set_num_threads(1)
REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO_ROOT / "bundles"
RUN_COLUMNS = {"seconds", "seconds_segment", "seconds_explain", "device", "rank", "host", "finished_utc"}
HEAVY = dict(shape=(40, 40, 40), n_blobs=10, n_missed=2, radius=15)  # ~10x the work of a light case
LIGHT = dict(shape=(16, 16, 16), n_blobs=2, n_missed=1, radius=6)  # one sliding window
ARGS = ["--explain", "domains", "--samples", "2", "--n-tn", "2", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    bundle = write_tiny_bundle(root / "tiny_bundle")
    data = root / "data"
    data.mkdir()
    heavy = write_case(data, "heavy", 100, **HEAVY)
    lights = [write_case(data, f"c{i}", i, **LIGHT) for i in range(2)]
    (data / "bad_FLAIR.nii.gz").write_bytes(b"this is not a NIfTI file")  # corrupt
    (data / "bad_T1.nii.gz").write_bytes((data / "c0_T1.nii.gz").read_bytes())
    bad = {"id": "bad", "flair": "bad_FLAIR.nii.gz", "t1": "bad_T1.nii.gz", "label": "c0_lesions.nii.gz"}
    return {"root": root, "bundle": bundle, "data": data,
            "all": write_datalist(data, [heavy, *lights, bad]),  # heavy first: it is claimed first
            "pair": write_datalist(data, [heavy, lights[0]], "pair.json")}


@pytest.fixture(scope="module")
def reference(cohort):
    out = cohort["root"] / "single"
    rc = cli_main(["batch", "--bundle", str(cohort["bundle"]), "--cohort", str(cohort["all"]), "--out", str(out), *ARGS])
    assert rc == 1  # one case failed
    return out


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               MSXAI_DEVICE="cpu")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _torchrun(nproc: int, args: list[str]) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(port), *args]


def _run(cmd, timeout=1500):  # generous: the CI machine may be shared
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=str(REPO_ROOT))
    return p.returncode, p.stdout + p.stderr


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _same_value(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return abs(float(a) - float(b)) <= 1e-5
    except ValueError:
        return False


def _assert_same_table(a: Path, b: Path, skip=RUN_COLUMNS):
    ra, rb = _rows(a), _rows(b)
    assert len(ra) == len(rb) and ra and [r.keys() for r in ra] == [r.keys() for r in rb], a.name
    for x, y in zip(ra, rb):
        for k in x:
            if k not in skip:
                assert _same_value(x[k], y[k]), (a.name, x.get("case"), k, x[k], y[k])


def _array(p: Path) -> np.ndarray:
    return np.asarray(nib.load(str(p)).dataobj)


def assert_same_results(a: Path, b: Path, ids):
    """Label maps equal, float maps within 1e-5, tables equal apart from where/when each case ran."""
    assert_same_cases(a, b, ids)
    _assert_same_table(a / "cases.csv", b / "cases.csv")
    _assert_same_table(a / "domains.csv", b / "domains.csv")


def assert_same_cases(a: Path, b: Path, ids):
    for cid in ids:
        fa, fb = a / "cases" / cid, b / "cases" / cid
        files = sorted(str(p.relative_to(fa)) for p in fa.rglob("*") if p.is_file())
        assert files == sorted(str(p.relative_to(fb)) for p in fb.rglob("*") if p.is_file()), cid
        for f in files:
            if f.endswith(".nii.gz"):
                x, y = _array(fa / f), _array(fb / f)
                assert x.dtype == y.dtype and x.shape == y.shape, (cid, f)
                if x.dtype.kind in "iu":
                    assert np.array_equal(x, y), (cid, f)
                else:
                    np.testing.assert_allclose(x, y, rtol=0, atol=1e-5, err_msg=f"{cid} {f}")
        for f in ("lesions.json", "metrics.json", "domains.json"):
            assert json.loads((fa / f).read_text()) == pytest.approx(json.loads((fb / f).read_text()), abs=1e-5)


def _markers(out: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in (out / "cases").glob("*/done.json")}


def _assert_dynamic(out: Path, world: int):
    """From the done-markers: the heavy case kept one rank; the other ranks took every other case."""
    m = _markers(out)
    fail = json.loads((out / "failures" / "bad.json").read_text())
    assert {x["world_size"] for x in m.values()} == {world} and fail["world_size"] == world
    heavy_rank = m["heavy"]["rank"]
    others = {cid: x["rank"] for cid, x in m.items() if cid != "heavy"} | {"bad": fail["rank"]}
    assert heavy_rank not in others.values(), (heavy_rank, others)
    return heavy_rank, others


# ----------------------------------------------------------------------------------------------- single process
def test_single_process_run_and_its_twins(cohort, reference):
    from msxai.bundle import load_bundle
    from msxai.io import load_volume
    from msxai.metrics import evaluate_case

    cases = {r["case"]: r for r in _rows(reference / "cases.csv")}
    assert [r["case"] for r in _rows(reference / "cases.csv")] == ["heavy", "c0", "c1", "bad"]
    assert {k: r["status"] for k, r in cases.items()} == {"heavy": "done", "c0": "done", "c1": "done",
                                                          "bad": "failed"}
    fail = json.loads((reference / "failures" / "bad.json").read_text())
    assert fail["kind"] == "input" and "bad_FLAIR.nii.gz" in fail["error"] and not (reference / "cases" / "bad").exists()
    summary = json.loads((reference / "cohort.json").read_text())
    assert summary["counts"] == {"done": 3, "failed": 1, "stale": 0, "missing": 0}
    marker = json.loads((reference / "cases" / "c0" / "done.json").read_text())
    for key in ("schema", "identity", "identity_sha256", "inputs", "versions", "seconds", "device", "rank", "counts"):
        assert key in marker
    from msxai.io import file_sha256

    assert marker["identity"]["weights_sha256"] == file_sha256(cohort["bundle"] / "models" / "model.pt")
    assert marker["inputs"]["flair"]["sha256"] == file_sha256(cohort["data"] / "c0_FLAIR.nii.gz")
    # twin 1: the bundle's own segmentation and the metrics of evaluate_case
    b = load_bundle(cohort["bundle"])
    res = b.segment(b.prepare(cohort["data"] / "c1_FLAIR.nii.gz", cohort["data"] / "c1_T1.nii.gz"))
    assert np.array_equal(_array(reference / "cases" / "c1" / "lesions.nii.gz"), res.labels)
    truth = load_volume(cohort["data"] / "c1_lesions.nii.gz").array
    direct = evaluate_case(res.labels, truth, res.affine)
    assert float(cases["c1"]["dice"]) == pytest.approx(direct["dice"]) and int(cases["c1"]["n_tp"]) == direct["tp"]
    # twin 2: one lesion through `msxai explain`
    tp = json.loads((reference / "cases" / "c1" / "domains.json").read_text())[0]
    assert tp["domain"].startswith("lesion_") and tp["cls"] in ("TP", "FP")
    out = cohort["root"] / "explain_twin"
    assert cli_main(["explain", "--bundle", str(cohort["bundle"]), "--flair", str(cohort["data"] / "c1_FLAIR.nii.gz"),
                     "--t1", str(cohort["data"] / "c1_T1.nii.gz"), "--lesions",
                     str(reference / "cases" / "c1" / "lesions.nii.gz"), "--lesion-id", str(tp["lesion_id"]),
                     "--samples", "2", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    name = f"{tp['domain']}_smoothgrad_flair.nii.gz"
    np.testing.assert_allclose(_array(reference / "cases" / "c1" / "saliency" / name), _array(out / name), atol=1e-6)


def test_rerun_skips_done_cases_and_redoes_changed_settings(cohort, reference, tmp_path):
    import shutil

    out = tmp_path / "rerun"
    shutil.copytree(reference, out)
    before = {p: p.stat().st_mtime_ns for p in (out / "cases").rglob("*") if p.is_file()}
    dl = write_datalist(cohort["data"], [{"id": "c0", "flair": "c0_FLAIR.nii.gz", "t1": "c0_T1.nii.gz",
                                          "label": "c0_lesions.nii.gz", "brain_mask": "c0_brainmask.nii.gz"}],
                        "c0.json")
    assert cli_main(["batch", "--bundle", str(cohort["bundle"]), "--cohort", str(dl), "--out", str(out), *ARGS]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "cases").rglob("*") if p.is_file()} == before  # untouched
    changed = [a if a != "2" else "3" for a in ARGS]  # N = 3 noise samples: other settings
    assert cli_main(["batch", "--bundle", str(cohort["bundle"]), "--cohort", str(dl), "--out", str(out), *changed]) == 0
    m = json.loads((out / "cases" / "c0" / "done.json").read_text())
    assert m["identity"]["settings"]["samples"] == 3
    assert (out / "cases" / "c0" / "done.json").stat().st_mtime_ns > before[out / "cases" / "c0" / "done.json"]
    assert (out / "cases" / "c1" / "done.json").stat().st_mtime_ns == before[out / "cases" / "c1" / "done.json"]
    rows = {r["case"]: r["status"] for r in json.loads((out / "cases.json").read_text())}
    assert rows == {"c0": "done"}  # the summary covers the cases of the run


# ------------------------------------------------------------------------------------------------- torchrun
def test_two_gloo_ranks_equal_one_process(cohort, reference):
    out = cohort["root"] / "two"
    rc, log = _run(_torchrun(2, ["-m", "msxai.cli", "batch", "--bundle", str(cohort["bundle"]), "--cohort",
                                 str(cohort["all"]), "--out", str(out), *ARGS]))
    assert rc != 0 and "bad" in log  # rank 0 exits 1: one case failed
    assert json.loads((out / "cohort.json").read_text())["counts"] == {"done": 3, "failed": 1, "stale": 0,
                                                                       "missing": 0}
    assert_same_results(reference, out, ["heavy", "c0", "c1"])
    _assert_dynamic(out, 2)
    assert "ETA" in log and "[rank 1/2 cpu]" in log


def test_three_gloo_ranks_bundle_way_equal_one_process(cohort, reference):
    out = cohort["root"] / "three"
    cfg = [str(cohort["bundle"] / "configs" / f) for f in ("inference.json", "batch_inference.json")]
    rc, log = _run(_torchrun(3, ["-m", "monai.bundle", "run", "--config_file", repr(cfg), "--bundle_root",
                                 str(cohort["bundle"]), "--datalist", str(cohort["all"]), "--output_dir", str(out),
                                 "--explain", "domains", "--samples", "2", "--n_tn", "2", "--progress", "False"]))
    assert rc == 0, log[-3000:]
    assert json.loads((out / "cohort.json").read_text())["world_size"] == 3
    assert_same_results(reference, out, ["heavy", "c0", "c1"])
    _assert_dynamic(out, 3)


def test_more_ranks_than_cases_then_sigkill_and_a_rerun_of_the_missing_case(cohort, reference):
    """3 ranks, 2 cases: the idle rank finishes at once; the worker on the heavy case is killed (SIGKILL) after
    the light one is done; a rerun computes the heavy case only and leaves the other one as it was."""
    out = cohort["root"] / "killed"
    proc = subprocess.Popen(_torchrun(3, ["-m", "msxai.cli", "batch", "--bundle", str(cohort["bundle"]), "--cohort",
                                          str(cohort["pair"]), "--out", str(out), *ARGS]),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(REPO_ROOT))
    log = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    victim, states, deadline = None, [], time.time() + 1200
    while victim is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        states = [json.loads(p.read_text()) for p in (out / "ranks").glob("rank*.json")] if (out / "ranks").is_dir() else []
        busy = [s for s in states if s.get("current_case") == "heavy"]
        idle = [s for s in states if s["state"] == "finished" and s["cases_taken"] == 0]
        if busy and idle and (out / "cases" / "c0" / "done.json").is_file():
            victim = busy[0]["pid"]
    assert victim is not None, (states, "".join(log)[-3000:])
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=600) != 0
    reader.join(timeout=10)
    assert (out / "cases" / "c0" / "done.json").is_file() and not (out / "cases" / "heavy").exists()
    assert list((out / "cases").glob(".heavy~tmp~*"))  # the killed worker was mid-case
    c0_files = {p: p.stat().st_mtime_ns for p in (out / "cases" / "c0").rglob("*") if p.is_file()}
    assert cli_main(["batch", "--bundle", str(cohort["bundle"]), "--cohort", str(cohort["pair"]), "--out", str(out),
                     *ARGS]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "cases" / "c0").rglob("*") if p.is_file()} == c0_files
    assert not list((out / "cases").glob(".*"))  # the dead worker's temporary folder is gone
    summary = json.loads((out / "cohort.json").read_text())
    assert summary["counts"]["done"] == 2 and summary["cases_computed"] == 1
    assert_same_cases(reference, out, ["heavy", "c0"])


# ------------------------------------------------------------------------------------------ pooled experiments
def test_experiments_from_cohort_match_numpy_on_the_maps(cohort, reference, tmp_path):
    """Experiment 3's peak medians per class and experiment 2's value counts, recomputed with numpy from the NIfTI
    files of the run (slow twin), equal those of `msxai experiments --from-cohort`."""
    out = tmp_path / "report"
    assert cli_main(["experiments", "--from-cohort", str(reference), "--out", str(out), "--n-boot", "50",
                     "--no-progress"]) == 0
    assert (out / "report.html").is_file()
    peaks = {"TP": [], "FP": [], "FN": [], "TN": []}
    inside_tp = 0
    for cid in ("heavy", "c0", "c1"):
        folder = reference / "cases" / cid
        pred, truth = _array(folder / "lesions.nii.gz"), _array(folder / "truth_lesions.nii.gz")
        tn = _array(folder / "tn_spheres.nii.gz")
        for r in json.loads((folder / "domains.json").read_text()):
            lab = {"TP": pred, "FP": pred, "FN": truth, "TN": tn}[r["cls"]]
            dom = lab == r["lesion_id"]
            flair = _array(folder / "saliency" / f"{r['domain']}_smoothgrad_flair.nii.gz")
            peaks[r["cls"]].append(float(flair[dom].max()))
            inside_tp += int(dom.sum()) if r["cls"] == "TP" else 0
    rows = {r["cls"]: r for r in _rows(out / "exp3_peaks.csv") if r["statistic"] == "flair_peak_max"}
    for cls, v in peaks.items():
        assert v, cls
        assert int(rows[cls]["n"]) == len(v)
        assert float(rows[cls]["median"]) == pytest.approx(float(np.median(v)), abs=1e-6)
    exp2 = {(r["sequence"], r["region"]): r for r in _rows(out / "exp2_sign.csv")}
    assert int(exp2[("FLAIR", "inside")]["n_values"]) == inside_tp
    notes = (out / "report.html").read_text()
    assert "need the network" in notes
    assert cli_main(["experiments", "--from-cohort", str(reference), "--bundle", "unet",  # needs the network
                     "--out", str(tmp_path / "x")]) == 2


def test_multi_gpu_override_puts_each_rank_on_its_gpu(monkeypatch):
    """The bundles' multi_gpu_inference.json (not run here: no GPU) resolves to cuda:<LOCAL_RANK> and nccl."""
    from monai.bundle import ConfigParser

    monkeypatch.setenv("LOCAL_RANK", "3")
    for name in ("msxai_unet", "msxai_dynunet", "msxai_swinunetr"):
        cfg = BUNDLES_DIR / name / "configs"
        parser = ConfigParser()
        parser.read_config([str(cfg / f) for f in ("inference.json", "batch_inference.json",
                                                    "multi_gpu_inference.json")])
        assert parser.get_parsed_content("device") == torch.device("cuda:3")
        assert any("nccl" in e for e in parser["initialize"]) and parser["run"] == ["$@batch.run()"]
        assert "$import msxai.batch.config" in parser["imports"] and "$import msxai.inference" in parser["imports"]


def test_nan_output_and_out_of_memory_are_recorded_and_the_cohort_goes_on(cohort, tmp_path):
    from msxai.batch.case import BatchSettings, CaseRunner
    from msxai.batch.cases import load_cases
    from msxai.bundle import load_bundle

    cases = {c.id: c for c in load_cases(cohort["all"])}
    b = load_bundle(cohort["bundle"])
    runner = CaseRunner(b, BatchSettings(), tmp_path)
    with torch.no_grad():
        b.network[2].bias[1] = float("nan")
    rec = runner.run(cases["c0"])
    with torch.no_grad():
        b.network[2].bias[1] = -2.5
    real_segment = b.segment

    def oom(prepared):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    b.segment = oom
    rec2 = runner.run(cases["c1"])
    b.segment = real_segment
    rec3 = runner.run(cases["c1"])
    assert rec["status"] == "failed" and rec2["status"] == "failed" and rec3["status"] == "done"
    fail = json.loads((tmp_path / "failures" / "c0.json").read_text())
    assert fail["kind"] == "nan" and "not finite" in fail["error"] and not (tmp_path / "cases" / "c0").exists()
    assert not (tmp_path / "failures" / "c1.json").exists()  # the success removed the earlier failure record
    assert not list((tmp_path / "cases").glob(".*"))  # no temporary folder left
