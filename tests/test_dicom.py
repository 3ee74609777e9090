"""msxai.dicom: NIfTI -> DICOM MR series read back by SimpleITK/GDCM (what MONAI Label's DICOMweb datastore uses), and
DICOM SEG checked against a brute-force pixel-by-pixel placement and against pydicom-seg's reader."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from msxai.dicom import (
    Segment,
    StudyInfo,
    dataset_affine,
    read_seg_frames,
    rgb_to_dicom_lab,
    saliency_segments,
    stable_uid,
    volume_to_mr_series,
    write_seg,
    write_series,
)
from msxai.errors import GeometryError, InputError


def _affine(kind: str) -> np.ndarray:
    a = np.eye(4)
    if kind == "las":  # the synthetic cohort's orientation (det < 0 in LPS: readers reverse the slice order)
        a[:3, :3] = np.diag([-1.5, 2.0, 2.5])
    elif kind == "ras":
        a[:3, :3] = np.diag([1.0, 1.2, 3.0])
    else:  # oblique: rotated about two axes, anisotropic
        c, s = np.cos(0.5), np.sin(0.5)
        rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]])
        a[:3, :3] = rz @ rx @ np.diag([0.9, 1.1, 2.0])
    a[:3, 3] = [-20.0, 13.0, 7.5]
    return a


def _reread(datasets):
    """Write, read each file back with pydicom (no force: the preamble must be there) and with SimpleITK."""
    import SimpleITK as sitk

    import tempfile

    d = tempfile.mkdtemp()
    paths = write_series(datasets, d)
    for p in paths:
        pydicom.dcmread(str(p))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(d))
    img = reader.Execute()
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0).astype(np.float64)
    aff = np.eye(4)
    aff[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ (np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing()))
    o = np.asarray(img.GetOrigin())
    aff[:3, 3] = [-o[0], -o[1], o[2]]
    return arr, aff


@pytest.mark.parametrize("kind", ["las", "ras", "oblique"])
def test_mr_series_geometry_and_values_read_back_by_simpleitk(kind):
    rng = np.random.default_rng(0)
    vol = rng.normal(100, 30, size=(7, 6, 5)).astype(np.float32)
    aff = _affine(kind)
    series = volume_to_mr_series(vol, aff, StudyInfo(), "FLAIR", 1)
    assert len(series) == 5 and {str(d.SeriesDescription) for d in series} == {"FLAIR"}
    assert len({d.StudyInstanceUID for d in series}) == 1 and len({d.SOPInstanceUID for d in series}) == 5
    arr, aff2 = _reread(series)
    # same voxels in space: every voxel of the original lands on a voxel of the re-read volume with its value
    ijk = np.argwhere(np.ones(vol.shape, bool)).astype(float)
    world = ijk @ aff[:3, :3].T + aff[:3, 3]
    inv = np.linalg.inv(aff2)
    ijk2 = world @ inv[:3, :3].T + inv[:3, 3]
    r = np.rint(ijk2).astype(int)
    np.testing.assert_allclose(ijk2, r, atol=1e-3)
    step = (vol.max() - vol.min()) / 65535
    np.testing.assert_allclose(arr[tuple(r.T)], vol[tuple(ijk.astype(int).T)], atol=step)
    # our own reader of the geometry agrees
    a3, _ = dataset_affine(series)
    np.testing.assert_allclose(np.abs(np.linalg.det(a3[:3, :3])), np.abs(np.linalg.det(aff[:3, :3])), rtol=1e-5)


def test_study_from_nifti_two_series_one_study(tmp_path):
    import nibabel as nib

    from msxai.dicom import study_from_nifti

    aff = _affine("las")
    rng = np.random.default_rng(1)
    nib.save(nib.Nifti1Image(rng.random((6, 5, 4)).astype(np.float32), aff), str(tmp_path / "s_FLAIR.nii.gz"))
    nib.save(nib.Nifti1Image(rng.random((6, 5, 4)).astype(np.float32), aff), str(tmp_path / "s_T1.nii.gz"))
    s = study_from_nifti(tmp_path / "s_FLAIR.nii.gz", tmp_path / "s_T1.nii.gz")
    assert set(s) == {"FLAIR", "T1"}
    assert s["FLAIR"][0].StudyInstanceUID == s["T1"][0].StudyInstanceUID
    assert s["FLAIR"][0].SeriesInstanceUID != s["T1"][0].SeriesInstanceUID
    assert s["FLAIR"][0].FrameOfReferenceUID == s["T1"][0].FrameOfReferenceUID
    assert [str(v[0].SeriesDescription) for v in s.values()] == ["FLAIR", "T1"]
    # a T1 on another grid is refused by msxai.io
    nib.save(nib.Nifti1Image(rng.random((6, 5, 3)).astype(np.float32), aff), str(tmp_path / "b_T1.nii.gz"))
    with pytest.raises(InputError):
        study_from_nifti(tmp_path / "s_FLAIR.nii.gz", tmp_path / "b_T1.nii.gz")


def _brute_force_frames(seg, source, labels, affine):
    """Label value expected in every pixel of every frame, one pixel at a time from the DICOM attributes."""
    by_uid = {str(d.SOPInstanceUID): d for d in source}
    numbers = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    inv = np.linalg.inv(np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine)
    out = []
    for fg in seg.PerFrameFunctionalGroupsSequence:
        src = by_uid[fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        value = int(numbers[number].SegmentNumber)
        iop = [float(x) for x in src.ImageOrientationPatient]
        ipp = [float(x) for x in src.ImagePositionPatient]
        dr, dc = (float(x) for x in src.PixelSpacing)
        f = np.zeros((int(src.Rows), int(src.Columns)), np.uint8)
        for r in range(f.shape[0]):
            for c in range(f.shape[1]):
                p = [ipp[k] + iop[k] * c * dc + iop[3 + k] * r * dr for k in range(3)]
                v = inv @ np.array(p + [1.0])
                i, j, k = (int(round(x)) for x in v[:3])
                f[r, c] = labels[i, j, k] == value
        out.append(f)
    return np.stack(out)


@pytest.mark.parametrize("kind", ["las", "oblique"])
def test_seg_frames_match_brute_force_and_pydicom_seg(kind):
    import pydicom_seg
    import SimpleITK as sitk

    aff = _affine(kind)
    rng = np.random.default_rng(2)
    vol = rng.random((7, 6, 5)).astype(np.float32)
    source = volume_to_mr_series(vol, aff, StudyInfo(), "FLAIR", 1)
    labels = np.zeros(vol.shape, np.int16)
    labels[1:3, 1:4, 0:2] = 1
    labels[4:6, 2:5, 3] = 3  # value 2 absent: its segment is left out
    labels[6, 0, 4] = 4
    segs = [Segment(1, "lesion 1"), Segment(2, "lesion 2"), Segment(3, "lesion 3"), Segment(4, "lesion 4")]
    seg = write_seg(labels, aff, source[::-1], segs, series_description="test")
    # a file readers open without force
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, seg)
    seg = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    # a complete file meta (dcmjs, which OHIF reads SEG with, refuses a file without the group length)
    assert buf.getvalue()[128:132] == b"DICM" and int(seg.file_meta.FileMetaInformationGroupLength) > 0
    assert seg.file_meta.FileMetaInformationVersion == b"\x00\x01"
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["lesion 1", "lesion 3", "lesion 4"]
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2, 3]
    # frames: only where a segment is present (2 + 1 + 1 slices)
    assert int(seg.NumberOfFrames) == 4
    frames = read_seg_frames(seg)
    # segment numbers 1..3 stand for values 1, 3, 4
    value_of = {1: 1, 2: 3, 3: 4}
    for s in seg.SegmentSequence:
        s.SegmentNumber = value_of[int(s.SegmentNumber)]
    for fg in seg.PerFrameFunctionalGroupsSequence:
        n = fg.SegmentIdentificationSequence[0]
        n.ReferencedSegmentNumber = value_of[int(n.ReferencedSegmentNumber)]
    np.testing.assert_array_equal(frames, _brute_force_frames(seg, source, labels, aff))
    assert frames.sum() == np.count_nonzero(labels)
    # pydicom-seg (an independent reader) places every segment where the labels are
    seg2 = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    res = pydicom_seg.SegmentReader().read(seg2)
    inv = np.linalg.inv(aff)
    for number, value in value_of.items():
        img = res.segment_image(number)
        arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
        idx = np.argwhere(arr > 0).astype(float)
        d = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())
        ras = (idx @ d.T + np.asarray(img.GetOrigin())) * np.array([-1.0, -1.0, 1.0])
        vox = np.rint(ras @ inv[:3, :3].T + inv[:3, 3]).astype(int)
        got = {tuple(v) for v in vox}
        assert got == {tuple(v) for v in np.argwhere(labels == value)}


def test_seg_refuses_bad_input():
    aff = _affine("las")
    source = volume_to_mr_series(np.ones((4, 4, 3), np.float32), aff, StudyInfo(), "FLAIR", 1)
    labels = np.zeros((4, 4, 3), np.uint8)
    labels[1, 1, 1] = 1
    with pytest.raises(InputError, match="none of the segments"):
        write_seg(labels, aff, source, [Segment(2, "x")], series_description="t")
    shifted = aff.copy()
    shifted[0, 3] += 0.4
    with pytest.raises(GeometryError, match="voxel grid"):
        write_seg(labels, shifted, source, [Segment(1, "x")], series_description="t")
    with pytest.raises(GeometryError, match="outside"):
        write_seg(labels[:, :, :2], aff, source, [Segment(1, "x")], series_description="t")
    with pytest.raises(InputError):
        write_seg(labels, aff, [], [Segment(1, "x")], series_description="t")
    sheared = aff.copy()
    sheared[0, 2] = 0.7
    with pytest.raises(GeometryError, match="sheared"):
        volume_to_mr_series(np.ones((3, 3, 3)), sheared, StudyInfo(), "FLAIR", 1)
    bad = np.ones((3, 3, 3))
    bad[1, 1, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        volume_to_mr_series(bad, aff, StudyInfo(), "FLAIR", 1)


def test_saliency_segments_keep_names_and_private_codes():
    names = {"lesion 3 outline": 1, "FLAIR+ strong [0.1, 0.2]": 2, "FLAIR- strong [-0.2, -0.1]": 5}
    segs = saliency_segments(names)
    assert [s.label for s in segs] == list(names) and [s.value for s in segs] == [1, 2, 5]
    assert all(s.category[1] == "99MSXAI" for s in segs)


def test_cielab_and_uids():
    assert rgb_to_dicom_lab((255, 255, 255)) == [65535, 32896, 32896]
    L, a, b = rgb_to_dicom_lab((255, 0, 0))
    assert abs(L * 100 / 65535 - 53.24) < 0.1 and abs(a * 255 / 65535 - 128 - 80.09) < 0.3
    u = stable_uid("x", 1)
    assert u == stable_uid("x", 1) != stable_uid("x", 2)
    assert len(u) <= 64 and all(p.isdigit() and (p == "0" or not p.startswith("0")) for p in u.split("."))
