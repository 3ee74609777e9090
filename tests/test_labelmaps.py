"""Saliency binning into client-renderable label maps, client domains, and label map writing (NIfTI/NRRD)."""

import numpy as np
import pytest

from msxai.errors import EmptyDomainError, GeometryError, InputError
from msxai.labelmaps import (
    NEG_MEDIUM,
    NEG_STRONG,
    OUTLINE,
    POS_MEDIUM,
    POS_STRONG,
    combine_signed_max,
    domain_from_label,
    domain_from_points,
    domain_outline,
    instance_label_names,
    read_labelmap,
    saliency_bins,
    static_saliency_names,
    write_labelmap,
)


def test_saliency_bins_values_names_edges():
    s = np.zeros((10, 10, 10), np.float32)
    s[1, 1, 1] = 2.0  # strong +  (>= 1.0)
    s[2, 2, 2] = 0.6  # medium +  [0.4, 1.0)
    s[3, 3, 3] = 0.3  # below medium -> unlabelled
    s[4, 4, 4] = -0.5  # medium -
    s[5, 5, 5] = -1.5  # strong -
    dom = np.zeros_like(s, bool)
    dom[6:9, 6:9, 6:9] = True
    lab, names, edges = saliency_bins(s, dom, prefix="FLAIR", domain_name="lesion 3")
    assert lab.dtype == np.uint8
    assert lab[1, 1, 1] == POS_STRONG and lab[2, 2, 2] == POS_MEDIUM and lab[3, 3, 3] == 0
    assert lab[4, 4, 4] == NEG_MEDIUM and lab[5, 5, 5] == NEG_STRONG
    # outline = 3x3x3 cube minus its centre
    assert (lab == OUTLINE).sum() == 26 and lab[7, 7, 7] == 0
    # a binned voxel on the outline keeps its bin (the saliency inside small lesions stays visible)
    s2 = s.copy()
    s2[6, 6, 6] = 1.9
    lab2, _, _ = saliency_bins(s2, dom)
    assert lab2[6, 6, 6] == POS_STRONG and (lab2 == OUTLINE).sum() == 25
    assert sorted(names.values()) == [1, 2, 3, 4, 5]
    assert "lesion 3 outline" in names
    assert names["FLAIR+ strong [1, 2]"] == POS_STRONG
    assert names["FLAIR+ medium [0.4, 1)"] == POS_MEDIUM
    assert names["FLAIR- medium (-1, -0.4]"] == NEG_MEDIUM
    assert names["FLAIR- strong [-2, -1]"] == NEG_STRONG
    assert edges["scale"] == pytest.approx(2.0)
    assert edges["bins"]["+ strong"]["observed"] == [2.0, 2.0]
    assert edges["bins"]["- medium"]["observed"] == [pytest.approx(-0.5), pytest.approx(-0.5)]
    assert edges["bins"]["+ medium"]["voxels"] == 1


def test_saliency_bins_given_scale_and_zero_map_and_bad_input():
    s = np.full((4, 4, 4), 0.1, np.float32)
    lab, _, edges = saliency_bins(s, scale=0.2)
    assert (lab == POS_STRONG).all() and edges["scale"] == 0.2
    lab, names, edges = saliency_bins(np.zeros((4, 4, 4)))
    assert not lab.any() and len(names) == 5 and edges["bins"]["+ strong"]["observed"] is None
    with pytest.raises(InputError, match="NaN"):
        saliency_bins(np.full((3, 3, 3), np.nan))
    with pytest.raises(InputError, match="fractions"):
        saliency_bins(s, fractions=(0.2, 0.5))
    with pytest.raises(GeometryError):
        saliency_bins(s, np.ones((3, 3, 3), bool))


def test_static_names_match_layout():
    st = static_saliency_names("saliency")
    assert sorted(st.values()) == [1, 2, 3, 4, 5]
    assert st["saliency+ strong"] == POS_STRONG and st["domain outline"] == OUTLINE


