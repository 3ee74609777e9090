"""Instance-level SmoothGrad (Spagnolo et al., Eq. 2 and 3) and class-level SmoothGrad, exact and fast.

For a domain Ω (any boolean mask on the image grid) and N noisy copies ``x_n = x + ε_n``, ``ε_n ~ N(0, σ²)``:

* ``aggregation="max"`` (Eq. 3, default): ``M(u) = 1/N Σ_n g_n(u)`` where ``g_n(u)`` is, among the per-output-voxel
  gradients ``∂y[v']/∂x(u)`` (``v' ∈ Ω``, evaluated at ``x_n``), the one with the largest absolute value (sign kept);
* ``aggregation="mean"`` (Eq. 2): ``M = 1/N Σ_n 1/|Ω| Σ_{v'∈Ω} ∂y[v']/∂x`` (one backward per copy, by linearity);
* ``class_smoothgrad``: ``M = 1/N Σ_n ∂(Σ_{v: p(v) > t} y[v])/∂x`` over the whole predicted class region.

``y`` is the lesion logit (channel 1, before softmax) of MONAI's sliding-window inference. Only the windows that
cover Ω are evaluated (exact: see :mod:`msxai.saliency.sliding`). Many output voxels go through one backward as a
batch of vector-Jacobian products (``backend``: ``"batched"`` = ``torch.autograd.grad(is_grads_batched=True)``,
``"vmap"`` = ``torch.func.vmap`` over ``torch.func.vjp``, ``"loop"`` = one backward per voxel; ``"auto"`` tries
``batched`` and falls back to ``loop``), noise copies are batched, and the window forwards of a group of domains are
shared by all of them.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from msxai import THRESHOLD
from msxai.errors import EmptyDomainError, GeometryError, InputError
from msxai.saliency.cpu_kernels import cpu_kernels as cpu_kernel_mode
from msxai.saliency.sliding import (
    SlidingWindowSpec,
    WindowGrid,
    check_image,
    network_window_output,
    sliding_window_logits,
)

AGGREGATIONS = ("max", "mean")
BACKENDS = ("auto", "batched", "vmap", "loop")
LESION_CHANNEL = 1


# --------------------------------------------------------------------------------------------------- helpers
def network_device(network) -> torch.device:
    for p in network.parameters():
        return p.device
    for b in network.buffers():
        return b.device
    return torch.device("cpu")


@contextlib.contextmanager
def explaining(network):
    """Eval mode (BatchNorm/Dropout frozen: noise copies and windows stay independent) and no parameter gradients
    for the duration; the previous state is restored afterwards."""
    was_training = network.training
    flags = [(p, p.requires_grad) for p in network.parameters()]
    network.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield network
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        network.train(was_training)


def noise_sigma(image: torch.Tensor, sigma_fraction: float | None = 0.05, sigma: float | None = None) -> float:
    """σ of the SmoothGrad noise: absolute ``sigma`` if given, else ``sigma_fraction × (max − min)`` of the FLAIR
    channel (channel 0), as in the authors' code. The same σ is used for every channel."""
    if sigma is not None:
        if sigma < 0:
            raise InputError(f"the noise sigma must be >= 0, got {sigma}")
        return float(sigma)
    if sigma_fraction is None or sigma_fraction < 0:
        raise InputError(f"the noise fraction must be >= 0, got {sigma_fraction}")
    flair = image[0]
    return float(sigma_fraction) * float(flair.max() - flair.min())


