"""msxai.dicom_pmap: saliency maps as float DICOM Parametric Maps, read back by an independent reader (pixel positions
from the DICOM attributes, values through the real-world value mapping) and by a twin of OHIF 3.10's loader;
dciodvfy (dicom3tools) reports no error."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_helpers import DCIODVFY, affine, dciodvfy_errors, ohif_pmap_volume, pm_volume
from msxai.dicom import StudyInfo, volume_to_mr_series
from msxai.dicom_pmap import read_parametric_map, saliency_parametric_maps, write_parametric_map
from msxai.errors import GeometryError, InputError

SHAPE = (12, 10, 9)


def _study(kind: str, shape=SHAPE):
    rng = np.random.default_rng(1)
    aff = affine(kind)
    flair = rng.normal(100, 20, shape).astype(np.float32)
    return aff, volume_to_mr_series(flair, aff, StudyInfo(patient_id=f"PM-{kind}"), "FLAIR", 1)


def _saliency(rng, z: slice = slice(3, 6), shape=SHAPE) -> np.ndarray:
    m = np.zeros(shape, np.float32)
    m[3:8, 2:7, z] = rng.normal(0, 2e-4, (5, 5, z.stop - z.start)).astype(np.float32)
    return m


def _reread(ds):
    buf = io.BytesIO()
    ds.save_as(buf, write_like_original=False)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def _slices_along_normal(source) -> list:
    iop = np.array([float(x) for x in source[0].ImageOrientationPatient])
    n = np.cross(iop[:3], iop[3:])
    return sorted(source, key=lambda d: float(np.dot(n, [float(x) for x in d.ImagePositionPatient])))


@pytest.mark.parametrize("kind", ["las", "ras", "oblique"])
def test_parts_read_back_independently(kind):
    aff, src = _study(kind)
    m = _saliency(np.random.default_rng(2))
    pms = saliency_parametric_maps(m, aff, src, name="lesion 3", map_name="FLAIR", method="smoothgrad", margin=1)
    assert [p for p, _ in pms] == ["positive", "negative"]
    flair_series = str(src[0].SeriesInstanceUID)
    uids = {str(d.SOPInstanceUID): d for d in src}
    for part, ds in pms:
        pm = _reread(ds)
        assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and "FloatPixelData" in pm and "PixelData" not in pm
        assert pm["FloatPixelData"].VR == "OF" and int(pm.BitsAllocated) == 32
        assert (int(pm.Rows), int(pm.Columns)) == (int(src[0].Rows), int(src[0].Columns))
        assert pm.StudyInstanceUID == src[0].StudyInstanceUID and pm.FrameOfReferenceUID == src[0].FrameOfReferenceUID
        # top-level ReferencedSeriesSequence: the FLAIR series with every instance (OHIF's PM loader needs it)
        rs = pm.ReferencedSeriesSequence[0]
        assert rs.SeriesInstanceUID == flair_series
        assert {str(r.ReferencedSOPInstanceUID) for r in rs.ReferencedInstanceSequence} == set(uids)
        stored = np.frombuffer(pm.FloatPixelData, dtype="<f4")
        assert stored.min() >= 0 and stored.max() == pytest.approx(1.0, abs=1e-7)  # scaled to [0, 1]
        # each frame references its FLAIR instance by UID and lies at its position
        for fg in pm.PerFrameFunctionalGroupsSequence:
            s = uids[str(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)]
            np.testing.assert_allclose([float(x) for x in fg.PlanePositionSequence[0].ImagePositionPatient],
                                       [float(x) for x in s.ImagePositionPatient], atol=1e-6)
        # the true values through the real-world value mapping equal the part of the NIfTI map, voxel for voxel
        expected = np.maximum(m, 0) if part == "positive" else np.minimum(m, 0)
        got = pm_volume(pm, aff, SHAPE)
        # msxai's own reader (what scripts/slicer_renderings.py draws) agrees with the independent one
        np.testing.assert_array_equal(read_parametric_map(pm, aff, SHAPE), got)
        covered = ~np.isnan(got)
        assert covered[expected != 0].all(), "a non-zero voxel of the map has no frame"
        np.testing.assert_allclose(got[covered], expected[covered], rtol=0, atol=1e-7 * np.abs(expected).max())
        # frames: the slices (in order along the normal) where the part is non-zero, +- margin, nothing else
        order = _slices_along_normal(src)
        k_of = {str(d.SOPInstanceUID): k for k, d in enumerate(order)}
        ks = sorted(k_of[str(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)]
                    for fg in pm.PerFrameFunctionalGroupsSequence)
        hit = [k for k in range(len(order)) if np.any(expected[..., int(order[k].InstanceNumber) - 1])]
        assert ks == list(range(max(0, hit[0] - 1), min(len(order), hit[-1] + 2)))
        rwv = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert float(rwv.RealWorldValueSlope) == pytest.approx(np.abs(expected).max() * (1 if part == "positive" else -1))
        assert rwv.MeasurementUnitsCodeSequence[0].CodeValue == "1"
        assert "FLAIR" in str(pm.SeriesDescription) and "lesion 3" in str(pm.SeriesDescription)


@pytest.mark.parametrize("shape", [(12, 10, 9), (12, 8, 9)])
def test_ohif_loader_twin(shape):
    """OHIF 3.10's PM loader with the app's two fixes (apps/msxai/lib/ohif_fixes.py) puts the map, x 100, on its
    slices (0..100); the bundled loader fails (rows x columns not a multiple of 4: RangeError) or misplaces it."""
    aff, src = _study("las", shape)
    m = _saliency(np.random.default_rng(3), z=slice(5, 7), shape=shape)
    order = _slices_along_normal(src)
    (_, ds), *_ = saliency_parametric_maps(m, aff, src, name="lesion 1", map_name="CAM", method="gradcampp", margin=0)
    pm = _reread(ds)
    assert int(pm.NumberOfFrames) == 2 < len(order)
    vol = ohif_pmap_volume(pm, src, fixed=True)
    pos = np.maximum(m, 0)
    # slice k of OHIF's volume holds the FLAIR slice order[k] (its voxels (i, j, InstanceNumber - 1)); in-plane order
    # is the frame's (msxai's in-plane flips), so compare the values of each slice as sets
    for k, d in enumerate(order):
        np.testing.assert_allclose(np.sort(vol[k].ravel()), np.sort(pos[..., int(d.InstanceNumber) - 1].ravel())
                                   / pos.max() * 100, atol=1e-4)
    assert vol.max() == pytest.approx(100, abs=1e-4) and vol.min() >= 0
    with pytest.raises(IndexError, match="multiple of 4" if (shape[0] * shape[1]) % 4 else "beyond"):
        ohif_pmap_volume(pm, src, fixed=False)


@pytest.mark.skipif(not DCIODVFY, reason="dciodvfy (Debian package dicom3tools) not installed "
                                         "(scripts/install_ohif_deps.sh installs it)")
def test_dciodvfy_reports_no_error(tmp_path):
    aff, src = _study("las")
    m = _saliency(np.random.default_rng(4))
    cam = np.abs(m) + 1e-5  # non-zero everywhere (as a Grad-CAM++ map): the stored minimum is above 0
    pms = saliency_parametric_maps(m, aff, src, name="lesion 2", map_name="MPRAGE", method="smoothgrad")
    pms += saliency_parametric_maps(cam, aff, src, name="lesion 2", map_name="CAM", method="gradcampp")
    assert len(pms) == 3
    for _, ds in pms:
        errors, text = dciodvfy_errors(ds, tmp_path)
        assert not errors, text
        assert "ParametricMap" in text


def test_refusals():
    aff, src = _study("ras")
    m = _saliency(np.random.default_rng(5))
    assert saliency_parametric_maps(np.zeros(SHAPE), aff, src, name="x", map_name="CAM", method="gradcampp") == []
    only_pos = saliency_parametric_maps(np.abs(m), aff, src, name="x", map_name="CAM", method="gradcampp")
    assert [p for p, _ in only_pos] == ["positive"]
    with pytest.raises(InputError, match="zero on every"):
        write_parametric_map(np.zeros(SHAPE), aff, src, slope=1.0, series_description="x", lut_label="x",
                             lut_explanation="x", quantity=("X", "99MSXAI", "x"))
    bad = m.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        saliency_parametric_maps(bad, aff, src, name="x", map_name="CAM", method="gradcampp")
    with pytest.raises(InputError, match="slope"):
        write_parametric_map(np.abs(m), aff, src, slope=0.0, series_description="x", lut_label="x",
                             lut_explanation="x", quantity=("X", "99MSXAI", "x"))
    with pytest.raises(InputError, match="margin"):
        saliency_parametric_maps(m, aff, src, name="x", map_name="CAM", method="gradcampp", margin=-1)
    shifted = aff.copy()
    shifted[:3, 3] += 0.37  # not the FLAIR's grid
    with pytest.raises(GeometryError):
        saliency_parametric_maps(m, shifted, src, name="x", map_name="CAM", method="gradcampp")
    with pytest.raises(InputError, match="method"):
        saliency_parametric_maps(m, aff, src, name="x", map_name="CAM", method="lime")


def test_every_frame_when_margin_is_none():
    """margin=None (the app's default for OHIF, whose PM viewport draws nothing of a partial map) writes a frame on
    every source slice, zeros where the part is zero; the values still read back."""
    aff, src = _study("las")
    m = _saliency(np.random.default_rng(7), z=slice(4, 6))
    (_, part), *_ = saliency_parametric_maps(m, aff, src, name="lesion 2", map_name="FLAIR", method="smoothgrad",
                                            margin=None)
    (_, few), *_ = saliency_parametric_maps(m, aff, src, name="lesion 2", map_name="FLAIR", method="smoothgrad")
    assert int(part.NumberOfFrames) == len(src) > int(few.NumberOfFrames)
    got = pm_volume(part, aff, SHAPE)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, np.maximum(m, 0), atol=1e-7 * np.abs(m).max())


def test_gradcampp_series_name_their_layer():
    """Two Grad-CAM++ maps of one lesion at two layers are two series a user tells apart by name."""
    aff, src = _study("ras")
    m = np.abs(_saliency(np.random.default_rng(6)))
    names = {layer: [str(ds.SeriesDescription) for _, ds in saliency_parametric_maps(
        m, aff, src, name="lesion 1", map_name="CAM", method="gradcampp", layer=layer)] for layer in ("model.1", "model.2.0", None)}
    assert names == {"model.1": ["msxai CAM++ CAM+ lesion 1 [model.1]"],
                     "model.2.0": ["msxai CAM++ CAM+ lesion 1 [model.2.0]"], None: ["msxai CAM++ CAM+ lesion 1"]}


def test_ohif_build_fix_found_and_applied(tmp_path):
    """The app's fix of OHIF 3.10's PM loader applies to the OHIF build of the installed monailabel wheel: exactly
    one bundle holds both buggy texts; the served copy has the fixed ones instead. A build without them is left
    alone."""
    import importlib.util

    REPO_ROOT = Path(__file__).resolve().parents[1]

    spec = importlib.util.spec_from_file_location("msxai_ohif_fixes", REPO_ROOT / "apps" / "msxai" / "lib" / "ohif_fixes.py")
    fixes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixes)
    bundles = fixes.patched_bundles()
    assert len(bundles) == 1, sorted(bundles)
    text = next(iter(bundles.values()))
    original = (fixes.ohif_dir() / next(iter(bundles))).read_text(encoding="utf-8", errors="surrogateescape")
    for old, new in fixes.FIXES:
        assert old in original and old not in text and text.count(new) == 1
    assert len(text) - len(original) == sum(len(n) - len(o) for o, n in fixes.FIXES)  # nothing else changed
    (tmp_path / "x.bundle.js").write_text(original.replace(fixes.FIXES[0][0], "something else"))
    assert fixes.patched_bundles(tmp_path) == {}
