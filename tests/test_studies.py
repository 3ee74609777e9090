"""Study naming rule, image-id validation, DICOM series pairing, artefact paths and the segmentation cache."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from msxai.errors import InputError
from msxai.studies import (
    AmbiguousSequenceError,
    InvalidImageIdError,
    MissingSequenceError,
    artifact_dir,
    dicom_sequence_of,
    find_t1,
    find_t1_series,
    is_study_image,
    safe_artifact_path,
    sequence_of,
    study_pair,
    validate_image_id,
)

from lib.params import parse_explain_params  # the app's (apps/msxai on sys.path: tests/conftest.py)
from lib.seg_cache import SegmentationCache


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


@pytest.mark.parametrize(
    "flair,t1",
    [
        ("s01_FLAIR.nii.gz", "s01_T1.nii.gz"),
        ("s01_flair.nii.gz", "s01_t1.nii.gz"),
        ("sub-01_FLAIR.nii", "sub-01_MPRAGE.nii.gz"),
        ("case-3-FLAIR.nii.gz", "case-3-T1w.nii"),
        ("FLAIR.nii.gz", "T1.nii.gz"),
    ],
)
def test_find_t1_naming_rule(tmp_path, flair, t1):
    f = _touch(tmp_path / flair)
    t = _touch(tmp_path / t1)
    _touch(tmp_path / "other_T1.nii.gz")  # another study's T1 is never picked
    assert find_t1(f) == t
    pair = study_pair(f)
    assert pair.t1 == t and pair.flair == f


def test_find_t1_missing_and_ambiguous(tmp_path):
    f = _touch(tmp_path / "a_FLAIR.nii.gz")
    with pytest.raises(MissingSequenceError, match="no T1/MPRAGE found.*a_T1.nii.gz"):
        find_t1(f)
    _touch(tmp_path / "a_T1.nii.gz")
    _touch(tmp_path / "a_MPRAGE.nii.gz")
    with pytest.raises(AmbiguousSequenceError, match="a_MPRAGE.nii.gz.*a_T1.nii.gz|a_T1.nii.gz.*a_MPRAGE.nii.gz"):
        find_t1(f)
    g = _touch(tmp_path / "patient7.nii.gz")
    with pytest.raises(MissingSequenceError, match="naming rule needs the FLAIR"):
        find_t1(g)


def test_listing_rule():
    assert is_study_image("s01_FLAIR.nii.gz")
    assert is_study_image("FLAIR.nii")
    assert is_study_image("patient7.nii.gz")  # listed; its missing T1 is reported at inference
    for name in ("s01_T1.nii.gz", "s01_MPRAGE.nii", "s01_T1w.nii.gz", "s01_lesions.nii.gz",
                 "s01_brainmask.nii.gz", "consensus_gt.nii.gz", "p_consensus_gt.nii.gz", "T1.nii.gz",
                 ".hidden_FLAIR.nii.gz", "notes.txt", "dataset.json"):
        assert not is_study_image(name), name
    assert sequence_of("x_T1.nii.gz") == "T1" and sequence_of("x_FLAIR.nii") == "FLAIR"
    assert sequence_of("x_lesions.nii.gz") == "aux" and sequence_of("x.nii.gz") is None


@pytest.mark.parametrize("bad", ["", "   ", "../etc/passwd", "a/b", "a\\b", "..", "x..y", ".hidden", "a\x00b",
                                 "x" * 201, None, 5, "semi;colon"])
def test_validate_image_id_refuses(bad):
    with pytest.raises(InvalidImageIdError):
        validate_image_id(bad)
    assert issubclass(InvalidImageIdError, InputError)


def test_validate_image_id_accepts():
    for ok in ("s01_FLAIR", "sub-01_FLAIR", "FLAIR", "a.b_FLAIR", "Case 1_FLAIR"):
        assert validate_image_id(ok) == ok


def test_dicom_rule():
    assert dicom_sequence_of("3D FLAIR SAG") == "FLAIR"
    assert dicom_sequence_of("t2_spc_da-fl_sag FLAIR") == "FLAIR"
    assert dicom_sequence_of("MPRAGE sag 1mm") == "T1"
    assert dicom_sequence_of("T1w_MPR") == "T1"
    assert dicom_sequence_of("t1_mprage_sag_p2_iso POST GAD") is None
    assert dicom_sequence_of("T1 FLAIR axial") is None
    assert dicom_sequence_of("DWI b1000") is None
    study = "1.2.3"
    series = [
        {"SeriesInstanceUID": "1.2.3.1", "SeriesDescription": "3D FLAIR", "StudyInstanceUID": study},
        {"SeriesInstanceUID": "1.2.3.2", "SeriesDescription": "MPRAGE", "StudyInstanceUID": study},
        {"SeriesInstanceUID": "1.2.3.3", "SeriesDescription": "MPRAGE post contrast", "StudyInstanceUID": study},
        {"SeriesInstanceUID": "9.9.9", "SeriesDescription": "MPRAGE", "StudyInstanceUID": "other"},
    ]
    assert find_t1_series(series, "1.2.3.1") == "1.2.3.2"
    # QIDO-RS DICOM JSON form
    qido = [{"0020000E": {"vr": "UI", "Value": [s["SeriesInstanceUID"]]},
             "0008103E": {"vr": "LO", "Value": [s["SeriesDescription"]]},
             "0020000D": {"vr": "UI", "Value": [s["StudyInstanceUID"]]}} for s in series]
    assert find_t1_series(qido, "1.2.3.1") == "1.2.3.2"
    with pytest.raises(MissingSequenceError, match="no T1/MPRAGE series"):
        find_t1_series(series[:1] + series[2:3], "1.2.3.1")
    with pytest.raises(AmbiguousSequenceError):
        find_t1_series(series + [{"SeriesInstanceUID": "1.2.3.4", "SeriesDescription": "T1 3D",
                                  "StudyInstanceUID": study}], "1.2.3.1")


def test_artifact_paths(tmp_path):
    d = artifact_dir(tmp_path, "s01_FLAIR", create=True)
    assert d == tmp_path / "msxai" / "s01_FLAIR" and d.is_dir()
    (d / "explain").mkdir()
    assert safe_artifact_path(tmp_path, "s01_FLAIR", "explain/x.nii.gz") == (d / "explain/x.nii.gz").resolve()
    for bad in ("../x", "/etc/passwd", "explain/../../x", ""):
        with pytest.raises(InvalidImageIdError):
            safe_artifact_path(tmp_path, "s01_FLAIR", bad)
    with pytest.raises(InvalidImageIdError):
        artifact_dir(tmp_path, "../s01")


def test_segmentation_cache_memory_disk_and_invalidation(tmp_path):
    calls = []
    aff = np.diag([1.0, 1.0, 1.0, 1.0])

    def compute():
        calls.append(1)
        lab = np.zeros((4, 4, 4), np.int32)
        lab[1, 1, 1] = 1
        return {"labels": lab, "prob": lab.astype(np.float32) * 0.9, "affine": aff,
                "table": [{"id": 1, "volume_mm3": 1.0}]}

    c = SegmentationCache(tmp_path)
    e1 = c.get("s01_FLAIR", "unet", "fp1", compute)
    assert e1["from_cache"] is None and len(calls) == 1
    e2 = c.get("s01_FLAIR", "unet", "fp1", compute)
    assert e2["from_cache"] == "memory" and len(calls) == 1
    # a new cache (server restart) reads the disk copy
    c2 = SegmentationCache(tmp_path)
    e3 = c2.get("s01_FLAIR", "unet", "fp1", compute)
    assert e3["from_cache"] == "disk" and len(calls) == 1
    assert np.array_equal(e3["labels"], e1["labels"]) and e3["table"] == e1["table"]
    meta = json.loads((tmp_path / "msxai/s01_FLAIR/seg_unet/meta.json").read_text())
    assert meta["fingerprint"] == "fp1"
    # inputs changed -> recomputed
    e4 = c2.get("s01_FLAIR", "unet", "fp2", compute)
    assert e4["from_cache"] is None and len(calls) == 2
    assert nib.load(str(tmp_path / "msxai/s01_FLAIR/seg_unet/labels.nii.gz")).shape == (4, 4, 4)


# ------------------------------------------------------------------------------------------ request parameters
from msxai.lesions import parse_lesion_ids  # noqa: E402


def test_parse_lesion_ids():
    assert parse_lesion_ids("all") == "all"
    assert parse_lesion_ids(3) == [3]
    assert parse_lesion_ids("3") == [3]
    assert parse_lesion_ids("1, 3,3") == [1, 3]
    assert parse_lesion_ids([2, "4"]) == [2, 4]
    for bad in ("x", 0, -1, [1.5], [], True, "1;2"):
        with pytest.raises(InputError, match="lesion"):
            parse_lesion_ids(bad)


def test_parse_explain_params_defaults_and_ranges():
    p = parse_explain_params("smoothgrad", {"lesion": "all"}, ["unet", "dynunet"])
    assert (p.model, p.samples, p.sigma, p.aggregation, p.seed, p.sequence) == ("unet", 50, 0.05, "max", 0, "FLAIR")
    assert p.lesion == "all" and p.fractions == (0.5, 0.2)
    # client configs send lists of choices: the first is the selection
    p = parse_explain_params("smoothgrad", {"network": ["dynunet", "unet"], "aggregation": ["mean", "max"],
                                            "sequence": "t1", "samples": "4"}, ["unet", "dynunet"])
    assert (p.model, p.aggregation, p.sequence, p.samples) == ("dynunet", "mean", "MPRAGE", 4)
    for bad, match in [({"samples": 10**9}, "samples must be an integer in \\[1, 200\\]"),
                       ({"samples": 0}, "samples"), ({"samples": "lots"}, "samples"), ({"samples": 2.5}, "samples"),
                       ({"sigma": -1}, "sigma"), ({"sigma": float("nan")}, "sigma"),
                       ({"aggregation": "median"}, "aggregation"), ({"network": "resnet"}, "network must be one of"),
                       ({"seed": -3}, "seed"), ({"sequence": "T2"}, "sequence"),
                       ({"strong": 0.1, "medium": 0.3}, "medium"), ({"foreground": "[[1,2"}, "foreground"),
                       ({"domain_mode": "cube"}, "domain_mode"), ({"radius_mm": 0}, "radius_mm")]:
        with pytest.raises(InputError, match=match):
            parse_explain_params("smoothgrad", bad, ["unet", "dynunet"])
    with pytest.raises(InputError, match="samples must be an integer in \\[1, 8\\]"):
        parse_explain_params("smoothgrad", {"samples": 9}, ["unet"], max_samples=8)


def test_explain_network_parameter_and_its_deprecated_name_model(caplog):
    """``network`` names the bundle; the old ``model`` (as a direct caller sends it, or as ``explain_model`` after
    the app's infer route moved it away from MONAI Label's task key) selects the same bundle, with a deprecation
    note and a log warning; MONAI Label's own task key (``model: explain_...``) is not a client's parameter."""
    models = ["unet", "dynunet"]
    new = parse_explain_params("smoothgrad", {"network": "dynunet", "model": "explain_smoothgrad"}, models)
    assert new.model == "dynunet" and new.deprecated == []
    assert parse_explain_params("smoothgrad", {"model": "explain_smoothgrad"}, models).model == "unet"
    for old in ({"model": "dynunet"}, {"explain_model": ["dynunet", "unet"], "model": "explain_smoothgrad"}):
        caplog.clear()
        with caplog.at_level("WARNING"):
            p = parse_explain_params("smoothgrad", old, models)
        assert p.model == "dynunet" and p.run_key("lesion3") == new.run_key("lesion3")  # the same request
        assert len(p.deprecated) == 1 and "'model' is now 'network'" in p.deprecated[0]
        assert any("'model' is now 'network'" in r.getMessage() for r in caplog.records)
    both = parse_explain_params("smoothgrad", {"network": "unet", "explain_model": "dynunet"}, models)
    assert both.model == "unet" and both.deprecated  # the new name wins
    with pytest.raises(InputError, match="network must be one of"):
        parse_explain_params("smoothgrad", {"model": "resnet"}, models)


def test_parse_explain_params_gradcampp():
    p = parse_explain_params("gradcampp", {"samples": 4, "lesion": 2}, ["unet"], default_layer="model.1")
    assert p.layer == "model.1" and p.ignored == ["samples"] and p.lesion == [2]
    p = parse_explain_params("gradcampp", {"layer": "x.y", "foreground": "[[1, 2, 3]]"}, ["unet"])
    assert p.layer == "x.y" and p.foreground == [[1, 2, 3]]
    with pytest.raises(InputError, match="layer"):
        parse_explain_params("gradcampp", {}, ["unet"], default_layer=None)
    with pytest.raises(InputError, match="method"):
        parse_explain_params("lime", {}, ["unet"])
