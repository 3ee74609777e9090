"""Rings, distances, transplants, context images, saliency features and the error flag against brute-force twins."""

import itertools
import json

import numpy as np
import pytest

from msxai.errors import EmptyDomainError, GeometryError, InputError
from msxai.experiments import geometry as geo
from msxai.experiments.error_flag import (
    ErrorFlagModel,
    case_counts,
    cross_validate,
    error_score_from_maps,
    f1_from_counts,
    f1_gain,
)
from msxai.experiments.features import region_values, saliency_features
from msxai.experiments.selection import select_round_robin
from msxai.lesions import distance_mm, ring_mask
from msxai.metrics import lesion_metrics

ANISO = np.diag([0.8, 1.0, 2.5, 1.0])


def random_domain(shape=(9, 8, 7), seed=0, n=4):
    rng = np.random.default_rng(seed)
    m = np.zeros(shape, bool)
    for _ in range(n):
        m[tuple(rng.integers(1, s - 1) for s in shape)] = True
    return m


def brute_distance(domain, spacing):
    pts = np.argwhere(domain) * np.asarray(spacing)
    out = np.zeros(domain.shape)
    for v in itertools.product(*map(range, domain.shape)):
        out[v] = np.sqrt(((pts - np.asarray(v) * np.asarray(spacing)) ** 2).sum(1)).min()
    return out


def test_distance_and_rings_match_brute_force_anisotropic():
    dom = random_domain()
    brute = brute_distance(dom, (0.8, 1.0, 2.5))
    np.testing.assert_allclose(distance_mm(dom, ANISO), brute, atol=1e-9)
    ring = ring_mask(dom, ANISO, 1.0, 3.0)
    np.testing.assert_array_equal(ring, (brute > 1.0 + 1e-6) & (brute <= 3.0 + 1e-6))
    assert not (ring & dom).any()
    np.testing.assert_array_equal(geo.dilate_mm(dom, ANISO, 2.0), brute <= 2.0 + 1e-6)
    with pytest.raises(InputError):
        ring_mask(dom, ANISO, 3.0, 1.0)
    with pytest.raises(EmptyDomainError):
        distance_mm(np.zeros((3, 3, 3), bool))
    # experiment 2's ring values are the brute-force ring (0, 3] mm, in raster order
    maps = np.random.default_rng(1).normal(size=(2, *dom.shape))
    vals = region_values(maps, dom, ANISO, 3.0)
    for c, key in enumerate(("flair", "mprage")):
        np.testing.assert_array_equal(vals[key]["ring"], maps[c][(brute > 1e-6) & (brute <= 3.0 + 1e-6)])
        np.testing.assert_array_equal(vals[key]["inside"], maps[c][dom])


def test_corner_fits_matches_a_loop():
    rng = np.random.default_rng(4)
    allowed = rng.random((10, 9, 8)) > 0.25
    allowed[2:8, 2:8, 1:7] = True
    fp = rng.random((3, 2, 3)) > 0.4
    fp[0, 0, 0] = True
    fits = geo._corner_fits(allowed, fp)
    for a in itertools.product(*map(range, allowed.shape)):
        ok = True
        for k in np.argwhere(fp):
            p = np.asarray(a) + k
            if np.any(p >= allowed.shape) or not allowed[tuple(p)]:
                ok = False
                break
        assert fits[a] == ok, a


def test_transplant_matches_a_voxel_loop_and_find_target_fits():
    rng = np.random.default_rng(5)
    img = rng.normal(size=(2, 12, 11, 10)).astype(np.float32)
    patch = np.zeros((12, 11, 10), bool)
    patch[2:4, 3:6, 2:4] = True
    patch[4, 4, 3] = True
    off = (5, 2, 4)
    out, moved = geo.transplant(img, patch, off)
    ref = img.copy()
    for v in np.argwhere(patch):
        ref[(slice(None), *(v + off))] = img[(slice(None), *v)]
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(moved, geo.shift_mask(patch, off))
    assert moved.sum() == patch.sum()
    with pytest.raises(GeometryError):
        geo.transplant(img, patch, (9, 0, 0))
    allowed = np.zeros(patch.shape, bool)
    allowed[6:12, 5:11, 4:10] = True
    o = geo.find_target(patch, allowed)
    assert o is not None and (allowed[geo.shift_mask(patch, o)]).all()
    assert geo.find_target(patch, np.zeros_like(allowed)) is None


