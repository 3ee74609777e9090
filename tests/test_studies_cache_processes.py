"""The app's segmentation cache shared by two processes (the server and MONAI Label's batch-infer subprocess): for
one study and model, one process computes while the other waits and then reads the entry from disk; no process ever
sees a half-written entry."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, os, sys, time
import numpy as np
from lib.seg_cache import SegmentationCache
studies, log, tag = sys.argv[1], sys.argv[2], sys.argv[3]
def compute():
    with open(log, "a") as fh:
        fh.write(f"start {tag}\n")
    time.sleep(1.5)  # long enough for the other process to arrive while this one computes
    lab = np.zeros((6, 7, 8), np.int32); lab[1:3, 2:4, 3:5] = 1
    with open(log, "a") as fh:
        fh.write(f"end {tag}\n")
    return {"labels": lab, "prob": lab.astype(np.float32) * 0.9, "affine": np.eye(4), "table": [{"id": 1}]}
e = SegmentationCache(studies).get("img1", "unet", "fp-1", compute)
print(json.dumps({"tag": tag, "from_cache": e["from_cache"], "sum": int(e["labels"].sum())}))
"""


def test_two_processes_compute_one_entry_once(tmp_path):
    log = tmp_path / "compute.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "apps" / "msxai")]), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(log), t], env=env,
                              stdout=subprocess.PIPE, text=True) for t in ("a", "b")]
    outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    lines = log.read_text().split()
    assert lines.count("start") == 1 and lines.count("end") == 1  # computed once, by one process
    assert sorted(str(o["from_cache"]) for o in outs) == ["None", "disk"]  # the other read the complete entry
    assert {o["sum"] for o in outs} == {8}
    d = tmp_path / "msxai" / "img1"
    assert sorted(p.name for p in (d / "seg_unet").iterdir()) == ["labels.nii.gz", "meta.json", "prob.nii.gz"]
    assert not [p for p in d.iterdir() if "~tmp~" in p.name]
    assert np.asarray(json.loads((d / "seg_unet" / "meta.json").read_text())["table"]).size == 1