def noise_samples(shape, n_samples: int, sigma: float, seed: int, dtype=torch.float32) -> Iterator[torch.Tensor]:
    """The SmoothGrad noise ``ε_n`` (n = 0..N-1), full-image tensors drawn one after another from a CPU
    ``torch.Generator(seed)``, so maps do not depend on the device, the box or the batching."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    for _ in range(int(n_samples)):
        eps = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
        yield (eps * sigma).to(dtype)


def as_domain(mask, shape, name: str = "domain") -> np.ndarray:
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise GeometryError(f"{name}: shape {m.shape} does not match the image grid {tuple(shape)}")
    m = m.astype(bool)
    if not m.any():
        raise EmptyDomainError(f"{name}: the domain is empty (no voxel)")
    return m


def _box_slices(box) -> tuple[slice, slice, slice]:
    return tuple(slice(lo, hi) for lo, hi in box)


def _sub_box(inner, outer) -> tuple[slice, slice, slice]:
    """Slices of the image-coordinate box ``inner`` inside the box ``outer`` (which contains it)."""
    return tuple(slice(lo - olo, hi - olo) for (lo, hi), (olo, _) in zip(inner, outer))


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------------- core
class WindowJacobian:
    """The lesion logits of a set of windows as a differentiable function of the input box they read.

    ``xs``: a leaf tensor [B, C, *box] (B noisy copies of the image restricted to the image-coordinate ``box``);
    ``vjp(cotangents)`` maps per-window cotangents ``{w: [K, B, *roi]}`` to ``[K, B, C, *box]`` (the gradients of K
    linear functionals of the blended output, each evaluated for the B copies).
    """

    def __init__(self, network, grid: WindowGrid, windows: Sequence[int], xs: torch.Tensor, box, backend="batched",
                 autocast_dtype=None, channel: int = LESION_CHANNEL, cpu_kernels: bool = False):
        if backend not in ("batched", "vmap", "loop"):
            raise ValueError(f"backend must be batched, vmap or loop, got {backend!r}")
        self.network, self.grid, self.windows, self.box = network, grid, list(windows), box
        self.backend, self.autocast_dtype, self.channel = backend, autocast_dtype, channel
        # faster CPU kernels (same arithmetic, msxai.saliency.cpu_kernels): plain forward/backward passes only
        self.cpu_kernels = bool(cpu_kernels) and backend == "loop" and xs.device.type == "cpu"
        self.xs = xs
        self.outputs: dict[int, torch.Tensor] = {}
        self.vjp_fns: dict[int, Callable] = {}
        for w in self.windows:
            if backend == "vmap":
                out, fn = torch.func.vjp(lambda t, w=w: self._window_fn(t, w), xs)
                self.outputs[w], self.vjp_fns[w] = out.detach(), fn
            else:
                with cpu_kernel_mode(self.cpu_kernels):
                    self.outputs[w] = self._window_fn(xs, w)

    def _window_fn(self, xs: torch.Tensor, w: int) -> torch.Tensor:
        """Lesion logits [B, *roi] of window ``w``."""
        xp = self.grid.pad_input(xs)
        sl = tuple(
            slice(s - lo, s - lo + r) for s, (lo, _), r in zip(self.grid.starts[w], self.box, self.grid.roi)
        )
        xw = xp[(slice(None), slice(None), *sl)]
        with _autocast(xs.device, self.autocast_dtype):
            out = network_window_output(self.network, xw)
        return out[:, self.channel].to(xs.dtype)

    def vjp(self, cotangents: Mapping[int, torch.Tensor], region=None) -> torch.Tensor:
        """``[K, B, C, *box]``, or only ``region`` (3 slices of the box) of it."""
        wins = [w for w in cotangents]
        cots = [cotangents[w] for w in wins]
        K = cots[0].shape[0]
        idx = (slice(None), slice(None), slice(None), *(region or ()))
        if self.backend == "vmap":
            total = None
            for w, c in zip(wins, cots):
                g = torch.func.vmap(self.vjp_fns[w])(c)[0]
                total = g if total is None else total + g
            return total[idx]
        outs = [self.outputs[w] for w in wins]
        if self.backend == "batched":
            return torch.autograd.grad(outs, self.xs, grad_outputs=cots, retain_graph=True,
                                       is_grads_batched=True)[0][idx]
        with cpu_kernel_mode(self.cpu_kernels):
            grads = [
                torch.autograd.grad(outs, self.xs, grad_outputs=[c[k] for c in cots], retain_graph=True)[0][idx[1:]]
                for k in range(K)
            ]
        return torch.stack(grads)


@dataclass
class _DomainState:
    name: str
    mask_padded: np.ndarray
    voxels: np.ndarray  # [V, 3] padded coordinates, raster order
    windows: list[int]
    acc: torch.Tensor | None = None  # [C, *box] sum over the noise copies


def _voxel_cotangents(grid: WindowGrid, windows, voxels: np.ndarray, B: int, dtype, device) -> dict[int, torch.Tensor]:
    """Per-window cotangents [K, B, *roi] selecting ``y[v']`` for each of the K voxels (one-hot × c_w(v'))."""
    K = len(voxels)
    cots = {}
    for w in windows:
        s = grid.starts[w]
        local = voxels - s
        inside = np.all((local >= 0) & (local < np.asarray(grid.roi)), axis=1)
        if not inside.any():
            continue
        k_idx = np.nonzero(inside)[0]
        loc = local[inside]
        coef = grid.blend_coefficients(w, dtype, device)
        c = torch.zeros((K, *grid.roi), dtype=dtype, device=device)
        li = [torch.as_tensor(loc[:, d], device=device) for d in range(3)]
        c[(torch.as_tensor(k_idx, device=device), *li)] = coef[tuple(li)]
        cots[w] = c[:, None].expand(K, B, *grid.roi)
    return cots


def _region_cotangents(grid: WindowGrid, windows, mask_padded: np.ndarray, scale: float, B: int, dtype, device):
    """Per-window cotangents [B, *roi] of ``scale × Σ_{v∈region} y[v]``."""
    cots = {}
    for w in windows:
        m = torch.as_tensor(mask_padded[grid.window_slices(w)], device=device)
        if not bool(m.any()):
            continue
        c = grid.blend_coefficients(w, dtype, device) * m.to(dtype) * scale
        cots[w] = c[None].expand(B, *grid.roi)
    return cots


class _MaxAbs:
    """Running Eq. 3 reduction over the voxels of Ω: per input element, the gradient of largest |.| (sign kept);
    on exact ties the voxel that comes first in raster order wins, whatever order the voxels are processed in.

    State over the whole box ``shape``; an update may cover only a ``region`` of it (the input box of a cell's
    windows: the gradient is exactly 0 outside). Skipping those zeros changes nothing but the rank recorded where
    the running value is 0 (and the sign of that zero) — which never decides a later comparison (a non-zero gradient
    beats 0 whatever the rank; another 0 leaves the value 0)."""

    _NONE = torch.iinfo(torch.int32).max  # rank of "no voxel yet" (ranks index Ω's voxels: < 2**31)

    def __init__(self, shape, dtype, device):
        self.value = torch.zeros(shape, dtype=dtype, device=device)
        self.absval = torch.zeros(shape, dtype=dtype, device=device)
        self.index = torch.full(shape, self._NONE, dtype=torch.int32, device=device)

    def update(self, g: torch.Tensor, order, region=None) -> None:
        """``g``: [k, B, C, *region] gradients of k voxels with raster ranks ``order`` [k] (element-wise passes, in
        order); ``region``: 3 slices of the box (default: all of it)."""
        idx = (slice(None), slice(None), *(region or ()))
        v, av, ix = self.value[idx], self.absval[idx], self.index[idx]  # views, updated in place
        g = g.detach()
        for k, rank in enumerate(int(r) for r in order):
            gk = g[k]
            a = gk.abs()
            take = a > av
            tie = a == av
            tie &= ix > rank
            take |= tie
            torch.where(take, gk, v, out=v)
            torch.where(take, a, av, out=av)
            ix.masked_fill_(take, rank)


def _voxel_cells(grid: WindowGrid, windows: Sequence[int], voxels: np.ndarray) -> list[tuple[list[int], np.ndarray]]:
    """Split Ω's voxels (raster order) into cells with the same set of covering windows: ``[(windows, rows)]``,
    ordered by each cell's first voxel; ``rows`` index ``voxels`` and increase."""
    roi = np.asarray(grid.roi)
    inside = np.stack([np.all((voxels >= grid.starts[w]) & (voxels < grid.starts[w] + roi), axis=1) for w in windows],
                      axis=1)
    keys, first, inverse = np.unique(inside, axis=0, return_index=True, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    cells = []
    for c in np.argsort(first):
        rows = np.nonzero(inverse == c)[0]
        cells.append(([w for w, on in zip(windows, keys[c]) if on], rows))
    return cells


def _group_domains(grid: WindowGrid, states: list[_DomainState], max_windows: int) -> list[list[_DomainState]]:
    """Consecutive domains (ordered by their first window) whose union of windows stays within ``max_windows``."""
    order = sorted(states, key=lambda s: (s.windows[0], s.windows))
    groups: list[list[_DomainState]] = []
    current: list[_DomainState] = []
    union: set[int] = set()
    for s in order:
        new = union | set(s.windows)
        if current and len(new) > max(max_windows, len(s.windows)):
            groups.append(current)
            current, new = [], set(s.windows)
        current.append(s)
        union = new
    if current:
        groups.append(current)
    return groups


def _resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: batched VJPs (vmap over the backward) on CUDA; on the CPU one backward per voxel over the batch of
    noise copies, which measured faster there (``docs/saliency.md``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "batched" if device.type == "cuda" else "loop"
    return backend


def instance_smoothgrad_many(
    network,
    image,
    domains: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    spec: SlidingWindowSpec,
    n_samples: int = 50,
    sigma_fraction: float = 0.05,
    sigma: float | None = None,
    aggregation: str = "max",
    seed: int = 0,
    noise_batch: int | None = None,
    max_batch: int | None = None,
    backend: str = "auto",
    device=None,
    autocast_dtype=None,
    max_group_windows: int = 8,
    channel: int = LESION_CHANNEL,
    memory_mb: float | None = None,
    cpu_kernels: bool = True,
    checkpoint: Callable[[dict], None] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Instance SmoothGrad for several domains; yields ``(name, map [C, X, Y, Z] float32)`` per domain.

    Domains are processed in groups whose windows are forwarded once per noise batch and shared; a result is
    yielded as soon as its group is done, so memory does not grow with the number of domains. Every domain sees the
    same noise copies (drawn from ``seed``), so its map does not depend on which other domains are explained.

    ``noise_batch``: noisy copies per forward (default 8 on CPU, 4 on CUDA), lowered per group so that the retained
    window graphs (measured for one copy of one window) fit in ``memory_mb`` (default: half the free CUDA memory,
    a quarter of the RAM on CPU); ``max_batch``: vector-Jacobian products per backward (voxels × copies; default 32
    on CPU, 64 on CUDA); ``autocast_dtype``: e.g. ``torch.bfloat16`` for a reduced-precision forward/backward (not
    the default); ``cpu_kernels``: reroute a few slow CPU kernels to equivalent faster ones
    (:mod:`msxai.saliency.cpu_kernels`; CPU, ``loop`` back-end, float32 only); ``checkpoint``: called after every
    noise batch of every group with ``{"domains": [names], "copies": n}`` (a server yields to other work or cancels
    there by raising; it changes nothing in the maps).
    """
    if aggregation not in AGGREGATIONS:
        raise InputError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if int(n_samples) < 1:
        raise InputError(f"the number of noise samples must be >= 1, got {n_samples}")
    img = check_image(image)
    device = torch.device(device) if device is not None else network_device(network)
    fallback = backend == "auto" and device.type == "cuda"
    backend = _resolve_backend(backend, device)
    grid = spec.grid(img.shape[1:])
    dtype = img.dtype
    items = list(domains.items()) if isinstance(domains, Mapping) else list(domains)
    if not items:
        return
    states = []
    for name, mask in items:
        m = as_domain(mask, img.shape[1:], str(name))
        mp = grid.domain_to_padded(m)
        states.append(_DomainState(str(name), mp, np.argwhere(mp), grid.windows_covering(m)))
    sig = noise_sigma(img, sigma_fraction, sigma)
    n_samples = int(n_samples)
    if noise_batch is None:
        noise_batch = 4 if device.type == "cuda" else 8
    B = max(1, min(int(noise_batch), n_samples))
    if max_batch is None:
        max_batch = 64 if device.type == "cuda" else 32

    with explaining(network):
        per_window_copy = graph_bytes_per_copy(network, grid, img, device, autocast_dtype, channel)
        budget = (memory_mb * 2**20) if memory_mb is not None else default_memory_budget(device)
        for group in _group_domains(grid, states, max_group_windows):
            windows = sorted(set().union(*[s.windows for s in group]))
            Bg = max(1, min(B, int(budget // max(1, per_window_copy * len(windows)))))
            K = max(1, int(max_batch) // Bg)
            box = grid.support_box(windows)
            bsl = _box_slices(box)
            for s in group:
                s.acc = torch.zeros((img.shape[0], *[hi - lo for lo, hi in box]), dtype=dtype, device=device)
            noise = noise_samples(img.shape, n_samples, sig, seed, dtype)
            for nb in noise_batches(n_samples, Bg):
                xs = torch.stack([(img + next(noise))[(slice(None), *bsl)] for _ in range(nb)]).to(device)
                xs.requires_grad_(True)
                args = (network, grid, windows, xs, box, group, aggregation, K, nb, dtype, device)
                try:
                    _accumulate_group(*args, backend, autocast_dtype, channel, cpu_kernels)
                except RuntimeError as exc:
                    if not fallback or backend == "loop":
                        raise
                    warnings.warn(f"batched VJP failed ({exc}); falling back to one backward per voxel")
                    backend = "loop"
                    _accumulate_group(*args, backend, autocast_dtype, channel, cpu_kernels)
                if checkpoint is not None:
                    checkpoint({"domains": [s.name for s in group], "copies": nb})
            for s in group:
                out = np.zeros(img.shape, dtype=np.float32)
                out[(slice(None), *bsl)] = (s.acc / n_samples).float().cpu().numpy()
                s.acc = None
                yield s.name, out


def noise_batches(n_samples: int, batch: int) -> list[int]:
    """Sizes of the noise batches: as few batches of at most ``batch`` copies as possible, balanced (50 copies at
    most 16 per batch: 13, 13, 12, 12 — not 16, 16, 16, 2, whose last small batch runs at a poor per-copy speed on the
    CPU). The copies are still drawn in order, so the maps do not depend on the batching."""
    n = max(1, -(-int(n_samples) // max(1, int(batch))))
    q, r = divmod(int(n_samples), n)
    return [q + 1] * r + [q] * (n - r)


def default_memory_budget(device: torch.device) -> float:
    """Bytes the retained window graphs may use: half the free CUDA memory, or a quarter of the RAM on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.5 * free
    try:
        import os

        return 0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def graph_bytes_per_copy(network, grid: WindowGrid, img: torch.Tensor, device, autocast_dtype=None,
                         channel: int = LESION_CHANNEL) -> int:
    """Bytes autograd keeps for the backward of one window forward of one copy (distinct storages of the saved
    tensors), measured on the first window."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except (RuntimeError, NotImplementedError):
            seen[id(t)] = t.numel() * t.element_size()
        return t

    xp = grid.pad_input(img[None])
    xw = xp[(slice(None), slice(None), *grid.window_slices(0))].to(device).clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(device, autocast_dtype):
        out = network_window_output(network, xw)[:, channel]
    del out
    return int(sum(seen.values())) + xw.numel() * xw.element_size()


def _accumulate_group(network, grid, windows, xs, box, group, aggregation, K, nb, dtype, device, backend,
                      autocast_dtype, channel, cpu_kernels=False):
    # partial sums must not leak into the accumulators if this call fails and is retried
    jac = WindowJacobian(network, grid, windows, xs, box, backend=backend, autocast_dtype=autocast_dtype,
                         channel=channel, cpu_kernels=cpu_kernels)
    results = []
    for s in group:
        if aggregation == "mean":
            cots = _region_cotangents(grid, s.windows, s.mask_padded, 1.0 / len(s.voxels), nb, dtype, device)
            g = jac.vjp({w: c[None] for w, c in cots.items()})[0]  # [B, C, box]
            results.append(g.sum(0))
        else:
            best = _MaxAbs(xs.shape, dtype, device)
            for cell_windows, rows in _voxel_cells(grid, s.windows, s.voxels):
                region = _sub_box(grid.support_box(cell_windows), box)
                for i in range(0, len(rows), K):
                    chunk = rows[i : i + K]
                    cots = _voxel_cotangents(grid, cell_windows, s.voxels[chunk], nb, dtype, device)
                    g = jac.vjp(cots, region)  # [k, B, C, region]
                    best.update(g, chunk, region)
            results.append(best.value.sum(0))
    for s, r in zip(group, results):
        s.acc += r.detach()


def instance_smoothgrad(
    network,
    image,
    domain,
    spec: SlidingWindowSpec,
    n_samples: int = 50,
    sigma_fraction: float = 0.05,
    sigma: float | None = None,
    aggregation: str = "max",
    seed: int = 0,
    **kwargs,
) -> np.ndarray:
    """Instance SmoothGrad of one domain Ω (boolean mask [X, Y, Z]) -> map [C, X, Y, Z] (one per input sequence).

    See :func:`instance_smoothgrad_many` for the performance options (``noise_batch``, ``max_batch``, ``backend``,
    ``device``, ``autocast_dtype``)."""
    for _, m in instance_smoothgrad_many(network, image, {"domain": domain}, spec, n_samples=n_samples,
                                         sigma_fraction=sigma_fraction, sigma=sigma, aggregation=aggregation,
                                         seed=seed, **kwargs):
        return m
    raise AssertionError("unreachable")


@torch.no_grad()
def predict_logits(network, image, spec: SlidingWindowSpec, device=None, autocast_dtype=None) -> torch.Tensor:
    """The sliding-window logits [K, X, Y, Z] of the clean image (on the CPU)."""
    img = check_image(image)
    device = torch.device(device) if device is not None else network_device(network)
    with explaining(network), _autocast(device, autocast_dtype):
        out = sliding_window_logits(network, img[None].to(device), spec)
    return out[0].float().cpu()


def lesion_probability(logits: torch.Tensor, channel: int = LESION_CHANNEL) -> np.ndarray:
    return torch.softmax(logits.float(), dim=0)[channel].numpy()


def class_smoothgrad(
    network,
    image,
    spec: SlidingWindowSpec,
    n_samples: int = 50,
    sigma_fraction: float = 0.05,
    sigma: float | None = None,
    seed: int = 0,
    threshold: float = THRESHOLD,
    class_mask: np.ndarray | None = None,
    noise_batch: int | None = None,
    device=None,
    autocast_dtype=None,
    channel: int = LESION_CHANNEL,
) -> np.ndarray:
    """Class-level SmoothGrad: ``1/N Σ_n ∂(Σ_{v ∈ R} y[v])/∂x`` with R the predicted lesion class region
    (softmax > ``threshold`` on the clean image, or ``class_mask``) -> [C, X, Y, Z].

    Linear in the window outputs, so each covering window is forwarded and back-propagated on its own (memory of one
    window at a time)."""
    img = check_image(image)
    device = torch.device(device) if device is not None else network_device(network)
    if class_mask is None:
        prob = lesion_probability(predict_logits(network, img, spec, device, autocast_dtype), channel)
        class_mask = prob > threshold
    region = as_domain(class_mask, img.shape[1:], "class region")
    grid = spec.grid(img.shape[1:])
    mp = grid.domain_to_padded(region)
    windows = grid.windows_covering(region)
    sig = noise_sigma(img, sigma_fraction, sigma)
    dtype = img.dtype
    B = int(noise_batch or min(int(n_samples), 4))
    acc = torch.zeros(img.shape, dtype=dtype, device=device)
    full = tuple((0, s) for s in img.shape[1:])
    noise = noise_samples(img.shape, n_samples, sig, seed, dtype)
    done = 0
    with explaining(network):
        while done < n_samples:
            nb = min(B, n_samples - done)
            xs = torch.stack([img + next(noise) for _ in range(nb)]).to(device).requires_grad_(True)
            for w in windows:
                jac = WindowJacobian(network, grid, [w], xs, full, backend="batched", autocast_dtype=autocast_dtype,
                                     channel=channel)
                cots = _region_cotangents(grid, [w], mp, 1.0, nb, dtype, device)
                acc += jac.vjp({w: cots[w][None]})[0].sum(0).detach()
                del jac
            done += nb
    return (acc / n_samples).float().cpu().numpy()