def test_context_image_and_radii():
    rng = np.random.default_rng(6)
    img = rng.normal(size=(2, 8, 8, 8))
    dom = np.zeros((8, 8, 8), bool)
    dom[3:5, 3:5, 3:5] = True
    d = distance_mm(dom)
    bg = np.array([-1.0, -2.0])
    for r in (0.0, 1.0, 2.5):
        out = geo.context_image(img, d, r, bg)
        for v in itertools.product(range(8), repeat=3):
            expect = img[(slice(None), *v)] if d[v] <= r + 1e-6 else bg
            np.testing.assert_array_equal(out[(slice(None), *v)], expect)
    assert geo.radii(3, 1) == [0, 1, 2, 3] and geo.radii(35, 1)[-1] == 35 and len(geo.radii(35, 1)) == 36
    brain = np.zeros((8, 8, 8), bool)
    brain[1:7, 1:7, 1:7] = True
    img2 = np.where(brain, 5.0, -3.0)[None].repeat(2, 0)
    np.testing.assert_array_equal(geo.background_value(img2, brain), [-3.0, -3.0])


def test_centre_of_mass_voxel_is_in_the_domain():
    dom = np.zeros((9, 9, 9), bool)
    dom[1:8, 1, 1] = True
    dom[1, 1:8, 1] = True  # an L: its centre of mass lies outside
    c = geo.centre_of_mass_voxel(dom)
    assert dom[c]
    com = np.argwhere(dom).mean(0)
    best = min(np.argwhere(dom).tolist(), key=lambda v: ((np.array(v) - com) ** 2).sum())
    assert list(c) == best


def test_saliency_features_hand_values():
    shape = (9, 9, 9)
    dom = np.zeros(shape, bool)
    dom[3:6, 3:6, 3:6] = True  # 27 voxels
    maps = np.zeros((2, *shape))
    maps[0][dom] = 0.5
    maps[0, 4, 4, 4] = 2.0
    maps[0][ring_mask(dom, None, 0, 1.0)] = -0.25
    maps[1][dom] = -0.1
    prob = np.where(dom, 0.8, 0.0)
    f = saliency_features(maps, dom, prob, np.diag([2.0, 1.0, 1.0, 1.0]), ring_mm=1.0)  # 2 mm^3 voxels
    assert f["volume_mm3"] == 54.0
    assert f["flair_peak_max"] == 2.0 and f["flair_peak_min"] == 0.5
    assert f["flair_mass_pos"] == pytest.approx((26 * 0.5 + 2.0) * 2.0)
    assert f["mprage_mass_neg"] == pytest.approx(-0.1 * 27 * 2.0)
    assert f["mean_prob"] == pytest.approx(0.8)
    # with 2 mm along x, the 1 mm ring holds the face neighbours along y and z only
    ring = ring_mask(dom, np.diag([2.0, 1.0, 1.0, 1.0]), 0, 1.0)
    assert f["flair_ring_mean"] == pytest.approx(maps[0][ring].mean())
    vals = region_values(maps, dom, np.diag([2.0, 1.0, 1.0, 1.0]), 1.0)
    assert vals["flair"]["inside"].size == 27 and vals["flair"]["ring"].size == int(ring.sum())
    tot_f = np.abs(maps[0][dom]).sum() + np.abs(maps[0][ring]).sum()
    tot_m = np.abs(maps[1][dom]).sum() + np.abs(maps[1][ring]).sum()
    assert f["flair_share"] == pytest.approx(tot_f / (tot_f + tot_m))
    with pytest.raises(GeometryError):
        saliency_features(maps[:, :5], dom)


def _toy_features(n, seed):
    rng = np.random.default_rng(seed)
    feats, y = [], []
    for i in range(n):
        fp = i % 2 == 1
        f = saliency_features(
            np.stack([rng.normal(0.3 if not fp else -0.1, 0.1, (7, 7, 7)), rng.normal(0, 0.1, (7, 7, 7))]),
            np.pad(np.ones((3, 3, 3), bool), 2), np.full((7, 7, 7), 0.6))
        feats.append(f)
        y.append(fp)
    return feats, np.array(y)


def test_error_flag_fit_score_save_load(tmp_path):
    feats, y = _toy_features(24, 0)
    m = ErrorFlagModel.fit(feats, y)
    s = m.scores(feats)
    assert ((s > 0.5) == y).mean() > 0.9  # separable toy data
    # error_score is the logistic function of the standardised linear score
    f0 = feats[0]
    z = sum(c * (f0[n] - mu) / sd for n, c, mu, sd in zip(m.feature_names, m.coef, m.mean, m.scale)) + m.intercept
    assert m.error_score(f0) == pytest.approx(1 / (1 + np.exp(-z)))
    p = m.save(tmp_path / "flag.json")
    m2 = ErrorFlagModel.load(p)
    np.testing.assert_allclose(m2.scores(feats), s)
    assert json.loads(p.read_text())["kind"] == "msxai-error-flag"
    with pytest.raises(InputError):
        m.error_score({"flair_peak_max": 1.0})
    with pytest.raises(InputError):
        ErrorFlagModel.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InputError):
        ErrorFlagModel.load(tmp_path / "bad.json")
    with pytest.raises(InputError):
        ErrorFlagModel.fit(feats[:3], [True, True, True])
    maps = np.zeros((2, 7, 7, 7))
    dom = np.pad(np.ones((3, 3, 3), bool), 2)
    assert 0.0 <= error_score_from_maps(m, maps, dom, np.full((7, 7, 7), 0.5)) <= 1.0


