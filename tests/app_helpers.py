"""The msxai MONAI Label app served for real, for the tests and the benchmarks alike: `monailabel start_server` in a
subprocess on 127.0.0.1 (:class:`Server`) over a small synthetic studies folder (:func:`write_small_studies`:
61x73x61 voxels, 3 mm subjects declared 1 mm).

Used by tests/test_app_server.py and scripts/bench_app_server.py (which puts ``tests/`` and ``apps/msxai`` on
``sys.path``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np

from deploy.loopback import free_port

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "msxai"
PY = sys.executable

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
           MONAI_LABEL_DATASTORE_AUTO_RELOAD="false")


class Server:
    """The app on a free 127.0.0.1 port, serving ``models`` from ``bundles_dir`` (default: the repository's
    bundles) with no explain cost budget; the constructor returns once /info answers (a 240 s guard against a hang)."""

    def __init__(self, studies: Path, log: Path, models: str = "all", bundles_dir: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._fh = open(log, "ab")
        self.proc = subprocess.Popen(
            [PY, "-m", "monailabel.main", "start_server", "--app", str(APP), "--studies", str(studies),
             "--conf", "models", models, "--host", "127.0.0.1", "--port", str(self.port),
             # these tests compare the app with the command lines: no cost budget (tests/test_app_security.py)
             "--conf", "explain_budget_s", "86400",
             *(["--conf", "bundles_dir", str(bundles_dir)] if bundles_dir else [])],
            cwd=str(REPO), env=ENV, stdout=self._fh, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 240
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/info/", timeout=5) as r:
                    if r.status == 200:
                        return
            except Exception:
                time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"server did not answer in time:\n{log.read_text()[-4000:]}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._fh.close()


def write_like(path, array, affine):
    nib.save(nib.Nifti1Image(np.asarray(array, np.float32), affine), str(path))


def write_small_studies(d: Path, n: int = 2, seed: int = 3) -> Path:
    """``msxai synth`` subjects ``synth000``... at 3 mm in ``d``, declared 1 mm scans (a small head): the bundles
    segment on a 1 mm grid (their pre-processing resamples any scan to it), so the server works on 61x73x61 voxels,
    not 181x217x181."""
    subprocess.run([PY, "-m", "msxai", "synth", "--out", str(d), "--n", str(n), "--seed", str(seed),
                    "--voxel-size", "3", "--no-progress"], check=True, env=ENV, cwd=str(REPO), capture_output=True)
    for f in d.glob("*.nii.gz"):
        img = nib.load(str(f))
        a = img.affine.copy()
        a[:3, :3] /= 3.0
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), a, img.header), str(f))
    return d
