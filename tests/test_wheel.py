"""msxai installed from its wheel, outside the repository: nothing guesses where the repository is. The wheel is
built from a copy of the sources (``pip wheel --no-deps --no-build-isolation``), installed into a temporary folder
(``pip install --no-deps --target``) and run from another folder: ``msxai segment`` with ``--bundle DIR`` gives the
repository's result; a bundle by name or the real patient without a path or environment variable is refused with
what to pass."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from msxai.io import save_volume

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "msxai_unet"
SHAPE = (40, 44, 36)
AFFINE = np.array([[-1.0, 0, 0, 90.0], [0, 1.0, 0, -126.0], [0, 0, 1.0, -72.0], [0, 0, 0, 1]])


def _pip(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--no-input"],
                          cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(site, env)``: the wheel installed into ``site``; ``env`` runs Python with only that on PYTHONPATH."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"  # a copy, so that the build leaves nothing in the repository
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "msxai", src / "msxai", ignore=shutil.ignore_patterns("__pycache__"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src), cwd=root)
    wheels = list((root / "dist").glob("msxai-*.whl"))
    assert len(wheels) == 1, wheels
    site = root / "site"
    _pip("install", "--no-deps", "--target", str(site), str(wheels[0]), cwd=root)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MSXAI_BUNDLES", "MSXAI_REAL_DATA")}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    where = subprocess.run([sys.executable, "-c", "import msxai, msxai.paths as p; print(msxai.__file__); "
                            "print(p.checkout_root())"], cwd=root, env=env, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr
    lines = where.stdout.split()
    assert Path(lines[0]).is_relative_to(site), lines  # the installed copy, not the repository's
    assert lines[1] == "None"  # and it knows it is not a checkout
    return site, env


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("case")
    rng = np.random.default_rng(3)
    g = np.indices(SHAPE).astype(float)
    c = (np.array(SHAPE) - 1)[:, None, None, None] / 2
    brain = (((g - c) / (np.array(SHAPE)[:, None, None, None] * 0.42)) ** 2).sum(0) < 1
    les = (((g - c - np.array([4, -3, 2])[:, None, None, None]) / 3.0) ** 2).sum(0) < 1
    flair = brain * (100 + 5 * rng.standard_normal(SHAPE)) + les * 80
    t1 = brain * (200 + 5 * rng.standard_normal(SHAPE)) - les * 60
    save_volume(d / "case_FLAIR.nii.gz", flair.astype(np.float32), AFFINE)
    save_volume(d / "case_T1.nii.gz", t1.astype(np.float32), AFFINE)
    return d / "case_FLAIR.nii.gz", d / "case_T1.nii.gz"


# one interpreter runs every command (importing torch and MONAI once): ``msxai.cli.main`` on each argument list,
# with the environment changes given; prints [{"rc", "stderr"}] as JSON
DRIVER = """
import contextlib, io, json, os, sys
from msxai.cli import main
out = []
for env, argv in json.loads(sys.argv[1]):
    os.environ.update(env)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    out.append({"rc": rc, "stderr": err.getvalue()})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def runs(installed, case, tmp_path_factory):
    """The installed msxai run from another folder: segment with --bundle DIR, then three refusals."""
    _, env = installed
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    flair, t1 = str(case[0]), str(case[1])
    calls = [
        ({}, ["segment", "--bundle", str(BUNDLE), "--flair", flair, "--t1", t1, "--out", "seg", "--threads", "1"]),
        ({}, ["segment", "--bundle", "unet", "--flair", flair, "--t1", t1, "--out", "o"]),
        ({}, ["experiments", "--real-patient", "--bundle", str(BUNDLE), "--out", "o"]),
        ({"MSXAI_BUNDLES": str(REPO / "bundles")},
         ["segment", "--bundle", "nosuch", "--flair", flair, "--t1", t1, "--out", "o"]),
    ]
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(calls)], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return elsewhere, json.loads(proc.stdout.strip().splitlines()[-1])


def test_segment_from_the_installed_wheel_elsewhere(runs, case):
    from msxai.bundle import load_bundle

    elsewhere, res = runs
    assert res[0]["rc"] == 0, res[0]["stderr"][-3000:]
    out = elsewhere / "seg"
    prob = np.asarray(nib.load(str(out / "probability.nii.gz")).dataobj)
    lesions = np.asarray(nib.load(str(out / "lesions.nii.gz")).dataobj)
    table = json.loads((out / "lesions.json").read_text())
    # the same result as the repository's msxai (this process) on the same bundle folder
    ref = load_bundle(BUNDLE, device="cpu")
    result = ref.segment(ref.prepare(case[0], case[1]))
    np.testing.assert_array_equal(prob, result.prob)
    np.testing.assert_array_equal(lesions, result.labels)
    assert len(table) == len(result.table)


def test_installed_wheel_says_what_to_pass(runs):
    _, res = runs
    assert res[1]["rc"] == 2 and "--bundle DIR" in res[1]["stderr"] and "MSXAI_BUNDLES" in res[1]["stderr"], res[1]
    assert res[2]["rc"] == 2 and "MSXAI_REAL_DATA" in res[2]["stderr"] and "pass the folder" in res[2]["stderr"], res[2]
    assert res[3]["rc"] == 2 and f"short names are looked up in {REPO / 'bundles'}" in res[3]["stderr"], res[3]
