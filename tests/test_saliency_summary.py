"""lesion_summary against a brute-force twin (distances by exhaustive search over Ω, in mm)."""

import json

import numpy as np
import pytest

from msxai.errors import EmptyDomainError, GeometryError
from msxai.saliency.summary import lesion_summary, summary_rows


def brute_rings(domain, spacing, radii):
    pts = np.argwhere(domain) * np.asarray(spacing)
    allpts = np.argwhere(np.ones(domain.shape, bool)) * np.asarray(spacing)
    d = np.sqrt(((allpts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)).min(1).reshape(domain.shape)
    return [((d > a) & (d <= b) & ~domain) for a, b in zip(radii, radii[1:])]


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.3, 2.5)])
def test_summary_matches_brute_force(spacing):
    rng = np.random.default_rng(0)
    shape = (11, 10, 8)
    maps = rng.normal(size=(2, *shape)).astype(np.float32)
    prob = rng.uniform(size=shape)
    dom = np.zeros(shape, bool)
    dom[4:7, 3:6, 3:5] = True
    dom[7, 6, 5] = True
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [10, -5, 3]
    s = lesion_summary(maps, dom, prob=prob, affine=affine, ring_mm=(0, 1.5, 3, 5))
    json.dumps(s)  # serialisable
    assert s["domain_voxels"] == int(dom.sum())
    assert s["domain_volume_mm3"] == pytest.approx(dom.sum() * np.prod(spacing))
    assert s["mean_probability"] == pytest.approx(prob[dom].mean())
    c = np.argwhere(dom).mean(0)
    assert s["centroid_world_mm"] == pytest.approx(list(np.asarray(spacing) * c + [10, -5, 3]))
    bands = brute_rings(dom, spacing, [0, 1.5, 3, 5])
    for ci, name in enumerate(["FLAIR", "MPRAGE"]):
        m = maps[ci].astype(np.float64)
        got = s["maps"][name]
        assert got["peak_max"] == pytest.approx(m.max())
        assert got["peak_min"] == pytest.approx(m.min())
        assert got["peak_max_in_domain"] == pytest.approx(m[dom].max())
        assert got["peak_min_in_domain"] == pytest.approx(m[dom].min())
        assert got["positive_mass_in_domain"] == pytest.approx(sum(v for v in m[dom] if v > 0))
        assert got["negative_mass_in_domain"] == pytest.approx(sum(v for v in m[dom] if v < 0))
        for ring, band in zip(got["rings"], bands):
            assert ring["voxels"] == int(band.sum()) > 0
            assert ring["negative_mass"] == pytest.approx(sum(v for v in m[band] if v < 0))
            assert ring["positive_mass"] == pytest.approx(sum(v for v in m[band] if v > 0))
    rows = summary_rows("lesion_3", s)
    assert [r["map"] for r in rows] == ["FLAIR", "MPRAGE"]
    assert rows[0]["ring_0_1.5mm_voxels"] == int(bands[0].sum())


def test_summary_rings_with_a_float_rounded_voxel_size():
    """A 1 mm grid whose affine gives 1.0000001 mm voxels: the voxels 2 voxels from a 1-voxel domain stay in the
    (0, 2] ring (as in the 1 mm test below), as msxai.lesions.ring_mask and the experiments count them."""
    dom = np.zeros((7, 7, 7), bool)
    dom[3, 3, 3] = True
    for size in (1.0, 1.0 + 1e-7):
        s = lesion_summary({"gradcampp": np.ones((7, 7, 7))}, dom, affine=np.diag([size, size, size, 1.0]),
                           ring_mm=(0, 2, 3))
        rings = s["maps"]["gradcampp"]["rings"]
        # (2, 3] mm: offsets (0,1,2) sqrt 5: 24, (1,1,2) sqrt 6: 24, (0,2,2) sqrt 8: 12, (0,0,3) and (1,2,2) 3 mm: 6 + 24
        assert [r["voxels"] for r in rings] == [26 + 6, 24 + 24 + 12 + 6 + 24], size


def test_summary_inputs():
    dom = np.zeros((5, 5, 5), bool)
    dom[2, 2, 2] = True
    s = lesion_summary({"gradcampp": np.ones((5, 5, 5))}, dom)
    assert s["maps"]["gradcampp"]["positive_mass_in_domain"] == 1.0 and s["mean_probability"] is None
    # 1-voxel domain, 1 mm: the ring (0, 2] holds the 26 neighbours (distance 1, sqrt 2, sqrt 3) and the 6 voxels at 2
    assert s["maps"]["gradcampp"]["rings"][0]["voxels"] == 26 + 6
    with pytest.raises(EmptyDomainError):
        lesion_summary(np.ones((2, 5, 5, 5)), np.zeros((5, 5, 5), bool))
    with pytest.raises(GeometryError):
        lesion_summary(np.ones((2, 5, 5, 4)), dom)
