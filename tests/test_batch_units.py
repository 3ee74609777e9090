"""The pieces of a cohort run that need no network: case listing (folder, synth dataset.json, MONAI datalist),
the atomic claims of the work queue under concurrent claimers, the settings identity and the CLI's refusals."""

import json
import threading

import numpy as np
import pytest
import torch.distributed as dist

from msxai.batch.cases import load_cases
from msxai.batch.dist import DistContext, WorkQueue
from msxai.errors import InputError
from msxai.io import save_volume

AFF = np.eye(4)


def _vol(p):
    save_volume(p, np.ones((4, 4, 4), np.float32), AFF)
    return p


def test_folder_cases_by_the_naming_rule(tmp_path):
    _vol(tmp_path / "s1_FLAIR.nii.gz"), _vol(tmp_path / "s1_T1.nii.gz"), _vol(tmp_path / "s1_lesions.nii.gz")
    (tmp_path / "patient26").mkdir()
    for n in ("FLAIR.nii.gz", "T1.nii.gz", "consensus_gt.nii.gz"):
        _vol(tmp_path / "patient26" / n)
    (tmp_path / "p2").mkdir()
    _vol(tmp_path / "p2" / "FLAIR.nii.gz"), _vol(tmp_path / "p2" / "MPRAGE.nii.gz")
    cases = {c.id: c for c in load_cases(tmp_path)}
    assert set(cases) == {"s1", "patient26", "p2"}
    assert cases["s1"].truth.endswith("s1_lesions.nii.gz") and cases["s1"].t1.endswith("s1_T1.nii.gz")
    assert cases["patient26"].truth.endswith("consensus_gt.nii.gz")
    assert cases["p2"].truth is None and cases["p2"].t1.endswith("MPRAGE.nii.gz")


def test_datalist_forms_and_refusals(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"testing": [
        {"image": ["a/x_FLAIR.nii.gz", "a/x_T1.nii.gz"], "label": "a/x_seg.nii.gz"},
        {"id": "y", "flair": "/abs/y.nii.gz", "t1": "/abs/yt1.nii.gz"}]}))
    a, b = load_cases(tmp_path / "d.json")
    assert (a.id, a.flair, a.truth) == ("x", str(tmp_path / "a/x_FLAIR.nii.gz"), str(tmp_path / "a/x_seg.nii.gz"))
    assert (b.id, b.flair, b.truth) == ("y", "/abs/y.nii.gz", None)
    for bad, msg in (([{"flair": "f"}], "give 'flair' and 't1'"),
                     ([{"id": "a", "flair": "f", "t1": "t"}, {"id": "a", "flair": "g", "t1": "u"}], "twice"),
                     ([{"id": "../x", "flair": "f", "t1": "t"}], "folder name"),
                     ({"training": [], "validation": []}, "which list")):
        (tmp_path / "b.json").write_text(json.dumps(bad))
        with pytest.raises(InputError, match=msg):
            load_cases(tmp_path / "b.json")


def test_synth_dataset_split(tmp_path):
    subjects = []
    for i in range(3):
        files = {k: str(_vol(tmp_path / f"s{i}_{k}.nii.gz").name) for k in ("flair", "t1", "label", "brain_mask")}
        subjects.append({"id": f"s{i}", **files})
    (tmp_path / "dataset.json").write_text(json.dumps({"subjects": subjects, "splits": {"test": ["s2"]}}))
    assert [c.id for c in load_cases(tmp_path)] == ["s0", "s1", "s2"]
    (c,) = load_cases(tmp_path, split="test")
    assert c.id == "s2" and c.truth.endswith("s2_label.nii.gz") and c.brain_mask.endswith("s2_brain_mask.nii.gz")


def test_concurrent_claims_give_every_case_exactly_once():
    """8 claimers on one store (threads here, processes under torchrun: the same atomic store.add) take 500 cases;
    slow twin: the union is range(500) without repeats."""
    store = dist.HashStore()
    ctx = DistContext(0, 8, 0, "cpu", None, store, "t/")
    got = [[] for _ in range(8)]

    def worker(k):
        q = WorkQueue(ctx, 500)
        while (i := q.claim()) is not None:
            got[k].append(i)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = sorted(i for g in got for i in g)
    assert flat == list(range(500))
    assert WorkQueue(ctx, 500).claim() is None  # nothing left, no hang


def test_identity_ignores_performance_knobs_and_unread_settings():
    from msxai.batch.case import BatchSettings

    a = BatchSettings(explain="domains", samples=8, max_batch=4).validate().identity()
    b = BatchSettings(explain="domains", samples=8, noise_batch=2).validate().identity()
    assert a == b and a["samples"] == 8
    assert BatchSettings(explain="none", samples=3).identity() == BatchSettings(explain="none").identity()
    assert BatchSettings(explain="domains", samples=3).identity() != a
    with pytest.raises(InputError, match="classes"):
        BatchSettings(classes=("TP", "XX")).validate()


def test_cli_refuses_domains_without_truth(tmp_path, capsys):
    from msxai.cli import main

    _vol(tmp_path / "s_FLAIR.nii.gz"), _vol(tmp_path / "s_T1.nii.gz")
    rc = main(["batch", "--bundle", "unet", "--cohort", str(tmp_path), "--out", str(tmp_path / "o"),
               "--explain", "domains", "--device", "cpu", "--no-progress"])
    assert rc == 2 and "needs the truth" in capsys.readouterr().err
