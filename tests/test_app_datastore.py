"""The app's datastore writes without a server (apps/msxai/lib/datastore.py): label saves are checked (tag, image,
readable image, grid, integer values) and atomic, the label they replace is kept in the label history, image uploads
are checked like studies, and SIGKILL at any moment of a save loses nothing (a forked writer killed at random
moments: every label is an old or a new version byte for byte, the index always parses).

The same checks over HTTP, through MONAI Label's client, are in tests/test_app_security.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "msxai"
if str(APP) not in sys.path:
    sys.path.insert(0, str(APP))

AFF = np.diag([2.0, 2.0, 2.0, 1.0])
AFF[:3, 3] = [-20.0, -24.0, -18.0]
SHAPE = (20, 24, 18)


def _nii(path, arr, aff=AFF):
    nib.save(nib.Nifti1Image(np.asarray(arr), aff), str(path))
    return path


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture()
def world(tmp_path):
    """``tmp/studies`` with two studies; ``tmp`` itself is where nothing may ever appear."""
    studies = tmp_path / "studies"
    studies.mkdir()
    rng = np.random.default_rng(0)
    for stem in ("a", "b"):
        _nii(studies / f"{stem}_FLAIR.nii.gz", rng.random(SHAPE).astype(np.float32))
        _nii(studies / f"{stem}_T1.nii.gz", rng.random(SHAPE).astype(np.float32))
    return tmp_path, studies


def _datastore(studies, **kw):
    from monailabel.config import settings

    settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False
    from lib.datastore import MsxaiDatastore

    return MsxaiDatastore(str(studies), extensions=("*.nii.gz", "*.nii"), auto_reload=False, **kw)


def test_index_write_under_the_file_lock_waits_for_nothing_else(world):
    """MONAI Label's add_image / save_label hold the datastore's file lock and then write the index
    (``_update_datastore_file(lock=False)``) while a watcher's refresh may hold ``_write_lock`` and wait for that file
    lock: the index write must not wait for ``_write_lock`` (it did: a DICOMweb series fetch hung until the request
    timed out in the OHIF stack test)."""
    import threading

    from filelock import FileLock

    _, studies = world
    ds = _datastore(studies)
    held, release = threading.Event(), threading.Event()

    def refresh_holding_the_write_lock():
        with ds._write_lock:
            held.set()
            release.wait(60)

    refresher = threading.Thread(target=refresh_holding_the_write_lock, daemon=True)
    refresher.start()
    assert held.wait(60)
    done = threading.Event()

    def add_image_like():
        with FileLock(ds._lock_file):
            ds._update_datastore_file(lock=False)
        done.set()

    writer = threading.Thread(target=add_image_like, daemon=True)
    writer.start()
    finished = done.wait(30)
    release.set()
    refresher.join(60)
    writer.join(60)
    assert finished, "the index write under the file lock waited for _write_lock (lock-order deadlock)"
    assert json.loads(Path(ds._datastore_config_path).read_text())["objects"]


def _label(tmp, name, seed=1, shape=SHAPE, aff=AFF, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    arr = (rng.random(shape) > 0.9).astype(dtype) * rng.integers(1, 4, shape).astype(dtype)
    return _nii(tmp / name, arr, aff)


def test_label_save_is_checked_kept_and_undoable(world):
    from lib.validation import status_for

    from msxai.errors import InputError

    tmp, studies = world
    ds = _datastore(studies)
    good = _label(tmp, "good.nii.gz", 1)
    assert ds.save_label("a_FLAIR", str(good), "final", {"comment": "x"}, user="alice") == "a_FLAIR"
    stored = studies / "labels" / "final" / "a_FLAIR.nii.gz"
    assert stored.read_bytes() == good.read_bytes()  # a .nii.gz is stored byte for byte
    index = json.loads((studies / "datastore_v2.json").read_text())
    info = index["objects"]["a_FLAIR"]["labels"]["final"]["info"]
    assert info["user"] == "alice" and info["comment"] == "x"
    assert info["sha256"] == hashlib.sha256(good.read_bytes()).hexdigest()

    # every bad save is refused with a 4xx and changes nothing anywhere under tmp (the studies' parent)
    before = _tree(tmp)
    shifted = AFF.copy()
    shifted[:3, 3] += 1.0
    bad = {
        "wrong_shape": (_label(tmp, "w.nii.gz", 2, shape=(20, 24, 17)), "a_FLAIR", "final", 422, "shape"),
        "wrong_affine": (_label(tmp, "s.nii.gz", 2, aff=shifted), "a_FLAIR", "final", 422, "grid"),
        "text": (tmp / "text.nii.gz", "a_FLAIR", "final", 422, "cannot read"),
        "empty_file": (tmp / "empty.nii.gz", "a_FLAIR", "final", 422, "cannot read"),
        "fractional": (_nii(tmp / "f.nii.gz", np.full(SHAPE, 0.5, np.float32)), "a_FLAIR", "final", 422,
                       "non-integer"),
        "nan": (_nii(tmp / "n.nii.gz", np.full(SHAPE, np.nan, np.float32)), "a_FLAIR", "final", 422, "NaN"),
        "negative": (_nii(tmp / "neg.nii.gz", -np.ones(SHAPE, np.int16)), "a_FLAIR", "final", 422, "negative"),
        "four_d": (_nii(tmp / "4d.nii.gz", np.zeros((*SHAPE, 2), np.uint8)), "a_FLAIR", "final", 422, "3-D"),
        "not_image_ext": (tmp / "label.txt", "a_FLAIR", "final", 415, "expected"),
        "traversal_tag": (good, "a_FLAIR", "../../outside", 400, "tag"),
        "dot_tag": (good, "a_FLAIR", ".hidden", 400, "tag"),
        "slash_tag": (good, "a_FLAIR", "a/b", 400, "tag"),
        "empty_tag": (good, "a_FLAIR", "", 400, "tag"),
        "unknown_image": (good, "zzz_FLAIR", "final", 404, "not in the datastore"),
        "empty_image_id": (good, "", "final", 400, "image id"),
        "traversal_image": (good, "../a_FLAIR", "final", 400, "path separator"),
        "t1_as_image": (good, "a_T1", "final", 404, "not in the datastore"),
    }
    (tmp / "text.nii.gz").write_bytes(b"garbage")
    (tmp / "empty.nii.gz").write_bytes(b"")
    (tmp / "label.txt").write_bytes(good.read_bytes())
    before = {k: v for k, v in _tree(tmp).items() if not k.startswith("studies/")}
    inside = _tree(studies)
    for case, (path, image, tag, status, msg) in bad.items():
        with pytest.raises(InputError) as err:
            ds.save_label(image, str(path), tag, {}, user="mallory")
        assert status_for(err.value) == status, (case, str(err.value))
        assert msg in str(err.value), (case, str(err.value))
        assert _tree(studies) == inside, case  # the label, the index, the history: all unchanged
    assert {k: v for k, v in _tree(tmp).items() if not k.startswith("studies/")} == before
    assert not (tmp / "outside").exists()

    # a second valid save keeps the first in the history; a restore brings it back (and keeps the second)
    second = _label(tmp, "second.nii.gz", 3)
    ds.save_label("a_FLAIR", str(second), "final", {}, user="bob")
    assert stored.read_bytes() == second.read_bytes()
    hist = ds.label_history("a_FLAIR", "final")
    assert len(hist) == 1 and hist[0]["reason"] == "replaced" and hist[0]["by"] == "bob"
    assert hist[0]["info"]["user"] == "alice"
    kept = studies / "msxai" / "a_FLAIR" / hist[0]["file"]
    assert kept.read_bytes() == good.read_bytes()
    ds.restore_label("a_FLAIR", "final", hist[0]["version"], user="alice")
    assert stored.read_bytes() == good.read_bytes()
    assert [h["info"]["user"] for h in ds.label_history("a_FLAIR", "final")] == ["bob", "alice"]
    # the history is not a tag, and a fresh datastore on the same folder sees the same labels
    ds2 = _datastore(studies)
    assert set(ds2.json()["objects"]["a_FLAIR"]["labels"]) == {"final"}
    assert ds2.get_label_uri("a_FLAIR", "final") == str(stored)

    # delete: the label goes, its last version stays; deleting again is a 404
    ds.remove_label("a_FLAIR", "final", user="alice")
    assert not stored.exists() and "final" not in ds.json()["objects"]["a_FLAIR"]["labels"]
    assert ds.label_history("a_FLAIR", "final")[0]["reason"] == "deleted"
    with pytest.raises(InputError) as err:
        ds.remove_label("a_FLAIR", "final")
    assert status_for(err.value) == 404


def test_label_formats_and_history_limit(world):
    import SimpleITK as sitk

    from msxai.labelmaps import read_labelmap

    tmp, studies = world
    ds = _datastore(studies)
    ds.history_keep = 3
    arr = np.zeros(SHAPE, np.uint8)
    arr[3:6, 4:8, 5:7] = 2
    # a .seg.nrrd as the Slicer module writes it: ITK (LPS) geometry of the same grid
    img = sitk.GetImageFromArray(arr.transpose(2, 1, 0))
    img.SetSpacing((2.0, 2.0, 2.0))
    img.SetOrigin((20.0, 24.0, -18.0))  # RAS (-20, -24, -18) in LPS
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    seg = tmp / "label.seg.nrrd"
    sitk.WriteImage(img, str(seg))
    ds.save_label("b_FLAIR", str(seg), "final", {})
    stored = studies / "labels" / "final" / "b_FLAIR.nii.gz"
    back, aff = read_labelmap(stored)
    assert np.array_equal(back, arr) and np.allclose(aff, AFF)
    # a .nii is stored gzip-compressed, same voxels
    nii = _nii(tmp / "label.nii", arr * 3)
    ds.save_label("b_FLAIR", str(nii), "final", {})
    assert np.array_equal(np.asarray(nib.load(str(stored)).dataobj), arr * 3)
    for i in range(4):
        ds.save_label("b_FLAIR", str(_label(tmp, f"v{i}.nii.gz", 10 + i)), "final", {})
    hist = ds.label_history("b_FLAIR", "final")
    assert len(hist) == 3  # the oldest versions are pruned
    assert (studies / "msxai" / "b_FLAIR" / hist[0]["file"]).read_bytes() == (tmp / "v2.nii.gz").read_bytes()
    # an all-zero label is a valid label (a study without lesions)
    ds.save_label("b_FLAIR", str(_nii(tmp / "zero.nii.gz", np.zeros(SHAPE, np.uint8))), "final", {})
    assert not np.asarray(nib.load(str(stored)).dataobj).any()


def test_image_upload_checked_like_a_study(world):
    from lib.validation import status_for

    from msxai.errors import InputError

    tmp, studies = world
    ds = _datastore(studies)
    rng = np.random.default_rng(5)
    flair = _nii(tmp / "up.nii.gz", rng.random(SHAPE).astype(np.float32))
    t1 = _nii(tmp / "upt1.nii.gz", rng.random(SHAPE).astype(np.float32))
    assert ds.add_image("c_T1", str(t1), {}, user="alice", filename="upt1.nii.gz") == "c_T1"
    assert "c_T1" not in ds.list_images()  # a companion: stored, not listed
    assert ds.add_image("c_FLAIR", str(flair), {}, user="alice", filename="up.nii.gz") == "c_FLAIR"
    assert "c_FLAIR" in ds.list_images()
    assert (studies / "c_FLAIR.nii.gz").read_bytes() == flair.read_bytes()
    nan = rng.random(SHAPE).astype(np.float32)
    nan[1, 2, 3] = np.nan
    (tmp / "garbage.nii.gz").write_bytes(b"not an image")
    cases = {
        "exists": ("c_FLAIR", flair, "up.nii.gz", 409, "already exists"),
        "garbage": ("d_FLAIR", tmp / "garbage.nii.gz", "garbage.nii.gz", 422, "cannot read"),
        "nan": ("d_FLAIR", _nii(tmp / "nan.nii.gz", nan), "nan.nii.gz", 422, "NaN"),
        "constant": ("d_FLAIR", _nii(tmp / "c.nii.gz", np.ones(SHAPE, np.float32)), "c.nii.gz", 422, "empty"),
        "two_d": ("d_FLAIR", _nii(tmp / "2d.nii.gz", rng.random((20, 24)).astype(np.float32)), "2d.nii.gz", 422,
                  "3-D"),
        "not_nifti": ("d_FLAIR", flair, "up.png", 415, "expected"),
        "traversal": ("../d_FLAIR", flair, "up.nii.gz", 400, "path separator"),
        "other_grid": ("e_FLAIR", _nii(tmp / "g.nii.gz", rng.random((20, 24, 17)).astype(np.float32)), "g.nii.gz",
                       422, "different grids"),
    }
    _nii(studies / "e_T1.nii.gz", rng.random(SHAPE).astype(np.float32))
    inside = _tree(studies)
    for case, (image_id, path, name, status, msg) in cases.items():
        with pytest.raises(InputError) as err:
            ds.add_image(image_id, str(path), {}, filename=name)
        assert status_for(err.value) == status, (case, str(err.value))
        assert msg in str(err.value), (case, str(err.value))
        assert _tree(studies) == inside, case
    ds.remove_image("c_FLAIR", user="admin")
    assert "c_FLAIR" not in ds.list_images() and not (studies / "c_FLAIR.nii.gz").exists()


# ---------------------------------------------------------------------------------------------- SIGKILL
def _writer(studies: str, versions: list[str], start: int, ack_fd: int) -> None:
    """Child of a fork: open the datastore (as a restarted server does) and save versions in a loop, writing the
    number of every save that returned to ``ack_fd``."""
    try:
        ds = _datastore(studies)
        os.write(ack_fd, b"ready\n")
        i = start
        while True:
            ds.save_label("big_FLAIR", versions[i % len(versions)], "final", {"n": i})
            os.write(ack_fd, f"{i}\n".encode())
            i += 1
    finally:
        os._exit(1)


def test_sigkill_during_saves_loses_nothing(world):
    """Many saves under random SIGKILLs: after every kill the label is the last acknowledged version or the one
    being saved (byte for byte), every kept version is a complete one, the index parses and names the label, and
    the next start (which reconciles and removes temp files) serves it."""
    tmp, studies = world
    # large enough (random values compress poorly: ~0.6 MB) that a kill often lands in the middle of a write
    big = (96, 96, 64)
    rng = np.random.default_rng(0)
    _nii(studies / "big_FLAIR.nii.gz", rng.random(big).astype(np.float32))
    _datastore(studies)  # creates labels/, the index
    versions = []
    for k in range(4):
        arr = rng.integers(0, 200, big).astype(np.uint8)
        versions.append(str(_nii(tmp / f"version{k}.nii.gz", arr)))
    blobs = {Path(v).read_bytes(): k for k, v in enumerate(versions)}
    stored = studies / "labels" / "final" / "big_FLAIR.nii.gz"
    rand = random.Random(1234)
    acked = -1
    kills = 0
    saves_total = 0
    for _ in range(25):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(r)
            _writer(str(studies), versions, acked + 1, w)
        os.close(w)
        fh = os.fdopen(r, "rb", buffering=0)
        assert fh.readline() == b"ready\n"
        os.set_blocking(r, False)
        time.sleep(rand.uniform(0.0, 1.0))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
        os.set_blocking(r, True)
        lines = fh.read().split()
        fh.close()
        done = [int(x) for x in lines]
        saves_total += len(done)
        if done:
            acked = done[-1]
        # the invariants
        index = json.loads((studies / "datastore_v2.json").read_text())  # always parses
        if acked >= 0:
            assert stored.is_file()
            k = blobs.get(stored.read_bytes())
            assert k is not None, "the label is not one of the versions saved (torn write)"
            assert k in (acked % 4, (acked + 1) % 4), (k, acked)  # the acknowledged save or the one in flight
            assert "final" in index["objects"]["big_FLAIR"]["labels"]
        for f in (studies / "msxai" / "big_FLAIR" / "label_history" / "final").glob("*.nii.gz"):
            assert f.read_bytes() in blobs, f"kept version {f.name} is not a complete version"
        for f in stored.parent.iterdir():
            assert f.name == "big_FLAIR.nii.gz" or ".tmp-" in f.name, f.name
    assert kills == 25 and saves_total > 25, saves_total
    # a restart cleans the temp files of the killed writers and serves the label
    ds = _datastore(studies)
    assert not [f for f in stored.parent.iterdir() if ".tmp-" in f.name]
    assert not [f for f in studies.iterdir() if ".tmp-" in f.name]
    assert ds.get_label_uri("big_FLAIR", "final") == str(stored)
    print(f"{kills} SIGKILLs over {saves_total} acknowledged saves: no torn label, index always parsed")
