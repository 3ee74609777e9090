"""The fast instance SmoothGrad against the naive reference (one autograd.grad per output voxel over MONAI's full
sliding-window inference), the windowed function against SlidingWindowInferer, and gradients against finite
differences."""

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer

from msxai.errors import EmptyDomainError, GeometryError, InputError
from msxai.saliency.sliding import SlidingWindowSpec, WindowGrid, sliding_window_logits, window_starts
from msxai.saliency.smoothgrad import (
    class_smoothgrad,
    graph_bytes_per_copy,
    instance_smoothgrad,
    instance_smoothgrad_many,
    noise_batches,
    noise_sigma,
)

from saliency_helpers import TinySegNet, naive_class_smoothgrad, naive_instance_smoothgrad, random_image

torch.set_num_threads(1)

SW_CASES = [
    # shape, roi, overlap, mode, padding_mode, cval, sigma_scale, sw_batch
    ((20, 17, 13), (8, 8, 8), 0.25, "gaussian", "constant", 0.0, 0.125, 1),
    ((19, 9, 11), (8, 6, 8), 0.5, "constant", "constant", 0.0, 0.125, 3),
    ((6, 7, 5), (8, 8, 8), 0.3, "gaussian", "constant", 1.5, 0.2, 2),  # smaller than the ROI on every axis
    ((20, 17, 5), (8, 8, 8), 0.5, "gaussian", "reflect", 0.0, 0.125, 1),  # smaller on one axis, reflect padding
    ((9, 6, 12), (8, 8, 8), 0.6, "gaussian", "replicate", 0.0, (0.1, 0.2, 0.3), 4),
    ((16, 16, 16), (8, -1, 8), 0.7, "gaussian", "circular", 0.0, 0.125, 1),  # roi -1 = image size
]


