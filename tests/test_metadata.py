"""Bundle metadata that tells the truth: the weights' sha256 under each version, the version = the newest changelog
entry, eval_metrics = the evaluation files (4 decimals); the check fails on every kind of drift and `msxai metadata`
refreshes the metadata (refusing new weights without a new version)."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from msxai.errors import InputError
from msxai.metadata import metadata_problems, refresh_metadata

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ["msxai_unet", "msxai_dynunet", "msxai_swinunetr"]


@pytest.mark.parametrize("name", BUNDLES)
def test_committed_metadata_agrees_with_weights_and_eval_files(name):
    root = REPO / "bundles" / name
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    # the twin: hashlib on the file and the eval files' means, read here without msxai.metadata
    digest = hashlib.sha256((root / "models" / "model.pt").read_bytes()).hexdigest()
    assert meta["weights_sha256"][meta["version"]] == digest
    assert set(meta["weights_sha256"]) == set(meta["changelog"])
    assert meta["version"] == max(meta["changelog"], key=lambda v: tuple(int(x) for x in v.split(".")))
    for split, key in (("test", "synthetic_test"), ("patient26", "patient26")):
        ev = json.loads((root / "eval" / f"metrics_{split}.json").read_text())
        for m in ("dice", "ndsc", "TPR", "FDR", "FNR", "F1"):
            assert meta["eval_metrics"][key][m] == round(ev["mean"][m], 4), (key, m)
        assert meta["eval_metrics"][key]["n_cases"] == ev["n_cases"]
    assert metadata_problems(root) == []
    inf = json.loads((root / "configs" / "inference.json").read_text())
    assert meta["msxai"]["orientation"] == inf["orientation"]
    assert meta["msxai"]["voxel_size_mm"] == inf["pixdim"]


@pytest.fixture()
def bundle(tmp_path):
    src = REPO / "bundles" / "msxai_unet"
    dst = tmp_path / "b"
    (dst / "models").mkdir(parents=True)
    shutil.copytree(src / "configs", dst / "configs")
    shutil.copytree(src / "eval", dst / "eval")
    (dst / "models" / "model.pt").write_bytes(b"weights one")
    meta = json.loads((dst / "configs" / "metadata.json").read_text())
    meta["weights_sha256"][meta["version"]] = hashlib.sha256(b"weights one").hexdigest()
    (dst / "configs" / "metadata.json").write_text(json.dumps(meta))
    for f in (dst / "eval").glob("metrics_*.json"):  # evaluated with these weights
        ev = json.loads(f.read_text())
        if "weights_sha256" in ev:
            ev["weights_sha256"] = hashlib.sha256(b"weights one").hexdigest()
            f.write_text(json.dumps(ev))
    assert metadata_problems(dst) == []
    return dst


def _meta(b):
    return json.loads((b / "configs" / "metadata.json").read_text())


def _write(b, meta):
    (b / "configs" / "metadata.json").write_text(json.dumps(meta))


def test_every_drift_is_a_problem(bundle):
    # new weights, same version
    (bundle / "models" / "model.pt").write_bytes(b"weights two")
    assert any("new weights need a new version" in p for p in metadata_problems(bundle))
    (bundle / "models" / "model.pt").write_bytes(b"weights one")
    # version bumped without a changelog entry / hash
    m = _meta(bundle)
    _write(bundle, {**m, "version": "9.0.0"})
    assert any("not the newest changelog entry" in p for p in metadata_problems(bundle))
    # a changelog entry without its weights' hash
    _write(bundle, {**m, "changelog": {"0.0.1": "x", **m["changelog"]}})
    assert any("weights_sha256 versions" in p for p in metadata_problems(bundle))
    # a metric off in the 4th decimal
    bad = json.loads(json.dumps(m))
    bad["eval_metrics"]["patient26"]["ndsc"] = round(bad["eval_metrics"]["patient26"]["ndsc"] + 0.0001, 4)
    _write(bundle, bad)
    assert any("eval_metrics[patient26]" in p for p in metadata_problems(bundle))
    _write(bundle, m)
    # an eval file regenerated (by other weights)
    ev = json.loads((bundle / "eval" / "metrics_test.json").read_text())
    ev["mean"]["dice"] += 0.01
    (bundle / "eval" / "metrics_test.json").write_text(json.dumps(ev))
    assert any("eval_metrics[synthetic_test]" in p for p in metadata_problems(bundle))
    ev["weights_sha256"] = "0" * 64
    (bundle / "eval" / "metrics_test.json").write_text(json.dumps(ev))
    assert any("evaluated with other weights" in p for p in metadata_problems(bundle))


def test_refresh_from_new_weights_and_eval_files(bundle):
    from msxai.cli import main

    (bundle / "models" / "model.pt").write_bytes(b"weights two")
    for f in (bundle / "eval").glob("metrics_*.json"):  # both evaluations re-run with the new weights
        ev = json.loads(f.read_text())
        if f.name == "metrics_patient26.json":
            ev["mean"]["dice"] = 0.123456
        ev["weights_sha256"] = hashlib.sha256(b"weights two").hexdigest()
        f.write_text(json.dumps(ev))
    old = _meta(bundle)
    with pytest.raises(InputError, match="give --version"):
        refresh_metadata(bundle)
    assert _meta(bundle) == old  # nothing written
    with pytest.raises(InputError, match="must be above"):
        refresh_metadata(bundle, old["version"], "x")
    with pytest.raises(InputError, match="changelog"):
        refresh_metadata(bundle, "0.9.0")
    assert main(["metadata", "--bundle", str(bundle), "--check"]) == 1
    assert main(["metadata", "--bundle", str(bundle), "--version", "0.9.0", "--changelog", "retrained"]) == 0
    new = _meta(bundle)
    assert new["version"] == "0.9.0" and new["changelog"]["0.9.0"] == "retrained"
    assert new["weights_sha256"]["0.9.0"] == hashlib.sha256(b"weights two").hexdigest()
    assert new["weights_sha256"][old["version"]] == old["weights_sha256"][old["version"]]
    assert new["eval_metrics"]["patient26"]["dice"] == 0.1235
    assert metadata_problems(bundle) == []
    assert main(["metadata", "--bundle", str(bundle), "--check"]) == 0
    with pytest.raises(InputError, match="no new version"):
        refresh_metadata(bundle, "1.0.0", "same weights")