def test_f1_gain_matches_lesion_metrics():
    # case with pred lesions 1 (TP, matches truth 1), 2 (FP), 3 (TP, matches truth 2); truth 3 missed
    pred = np.zeros((12, 4, 4), int)
    truth = np.zeros((12, 4, 4), int)
    pred[0:2], truth[0:2] = 1, 1
    pred[3:5] = 2
    pred[6:8], truth[6:8] = 3, 2
    truth[10:12] = 3
    from msxai.lesions import classify_lesions

    cl = classify_lesions(pred, truth)
    case = {"case": "a", "pairs": cl.pairs, "pred_ids": [1, 2, 3], "truth_ids": [1, 2, 3], "fp_ids": cl.fp}
    for dropped in (set(), {2}, {1}, {1, 2, 3}):
        kept_pred = np.where(np.isin(pred, list(dropped)), 0, pred)
        c = case_counts(case["pairs"], case["pred_ids"], case["truth_ids"], case["fp_ids"], dropped)
        ref = lesion_metrics(kept_pred, truth)
        assert f1_from_counts(c["tp"], c["n_pred"], c["detected"], c["n_truth"]) == pytest.approx(ref["F1"])
    g = f1_gain([case], {"a": {2}}, n_boot=50)
    assert g["f1_before"] == pytest.approx(lesion_metrics(pred, truth)["F1"])
    assert g["gain"].estimate == pytest.approx(lesion_metrics(np.where(pred == 2, 0, pred), truth)["F1"] - g["f1_before"])
    assert g["n_dropped"] == 1


def test_cross_validate_by_patient():
    feats, y = _toy_features(24, 1)
    records = [{"case": f"p{i % 4}", "lesion_id": i, "cls": "FP" if fp else "TP", "features": f}
               for i, (f, fp) in enumerate(zip(feats, y))]
    cases = [{"case": f"p{k}", "pairs": [], "pred_ids": [i for i in range(24) if i % 4 == k], "truth_ids": [],
              "fp_ids": [i for i in range(24) if i % 4 == k and y[i]]} for k in range(4)]
    for c in cases:
        c["pairs"] = [(i, i) for i in c["pred_ids"] if i not in c["fp_ids"]]
        c["truth_ids"] = [i for i, _ in c["pairs"]]
    ev = cross_validate(records, cases, n_boot=100)
    assert ev["status"] == "ok" and ev["n_folds"] == 4 and ev["auc"].estimate > 0.8
    assert ev["f1"]["f1_after"] >= ev["f1"]["f1_before"]
    one = cross_validate([dict(r, case="p0") for r in records], cases[:1])
    assert one["status"].startswith("not evaluated")


def test_select_round_robin_spreads_over_cases():
    sel = select_round_robin({"a": [1, 2, 3, 4], "b": [7], "c": []}, 3, seed=0)
    assert len(sel) == 3 and sum(1 for c, _ in sel if c == "b") == 1
    assert len(set(sel)) == 3
    assert select_round_robin({"a": [1]}, 5, seed=0) == [("a", 1)]


def test_radiomics_moments_match_scipy_and_exp2_cut():
    from scipy import stats as sps

    from msxai.experiments.features import _radiomics
    from msxai.experiments.bulk import exp2_cut
    from msxai.experiments.state import ExperimentConfig

    v = np.random.default_rng(8).gamma(2.0, size=200) - 1.0
    r = _radiomics(v, "x")
    assert r["x_skew"] == pytest.approx(sps.skew(v)) and r["x_kurt"] == pytest.approx(sps.kurtosis(v))
    assert r["x_pos_frac"] == pytest.approx((v > 0).mean()) and r["x_std"] == pytest.approx(v.std())
    assert _radiomics(np.full(5, 0.3), "c")["c_skew"] == 0.0
    vals = {"flair": {"inside": np.array([0.5, -2.0]), "ring": np.array([0.1])},
            "mprage": {"inside": np.array([1.0]), "ring": np.zeros(0)}}
    assert exp2_cut(vals, ExperimentConfig()) == 0.1
    assert exp2_cut(vals, ExperimentConfig(min_abs_relative=0.25)) == pytest.approx(0.5)


