"""The CPU kernel rerouting (msxai.saliency.cpu_kernels) against its slow twin, plain PyTorch: same outputs and input
gradients (float32 rounding only; PReLU bit-identical), each rule actually fires, and everything it must not touch
(weight gradients, per-channel PReLU, other dtypes, the backward of transposed convolutions) is left alone."""

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from msxai.saliency.cpu_kernels import CPUKernels, cpu_kernels
from msxai.saliency.sliding import SlidingWindowSpec
from msxai.saliency.smoothgrad import explaining, instance_smoothgrad

from saliency_helpers import random_image

torch.set_num_threads(1)


def _run(net, x, cot, mode):
    """Output and input gradient of <cot, net(x)> (weights frozen as in the engine), forward and backward with or
    without the rerouting mode."""
    with explaining(net):
        xs = x.clone().requires_grad_(True)
        with mode if mode is not None else cpu_kernels(False):
            y = net(xs)
        with mode if mode is not None else cpu_kernels(False):
            return y.detach(), torch.autograd.grad(y, xs, cot)[0]


def _grads(net, x, cot, mode):
    return _run(net, x, cot, mode)[1]


def _bundle_like_unet():
    # the bundle UNet's structure (PReLU with one slope, instance norm, strided 2-channel first convolution, 2->2
    # output convolution), narrower
    torch.manual_seed(0)
    return UNet(3, 2, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=2, norm="instance")


def test_unet_vjp_equals_plain_backward_and_every_rule_fires():
    net = _bundle_like_unet()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 16, 16, 16, generator=g)
    cot = torch.zeros(3, 2, 16, 16, 16)
    cot[:, 1, 7, 8, 9] = 1.0
    cot[1, 1, 2, 3, 4] = -0.5
    yref, ref = _run(net, x, cot, None)
    mode = CPUKernels()
    y, got = _run(net, x, cot, mode)
    assert set(mode.rerouted) == {"conv_transposed_native", "conv_channels_last", "conv_strided_native",
                                  "prelu_single_slope"}
    np.testing.assert_allclose(y.numpy(), yref.numpy(), rtol=1e-5, atol=1e-6 * float(yref.abs().max()))
    assert got.is_contiguous() and got.shape == ref.shape
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    assert float(ref.abs().max()) > 0


def test_prelu_rule_is_bit_identical_and_leaves_other_cases_alone():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, 6, 7, generator=g)
    cot = torch.randn(2, 3, 5, 6, 7, generator=g)
    single = torch.nn.PReLU(init=0.3)
    mode = CPUKernels()
    assert torch.equal(_grads(single, x, cot, mode), _grads(single, x, cot, None))
    assert mode.rerouted == {"prelu_single_slope": 1}
    # one slope per channel: not rerouted, same result
    per_channel = torch.nn.PReLU(num_parameters=3, init=0.2)
    mode = CPUKernels()
    assert torch.equal(_grads(per_channel, x, cot, mode), _grads(per_channel, x, cot, None))
    assert mode.rerouted == {}
    # a weight that requires grad (outside the engine): not rerouted, the weight gradient is still right
    xs = x.clone().requires_grad_(True)
    with CPUKernels() as mode:
        gx, gw = torch.autograd.grad(single(xs), (xs, single.weight), cot)
    rx, rw = torch.autograd.grad(single(xs), (xs, single.weight), cot)
    assert mode.rerouted == {} and torch.equal(gx, rx) and torch.equal(gw, rw)


def test_conv_rules_leave_weight_gradients_float64_and_transposed_backward_alone():
    torch.manual_seed(3)
    conv = torch.nn.Conv3d(2, 2, 3, padding=1)
    x = torch.randn(2, 2, 8, 8, 8, requires_grad=True)
    cot = torch.randn(2, 2, 8, 8, 8)
    with CPUKernels() as mode:  # weight gradient requested
        got = torch.autograd.grad(conv(x), (x, conv.weight), cot)
    ref = torch.autograd.grad(conv(x), (x, conv.weight), cot)
    assert mode.rerouted == {} and all(torch.equal(a, b) for a, b in zip(got, ref))
    conv64 = torch.nn.Conv3d(2, 2, 3, padding=1).double()
    mode = CPUKernels()
    assert torch.equal(_grads(conv64, x.detach().double(), cot.double(), mode),
                       _grads(conv64, x.detach().double(), cot.double(), None))
    assert mode.rerouted == {}
    # strided transposed convolution to 2 channels: the forward is rerouted (same values up to rounding), its
    # backward (a strided convolution from 2 channels) is not; to 3 channels: nothing is rerouted
    up = torch.nn.ConvTranspose3d(4, 2, 3, stride=2, padding=1, output_padding=1)
    x4 = torch.randn(2, 4, 8, 8, 8)
    cot_up = torch.randn(2, 2, 16, 16, 16)
    mode = CPUKernels()
    (y, got), (yref, ref) = _run(up, x4, cot_up, mode), _run(up, x4, cot_up, None)
    assert mode.rerouted == {"conv_transposed_native": 1}
    np.testing.assert_allclose(y.numpy(), yref.numpy(), rtol=1e-5, atol=1e-6 * float(yref.abs().max()))
    assert torch.equal(got, ref)
    up3 = torch.nn.ConvTranspose3d(4, 3, 3, stride=2, padding=1, output_padding=1)
    mode = CPUKernels()
    cot3 = torch.randn(2, 3, 16, 16, 16)
    assert all(torch.equal(a, b) for a, b in zip(_run(up3, x4, cot3, mode), _run(up3, x4, cot3, None)))
    assert mode.rerouted == {}


@pytest.mark.parametrize("aggregation", ["max", "mean"])
def test_engine_with_and_without_rerouting(aggregation):
    net = _bundle_like_unet()
    shape = (24, 20, 16)
    img = random_image(shape, seed=4)
    spec = SlidingWindowSpec((16, 16, 16), overlap=0.25, mode="gaussian")
    dom = np.zeros(shape, bool)
    dom[14:17, 9:11, 7] = True  # straddles windows
    kw = dict(n_samples=2, seed=1, aggregation=aggregation, noise_batch=2)
    fast = instance_smoothgrad(net, img, dom, spec, **kw)
    plain = instance_smoothgrad(net, img, dom, spec, cpu_kernels=False, **kw)
    assert np.abs(plain).max() > 0
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-6 * np.abs(plain).max())