def test_outline_and_combine():
    d = np.zeros((5, 5, 5), bool)
    d[2, 2, 2] = True
    assert domain_outline(d).sum() == 1  # a single voxel is its own outline
    a = np.array([[[1.0, -3.0]]])
    b = np.array([[[-2.0, 1.0]]])
    assert combine_signed_max([a, b]).tolist() == [[[-2.0, -3.0]]]


def test_instance_label_names():
    lab = np.zeros((4, 4, 4), np.int32)
    lab[0, 0, 0] = 1
    lab[3, 3, 3] = 2
    names = instance_label_names(lab, [{"id": 1, "volume_mm3": 12.0}, {"id": 2, "volume_mm3": 5.5}])
    assert names == {"lesion 1 (12.0 mm3)": 1, "lesion 2 (5.5 mm3)": 2}


def test_domain_from_label():
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[1, 1, 1] = 2
    lab[2, 2, 2] = 1
    assert domain_from_label(lab, (4, 4, 4)).sum() == 2
    assert domain_from_label(lab, (4, 4, 4), value=2).sum() == 1
    with pytest.raises(EmptyDomainError):
        domain_from_label(np.zeros((4, 4, 4)), (4, 4, 4))
    with pytest.raises(EmptyDomainError):
        domain_from_label(lab, (4, 4, 4), value=7)
    with pytest.raises(GeometryError, match="shape"):
        domain_from_label(lab, (5, 4, 4))


def test_domain_from_points_ball_and_grow():
    aff = np.diag([1.0, 1.0, 2.0, 1.0])  # anisotropic: 2 mm along k
    d = domain_from_points([[10, 10, 10]], (21, 21, 21), aff, radius_mm=2.0)
    # |di|,|dj| <= 2 along i/j, k only +-1 voxel (2 mm)
    assert d[10, 10, 10] and d[12, 10, 10] and not d[13, 10, 10]
    assert d[10, 10, 11] and not d[10, 10, 12]
    flair = np.ones((21, 21, 21), np.float32)
    flair[9:12, 9:12, 9:12] = 5.0  # hyperintense 3x3x3 spot
    g = domain_from_points([[10, 10, 10]], flair.shape, np.eye(4), radius_mm=5.0, mode="grow", flair=flair)
    assert g.sum() == 27
    with pytest.raises(InputError, match="outside the image"):
        domain_from_points([[30, 0, 0]], (21, 21, 21), np.eye(4))
    with pytest.raises(InputError, match="non-empty list"):
        domain_from_points([], (21, 21, 21), np.eye(4))
    with pytest.raises(InputError, match="finite"):
        domain_from_points([[float("nan"), 1, 1]], (21, 21, 21), np.eye(4))
    with pytest.raises(InputError, match="radius"):
        domain_from_points([[1, 1, 1]], (21, 21, 21), np.eye(4), radius_mm=1e6)


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_write_read_roundtrip_keeps_grid(tmp_path, ext):
    aff = np.array([[-0.9, 0, 0, 40.0], [0, 1.1, 0, -30.0], [0, 0, 1.3, 12.0], [0, 0, 0, 1]])
    arr = np.zeros((6, 7, 8), np.int32)
    arr[1, 2, 3] = 4
    arr[5, 6, 7] = 1
    p = write_labelmap(tmp_path / f"x{ext}", arr, aff)
    back, aff2 = read_labelmap(p)
    assert back.shape == (6, 7, 8) and back.dtype == np.uint8
    assert np.array_equal(back, arr)
    assert np.allclose(aff2, aff, atol=1e-5)
    # the nrrd header is in LPS, what Slicer expects
    if ext == ".nrrd":
        import nrrd

        _, hdr = nrrd.read(str(p))
        assert hdr["space"] == "left-posterior-superior"
        assert np.allclose(hdr["space origin"], [-40.0, 30.0, 12.0])
    with pytest.raises(InputError, match="not supported"):
        write_labelmap(tmp_path / "x.png", arr, aff)