@pytest.mark.parametrize("case", SW_CASES)
def test_windowed_function_equals_monai(case):
    shape, roi, overlap, mode, pm, cval, ss, swb = case
    net = TinySegNet(2).eval()
    inf = SlidingWindowInferer(roi, sw_batch_size=swb, overlap=overlap, mode=mode, padding_mode=pm, cval=cval,
                               sigma_scale=ss)
    spec = SlidingWindowSpec.from_inferer(inf)
    x = random_image(shape, seed=1)[None]
    with torch.no_grad():
        ref = inf(x, net)
        got = sliding_window_logits(net, x, spec)
    assert got.shape == ref.shape == (1, 2, *shape)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    # a subset of windows is exact wherever all covering windows are included
    grid = spec.grid(shape)
    dom = np.zeros(shape, bool)
    dom[tuple(s // 2 for s in shape)] = True
    wins = grid.windows_covering(dom)
    assert wins and len(wins) <= grid.num_windows
    with torch.no_grad():
        part = sliding_window_logits(net, x, spec, windows=wins)
    np.testing.assert_allclose(part[0, :, dom].numpy(), ref[0, :, dom].numpy(), rtol=1e-5, atol=1e-6)


def test_window_starts_and_importance_match_monai_utilities():
    from monai.data.utils import compute_importance_map, dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    for img, roi, ov in [((20, 17, 13), (8, 8, 8), 0.25), ((33, 8, 50), (16, 8, 7), (0.5, 0.1, 0.9))]:
        spec = SlidingWindowSpec(roi, overlap=ov, mode="gaussian", sigma_scale=0.3)
        grid = spec.grid(img)
        interval = _get_scan_interval(img, roi, 3, spec.overlap)
        assert grid.interval == interval
        ref = [tuple(s.start for s in sl) for sl in dense_patch_slices(img, roi, interval)]
        assert [tuple(s) for s in window_starts(img, roi, interval).tolist()] == ref
        imp = compute_importance_map(roi, mode="gaussian", sigma_scale=0.3, device="cpu")
        assert torch.equal(grid.importance, imp)


def test_spec_from_inferer_and_validation():
    inf = SlidingWindowInferer((32, 32, 16), sw_batch_size=2, overlap=0.5, mode="gaussian", sigma_scale=0.2,
                               padding_mode="reflect")
    spec = SlidingWindowSpec.from_inferer(inf)
    assert spec.roi_size == (32, 32, 16) and spec.overlap == (0.5,) * 3 and spec.mode == "gaussian"
    assert spec.padding_mode == "reflect" and spec.sigma_scale == (0.2,) * 3 and spec.sw_batch_size == 2
    assert SlidingWindowSpec.from_inferer(spec.to_inferer()) == spec
    with pytest.raises(ValueError, match="overlap"):
        SlidingWindowSpec((8, 8, 8), overlap=1.0)
    with pytest.raises(ValueError, match="mode"):
        SlidingWindowSpec((8, 8, 8), mode="median")


DOMAIN_CASES = {
    "blob": lambda s: _box(s, (3, 4, 2), (6, 7, 5)),
    "single_voxel": lambda s: _box(s, (7, 5, 4), (8, 6, 5)),
    "across_windows": lambda s: _box(s, (5, 2, 1), (9, 4, 3)) | _box(s, (0, 9, 7), (1, 11, 9)),
}


def _box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


@pytest.mark.parametrize("aggregation", ["max", "mean"])
@pytest.mark.parametrize("domain_name", list(DOMAIN_CASES))
def test_fast_matches_naive(aggregation, domain_name):
    shape = (12, 11, 9)
    net = TinySegNet(1)
    img = random_image(shape, seed=5)
    inf = SlidingWindowInferer((8, 8, 6), overlap=0.5, mode="gaussian")
    spec = SlidingWindowSpec.from_inferer(inf)
    dom = DOMAIN_CASES[domain_name](shape)
    ref = naive_instance_smoothgrad(net, img, dom, inf, n_samples=3, aggregation=aggregation, seed=7)
    got = instance_smoothgrad(net, img, dom, spec, n_samples=3, aggregation=aggregation, seed=7, noise_batch=2,
                              max_batch=6)
    assert got.shape == (2, *shape) and got.dtype == np.float32
    assert np.abs(ref).max() > 0
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())


def test_fast_matches_naive_padded_reflect_and_absolute_sigma():
    shape = (10, 6, 7)  # smaller than the ROI on two axes: reflect padding, whose gradient folds back
    net = TinySegNet(3)
    img = random_image(shape, seed=2)
    inf = SlidingWindowInferer((8, 8, 8), overlap=0.25, mode="constant", padding_mode="reflect")
    spec = SlidingWindowSpec.from_inferer(inf)
    dom = _box(shape, (1, 0, 2), (3, 2, 4))
    ref = naive_instance_smoothgrad(net, img, dom, inf, n_samples=2, sigma=0.3, seed=1)
    got = instance_smoothgrad(net, img, dom, spec, n_samples=2, sigma=0.3, seed=1)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    # the gradient reaches the border voxels that reflect padding copies
    assert np.abs(got[:, :, 0, :]).max() > 0


def test_backends_give_identical_maps():
    shape = (12, 11, 9)
    net = TinySegNet(4)
    img = random_image(shape, seed=4)
    spec = SlidingWindowSpec((8, 8, 6), overlap=0.5, mode="gaussian")
    dom = DOMAIN_CASES["across_windows"](shape)
    maps = {b: instance_smoothgrad(net, img, dom, spec, n_samples=2, backend=b, max_batch=4)
            for b in ("batched", "vmap", "loop", "auto")}
    for b in ("vmap", "loop", "auto"):
        np.testing.assert_allclose(maps[b], maps["batched"], rtol=1e-5, atol=1e-7)
    # chunking and noise batching do not change the result
    other = instance_smoothgrad(net, img, dom, spec, n_samples=2, max_batch=1, noise_batch=1)
    np.testing.assert_allclose(other, maps["batched"], rtol=1e-5, atol=1e-7)
    # a memory budget too small for two copies forces one copy per forward: same maps
    grid = spec.grid(shape)
    per_copy = graph_bytes_per_copy(net, grid, img, torch.device("cpu"))
    assert per_copy > img[:, :8, :8, :6].numel() * 4
    tight = instance_smoothgrad(net, img, dom, spec, n_samples=2, noise_batch=2, memory_mb=1.5 * per_copy / 2**20)
    np.testing.assert_allclose(tight, maps["batched"], rtol=1e-5, atol=1e-7)


def test_noise_batches_are_balanced_and_do_not_change_the_maps():
    assert noise_batches(50, 16) == [13, 13, 12, 12]
    assert noise_batches(50, 8) == [8] + [7] * 6
    assert noise_batches(3, 8) == [3] and noise_batches(4, 1) == [1] * 4 and noise_batches(1, 4) == [1]
    shape = (10, 9, 8)
    net = TinySegNet(2)
    img = random_image(shape, seed=3)
    spec = SlidingWindowSpec((8, 8, 6), overlap=0.5, mode="gaussian")
    dom = _box(shape, (3, 3, 2), (5, 5, 4))
    a = instance_smoothgrad(net, img, dom, spec, n_samples=5, noise_batch=4)  # batches 3, 2
    b = instance_smoothgrad(net, img, dom, spec, n_samples=5, noise_batch=1)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_many_domains_equal_single_domain_results():
    shape = (16, 12, 9)
    net = TinySegNet(6)
    img = random_image(shape, seed=6)
    spec = SlidingWindowSpec((8, 8, 6), overlap=0.25, mode="gaussian")
    domains = {
        "a": _box(shape, (1, 1, 1), (3, 3, 2)),
        "b": _box(shape, (12, 9, 6), (14, 11, 8)),
        "c": _box(shape, (6, 5, 3), (9, 7, 5)),
    }
    many = dict(instance_smoothgrad_many(net, img, domains, spec, n_samples=2, max_group_windows=4))
    assert set(many) == set(domains)
    for name, dom in domains.items():
        single = instance_smoothgrad(net, img, dom, spec, n_samples=2)
        np.testing.assert_allclose(many[name], single, rtol=1e-5, atol=1e-7)
        # the map is zero outside the windows that cover the domain
        grid = spec.grid(shape)
        box = grid.support_box(grid.windows_covering(dom))
        outside = np.ones(shape, bool)
        outside[tuple(slice(a, b) for a, b in box)] = False
        assert np.all(many[name][:, outside] == 0)


def test_class_smoothgrad_matches_naive():
    shape = (12, 10, 9)
    net = TinySegNet(7)
    img = random_image(shape, seed=8)
    inf = SlidingWindowInferer((8, 8, 6), overlap=0.5, mode="gaussian")
    spec = SlidingWindowSpec.from_inferer(inf)
    with torch.no_grad():
        prob = torch.softmax(inf(img[None], net)[0], 0)[1].numpy()
    t = float(np.quantile(prob, 0.8))
    ref = naive_class_smoothgrad(net, img, prob > t, inf, n_samples=3, seed=2)
    got = class_smoothgrad(net, img, spec, n_samples=3, seed=2, threshold=t)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())


