"""The exact sliding-window function that produced the segmentation, restricted to the windows that matter.

MONAI's ``sliding_window_inference`` computes, for every output voxel ``v`` (in padded coordinates)::

    y[v] = sum_{w covering v} imp(v - s_w) * f(x_w)[v - s_w] / count[v],   count[v] = sum_{w covering v} imp(v - s_w)

where ``s_w`` are the window starts of ``dense_patch_slices``, ``imp`` the (clamped) importance map of
``compute_importance_map`` and ``f`` the network. ``count`` does not depend on the image, so ``y`` is a linear blend
with constant coefficients ``c_w(v) = imp(v - s_w) / count[v]`` of the window outputs: an output voxel (and its
gradient) depends only on the windows that cover it. ``WindowGrid`` holds that geometry for one image size;
``sliding_window_logits`` reproduces the inferer's output (optionally from a subset of windows, with autograd).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from msxai.errors import GeometryError, InputError

_PAD_MODES = ("constant", "reflect", "replicate", "circular")
_BLEND_MODES = ("constant", "gaussian")


def _enum_value(value) -> str:
    return str(getattr(value, "value", value)).lower()


def _tuple3(value, name: str, cast=float) -> tuple:
    if isinstance(value, (list, tuple, np.ndarray)):
        out = tuple(cast(v) for v in value)
        if len(out) != 3:
            raise ValueError(f"{name} must have 3 values (one per spatial axis), got {value!r}")
        return out
    return (cast(value),) * 3


@dataclass(frozen=True)
class SlidingWindowSpec:
    """The arguments of ``monai.inferers.SlidingWindowInferer`` that define its output values.

    ``roi_size`` components <= 0 fall back to the image size (as in MONAI). ``sw_batch_size`` only changes how many
    windows go through the network at once, never the values.
    """

    roi_size: tuple[int, int, int]
    sw_batch_size: int = 1
    overlap: tuple[float, float, float] = (0.25, 0.25, 0.25)
    mode: str = "constant"
    sigma_scale: tuple[float, float, float] = (0.125, 0.125, 0.125)
    padding_mode: str = "constant"
    cval: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "roi_size", _tuple3(self.roi_size, "roi_size", int))
        object.__setattr__(self, "overlap", _tuple3(self.overlap, "overlap"))
        object.__setattr__(self, "sigma_scale", _tuple3(self.sigma_scale, "sigma_scale"))
        object.__setattr__(self, "mode", _enum_value(self.mode))
        object.__setattr__(self, "padding_mode", _enum_value(self.padding_mode))
        object.__setattr__(self, "sw_batch_size", max(1, int(self.sw_batch_size)))
        object.__setattr__(self, "cval", float(self.cval))
        if any(not 0 <= o < 1 for o in self.overlap):
            raise ValueError(f"overlap must be >= 0 and < 1, got {self.overlap}")
        if self.mode not in _BLEND_MODES:
            raise ValueError(f"mode must be one of {_BLEND_MODES}, got {self.mode!r}")
        if self.padding_mode not in _PAD_MODES:
            raise ValueError(f"padding_mode must be one of {_PAD_MODES}, got {self.padding_mode!r}")

    @classmethod
    def from_inferer(cls, inferer) -> "SlidingWindowSpec":
        """The spec of a ``monai.inferers.SlidingWindowInferer`` (refuses options that change the blending)."""
        if getattr(inferer, "with_coord", False):
            raise ValueError("SlidingWindowInferer(with_coord=True) is not supported by the saliency engine")
        for attr in ("roi_size", "overlap", "mode", "sigma_scale", "padding_mode", "cval", "sw_batch_size"):
            if not hasattr(inferer, attr):
                raise ValueError(f"{type(inferer).__name__} has no attribute {attr!r}; expected a SlidingWindowInferer")
        return cls(
            roi_size=inferer.roi_size,
            sw_batch_size=inferer.sw_batch_size,
            overlap=inferer.overlap,
            mode=inferer.mode,
            sigma_scale=inferer.sigma_scale,
            padding_mode=inferer.padding_mode,
            cval=inferer.cval,
        )

    def to_inferer(self, **kwargs):
        from monai.inferers import SlidingWindowInferer

        return SlidingWindowInferer(
            roi_size=self.roi_size,
            sw_batch_size=self.sw_batch_size,
            overlap=self.overlap,
            mode=self.mode,
            sigma_scale=self.sigma_scale,
            padding_mode=self.padding_mode,
            cval=self.cval,
            **kwargs,
        )

    def grid(self, image_shape: Sequence[int]) -> "WindowGrid":
        return WindowGrid(self, tuple(int(s) for s in image_shape))


def scan_interval(image_size, roi_size, overlap) -> tuple[int, ...]:
    """``monai.inferers.utils._get_scan_interval``: ``int(roi * (1 - overlap))`` (>= 1), or roi when roi == image."""
    out = []
    for img, roi, o in zip(image_size, roi_size, overlap):
        if roi == img:
            out.append(int(roi))
        else:
            interval = int(roi * (1 - o))
            out.append(interval if interval > 0 else 1)
    return tuple(out)


def window_starts(image_size, roi_size, interval) -> np.ndarray:
    """Window start positions of ``monai.data.utils.dense_patch_slices`` ([W, 3], same order: C order over axes)."""
    per_axis = []
    for img, roi, step in zip(image_size, roi_size, interval):
        roi = min(roi, img)
        if step == 0:
            num = 1
        else:
            num = 1
            for d in range(int(math.ceil(float(img) / step))):
                if d * step + roi >= img:
                    num = d + 1
                    break
        starts = []
        for idx in range(num):
            s = idx * step
            s -= max(s + roi - img, 0)
            starts.append(s)
        per_axis.append(starts)
    mesh = np.meshgrid(*per_axis, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1).astype(np.int64)


def importance_map(roi_size, mode: str, sigma_scale) -> torch.Tensor:
    """``monai.data.utils.compute_importance_map`` (float32, incl. its clamping to the smallest positive value)."""
    if mode == "constant":
        imp = torch.ones(tuple(roi_size), dtype=torch.float)
    else:
        sigmas = [r * s for r, s in zip(roi_size, sigma_scale)]
        imp = None
        for i, r in enumerate(roi_size):
            x = torch.arange(start=-(r - 1) / 2.0, end=(r - 1) / 2.0 + 1, dtype=torch.float)
            x = torch.exp(x**2 / (-2 * sigmas[i] ** 2))
            imp = imp.unsqueeze(-1) * x[(None,) * i] if i > 0 else x
    min_non_zero = max(torch.min(imp).item(), 1e-3)
    return torch.clamp_(imp.to(torch.float), min=min_non_zero)


class WindowGrid:
    """Sliding-window geometry for one image size: padding, window starts, importance and count maps.

    Coordinates: *image* coordinates index the unpadded image; *padded* coordinates index the image after MONAI's
    symmetric padding (only along axes where the image is smaller than the ROI); ``padded = image + pad_lo``.
    """

    def __init__(self, spec: SlidingWindowSpec, image_shape: tuple[int, int, int]):
        if len(image_shape) != 3:
            raise ValueError(f"expected a 3-D spatial shape, got {image_shape}")
        self.spec = spec
        self.image_shape = tuple(int(s) for s in image_shape)
        self.roi = tuple(int(r) if r > 0 else s for r, s in zip(spec.roi_size, self.image_shape))
        self.pad = tuple((max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(self.roi, self.image_shape))
        self.padded_shape = tuple(max(r, s) for r, s in zip(self.roi, self.image_shape))
        self.interval = scan_interval(self.padded_shape, self.roi, spec.overlap)
        self.starts = window_starts(self.padded_shape, self.roi, self.interval)
        self.importance = importance_map(self.roi, spec.mode, spec.sigma_scale)
        count = torch.zeros(self.padded_shape, dtype=torch.float)
        for w in range(len(self.starts)):
            count[self.window_slices(w)] += self.importance
        self.count = count
        self._dtype_cache: dict = {}

    # ----------------------------------------------------------------- geometry
    @property
    def num_windows(self) -> int:
        return len(self.starts)

    @property
    def padded(self) -> bool:
        return any(lo or hi for lo, hi in self.pad)

    @property
    def torch_pad(self) -> tuple[int, ...]:
        """Padding in ``F.pad`` order (last axis first)."""
        out: list[int] = []
        for lo, hi in reversed(self.pad):
            out += [lo, hi]
        return tuple(out)

    def window_slices(self, w: int) -> tuple[slice, slice, slice]:
        """Slices of window ``w`` in padded coordinates."""
        return tuple(slice(int(s), int(s) + r) for s, r in zip(self.starts[w], self.roi))

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """MONAI's padding of a [B, C, X, Y, Z] input (identity when the image is at least the ROI)."""
        if not self.padded:
            return x
        spec = self.spec
        if spec.padding_mode == "constant":
            return F.pad(x, self.torch_pad, mode="constant", value=spec.cval)
        return F.pad(x, self.torch_pad, mode=spec.padding_mode)

    def crop_output(self, y: torch.Tensor) -> torch.Tensor:
        """Remove the padding from a [..., X', Y', Z'] tensor in padded coordinates."""
        sl = tuple(slice(lo, lo + s) for (lo, _), s in zip(self.pad, self.image_shape))
        return y[(Ellipsis, *sl)]

    def domain_to_padded(self, mask: np.ndarray) -> np.ndarray:
        """A boolean image-coordinate mask embedded in padded coordinates."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.image_shape:
            raise GeometryError(f"domain shape {mask.shape} does not match the image grid {self.image_shape}")
        if not self.padded:
            return mask
        out = np.zeros(self.padded_shape, dtype=bool)
        out[tuple(slice(lo, lo + s) for (lo, _), s in zip(self.pad, self.image_shape))] = mask
        return out

    def windows_covering(self, mask: np.ndarray) -> list[int]:
        """Indices (in MONAI's order) of the windows that contain at least one voxel of the image-coordinate mask."""
        pm = self.domain_to_padded(mask)
        if not pm.any():
            return []
        idx = np.nonzero(pm)
        lo = [int(i.min()) for i in idx]
        hi = [int(i.max()) + 1 for i in idx]
        out = []
        for w, s in enumerate(self.starts):
            if all(s[d] < hi[d] and s[d] + self.roi[d] > lo[d] for d in range(3)):
                if pm[self.window_slices(w)].any():
                    out.append(w)
        return out

    def blend_coefficients(self, w: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """``c_w = imp / count`` over window ``w`` (the weight of the window's output in the blended output)."""
        key = (w, dtype, str(device))
        if key not in self._dtype_cache:
            imp = self.importance.to(dtype)
            count = self.count_map(dtype)[self.window_slices(w)]
            self._dtype_cache[key] = (imp / count).to(device)
        return self._dtype_cache[key]

    def count_map(self, dtype=torch.float32) -> torch.Tensor:
        """MONAI's count map, accumulated in ``dtype`` in window order."""
        if dtype == torch.float32:
            return self.count
        key = ("count", dtype)
        if key not in self._dtype_cache:
            count = torch.zeros(self.padded_shape, dtype=dtype)
            imp = self.importance.to(dtype)
            for w in range(self.num_windows):
                count[self.window_slices(w)] += imp
            self._dtype_cache[key] = count
        return self._dtype_cache[key]

    def box_of(self, windows: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """Padded-coordinate bounding box ``((lo, hi),) * 3`` of a set of windows."""
        st = self.starts[list(windows)]
        return tuple((int(st[:, d].min()), int(st[:, d].max()) + self.roi[d]) for d in range(3))

    def support_box(self, windows: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """Image-coordinate box of the input voxels the windows read (axes that are padded span the whole axis)."""
        box = self.box_of(windows)
        out = []
        for d, (lo, hi) in enumerate(box):
            if self.pad[d][0] or self.pad[d][1]:
                out.append((0, self.image_shape[d]))
            else:
                out.append((lo, hi))
        return tuple(out)


def check_image(image, name: str = "image") -> torch.Tensor:
    """A [C, X, Y, Z] (or [1, C, X, Y, Z]) array/tensor as a [C, X, Y, Z] tensor."""
    t = torch.as_tensor(image)
    if t.ndim == 5 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 4:
        raise InputError(f"{name}: expected a [C, X, Y, Z] array, got shape {tuple(t.shape)}")
    if not torch.is_floating_point(t):
        t = t.float()
    return t


def network_window_output(network, xw: torch.Tensor) -> torch.Tensor:
    """Run the network on a window batch and return its (single) output tensor [B, K, ...]."""
    out = network(xw)
    if isinstance(out, (list, tuple)):
        out = out[0]
    if isinstance(out, dict):
        raise ValueError("networks returning dicts are not supported; wrap the network to return the logits tensor")
    if out.shape[2:] != xw.shape[2:]:
        raise ValueError(
            f"the network output spatial size {tuple(out.shape[2:])} differs from its input window {tuple(xw.shape[2:])};"
            " the saliency engine needs same-size segmentation outputs"
        )
    return out


def sliding_window_logits(
    network,
    image: torch.Tensor,
    spec: SlidingWindowSpec,
    windows: Sequence[int] | None = None,
    grid: WindowGrid | None = None,
) -> torch.Tensor:
    """The blended output of ``SlidingWindowInferer`` on a [B, C, X, Y, Z] tensor (differentiable).

    With ``windows`` only those windows are evaluated; the result is then exact wherever all covering windows are
    included (the denominator is always MONAI's full count map).
    """
    if image.ndim != 5:
        raise ValueError(f"expected [B, C, X, Y, Z], got {tuple(image.shape)}")
    grid = grid or spec.grid(image.shape[2:])
    xp = grid.pad_input(image)
    wins = list(range(grid.num_windows)) if windows is None else list(windows)
    out = None
    B = image.shape[0]
    imp = grid.importance.to(device=image.device, dtype=image.dtype)
    for i in range(0, len(wins), spec.sw_batch_size):
        chunk = wins[i : i + spec.sw_batch_size]
        xw = torch.cat([xp[(slice(None), slice(None), *grid.window_slices(w))] for w in chunk])
        yw = network_window_output(network, xw)
        if out is None:
            out = torch.zeros((B, yw.shape[1], *grid.padded_shape), dtype=image.dtype, device=image.device)
        for j, w in enumerate(chunk):
            out[(slice(None), slice(None), *grid.window_slices(w))] += yw[j * B : (j + 1) * B].to(image.dtype) * imp
    if out is None:
        raise ValueError("no window to evaluate")
    out = out / grid.count_map(image.dtype).to(image.device)
    return grid.crop_output(out)
