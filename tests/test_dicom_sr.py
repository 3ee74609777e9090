"""msxai.dicom_sr / msxai.dicom_saliency: an explanation's outputs (float maps, domains, summary JSON) as Parametric
Maps and a TID 1500 SR; the SR read back by walking its content tree (no msxai code) and compared with the summary
JSON and a brute-force saliency peak; OHIF 3.10's SR parsing (Python twin) finds one measurement per lesion;
dciodvfy (dicom3tools) reports no error."""

from __future__ import annotations

import io
import json

import numpy as np
import pydicom
import pytest

from dicom_helpers import (DCIODVFY, affine, dciodvfy_errors, ohif_hydrated_rows, ohif_sr_measurements, pm_volume,
                           sr_items)
from msxai.dicom import SEGMENTATION_STORAGE, StudyInfo, lesion_segments, volume_to_mr_series, write_seg
from msxai.dicom_saliency import explain_dicom
from msxai.dicom_sr import Measurement, MeasurementGroup, write_measurement_report
from msxai.errors import InputError
from msxai.io import save_volume
from msxai.labelmaps import instance_label_names
from msxai.saliency.summary import lesion_summary

SHAPE = (14, 12, 10)


def _reread(ds):
    buf = io.BytesIO()
    ds.save_as(buf, write_like_original=False)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """A study, its lesion SEG and an explanation of lesions 1 and 2 saved as explain_request saves it."""
    d = tmp_path_factory.mktemp("explain")
    rng = np.random.default_rng(0)
    aff = affine("las")
    src = volume_to_mr_series(rng.normal(100, 20, SHAPE).astype(np.float32), aff, StudyInfo(patient_id="SR"),
                              "FLAIR", 1)
    labels = np.zeros(SHAPE, np.int16)
    labels[3:6, 3:6, 2:5] = 1
    labels[9:12, 7:10, 6:8] = 2
    prob = np.clip(rng.uniform(0.3, 0.9, SHAPE), 0, 1) * (labels > 0)
    table = [{"id": i, "volume_mm3": float((labels == i).sum() * 7.5)} for i in (1, 2)]
    seg = write_seg(labels, aff, src, lesion_segments(instance_label_names(labels, table)),
                    series_description="msxai lesions unet")
    summaries, maps = {}, {}
    for i in (1, 2):
        name = f"lesion_{i}"
        m = np.zeros((2, *SHAPE), np.float32)
        m[:, max(0, 3 * i - 2):3 * i + 6, 1:11, 1:9] = rng.normal(0, 1e-3, m[:, max(0, 3 * i - 2):3 * i + 6, 1:11, 1:9].shape)
        maps[name] = m
        dom = labels == i
        save_volume(d / f"{name}_smoothgrad_flair.nii.gz", m[0], aff, dtype=np.float32)
        save_volume(d / f"{name}_smoothgrad_mprage.nii.gz", m[1], aff, dtype=np.float32)
        save_volume(d / f"{name}_domain.nii.gz", dom.astype(np.uint8), aff, dtype=np.uint8)
        s = lesion_summary({"smoothgrad_flair": m[0], "smoothgrad_mprage": m[1]}, dom, prob, aff)
        s.update(lesion_id=i, error_score=0.71 if i == 1 else None, error_flag=None)
        summaries[name] = s
    result = json.loads(json.dumps({"method": "smoothgrad", "model": "unet", "domains": {k: 1 for k in maps},
                                    "summary": summaries}))
    return d, aff, src, seg, maps, result, labels