def test_gradient_matches_finite_differences_float64():
    """σ = 0, one sample: the instance map is ∂y[v']/∂x (mean over Ω) — checked by central differences in float64."""
    shape = (7, 6, 5)
    net = TinySegNet(9).double()
    img = random_image(shape, seed=3, dtype=torch.float64)
    spec = SlidingWindowSpec((5, 4, 5), overlap=0.5, mode="gaussian")
    dom = _box(shape, (2, 2, 1), (4, 3, 3))
    got = instance_smoothgrad(net, img, dom, spec, n_samples=1, sigma=0.0, aggregation="mean")

    def f(x):
        with torch.no_grad():
            y = sliding_window_logits(net, x[None], spec)[0, 1]
        return float(y[torch.as_tensor(dom)].mean())

    rng = np.random.default_rng(0)
    eps = 1e-6
    idx = [tuple(rng.integers(0, s) for s in (2, *shape)) for _ in range(12)] + [(0, 2, 2, 1), (1, 3, 2, 2)]
    for i in idx:
        xp, xm = img.clone(), img.clone()
        xp[i] += eps
        xm[i] -= eps
        fd = (f(xp) - f(xm)) / (2 * eps)
        assert abs(got[i] - fd) <= 1e-5 * max(1.0, abs(fd)), (i, got[i], fd)
    # and with max aggregation a single-voxel domain is the plain gradient of that voxel
    one = _box(shape, (3, 2, 2), (4, 3, 3))
    g1 = instance_smoothgrad(net, img, one, spec, n_samples=1, sigma=0.0, aggregation="max")
    g2 = instance_smoothgrad(net, img, one, spec, n_samples=1, sigma=0.0, aggregation="mean")
    np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-9)


