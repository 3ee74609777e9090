"""Lesion instances, tables, TP/FP/FN classes and TN spheres (msxai.lesions), each against a slow twin."""

from __future__ import annotations

import csv
import itertools
import json
import os
from collections import deque

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

from msxai.data import REAL_PATIENT_MISSING_REASON, REAL_PATIENT_N_LESIONS, real_patient_paths
from msxai.errors import EmptyDomainError, GeometryError, InputError, UnknownLesionError
from msxai.lesions import (
    ball_structure,
    classify_lesions,
    instances_from_mask,
    lesion_domain,
    lesion_instances,
    lesion_table,
    parse_lesion_ids,
    prediction_instances,
    ring_mask,
    sample_tn_spheres,
    tn_sphere_radius_mm,
    write_lesion_table,
)


# ------------------------------------------------------------------------------------------------ slow twins
def neighbour_offsets(connectivity: int) -> list[tuple[int, int, int]]:
    """Offsets of the 6/18/26-neighbourhood: |d| summed is <= 1, 2 or 3 with each |d_i| <= 1."""
    max_nonzero = {6: 1, 18: 2, 26: 3}[connectivity]
    return [d for d in itertools.product((-1, 0, 1), repeat=3) if 0 < sum(map(abs, d)) <= max_nonzero]


def brute_force_instances(mask: np.ndarray, connectivity: int = 18, min_voxels: float = 0.0) -> np.ndarray:
    """Python-loop BFS labelling, visiting voxels in C order: component k is the k-th found in the raster scan."""
    offsets = neighbour_offsets(connectivity)
    labels = np.zeros(mask.shape, dtype=np.int64)
    comps = []
    for start in itertools.product(*map(range, mask.shape)):
        if not mask[start] or labels[start]:
            continue
        comp = [start]
        labels[start] = -1
        queue = deque([start])
        while queue:
            v = queue.popleft()
            for d in offsets:
                w = (v[0] + d[0], v[1] + d[1], v[2] + d[2])
                if all(0 <= w[i] < mask.shape[i] for i in range(3)) and mask[w] and not labels[w]:
                    labels[w] = -1
                    comp.append(w)
                    queue.append(w)
        comps.append(comp)
    out = np.zeros(mask.shape, dtype=np.int32)
    k = 0
    for comp in comps:
        if len(comp) >= min_voxels:
            k += 1
            for v in comp:
                out[v] = k
    return out


def test_neighbourhood_sizes():
    assert [len(neighbour_offsets(c)) for c in (6, 18, 26)] == [6, 18, 26]


@pytest.mark.parametrize("connectivity", [6, 18, 26])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_instances_match_brute_force(connectivity, seed):
    rng = np.random.default_rng(seed)
    prob = rng.random((7, 8, 6))
    mask = prob > 0.65
    for min_vol in (0.0, 3.0):
        fast = lesion_instances(prob, threshold=0.65, min_volume_mm3=min_vol, connectivity=connectivity)
        slow = brute_force_instances(mask, connectivity, min_vol)
        np.testing.assert_array_equal(fast, slow)
        assert fast.dtype == np.int32


def test_18_vs_26_and_6_vs_18_connectivity_differ():
    corner = np.zeros((4, 4, 4), bool)
    corner[1, 1, 1] = corner[2, 2, 2] = True  # touch by a corner only
    assert lesion_instances(corner, min_volume_mm3=0, connectivity=26).max() == 1
    assert lesion_instances(corner, min_volume_mm3=0).max() == 2  # the paper's 18-connectivity: two lesions
    assert brute_force_instances(corner, 18).max() == 2 and brute_force_instances(corner, 26).max() == 1
    edge = np.zeros((4, 4, 4), bool)
    edge[1, 1, 1] = edge[2, 2, 1] = True  # touch by an edge
    assert lesion_instances(edge, min_volume_mm3=0).max() == 1
    assert lesion_instances(edge, min_volume_mm3=0, connectivity=6).max() == 2
    with pytest.raises(InputError, match="connectivity"):
        lesion_instances(edge, connectivity=8)


