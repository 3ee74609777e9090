"""Bundles take the scans users have (issue 14), shown on a synthetic subject with the U-Net bundle.

Every geometry is made here with nibabel (voxel reorders) and scipy (reslicing), and every DICOM series is written
with pydicom (``msxai.dicom``, read back by the bundle through SimpleITK/GDCM), never with the chain under test:

(a) the same 1 mm scan given in LPS and in a sagittal PSR voxel order gives the canonical lesions voxel for voxel (ids
    included) and one lesion's saliency equal to the canonical map reoriented;
(c) each geometry written as a DICOM series gives what its NIfTI gives;
    an oblique (10 degrees) 0.9 x 0.9 x 3 mm FLAIR with the T1 on its own 1 mm grid is segmented on the 1 mm
    network grid and answered on its own grid (how well: tests/test_inputs_patient26.py);
    maps on the network grid go back to the native grid by the probability's inversion (equal to a scipy twin, not
    zero-filled: MONAI issue 7392), and native-grid domains reach the network grid by nearest neighbour;
and the refusals: FLAIR/T1 fields of view overlapping < 50 %, 2-D and 4-D images, a missing or degenerate
orientation (exit 2 from the command line).

One canonical run is shared by the module. The subject is a 1 mm crop (112 x 128 x 96) of ``msxai.synth`` seed 101,
its intensities rescaled to integers in [0, 65535] so that a DICOM series (uint16, slope 1) holds them exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from geometry_helpers import oblique_grid, reorder, reslice, save_nifti, to_reference_order
from msxai.errors import GeometryError, InputError

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "msxai_unet"
SEED = 101
CROP = (112, 128, 96)


def _write_dicom(array, affine, folder, description, study):
    from msxai.dicom import volume_to_mr_series, write_series

    write_series(volume_to_mr_series(array, affine, study, description, 1 if description == "FLAIR" else 2), folder)
    return folder


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    from msxai.synth import generate_subject

    d = tmp_path_factory.mktemp("inputs")
    s = generate_subject(SEED)
    centre = np.round(np.argwhere(s.lesions > 0).mean(0)).astype(int)
    lo = np.clip(centre - np.array(CROP) // 2, 0, np.array(s.flair.shape) - CROP)
    sl = tuple(slice(int(a), int(a) + n) for a, n in zip(lo, CROP))
    affine = s.affine.copy()
    affine[:3, 3] = s.affine[:3, :3] @ lo + s.affine[:3, 3]
    flair = np.rint(s.flair[sl] / s.flair[sl].max() * 65535)
    t1 = np.rint(s.t1[sl] / s.t1[sl].max() * 65535)
    truth = (s.lesions[sl] > 0).astype(np.uint8)
    paths = {"flair": save_nifti(d / "FLAIR.nii.gz", flair, affine), "t1": save_nifti(d / "T1.nii.gz", t1, affine),
             "truth": save_nifti(d / "truth.nii.gz", truth, affine, np.uint8)}
    return {"dir": d, "flair": flair.astype(np.float32), "t1": t1.astype(np.float32), "truth": truth,
            "affine": affine, "paths": paths}


@pytest.fixture(scope="module")
def bundle():
    from msxai.bundle import load_bundle

    return load_bundle(BUNDLE)


@pytest.fixture(scope="module")
def canonical(subject, bundle):
    from msxai.metrics import evaluate_case

    assert "".join(nib.aff2axcodes(subject["affine"])) == "LAS"
    r = bundle.segment_files(subject["paths"]["flair"], subject["paths"]["t1"])
    assert r.labels.max() >= 3, "the canonical run finds too few lesions for the comparisons below"
    return {"result": r, "metrics": evaluate_case(r.labels, subject["truth"], r.affine)}


def test_canonical_input_gives_todays_outputs(subject, bundle, canonical):
    """A canonical input (1 mm, LAS, T1 on the FLAIR grid, skull-stripped) goes through the chain unchanged: the
    probability is today's within 1e-5 - nibabel arrays normalised over their non-zero voxels by hand with the
    bundle's normalisation (median_iqr: (x - median) / (IQR / 1.34898); zscore_brain: (x - mean) / std), the bundle's
    sliding-window inferer, softmax channel 1 - and the lesions are its 18-connected components >= 5 mm3."""
    import json

    from msxai.lesions import lesion_instances

    method = json.loads((BUNDLE / "configs" / "inference.json").read_text())["normalization"]
    raw = np.stack([nib.load(str(subject["paths"][k])).get_fdata(dtype=np.float32) for k in ("flair", "t1")])
    brain = np.any(raw != 0, axis=0)
    image = np.zeros_like(raw)
    for c in range(2):
        v = raw[c][brain].astype(np.float64)
        if method == "median_iqr":
            q25, q50, q75 = np.percentile(v, [25, 50, 75])
            image[c][brain] = (v - q50) / ((q75 - q25) / 1.3489795003921634)  # the standard normal IQR
        else:
            assert method == "zscore_brain", method
            image[c][brain] = (v - v.mean()) / v.std()
    with torch.no_grad():
        logits = bundle.inferer(torch.from_numpy(image)[None], bundle.network)
    prob = torch.softmax(logits, 1)[0, 1].numpy()
    r = canonical["result"]
    np.testing.assert_allclose(r.prob, prob, atol=1e-5)
    np.testing.assert_array_equal(r.labels, lesion_instances(prob, 0.3, 5.0, subject["affine"]))
    np.testing.assert_array_equal(r.affine, subject["affine"])


# ----------------------------------------------------------------------------------------------------------- (a)
@pytest.mark.parametrize("axcodes", ["LPS", "PSR"])
def test_reordered_scan_gives_the_canonical_lesions(subject, bundle, canonical, axcodes, tmp_path):
    flair, a = reorder(subject["flair"], subject["affine"], axcodes)
    t1, _ = reorder(subject["t1"], subject["affine"], axcodes)
    r = bundle.segment_files(save_nifti(tmp_path / "F.nii.gz", flair, a), save_nifti(tmp_path / "T.nii.gz", t1, a))
    assert "".join(nib.aff2axcodes(r.affine)) == axcodes and r.labels.shape == flair.shape
    np.testing.assert_allclose(r.affine, a, atol=1e-6)  # outputs on the input's own grid
    c = canonical["result"]
    np.testing.assert_array_equal(to_reference_order(r.labels, r.affine, c.affine), c.labels)  # ids included
    np.testing.assert_allclose(to_reference_order(r.prob, r.affine, c.affine), c.prob, atol=1e-6)
    assert [t["volume_mm3"] for t in r.table] == [t["volume_mm3"] for t in c.table]


def test_reordered_scan_explains_a_lesion_like_the_canonical(subject, bundle, canonical, tmp_path):
    from msxai.io import save_volume
    from msxai.saliency.engine import explain_to_files

    c = canonical["result"]
    small = min(c.table, key=lambda t: (t["voxels"], t["id"]))["id"]
    save_volume(tmp_path / "c_lesions.nii.gz", c.labels, c.affine, dtype=np.int32)
    explain_to_files(bundle, subject["paths"]["flair"], subject["paths"]["t1"], tmp_path / "c",
                     lesions_path=tmp_path / "c_lesions.nii.gz", lesion_ids=small, n_samples=2, aggregation="mean",
                     progress=False)
    flair, a = reorder(subject["flair"], subject["affine"], "PSR")
    t1, _ = reorder(subject["t1"], subject["affine"], "PSR")
    labels, _ = reorder(c.labels, c.affine, "PSR")
    f, t = save_nifti(tmp_path / "F.nii.gz", flair, a), save_nifti(tmp_path / "T.nii.gz", t1, a)
    save_volume(tmp_path / "r_lesions.nii.gz", labels, a, dtype=np.int32)
    out = explain_to_files(bundle, f, t, tmp_path / "r", lesions_path=tmp_path / "r_lesions.nii.gz",
                           lesion_ids=small, n_samples=2, aggregation="mean", progress=False)
    assert out["settings"]["network_grid_is_input_grid"] is False
    for seq in ("flair", "mprage"):
        name = f"lesion_{small}_smoothgrad_{seq}.nii.gz"
        ref = np.asarray(nib.load(str(tmp_path / "c" / name)).dataobj)
        img = nib.load(str(tmp_path / "r" / name))
        got = to_reference_order(np.asarray(img.dataobj), img.affine, c.affine)
        assert np.abs(ref).max() > 0
        np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())


# ----------------------------------------------------------------------------------------------------------- (c)
def _oblique_scan(subject):
    affine, shape = oblique_grid(subject["affine"], subject["flair"].shape)
    flair = np.clip(reslice(subject["flair"], subject["affine"], affine, shape, 3, slab_mm=3), 0, 65535)
    truth = reslice(subject["truth"].astype(np.float32), subject["affine"], affine, shape, 0) > 0.5
    # integers 0..65535 (max = 65535): what a DICOM series stores exactly (RescaleSlope 1, intercept 0)
    return np.rint(flair / flair.max() * 65535), affine, truth


@pytest.fixture(scope="module")
def oblique(subject, bundle, tmp_path_factory):
    """The oblique 0.9 x 0.9 x 3 mm FLAIR with the canonical T1 on its own grid, segmented."""
    d = tmp_path_factory.mktemp("oblique")
    flair, affine, truth = _oblique_scan(subject)
    f = save_nifti(d / "FLAIR.nii.gz", flair, affine)
    prepared = bundle.prepare(f, subject["paths"]["t1"])
    result = bundle.segment(prepared)
    return {"flair": flair, "affine": affine, "truth": truth, "path": f, "prepared": prepared, "result": result}


def test_oblique_anisotropic_flair_comes_back_on_its_own_grid(canonical, oblique):
    """The oblique 0.9 x 0.9 x 3 mm FLAIR (T1 on its own 1 mm grid, resampled in world coordinates, nothing to
    register) is segmented on the 1 mm network grid and its outputs are on the FLAIR's native grid. How well it
    segments is measured on patient26 (tests/test_inputs_patient26.py); on this synthetic crop the Dice and F1
    against the truth resliced to the oblique grid are printed for information (docs/inputs.md)."""
    from msxai.metrics import evaluate_case

    r, prep = oblique["result"], oblique["prepared"]
    assert r.labels.shape == oblique["flair"].shape and np.allclose(r.affine, oblique["affine"], atol=1e-6)
    assert r.prob.shape == oblique["flair"].shape and 0.0 <= r.prob.min() and r.prob.max() <= 1.0
    np.testing.assert_allclose(prep.info["flair"]["spacing_mm"], [0.9, 0.9, 3.0], atol=1e-4)
    np.testing.assert_allclose(np.sqrt((prep.affine[:3, :3] ** 2).sum(0)), 1.0, atol=1e-6)  # network grid: 1 mm
    reg = prep.info["registration"]
    assert reg["resampled"] is True and reg["registered"] is False and reg["misalignment_mm"] <= 2.0, reg
    for t in r.table:  # native mm3
        assert t["volume_mm3"] == pytest.approx(t["voxels"] * 0.9 * 0.9 * 3.0, rel=1e-4) and t["volume_mm3"] >= 5.0
    got = evaluate_case(r.labels, oblique["truth"], r.affine)
    ref = canonical["metrics"]
    print(f"synthetic oblique 0.9x0.9x3 mm: Dice {got['dice']:.3f} F1 {got['F1']:.3f} ({got['n_pred']} lesions); "
          f"canonical Dice {ref['dice']:.3f} F1 {ref['F1']:.3f} ({ref['n_pred']} lesions)")


@pytest.mark.parametrize("geometry", ["canonical", "PSR", "oblique"])
def test_dicom_series_give_what_their_nifti_gives(subject, bundle, canonical, oblique, geometry, tmp_path):
    from msxai.dicom import StudyInfo

    if geometry == "oblique":
        flair, a, nifti_result = oblique["flair"], oblique["affine"], oblique["result"]
        t1, ta = subject["t1"], subject["affine"]
    else:
        axcodes = "LAS" if geometry == "canonical" else "PSR"
        flair, a = reorder(subject["flair"], subject["affine"], axcodes)
        t1, ta = reorder(subject["t1"], subject["affine"], axcodes)
        nifti_result = canonical["result"]
    study = StudyInfo(patient_id=f"INPUTS-{geometry}")
    fd = _write_dicom(flair, a, tmp_path / "flair_dcm", "FLAIR", study)
    td = _write_dicom(t1, ta, tmp_path / "t1_dcm", "T1", study)
    r = bundle.segment_files(fd, td)
    assert r.info["flair"]["source"] == "dicom" and r.info["t1"]["source"] == "dicom"
    ref_affine = nifti_result.affine
    labels = to_reference_order(r.labels, r.affine, ref_affine)
    prob = to_reference_order(r.prob, r.affine, ref_affine)
    if geometry != "oblique":  # the same voxels: the same network input, bit for bit
        np.testing.assert_array_equal(labels, nifti_result.labels)
        np.testing.assert_allclose(prob, nifti_result.prob, atol=1e-5)
    else:  # DICOM keeps 10 significant digits of the oblique direction cosines: a 1e-10 mm different grid
        np.testing.assert_allclose(prob, nifti_result.prob, atol=1e-4, err_msg=f"{r.info} vs {nifti_result.info}")
        differ = (labels > 0) != (nifti_result.labels > 0)
        assert np.all(np.abs(nifti_result.prob[differ] - 0.3) < 1e-4), "lesion voxels differ away from the threshold"


def test_maps_go_back_to_the_native_grid_like_a_scipy_twin(bundle, oblique):
    """A Grad-CAM++ map on the network grid, inverted to the native grid (the trap of MONAI issue 7392: zeros),
    equals trilinear interpolation at the native voxel centres done with scipy; the probability likewise."""
    from msxai.saliency.engine import explain

    prep, r = oblique["prepared"], oblique["result"]
    assert not prep.on_native_grid
    lesion = max(r.table, key=lambda t: t["voxels"])["id"]
    domain = prep.to_network(r.labels == lesion, "lesion")
    cam = next(explain(bundle, prep.image, {"lesion": domain}, method="gradcampp")).maps["gradcampp"]
    native = prep.to_native(cam)

    def twin(arr):
        ijk = np.indices(prep.native_shape).reshape(3, -1).astype(np.float64)
        m = np.linalg.inv(prep.affine) @ prep.native_affine
        xyz = m[:3, :3] @ ijk + m[:3, 3:4]
        return ndimage.map_coordinates(arr, xyz, order=1, mode="nearest").reshape(prep.native_shape)

    assert native.shape == tuple(prep.native_shape) and np.abs(cam).max() > 0
    np.testing.assert_allclose(native, twin(cam), atol=1e-5 * np.abs(cam).max())
    assert np.abs(native).max() > 0.5 * np.abs(cam).max()
    np.testing.assert_allclose(r.prob, twin(r.prob_network), atol=1e-5)


def test_native_domains_reach_the_network_grid_by_nearest_neighbour(oblique):
    prep, r = oblique["prepared"], oblique["result"]
    for t in sorted(r.table, key=lambda t: -t["voxels"])[:3]:
        native = r.labels == t["id"]
        got = prep.to_network(native, f"lesion {t['id']}")
        ijk = np.indices(prep.shape).reshape(3, -1).astype(np.float64)
        m = np.linalg.inv(prep.native_affine) @ prep.affine
        idx = np.rint(m[:3, :3] @ ijk + m[:3, 3:4]).astype(int)
        ok = np.all((idx >= 0) & (idx < np.array(prep.native_shape)[:, None]), axis=0)
        twin = np.zeros(prep.shape, bool).ravel()
        twin[ok] = native[tuple(idx[:, ok])]
        np.testing.assert_array_equal(got, twin.reshape(prep.shape))


# ------------------------------------------------------------------------------------------------------ refusals
def test_refusals_name_the_problem(subject, bundle, tmp_path, capsys):
    from msxai.cli import main

    f, t, a = subject["flair"], subject["t1"], subject["affine"]
    far = a.copy()
    far[:3, 3] += [0.0, 0.6 * f.shape[1], 0.0]  # T1 field of view shifted: 40 % of the FLAIR's left inside it
    cases = [
        (save_nifti(tmp_path / "F.nii.gz", f, a), save_nifti(tmp_path / "Tfar.nii.gz", t, far), GeometryError, "overlap too little"),
        (save_nifti(tmp_path / "F2d.nii.gz", f[:, :, 40:41], a), save_nifti(tmp_path / "T2d.nii.gz", t[:, :, 40:41], a),
         InputError, "2-D image"),
        (save_nifti(tmp_path / "F4d.nii.gz", np.stack([f, f], -1), a), save_nifti(tmp_path / "T.nii.gz", t, a),
         InputError, "4-D image (2 volumes"),
    ]
    no_orient = nib.Nifti1Image(f, None)
    no_orient.header.set_sform(None, code=0)
    no_orient.header.set_qform(None, code=0)
    nib.save(no_orient, str(tmp_path / "Fnone.nii.gz"))
    cases.append((tmp_path / "Fnone.nii.gz", tmp_path / "T.nii.gz", GeometryError, "no orientation"))
    flat = a.copy()
    flat[:3, 1] = flat[:3, 0] * 1.0001  # two voxel axes along one direction
    cases.append((save_nifti(tmp_path / "Fflat.nii.gz", f, flat), tmp_path / "T.nii.gz", GeometryError,
                  "degenerate orientation"))
    for flair, t1, err, msg in cases:
        with pytest.raises(err, match=msg.replace("(", r"\(")):
            bundle.prepare(flair, t1)
        assert main(["segment", "--bundle", str(BUNDLE), "--flair", str(flair), "--t1", str(t1),
                     "--out", str(tmp_path / "out")]) == 2
        assert msg in capsys.readouterr().err