def test_noise_and_input_checks():
    img = random_image((8, 8, 8))
    img[0, 0, 0, 0] = 10.0
    assert noise_sigma(img, 0.05) == pytest.approx(0.05 * float(img[0].max() - img[0].min()))
    assert noise_sigma(img, 0.05, sigma=0.7) == 0.7
    net = TinySegNet(0)
    spec = SlidingWindowSpec((8, 8, 8))
    dom = _box((8, 8, 8), (2, 2, 2), (4, 4, 4))
    a = instance_smoothgrad(net, img, dom, spec, n_samples=2, seed=3)
    b = instance_smoothgrad(net, img, dom, spec, n_samples=2, seed=3)
    c = instance_smoothgrad(net, img, dom, spec, n_samples=2, seed=4)
    assert np.array_equal(a, b) and not np.allclose(a, c)
    with pytest.raises(EmptyDomainError):
        instance_smoothgrad(net, img, np.zeros((8, 8, 8), bool), spec, n_samples=1)
    with pytest.raises(GeometryError):
        instance_smoothgrad(net, img, np.ones((8, 8, 7), bool), spec, n_samples=1)
    with pytest.raises(InputError, match="aggregation"):
        instance_smoothgrad(net, img, dom, spec, n_samples=1, aggregation="median")
    with pytest.raises(InputError, match="sigma"):
        instance_smoothgrad(net, img, dom, spec, n_samples=1, sigma=-1.0)
    # the network's training flag and parameter flags are restored
    net.train()
    instance_smoothgrad(net, img, dom, spec, n_samples=1)
    assert net.training and all(p.requires_grad for p in net.parameters())


def test_bf16_autocast_error_is_small_but_nonzero():
    shape = (10, 10, 8)
    net = TinySegNet(1)
    img = random_image(shape, seed=1)
    spec = SlidingWindowSpec((8, 8, 8), overlap=0.25)
    dom = _box(shape, (3, 3, 3), (5, 5, 5))
    ref = instance_smoothgrad(net, img, dom, spec, n_samples=2)
    low = instance_smoothgrad(net, img, dom, spec, n_samples=2, autocast_dtype=torch.bfloat16)
    rel = np.abs(low - ref).max() / np.abs(ref).max()
    assert 0 < rel < 0.1


def test_exact_ties_follow_raster_order_like_the_naive_loop():
    """Two voxels of Ω, in cells processed in the opposite of raster order, give gradients +1 and -1 at the same
    input voxel: Eq. 3 keeps the one of the voxel first in raster order (as the naive loop does)."""
    net = torch.nn.Conv3d(2, 2, (3, 1, 9), padding=(1, 0, 4), bias=False)
    with torch.no_grad():
        net.weight.zero_()
        net.weight[1, 0, 2, 0, 1] = 1.0  # y[v] += x[v + (1, 0, -3)]
        net.weight[1, 0, 0, 0, 8] = -1.0  # y[v] -= x[v + (-1, 0, 4)]
    shape = (8, 8, 12)
    img = random_image(shape, seed=0)
    inf = SlidingWindowInferer((8, 8, 8), overlap=0.5, mode="constant")
    spec = SlidingWindowSpec.from_inferer(inf)
    dom = np.zeros(shape, bool)
    # cells: {(3,4,2), (6,4,2)} (window 0 only, first in raster order), {(4,4,5)} (both), {(4,4,9)} (window 1 only):
    # (6,4,2) is processed before (4,4,9) although it comes after it in raster order
    for v in [(3, 4, 2), (4, 4, 9), (6, 4, 2), (4, 4, 5)]:
        dom[v] = True
    ref = naive_instance_smoothgrad(net, img, dom, inf, n_samples=1, sigma=0.0)
    assert ref[0, 5, 4, 6] == 1.0
    for backend in ("loop", "batched"):
        got = instance_smoothgrad(net, img, dom, spec, n_samples=1, sigma=0.0, backend=backend)
        np.testing.assert_array_equal(got, ref)