def test_threshold_is_strict_and_bool_masks_accepted():
    prob = np.zeros((6, 6, 6), np.float32)
    prob[1:3, 1:3, 1:3] = 0.3  # exactly t: not a lesion
    prob[4:6, 4:6, 4:6] = 0.31
    labels = lesion_instances(prob)
    assert labels.max() == 1 and labels[4, 4, 4] == 1 and labels[1, 1, 1] == 0
    np.testing.assert_array_equal(lesion_instances(prob > 0.2), lesion_instances(prob, threshold=0.2))


def test_minimum_volume_in_mm3_with_anisotropic_voxels():
    affine = np.diag([0.5, 0.5, 3.0, 1.0])  # 0.75 mm^3 voxels: 7 voxels = 5.25 mm^3 kept, 6 = 4.5 mm^3 dropped
    mask = np.zeros((12, 12, 4), bool)
    mask[1, 1:8, 1] = True  # 7 voxels
    mask[5, 1:7, 1] = True  # 6 voxels
    mask[9, 1:3, 1] = True  # 2 voxels
    labels = lesion_instances(mask, affine=affine)
    assert labels.max() == 1 and labels[1, 1, 1] == 1 and labels[5, 1, 1] == 0
    # with 1 mm^3 voxels both long lines are >= 5 mm^3
    assert lesion_instances(mask).max() == 2
    # the voxel volume comes from the determinant, so a rotated anisotropic grid gives the same answer
    c, s = np.cos(0.4), np.sin(0.4)
    rot = np.eye(4)
    rot[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    np.testing.assert_array_equal(lesion_instances(mask, affine=rot @ affine), labels)
    # exactly 5 mm^3 (5 voxels of 1 mm^3) is kept, 4 is not
    five = np.zeros((8, 8, 8), bool)
    five[1, 1:6, 1] = True
    five[5, 1:5, 5] = True
    assert lesion_instances(five).max() == 1


def test_ids_are_stable_raster_order():
    mask = np.zeros((10, 10, 10), bool)
    mask[7:9, 0:2, 0:2] = True  # first voxel (7, 0, 0)
    mask[0:2, 8:10, 8:10] = True  # first voxel (0, 8, 8): earliest in C order
    mask[3:5, 3:5, 0:2] = True  # first voxel (3, 3, 0)
    labels = lesion_instances(mask, min_volume_mm3=0)
    assert labels[0, 8, 8] == 1 and labels[3, 3, 0] == 2 and labels[7, 0, 0] == 3
    # adding a lesion later in the raster leaves the earlier ids unchanged
    mask2 = mask.copy()
    mask2[9, 9, 9] = True
    labels2 = lesion_instances(mask2, min_volume_mm3=0)
    np.testing.assert_array_equal(labels2[mask], labels[mask])
    assert labels2[9, 9, 9] == 4


def test_instances_from_mask_binary_and_instance_maps():
    truth = np.zeros((10, 10, 10), np.float32)
    truth[1:3, 1:3, 1:3] = 2  # two touching labelled lesions stay two lesions
    truth[3:5, 1:3, 1:3] = 1
    truth[8, 8, 8] = 3  # 1 voxel < 5 mm^3: dropped
    inst = instances_from_mask(truth)
    assert inst.max() == 2 and inst[1, 1, 1] == 1 and inst[3, 1, 1] == 2 and inst[8, 8, 8] == 0
    binary = (truth > 0).astype(np.uint8)
    b_inst = instances_from_mask(binary)
    assert b_inst.max() == 1  # the binary mask is one connected lesion
    np.testing.assert_array_equal(instances_from_mask(binary.astype(bool)), b_inst)
    soft = binary * 0.8  # a soft float truth is thresholded at 0.5
    np.testing.assert_array_equal(instances_from_mask(soft), b_inst)
    with pytest.raises(InputError, match="negative"):
        instances_from_mask(-binary.astype(np.int16))


def test_prediction_instances_accepts_prob_mask_and_instance_map_and_refuses_logits():
    prob = np.zeros((8, 8, 8), np.float32)
    prob[1:3, 1:3, 1:3] = 0.9
    prob[5:7, 5:7, 5:7] = 0.4
    np.testing.assert_array_equal(prediction_instances(prob), lesion_instances(prob))
    np.testing.assert_array_equal(prediction_instances(prob > 0.3), lesion_instances(prob))
    np.testing.assert_array_equal(prediction_instances(lesion_instances(prob).astype(np.float32) * 3),
                                  lesion_instances(prob))
    with pytest.raises(InputError, match="logits"):
        prediction_instances(prob - 0.5)
    with pytest.raises(InputError, match="non-integer"):
        prediction_instances(prob * 3)
    bad = prob.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        prediction_instances(bad)


def test_lesion_domain_and_unknown_ids():
    labels = np.zeros((5, 5, 5), np.int32)
    labels[1, 1, 1] = 1
    labels[3, 3, 3] = 2
    dom = lesion_domain(labels, 2)
    assert dom.dtype == bool and dom.sum() == 1 and dom[3, 3, 3]
    for bad in (0, 3, -1, 1.5):
        with pytest.raises(UnknownLesionError, match="valid ids: 1, 2"):
            lesion_domain(labels, bad)
    with pytest.raises(UnknownLesionError, match="none"):
        lesion_domain(np.zeros((3, 3, 3), np.int32), 1)


def brute_force_row(labels, lid, affine, prob=None, truth=None):
    idx = np.argwhere(labels == lid)
    centroid = idx.mean(axis=0)
    row = {
        "id": lid,
        "voxels": len(idx),
        "volume_mm3": len(idx) * abs(np.linalg.det(affine[:3, :3])),
        "centroid_vox": centroid.tolist(),
        "centroid_mm": (affine @ np.append(centroid, 1.0))[:3].tolist(),
        "bbox_min": idx.min(axis=0).tolist(),
        "bbox_max": idx.max(axis=0).tolist(),
    }
    if prob is not None:
        vals = [prob[tuple(v)] for v in idx]
        row["mean_probability"] = float(np.mean(vals))
        row["max_probability"] = float(np.max(vals))
    if truth is not None:
        ov = sum(1 for v in idx if truth[tuple(v)] > 0)
        row["class"] = "TP" if ov else "FP"
        row["overlap_voxels"] = ov
    return row


def test_ring_edges_allow_float_voxel_sizes():
    """One voxel at the centre of 7^3: the (0, 2] mm ring holds its 26 neighbours and the 6 voxels 2 voxels away
    (hand count). With a voxel size of 1 + 1e-9 mm (a float affine) those 6 stay at 2 mm: in (0, 2], not (2, 3]."""
    dom = np.zeros((7, 7, 7), bool)
    dom[3, 3, 3] = True
    for size in (1.0, 1.0 + 1e-9, 1.0 - 1e-9):
        aff = np.diag([size, size, size, 1.0])
        assert int(ring_mask(dom, aff, 0.0, 2.0).sum()) == 26 + 6, size
        outer = ring_mask(dom, aff, 2.0, 3.0)
        assert not outer[3, 3, 5] and outer[3, 4, 5] and not outer[3, 3, 3], size  # sqrt 5 = 2.24 mm is in (2, 3]
    with pytest.raises(InputError, match="inner < outer"):
        ring_mask(dom, None, 2.0, 2.0)
    with pytest.raises(EmptyDomainError):
        ring_mask(np.zeros((3, 3, 3), bool))


def test_parse_lesion_ids_cli_and_request_forms():
    assert parse_lesion_ids(" ALL ") == "all"
    assert parse_lesion_ids("1 3") == parse_lesion_ids("1,3") == parse_lesion_ids([1, "3"]) == [1, 3]
    assert parse_lesion_ids(np.int64(4)) == parse_lesion_ids(4.0) == [4]
    for bad in ("0", "two", "1.5", "", [], [True], "1;2", None):
        with pytest.raises(InputError, match="lesion must be"):
            parse_lesion_ids(bad)


def test_lesion_table_hand_built_and_twin(tmp_path):
    affine = np.array([[-0.5, 0, 0, 90], [0, 0.5, 0, -126], [0, 0, 3.0, -72], [0, 0, 0, 1]], float)
    prob = np.zeros((12, 10, 6), np.float32)
    prob[2:5, 3:5, 1:3] = 0.5  # 12 voxels: lesion 1
    prob[2, 3, 1] = 0.9
    prob[8:10, 6:10, 4] = 0.8  # 8 voxels = 6 mm^3: lesion 2
    truth = np.zeros(prob.shape, np.uint8)
    truth[4, 4, 2] = 1  # overlaps lesion 1 only
    labels = lesion_instances(prob, affine=affine)
    rows = lesion_table(labels, affine, prob=prob, truth=truth)
    assert [r["id"] for r in rows] == [1, 2]
    r1, r2 = rows
    assert r1["voxels"] == 12 and r1["volume_mm3"] == pytest.approx(9.0)
    assert r1["centroid_vox"] == pytest.approx([3.0, 3.5, 1.5])
    assert r1["centroid_mm"] == pytest.approx([90 - 1.5, -126 + 1.75, -72 + 4.5])
    assert r1["bbox_min"] == [2, 3, 1] and r1["bbox_max"] == [4, 4, 2]
    assert r1["max_probability"] == pytest.approx(0.9)
    assert r1["mean_probability"] == pytest.approx((11 * 0.5 + 0.9) / 12)
    assert r1["class"] == "TP" and r2["class"] == "FP" and r1["overlap_voxels"] == 1
    for row in rows:
        twin = brute_force_row(labels, row["id"], affine, prob, truth)
        assert row.keys() == twin.keys()
        for key in row:
            assert row[key] == pytest.approx(twin[key]), key
    json.dumps(rows)  # plain python types only
    assert all(type(v) in (int, float, str, list) for r in rows for v in r.values())
    write_lesion_table(rows, tmp_path / "t.json", tmp_path / "t.csv")
    assert json.loads((tmp_path / "t.json").read_text()) == rows
    with (tmp_path / "t.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 and table[1]["class"] == "FP" and float(table[0]["centroid_mm_y"]) == pytest.approx(-124.25)
    assert lesion_table(np.zeros((3, 3, 3), np.int32), affine) == []
    with pytest.raises(GeometryError):
        lesion_table(labels, affine, prob=prob[:-1])


def brute_force_classes(pred, truth):
    pred_ids = sorted(set(np.unique(pred)) - {0})
    truth_ids = sorted(set(np.unique(truth)) - {0})
    tp = [p for p in pred_ids if np.any(truth[pred == p] > 0)]
    fp = [p for p in pred_ids if p not in tp]
    detected = [t for t in truth_ids if np.any(pred[truth == t] > 0)]
    fn = [t for t in truth_ids if t not in detected]
    return tp, fp, fn, detected


def test_classify_lesions_hand_built():
    pred = np.zeros((10, 10, 10), np.int32)
    truth = np.zeros_like(pred)
    truth[1:3, 1:3, 1:3] = 1
    truth[5, 5, 5] = 2
    truth[5, 5, 7] = 3
    truth[8:10, 8:10, 8:10] = 4  # missed
    pred[2:4, 2:4, 2:4] = 1  # overlaps truth 1
    pred[0, 9, 0] = 2  # no overlap: FP
    pred[5, 5, 5:8] = 3  # overlaps truth 2 and 3
    c = classify_lesions(pred, truth)
    assert (c.tp, c.fp, c.fn, c.detected) == ([1, 3], [2], [4], [1, 2, 3])
    assert c.pairs == [(1, 1), (3, 2), (3, 3)]


@pytest.mark.parametrize("seed", range(4))
def test_classify_lesions_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    pred = lesion_instances(rng.random((9, 9, 9)) > 0.8, min_volume_mm3=0)
    truth = lesion_instances(rng.random((9, 9, 9)) > 0.85, min_volume_mm3=0)
    c = classify_lesions(pred, truth)
    assert (c.tp, c.fp, c.fn, c.detected) == brute_force_classes(pred, truth)


# ------------------------------------------------------------------------------------------------ TN spheres
def check_tn_spheres(spheres, brain, truth, pred, ball_voxels):
    lesion_vox = set(map(tuple, np.argwhere(truth | pred)))
    occupied = np.zeros(brain.shape, bool)
    for s in spheres:
        assert s.dtype == bool and s.sum() == ball_voxels
        assert np.all(brain[s]), "a TN sphere leaves the brain"
        for v in map(tuple, np.argwhere(s)):  # not even adjacent (26-neighbourhood) to a lesion voxel
            for d in itertools.product((-1, 0, 1), repeat=3):
                assert (v[0] + d[0], v[1] + d[1], v[2] + d[2]) not in lesion_vox
        assert not np.any(occupied & s), "TN spheres overlap"
        occupied |= s


def small_brain(shape=(30, 30, 24)):
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    brain = (((grid - centre[:, None, None, None]) / (np.array(shape) / 2.2)[:, None, None, None]) ** 2).sum(0) <= 1
    truth = np.zeros(shape, bool)
    truth[10:14, 12:16, 10:13] = True
    pred = np.zeros(shape, bool)
    pred[16:19, 14:18, 11:14] = True
    return brain, truth, pred


def test_tn_spheres_obey_their_constraints():
    brain, truth, pred = small_brain()
    spheres = sample_tn_spheres(brain, truth, pred, np.eye(4), n=6, seed=3)
    assert len(spheres) == 6
    assert tn_sphere_radius_mm(93.0) == pytest.approx((3 * 93 / (4 * np.pi)) ** (1 / 3))
    ball = ball_structure(tn_sphere_radius_mm(93.0), (1.0, 1.0, 1.0))
    assert ball.sum() == 81  # the voxelised 93 mm^3 ball at 1 mm (radius 2.81 mm)
    check_tn_spheres(spheres, brain, truth, pred, int(ball.sum()))
    # seeded: the same seed gives the same balls, another seed other balls
    again = sample_tn_spheres(brain, truth, pred, np.eye(4), n=6, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(spheres, again))
    other = sample_tn_spheres(brain, truth, pred, np.eye(4), n=6, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(spheres, other))


def test_tn_spheres_anisotropic_voxels():
    brain, truth, pred = small_brain((40, 40, 12))
    affine = np.diag([0.7, 0.7, 2.0, 1.0])
    spheres = sample_tn_spheres(brain, truth, pred, affine, n=3, seed=0)
    ball = ball_structure(tn_sphere_radius_mm(93.0), (0.7, 0.7, 2.0))
    assert ball.shape == (9, 9, 3)
    assert abs(ball.sum() * 0.7 * 0.7 * 2.0 - 93.0) < 0.25 * 93.0
    check_tn_spheres(spheres, brain, truth, pred, int(ball.sum()))


def test_tn_spheres_impossible_cases_raise():
    brain, truth, pred = small_brain((10, 10, 10))
    with pytest.raises(EmptyDomainError, match="no TN sphere"):
        sample_tn_spheres(brain, np.ones_like(truth), pred)
    with pytest.raises(EmptyDomainError, match="could be placed"):
        sample_tn_spheres(*small_brain(), n=500, max_tries=300)
    with pytest.raises(GeometryError):
        sample_tn_spheres(brain, truth[:-1], pred)


# ------------------------------------------------------------------------------------------------ real patient
@pytest.fixture(scope="module")
def real_truth():
    paths = real_patient_paths()
    if paths is None:
        pytest.skip(REAL_PATIENT_MISSING_REASON)
    from msxai.io import load_volume

    return load_volume(paths["truth"]), load_volume(paths["flair"])


@pytest.mark.realdata
def test_real_patient_lesions(real_truth):
    truth, flair = real_truth
    labels = instances_from_mask(truth.array, truth.affine)
    assert labels.max() == REAL_PATIENT_N_LESIONS == 16
    # at 1 mm, 5 mm^3 = 5 voxels; without the minimum volume 3 more specks (< 5 voxels) are lesions
    assert lesion_instances(truth.array > 0, min_volume_mm3=0).max() == 19
    rows = lesion_table(labels, truth.affine, prob=truth.array, truth=truth.array)
    assert len(rows) == 16 and all(r["class"] == "TP" and r["voxels"] >= 5 for r in rows)
    assert sum(r["voxels"] for r in rows) == int(np.count_nonzero(labels))
    firsts = [np.flatnonzero((labels == r["id"]).ravel())[0] for r in rows]
    assert firsts == sorted(firsts)  # stable raster-order ids
    brain = flair.array != 0
    spheres = sample_tn_spheres(brain, truth.array, np.zeros_like(brain), truth.affine, n=10, seed=0)
    lesions = truth.array > 0
    from scipy import ndimage

    near = ndimage.binary_dilation(lesions, np.ones((3, 3, 3), bool))
    for s in spheres:
        assert s.sum() == 81 and np.all(brain[s]) and not np.any(near[s])
    assert not np.any(np.sum(spheres, axis=0) > 1)
