"""Faster CPU kernels for the operations that dominate instance SmoothGrad on the CPU — same arithmetic.

On the CPU (float32, one thread) a window forward/backward of a MONAI UNet is dominated by convolutions; a few kinds
get a slow oneDNN (mkldnn) kernel, and PReLU's backward computes a full-size weight gradient nobody uses.
:class:`CPUKernels` is a ``TorchDispatchMode`` (below autograd: the recorded graph is unchanged) active only around
the engine's window forwards and ``torch.autograd.grad`` calls; it reroutes exactly these operations (measured on a
2-core AVX2 machine, oneDNN 3.12, batch 4-8, 32³, thread CPU time):

* forward of strided transposed convolutions with at most 2 output channels (the last up-sampling convolution of a
  2-class UNet, 32→2): PyTorch's native kernel instead of oneDNN's (3.4× faster);

backward, input gradient only:

* stride-1 convolutions with at most 4 output channels (e.g. the 2→2 output convolution of a 2-class UNet): the
  same oneDNN kernel in ``channels_last_3d`` memory format (2.3× faster for 2→2, 1.5× for 2→4 / 4→4; slower for
  ≥ 8 output channels, which keep the default);
* strided convolutions with at most 2 input channels (the first, down-sampling convolution reading the 2-channel
  image): PyTorch's native kernel instead of oneDNN's (1.6-3.6× faster);
* PReLU with a single parameter (MONAI's default): ``leaky_relu_backward`` with that slope, the input gradient only
  (``x > 0 ? g : g·a``, the same products; PReLU's own kernel also writes an input-sized weight gradient).

Only the summation order inside a convolution changes (float32 rounding, ~1e-7 relative); the PReLU rule is
bit-identical. Everything else (other dtypes, devices, weight gradients, grouped/dilated convolutions, the
backward of transposed convolutions) goes through unchanged. ``tests/test_saliency_cpu_kernels.py`` holds outputs
and VJPs with and without the mode together.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
_CL = torch.channels_last_3d


def _plain_cpu_float32(*tensors) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 5 for t in tensors)


class CPUKernels(TorchDispatchMode):
    """Reroutes the slow CPU kernels listed in the module docstring; counts the rerouted calls in ``self.rerouted``
    (rule name -> calls)."""

    def __init__(self):
        super().__init__()
        self.rerouted: dict[str, int] = {}

    def _count(self, rule: str) -> None:
        self.rerouted[rule] = self.rerouted.get(rule, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten.convolution_backward.default and not kwargs:
            out = self._convolution_backward(func, args)
            if out is not None:
                return out
        elif func is _aten.convolution.default and not kwargs:
            out = self._convolution(func, args)
            if out is not None:
                return out
        elif func is _aten._prelu_kernel_backward.default and not kwargs:
            grad, x, weight = args
            if (weight.numel() == 1 and not weight.requires_grad and x.device.type == "cpu"
                    and x.dtype in (torch.float32, torch.float64) and grad.dtype == x.dtype == weight.dtype):
                self._count("prelu_single_slope")
                gi = _aten.leaky_relu_backward.default(grad, x, float(weight.reshape(())), False)
                # the weight gradient (input-sized, summed by autograd) is not needed: the weight does not require grad
                return gi, torch.zeros((), dtype=weight.dtype, device=weight.device).expand(gi.shape)
        return func(*args, **kwargs)

    def _native(self, rule, func, args):
        self._count(rule)
        torch.backends.mkldnn.enabled = False
        try:
            return func(*args)
        finally:
            torch.backends.mkldnn.enabled = True

    def _convolution(self, func, args):
        x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = args
        if not transposed or groups != 1 or any(d != 1 for d in dilation) or all(s == 1 for s in stride):
            return None
        if not _plain_cpu_float32(x, weight) or not torch.backends.mkldnn.is_available():
            return None
        if not torch.backends.mkldnn.enabled or weight.shape[1] > 2:
            return None
        return self._native("conv_transposed_native", func, args)

    def _convolution_backward(self, func, args):
        (grad_out, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups,
         output_mask) = args
        if transposed or groups != 1 or any(d != 1 for d in dilation) or list(output_mask) != [True, False, False]:
            return None
        if not _plain_cpu_float32(grad_out, x, weight) or not torch.backends.mkldnn.is_available():
            return None
        if not torch.backends.mkldnn.enabled:
            return None
        if all(s == 1 for s in stride) and weight.shape[0] <= 4:
            self._count("conv_channels_last")
            g, xx, ww = (t.contiguous(memory_format=_CL) for t in (grad_out, x, weight))
            gi, gw, gb = func(g, xx, ww, bias_sizes, stride, padding, dilation, transposed, output_padding, groups,
                              output_mask)
            return gi.contiguous(), gw, gb
        if any(s > 1 for s in stride) and weight.shape[1] <= 2:
            return self._native("conv_strided_native", func, args)
        return None


def cpu_kernels(enabled: bool = True):
    """A :class:`CPUKernels` mode (a context manager) if ``enabled``, else a null context."""
    return CPUKernels() if enabled else contextlib.nullcontext()
