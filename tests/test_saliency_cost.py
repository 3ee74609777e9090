"""The explain cost estimator (msxai/saliency/cost.py): the work it counts against a brute-force count over every
window, the estimate against its formula, the narrowing advice against the budget, and the measurement leaving the
network and the maps unchanged; the engine's checkpoint hook changes nothing in the maps.

Estimated against measured time: scripts/bench_explain_cost.py (no timing assertions here)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from saliency_helpers import TinySegNet, random_image

from msxai.saliency import cost
from msxai.saliency.sliding import SlidingWindowSpec
from msxai.saliency.smoothgrad import instance_smoothgrad_many, noise_batches


def _brute_work(grid, mask):
    """Per voxel of the mask (padded coordinates), the windows whose slices contain it, by looking at every window."""
    pm = grid.domain_to_padded(mask)
    wins, passes, upd = set(), 0, 0.0
    roi_vol = float(np.prod(grid.roi))
    for v in np.argwhere(pm):
        inside = []
        for w in range(grid.num_windows):
            sl = grid.window_slices(w)
            if all(s.start <= c < s.stop for s, c in zip(sl, v)):
                inside.append(w)
        wins |= set(inside)
        passes += len(inside)
        lo = np.min([[s.start for s in grid.window_slices(w)] for w in inside], axis=0)
        hi = np.max([[s.stop for s in grid.window_slices(w)] for w in inside], axis=0)
        upd += float(np.prod(hi - lo)) / roi_vol
    return len(wins), passes, upd


@pytest.mark.parametrize("shape", [(40, 30, 20), (10, 12, 8)])  # several windows; smaller than the ROI (padded)
def test_domain_work_matches_brute_force(shape):
    spec = SlidingWindowSpec(roi_size=(16, 16, 16), overlap=(0.25, 0.5, 0.25))
    grid = spec.grid(shape)
    rng = np.random.default_rng(1)
    for trial in range(4):
        mask = np.zeros(shape, bool)
        c = [rng.integers(0, s) for s in shape]
        r = 1 + trial * 3
        mask[tuple(slice(max(0, x - r), x + r) for x in c)] = rng.random(mask[tuple(
            slice(max(0, x - r), x + r) for x in c)].shape) > 0.3
        if not mask.any():
            mask[tuple(c)] = True
        w = cost.domain_work(grid, "d", mask)
        windows, passes, upd = _brute_work(grid, mask)
        assert (w.voxels, w.windows, w.window_passes) == (int(mask.sum()), windows, passes)
        assert w.update_volume == pytest.approx(upd)


UNITS = cost.UnitCosts(noise_batch=8, forward_s=2.0, backward_s=0.5, update_s=0.01, noise_s=0.1, call_s=0.3,
                       write_s=0.2, cam_forward_s=1.0, cam_window_s=3.0)


def test_estimate_is_its_formula():
    w = cost.DomainWork("lesion_3", voxels=10, windows=2, window_passes=14, update_volume=12.5)
    n = 20
    per_batch_max = 2 * 2.0 + 14 * 0.5 + 12.5 * 0.01
    expect = 0.3 + n * 0.1 + n / 8 * per_batch_max + 3 * 0.2
    est = cost.estimate_smoothgrad([w], UNITS, n, "max", image_voxels=1000)
    assert est.seconds == pytest.approx(expect)
    assert est.chunks == len(noise_batches(n, 8)) == 3
    assert est.map_bytes == 2 * 1000 * 4
    mean = cost.estimate_smoothgrad([w], UNITS, n, "mean").seconds
    assert mean == pytest.approx(0.3 + n * 0.1 + n / 8 * (2 * 2.0 + 2 * 0.5) + 3 * 0.2)
    two = cost.estimate_smoothgrad([w, cost.DomainWork("lesion_4", 1, 1, 1, 1.0)], UNITS, n, "max")
    assert two.chunks == 6 and two.seconds == pytest.approx(sum(two.per_domain.values()))
    # with the one-copy times measured, a batch's time is interpolated between one copy and a full batch
    u1 = cost.UnitCosts(8, 2.0, 0.5, 0.01, 0.1, 0.3, 0.2, forward1_s=0.6, backward1_s=0.2)
    batches = noise_batches(9, 8)
    assert batches == [5, 4]
    expect = 0.3 + 9 * 0.1 + 3 * 0.2 + sum(
        2 * (0.6 + (nb - 1) / 7 * (2.0 - 0.6)) + 14 * (0.2 + (nb - 1) / 7 * (0.5 - 0.2)) + 12.5 * 0.01 * nb / 8
        for nb in batches)
    assert cost.estimate_smoothgrad([w], u1, 9, "max").seconds == pytest.approx(expect)
    cam = cost.estimate_gradcampp([w, cost.DomainWork("lesion_5", 3, 2, 3, 2.0)], UNITS, total_windows=27)
    assert cam.seconds == pytest.approx(27 * 1.0 + 2 * (2 * 3.0 + 2 * 0.2)) and cam.chunks == 2


def test_narrowing_advice_fits_the_budget():
    works = [cost.DomainWork(f"lesion_{i}", voxels=5 * i, windows=1 + i % 3, window_passes=5 * i * (1 + i % 2),
                             update_volume=5.0 * i) for i in range(1, 9)]
    budget = 120.0
    est = cost.estimate_smoothgrad(works, UNITS, 50, "max")
    assert est.seconds > budget
    n_fit = cost.max_samples_within(works, UNITS, "max", budget, upper=50)
    # twin: the first N that no longer fits, by trying every N
    brute = max([n for n in range(0, 51) if n == 0 or cost.estimate_smoothgrad(works, UNITS, n, "max").seconds <= budget])
    assert n_fit == brute
    advice = cost.narrowing_advice(works, UNITS, 50, "max", budget)
    text = " | ".join(advice)
    assert "aggregation=mean" in text
    if n_fit:
        assert f"samples={n_fit}" in text
    lesion = [a for a in advice if a.startswith("fewer lesions")]
    assert lesion
    ids = lesion[0].split("lesion=")[1].split(" ")[0].split(",")
    chosen = [w for w in works if w.name.replace("lesion_", "") in ids]
    assert cost.estimate_smoothgrad(chosen, UNITS, 50, "max").seconds <= budget
    # nothing fits with the requested N: the advice still names a request that fits (one lesion, fewer copies)
    slow = cost.UnitCosts(8, 20.0, 30.0, 0.1, 0.1, 0.3, 0.2)
    tight = cost.narrowing_advice(works, slow, 50, "max", budget)
    one = [a for a in tight if a.startswith("one lesion")]
    assert one, tight
    lid, k = one[0].split("lesion=")[1].split(" ")[0], int(one[0].split("samples=")[1].split(" ")[0])
    agg = "mean" if "aggregation=mean" in one[0] else "max"
    w1 = [w for w in works if w.name == f"lesion_{lid}"]
    assert cost.estimate_smoothgrad(w1, slow, k, agg).seconds <= budget
    assert cost.fmt_seconds(30) == "30 s" and cost.fmt_seconds(600) == "10 min" and cost.fmt_seconds(7200) == "2.0 h"


def test_measuring_and_checkpoints_change_nothing():
    """Measuring the unit costs leaves the network as it was, and a checkpoint after every noise batch (what the
    server passes) neither changes the maps nor is called other than once per noise batch of each group."""
    torch.manual_seed(0)
    net = TinySegNet(seed=3)
    spec = SlidingWindowSpec(roi_size=(8, 8, 8))
    img = random_image((12, 10, 9), seed=2)
    dom = np.zeros((12, 10, 9), bool)
    dom[4:6, 3:5, 2:4] = True
    doms = {"a": dom, "b": np.roll(dom, 5, axis=0)}
    kw = dict(n_samples=5, aggregation="max", seed=4, noise_batch=2)
    ref = dict(instance_smoothgrad_many(net, img, doms, spec, **kw))
    flags = [p.requires_grad for p in net.parameters()]
    units = cost.measure_unit_costs(net, spec, img, "cpu")
    assert [p.requires_grad for p in net.parameters()] == flags and net.training
    for k in ("forward_s", "backward_s", "update_s", "noise_s", "call_s", "write_s", "cam_forward_s", "cam_window_s"):
        assert getattr(units, k) > 0, k
    calls = []
    got = dict(instance_smoothgrad_many(net, img, doms, spec, checkpoint=calls.append, **kw))
    for name in doms:
        assert np.array_equal(got[name], ref[name])
    n_groups = len({tuple(c["domains"]) for c in calls})
    assert len(calls) == n_groups * math.ceil(5 / 2)
    assert sum(c["copies"] for c in calls) == 5 * n_groups
    # a checkpoint that raises stops the explanation there (how a server cancels)
    def stop(info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        list(instance_smoothgrad_many(net, img, doms, spec, checkpoint=stop, **kw))
    assert [p.requires_grad for p in net.parameters()] == flags and net.training