def test_randomized_model_changes_every_weight_and_keeps_the_original():
    import torch

    from msxai.bundle import Bundle
    from msxai.saliency.sliding import SlidingWindowSpec

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(2, 2, 3, padding=1)
            self.table = torch.nn.Parameter(torch.arange(12.0).reshape(3, 4))  # no reset_parameters: permuted

        def forward(self, x):
            return self.conv(x) + self.table.sum()

    torch.manual_seed(0)
    net = Net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    m = Bundle(net, SlidingWindowSpec(roi_size=(8, 8, 8)).to_inferer(), name="n")
    r = m.randomized(seed=3)
    for n, p in r.network.named_parameters():
        assert not torch.equal(p, before[n]), n
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n])  # the trained network is untouched
    assert sorted(r.network.table.detach().reshape(-1).tolist()) == list(range(12))
    assert r.name == "n (randomised)" and type(r.network) is Net


def test_exp1_pick_large_under_the_cap_and_smallest():
    from msxai.experiments.selection import exp1_pick

    tps = [("a", 1, 50), ("a", 2, 7), ("b", 1, 19), ("b", 2, 300)]
    assert exp1_pick(tps, 20) == [("large", "b", 1), ("small", "a", 2)]
    assert exp1_pick(tps, 1000) == [("large", "b", 2), ("small", "a", 2)]
    assert exp1_pick(tps, 7) == [("single", "a", 2)]  # one lesion under the cap
    assert exp1_pick(tps, 5) == [] and exp1_pick([], 20) == []  # nothing small enough: not run


def test_tn_spheres_as_many_as_fit():
    from msxai.experiments.runner import sample_tn_as_many

    brain = np.zeros((20, 9, 9), bool)
    brain[1:19, 1:8, 1:8] = True  # room for 2-3 balls of 93 mm^3 (radius 2.8 voxels) side by side
    none = np.zeros_like(brain)
    got = sample_tn_as_many(brain, none, none, None, 10, seed=0)
    assert 1 <= len(got) < 10
    assert not np.any(np.sum(got, axis=0) > 1)  # disjoint
    assert sample_tn_as_many(np.zeros_like(brain), none, none, None, 3, seed=0) == []


def test_label_window_counts_match_the_windows_covering_the_box():
    from scipy import ndimage

    from msxai.experiments.selection import label_window_counts
    from msxai.saliency.sliding import SlidingWindowSpec

    rng = np.random.default_rng(10)
    labels = np.zeros((30, 26, 12), np.int32)  # the last axis is smaller than the ROI: padded
    labels[2:5, 3:9, 1:4] = 1
    labels[14:20, 10:12, 5:11] = 2
    labels[25:30, 20:26, 0:2] = 3
    labels[rng.random(labels.shape) > 0.995] = 4
    spec = SlidingWindowSpec(roi_size=(16, 16, 16), overlap=0.25)
    grid = spec.grid(labels.shape)
    counts = label_window_counts(spec, labels)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        box = np.zeros(labels.shape, bool)
        box[sl] = True
        assert counts[i] == len(grid.windows_covering(box)), i


def test_window_count_map_and_domain_costs_match_a_per_voxel_count():
    """Fast path (product of per-axis counts) vs the slow twin (windows covering each single voxel)."""
    from msxai.experiments.selection import domain_costs, interleave_classes, mask_cost, window_count_map
    from msxai.saliency.sliding import SlidingWindowSpec

    for shape, roi in (((20, 17, 9), (8, 8, 8)), ((6, 30, 12), (16, 16, 16))):
        spec = SlidingWindowSpec(roi_size=roi, overlap=0.25, mode="gaussian")
        grid = spec.grid(shape)
        wmap = window_count_map(spec, shape)
        ref = np.zeros(shape, np.float32)
        for idx in np.ndindex(*shape):
            m = np.zeros(shape, bool)
            m[idx] = True
            ref[idx] = len(grid.windows_covering(m))
        np.testing.assert_array_equal(wmap, ref)
        labels = np.zeros(shape, np.int32)
        labels[1:4, 2:6, 1:3] = 1
        labels[-3:, -4:, -2:] = 2
        costs = domain_costs(spec, labels)
        assert costs == {1: float(ref[labels == 1].sum()), 2: float(ref[labels == 2].sum())}
        assert mask_cost(spec, labels == 2) == costs[2]
    sel = {"TP": [("a", 1), ("b", 2), ("a", 3)], "FP": [("a", 5)], "FN": [], "TN": [("b", 0), ("a", 1)]}
    assert interleave_classes(sel, first=[("TP", "a", 3)]) == [
        ("TP", "a", 3), ("TP", "a", 1), ("FP", "a", 5), ("TN", "b", 0), ("TP", "b", 2), ("TN", "a", 1)]
