"""Grad-CAM++ at a named layer, class level (Spagnolo et al. Eq. 4-7) and instance level (Eq. 8-10), through
MONAI's sliding-window inference.

Scores. With the exponential score ``S = exp(y')`` (Chattopadhyay et al. 2018) and ``y'`` piecewise linear in the
activations ``A`` (ReLU networks; the standard Grad-CAM++ assumption, second derivatives of ``y'`` taken as 0), the
higher derivatives have the closed form ``∂S/∂A = S g``, ``∂²S/∂A² = S g²``, ``∂³S/∂A³ = S g³`` with
``g = ∂y'/∂A``, so::

    α_k(ij) = g_k(ij)² / (2 g_k(ij)² + Σ_ab A_k(ab) · g_k(ij)³)      (α = 0 where g = 0 or the denominator is 0)

* class level: ``y' = Σ_{v: p(v) > t} y[v]``; one weight per channel ``w_k = Σ_ij α_k(ij) ReLU(g_k(ij))``;
  ``L = ReLU(Σ_k w_k A_k)``;
* instance level: ``y' = Σ_{v ∈ Ω} y[v]``; a weight per channel and voxel ``w_k(ij) = α_k(ij) ReLU(g_k(ij))`` (no
  spatial sum); ``L = ReLU(Σ_k w_k(ij) A_k(ij))``.

Sliding windows. ``y`` is the blended output, so ``g`` is taken through the blending (window ``w``'s outputs enter
``y'`` with the weights ``imp/count``). The layer's feature map is the set of per-window activation maps of *all*
windows of the inference: ``Σ_ab A_k(ab)`` and the class-level ``Σ_ij`` run over all of them. Each window's CAM
``L_w`` is upsampled (trilinear, ``align_corners=False``) to the window size and the window CAMs are blended exactly
like the logits: ``L(v) = Σ_w imp(v - s_w) L_w(v - s_w) / count(v)``, then the padding is removed. With one window
(image no larger than the ROI) this is the ordinary Grad-CAM++ of that window.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from msxai import THRESHOLD
from msxai.errors import InputError
from msxai.saliency.sliding import SlidingWindowSpec, check_image, network_window_output
from msxai.saliency.smoothgrad import (
    LESION_CHANNEL,
    _autocast,
    as_domain,
    explaining,
    network_device,
)


def resolve_layer(network: torch.nn.Module, name: str) -> torch.nn.Module:
    """``dict(network.named_modules())[name]`` with a message listing candidates when the name is unknown."""
    modules = dict(network.named_modules())
    if name not in modules or not name:
        convs = [n for n, m in modules.items() if n and isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
        hint = ", ".join(convs[-8:]) if convs else ", ".join(list(modules)[1:9])
        raise InputError(f"Grad-CAM++ layer {name!r} is not a module of the network (e.g. {hint})")
    return modules[name]


def gradcampp_alpha(g: torch.Tensor, sum_a: torch.Tensor) -> torch.Tensor:
    """Closed-form α for exponential scores. ``g``: [K, ...] gradients, ``sum_a``: [K] Σ_ab A_k(ab)."""
    shape = (-1,) + (1,) * (g.ndim - 1)
    g2 = g * g
    denom = 2 * g2 + sum_a.reshape(shape) * g2 * g
    ok = (g != 0) & (denom != 0)
    return torch.where(ok, g2 / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(g))


class _Capture:
    def __init__(self, module: torch.nn.Module, name: str):
        self.name = name
        self.value = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if isinstance(output, (list, tuple)):
            output = output[0] if len(output) == 1 else output
        if not torch.is_tensor(output) or output.ndim != 5:
            raise InputError(f"Grad-CAM++ layer {self.name!r} does not output a [B, K, X, Y, Z] tensor")
        self.value = output

    def close(self):
        self.handle.remove()


class GradCAMPlusPlus:
    """Grad-CAM++ of one image at one layer; the full-image pass (logits and Σ A per channel) is done once and
    shared by the class map and every instance map."""

    def __init__(self, network, image, spec: SlidingWindowSpec, layer: str, device=None, autocast_dtype=None,
                 channel: int = LESION_CHANNEL):
        self.network, self.spec, self.layer_name = network, spec, layer
        self.layer = resolve_layer(network, layer)
        self.image = check_image(image)
        self.device = torch.device(device) if device is not None else network_device(network)
        self.autocast_dtype, self.channel = autocast_dtype, channel
        self.grid = spec.grid(self.image.shape[1:])
        self.dtype = self.image.dtype
        self._xp = self.grid.pad_input(self.image[None]).to(self.device)
        self._full_pass()

    def _window(self, w: int) -> torch.Tensor:
        return self._xp[(slice(None), slice(None), *self.grid.window_slices(w))]

    def _forward(self, w: int, cap: _Capture, grad: bool):
        xw = self._window(w)
        if grad:
            xw = xw.clone().requires_grad_(True)  # so that the activations carry a graph (parameters are frozen)
        with torch.set_grad_enabled(grad), _autocast(self.device, self.autocast_dtype):
            out = network_window_output(self.network, xw)
        return out[:, self.channel].to(self.dtype), cap.value

    def _full_pass(self):
        grid = self.grid
        cap = _Capture(self.layer, self.layer_name)
        try:
            with explaining(self.network):
                logits = None
                sum_a = None
                for w in range(grid.num_windows):
                    xw = self._window(w)
                    with torch.no_grad(), _autocast(self.device, self.autocast_dtype):
                        y = network_window_output(self.network, xw).to(self.dtype)
                    if logits is None:
                        logits = torch.zeros((y.shape[1], *grid.padded_shape), dtype=self.dtype, device=self.device)
                    logits[(slice(None), *grid.window_slices(w))] += y[0] * grid.importance.to(self.device, self.dtype)
                    a = cap.value[0].to(self.dtype).sum(dim=(1, 2, 3))
                    sum_a = a if sum_a is None else sum_a + a
        finally:
            cap.close()
        self.logits = grid.crop_output(logits / grid.count_map(self.dtype).to(self.device)).cpu()
        self.sum_a = sum_a

    @property
    def probability(self) -> np.ndarray:
        return torch.softmax(self.logits.float(), dim=0)[self.channel].numpy()

    def _target_weights(self, region_padded: np.ndarray, w: int) -> torch.Tensor | None:
        m = region_padded[self.grid.window_slices(w)]
        if not m.any():
            return None
        c = self.grid.blend_coefficients(w, self.dtype, self.device)
        return (c * torch.as_tensor(m, device=self.device).to(self.dtype))[None]

    def _upsampled(self, cam: torch.Tensor) -> torch.Tensor:
        """[a, b, c] -> window size (trilinear)."""
        if tuple(cam.shape) == tuple(self.grid.roi):
            return cam
        return F.interpolate(cam[None, None], size=self.grid.roi, mode="trilinear", align_corners=False)[0, 0]

    def _blend(self, cams: dict[int, torch.Tensor]) -> np.ndarray:
        grid = self.grid
        out = torch.zeros(grid.padded_shape, dtype=self.dtype, device=self.device)
        imp = grid.importance.to(self.device, self.dtype)
        for w, cam in cams.items():
            out[grid.window_slices(w)] += self._upsampled(cam) * imp
        out = out / grid.count_map(self.dtype).to(self.device)
        return grid.crop_output(out).float().cpu().numpy()

    def _gradients(self, region: np.ndarray):
        """Yield ``(w, A_w [K, a, b, c], g_w [K, a, b, c])`` for the windows on which ``Σ_{v∈region} y[v]`` depends."""
        grid = self.grid
        rp = grid.domain_to_padded(region)
        cap = _Capture(self.layer, self.layer_name)
        try:
            with explaining(self.network):
                for w in grid.windows_covering(region):
                    cot = self._target_weights(rp, w)
                    y, a = self._forward(w, cap, grad=True)
                    g = torch.autograd.grad(y, a, grad_outputs=cot.to(y.dtype))[0]
                    yield w, a[0].detach().to(self.dtype), g[0].to(self.dtype)
        finally:
            cap.close()

    def class_map(self, threshold: float = THRESHOLD, class_mask: np.ndarray | None = None) -> np.ndarray:
        """Class-level Grad-CAM++ (Eq. 4-7) [X, Y, Z]; the class region is ``p > threshold`` unless given."""
        region = self.probability > threshold if class_mask is None else class_mask
        region = as_domain(region, self.image.shape[1:], "class region")
        weights = torch.zeros_like(self.sum_a)
        for _, a, g in self._gradients(region):
            alpha = gradcampp_alpha(g, self.sum_a)
            weights += (alpha * torch.relu(g)).sum(dim=(1, 2, 3))
        cams = {}
        cap = _Capture(self.layer, self.layer_name)
        try:
            with explaining(self.network):
                for w in range(self.grid.num_windows):
                    _, a = self._forward(w, cap, grad=False)
                    cams[w] = torch.relu((weights[:, None, None, None] * a[0].to(self.dtype)).sum(0))
        finally:
            cap.close()
        return self._blend(cams)

    def instance_map(self, domain: np.ndarray, name: str = "domain") -> np.ndarray:
        """Instance-level Grad-CAM++ (Eq. 8-10) of the domain Ω [X, Y, Z]."""
        region = as_domain(domain, self.image.shape[1:], name)
        cams = {}
        for w, a, g in self._gradients(region):
            alpha = gradcampp_alpha(g, self.sum_a)
            cams[w] = torch.relu((alpha * torch.relu(g) * a).sum(0))
        return self._blend(cams)


def gradcampp(network, image, spec: SlidingWindowSpec, layer: str, domain=None, threshold: float = THRESHOLD,
              class_mask=None, device=None, autocast_dtype=None, channel: int = LESION_CHANNEL) -> np.ndarray:
    """Grad-CAM++ map [X, Y, Z]: instance level for ``domain`` (a boolean mask), class level when ``domain`` is None."""
    cam = GradCAMPlusPlus(network, image, spec, layer, device=device, autocast_dtype=autocast_dtype, channel=channel)
    if domain is None:
        return cam.class_map(threshold, class_mask)
    return cam.instance_map(domain)