@pytest.mark.parametrize("coordinates", ["3d", "ohif"])
def test_report_content_against_the_summary(explained, coordinates):
    d, aff, src, seg, maps, result, labels = explained
    out = explain_dicom(d, result, src, lesion_seg=seg, coordinates=coordinates)
    sr = _reread(out["report"])
    assert sr.SOPClassUID == ("1.2.840.10008.5.1.4.1.1.88.34" if coordinates == "3d" else "1.2.840.10008.5.1.4.1.1.88.33")
    assert sr.Modality == "SR" and str(sr.SeriesDescription) == "msxai SmoothGrad unet table 1,2"
    assert sr.StudyInstanceUID == src[0].StudyInstanceUID
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    groups = sr_items(sr_items(sr, "126010")[0], "125007")
    assert len(groups) == 2
    uids = {str(x.SOPInstanceUID): x for x in src}
    seg_labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    for g, name in zip(groups, ("lesion_1", "lesion_2")):
        i = int(name[-1])
        finding = sr_items(g, "121071")[0].ConceptCodeSequence[0]
        if coordinates == "3d":
            assert sr_items(g, "112039")[0].TextValue == f"lesion {i}" and finding.CodeMeaning == "Lesion"
        else:  # OHIF's arrow: its tag as tracking identifier, the name as the finding
            assert sr_items(g, "112039")[0].TextValue == "Cornerstone3DTools@^0.1.0:ArrowAnnotate"
            assert (finding.CodeValue, finding.CodeMeaning) == (f"LESION{i}", f"lesion {i}")
        uidrefs = sr_items(g, value_type="UIDREF")
        assert uidrefs[0].ConceptNameCodeSequence[0].CodeValue == "112040"  # OHIF takes the first UIDREF
        # the point: the domain voxel with the largest |FLAIR SmoothGrad|, brute force
        best, where = -1.0, None
        for v in np.argwhere(labels == i):
            a = abs(float(maps[name][0][tuple(v)]))
            if a > best:
                best, where = a, v
        lps = np.diag([-1.0, -1.0, 1.0]) @ (aff[:3, :3] @ where + aff[:3, 3])
        if coordinates == "3d":
            pt = sr_items(g, value_type="SCOORD3D")[0]
            assert pt.GraphicType == "POINT" and pt.ReferencedFrameOfReferenceUID == src[0].FrameOfReferenceUID
            np.testing.assert_allclose([float(x) for x in pt.GraphicData], lps, atol=1e-4)
        else:  # on the FLAIR slice holding it: pixel (column, row), the centre of the first pixel at (0.5, 0.5)
            pt = sr_items(g, value_type="SCOORD")[0]
            img = uids[str(pt.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)]
            assert pt.GraphicType == "POINT" and pt.ContentSequence[0].RelationshipType == "SELECTED FROM"
            iop = np.array([float(x) for x in img.ImageOrientationPatient])
            dr, dc = (float(x) for x in img.PixelSpacing)
            col, row = (float(x) for x in pt.GraphicData)
            back = np.array([float(x) for x in img.ImagePositionPatient]) + (col - 0.5) * dc * iop[:3] \
                + (row - 0.5) * dr * iop[3:]
            np.testing.assert_allclose(back, lps, atol=1e-4)
        # the lesion's segment of the lesion SEG
        ref = sr_items(g, "121191")[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID and ref.ReferencedSOPClassUID == SEGMENTATION_STORAGE
        assert seg_labels[int(ref.ReferencedSegmentNumber)].startswith(f"lesion {i} (")
        # every number of the summary JSON, by meaning
        nums = {str(c.ConceptNameCodeSequence[0].CodeMeaning): (float(c.MeasuredValueSequence[0].FloatingPointValue),
                                                               c.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue)
                for c in sr_items(g, value_type="NUM")}
        s = result["summary"][name]
        assert nums["Volume"] == (pytest.approx(s["domain_volume_mm3"]), "mm3")
        assert nums["Mean lesion probability in the lesion"][0] == pytest.approx(s["mean_probability"])
        assert ("Segmentation error score (error flag)" in nums) == (i == 1)
        for seq, key in (("FLAIR", "smoothgrad_flair"), ("MPRAGE", "smoothgrad_mprage")):
            ms = s["maps"][key]
            assert nums[f"{seq} SmoothGrad peak maximum in the lesion"][0] == pytest.approx(ms["peak_max_in_domain"])
            assert nums[f"{seq} SmoothGrad negative mass in the lesion"][0] == pytest.approx(ms["negative_mass_in_domain"])
            for r in ms["rings"]:
                band = f"{r['from_mm']:g}-{r['to_mm']:g}"
                assert nums[f"{seq} SmoothGrad positive mass in ring {band} mm"][0] == pytest.approx(r["positive_mass"])
                assert nums[f"{seq} SmoothGrad negative mass in ring {band} mm"][0] == pytest.approx(r["negative_mass"])
        assert len(nums) == 2 + (i == 1) + 2 * (4 + 2 * len(s["maps"]["smoothgrad_flair"]["rings"]))
    # evidence: the SEG and the FLAIR instances holding the points
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0]
    refd = {str(r.ReferencedSOPInstanceUID) for s in ev.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert str(seg.SOPInstanceUID) in refd and len(refd) >= 2
    # OHIF 3.10's parser: one measurement per lesion, a SCOORD3D point each, the tracking UIDs of the groups
    meas = ohif_sr_measurements(sr)
    assert [m["TrackingUniqueIdentifier"] for m in meas] == [str(sr_items(g, "112040")[0].UID) for g in groups]
    assert all(m["ValueType"] == ("SCOORD3D" if coordinates == "3d" else "SCOORD") and m["GraphicType"] == "POINT"
               for m in meas)
    # OHIF 3.10's hydration ("track measurements"): one measurement-panel row per lesion, named, at its peak
    rows = ohif_hydrated_rows(sr, uids)
    if coordinates == "3d":
        assert rows == []
    else:
        assert [r["label"] for r in rows] == ["lesion 1", "lesion 2"]
        for r, g in zip(rows, groups):
            pt = sr_items(g, value_type="SCOORD")[0]
            np.testing.assert_allclose(r["point"], _lps_of(pt, uids), atol=1e-6)


def _lps_of(scoord, uids) -> np.ndarray:
    img = uids[str(scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)]
    iop = np.array([float(x) for x in img.ImageOrientationPatient])
    dr, dc = (float(x) for x in img.PixelSpacing)
    col, row = (float(x) for x in scoord.GraphicData)
    return np.array([float(x) for x in img.ImagePositionPatient]) + (col - 0.5) * dc * iop[:3] + (row - 0.5) * dr * iop[3:]


def test_parametric_maps_of_the_explanation(explained):
    d, aff, src, seg, maps, result, _ = explained
    stored = []
    out = explain_dicom(d, result, src, lesion_seg=seg, sink=stored.append)
    pms = out["parametric_maps"]
    assert [(p["domain"], p["map"], p["part"]) for p in pms] == [
        (n, s, p) for n in ("lesion_1", "lesion_2") for s in ("FLAIR", "MPRAGE") for p in ("positive", "negative")]
    assert len(stored) == len(pms) and all(p["dataset"] is None for p in pms)  # passed on, not kept
    assert len({p["SeriesInstanceUID"] for p in pms}) == len(pms)  # one series each (OHIF: one PM per series)
    for p, ds in zip(pms, stored):
        m = maps[p["domain"]][0 if p["map"] == "FLAIR" else 1]
        part = np.maximum(m, 0) if p["part"] == "positive" else np.minimum(m, 0)
        got = pm_volume(_reread(ds), aff, SHAPE)
        cov = ~np.isnan(got)
        assert cov[part != 0].all()
        np.testing.assert_allclose(got[cov], part[cov], atol=1e-7 * np.abs(part).max())
    # at most max_pm_domains domains get PMs; the SR still has every lesion
    few = explain_dicom(d, result, src, max_pm_domains=1)
    assert {p["domain"] for p in few["parametric_maps"]} == {"lesion_1"} and few["skipped"] == ["lesion_2"]
    assert len(sr_items(sr_items(few["report"], "126010")[0], "125007")) == 2
    # no lesion SEG (e.g. a drawn domain): groups without a segment reference, still a point each
    assert not sr_items(sr_items(sr_items(few["report"], "126010")[0], "125007")[0], "121191")


@pytest.mark.skipif(not DCIODVFY, reason="dciodvfy (Debian package dicom3tools) not installed "
                                         "(scripts/install_ohif_deps.sh installs it)")
def test_dciodvfy_reports_no_error(explained, tmp_path):
    d, aff, src, seg, maps, result, _ = explained
    out = explain_dicom(d, result, src, lesion_seg=seg, max_pm_domains=1)
    sr3d = explain_dicom(d, result, src, lesion_seg=seg, max_pm_domains=0, coordinates="3d")["report"]
    for ds in [out["report"], sr3d, seg, *[p["dataset"] for p in out["parametric_maps"]]]:
        errors, text = dciodvfy_errors(ds, tmp_path)
        assert not errors, text


def test_refusals(explained, tmp_path):
    d, aff, src, seg, maps, result, _ = explained
    g = MeasurementGroup("lesion 1", "1.2.3", [0.0, 0.0, 0.0], [Measurement(("X", "99MSXAI", "x"), 1.0)])
    with pytest.raises(InputError, match="no measurement group"):
        write_measurement_report([], src, series_description="x")
    with pytest.raises(InputError, match="unique"):
        write_measurement_report([g, g], src, series_description="x")
    with pytest.raises(InputError, match="finite"):
        write_measurement_report([MeasurementGroup("a", "1.2", [0.0, np.nan, 0.0])], src, series_description="x")
    with pytest.raises(InputError, match="16 characters"):
        write_measurement_report([MeasurementGroup("a", "1.2", [0, 0, 0], [Measurement(("X" * 17, "99MSXAI", "x"), 1)])],
                                 src, series_description="x")
    with pytest.raises(InputError, match="method"):
        explain_dicom(d, dict(result, method="lime"), src)
    with pytest.raises(InputError, match="coordinates"):
        write_measurement_report([g], src, series_description="x", coordinates="2d")
    with pytest.raises(InputError, match="image"):
        write_measurement_report([g], src, series_description="x", coordinates="ohif")
    with pytest.raises(InputError, match="not found"):
        explain_dicom(tmp_path, result, src)


def test_lesions_of_a_saved_label_are_named_after_it(explained):
    """lesions_from=final: "final lesion 1" (its PMs, SR group and SR series), not the model's "lesion 1"."""
    d, aff, src, seg, maps, result, _ = explained
    res = dict(result, domain_source="lesions 1, 2 of the saved 'final' label")
    out = explain_dicom(d, res, src, max_pm_domains=1)
    assert {p["SeriesDescription"] for p in out["parametric_maps"]} == {
        "msxai SG FLAIR+ final lesion 1", "msxai SG FLAIR- final lesion 1", "msxai SG MPRAGE+ final lesion 1",
        "msxai SG MPRAGE- final lesion 1"}
    sr = out["report"]
    assert str(sr.SeriesDescription) == "msxai SmoothGrad unet table final 1,2"
    groups = sr_items(sr_items(sr, "126010")[0], "125007")
    assert [sr_items(g, "121071")[0].ConceptCodeSequence[0].CodeMeaning for g in groups] == [
        "final lesion 1", "final lesion 2"]
    plain = sr_items(sr_items(explain_dicom(d, result, src, max_pm_domains=0)["report"], "126010")[0], "125007")
    assert not ({str(sr_items(g, "112040")[0].UID) for g in groups}
                & {str(sr_items(g, "112040")[0].UID) for g in plain})  # other findings, other tracking UIDs
