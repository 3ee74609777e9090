"""What an explanation costs before it runs, from the work the saliency engine will do and unit times measured on
the serving device.

Work (exact, from the sliding-window geometry; :func:`domain_work`): for a lesion domain Ω,

* ``windows``: the windows covering Ω, forwarded once per noise batch;
* ``window_passes`` = Σ_{v ∈ Ω} |windows containing v|: Eq. 3 (``aggregation="max"``) back-propagates every voxel of
  Ω through each window that contains it, once per noise batch (:func:`msxai.saliency.smoothgrad._accumulate_group`);
  Eq. 2 (``mean``) needs one backward per covering window and batch;
* ``update_volume`` = Σ_{v ∈ Ω} |support box of v's windows| / |window|: the running max-abs reduction of Eq. 3 runs
  over the input box of each voxel's windows.

Time = work × unit times (:class:`UnitCosts`, measured once per network and device by :func:`measure_unit_costs`: one
window forward of a noise batch, one window backward, one Eq. 3 update, one noise copy, one written map), summed
over the noise batches (:func:`msxai.saliency.smoothgrad.noise_batches`) and the domains (the app explains one
lesion per engine call, so a *chunk* — the unit of work between two checkpoints — is one lesion x one noise batch).

The estimate is a prediction, not a bound: ``scripts/bench_explain_cost.py`` prints it against the measured time.
Nothing here changes what the engine computes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from msxai.saliency.sliding import WindowGrid
from msxai.saliency.smoothgrad import noise_batches


@dataclass(frozen=True)
class DomainWork:
    name: str
    voxels: int
    windows: int
    window_passes: int
    update_volume: float


def domain_work(grid: WindowGrid, name: str, mask: np.ndarray) -> DomainWork:
    """The engine's work for one domain on ``grid`` (see the module docstring)."""
    pm = grid.domain_to_padded(mask)
    vox = np.argwhere(pm)
    wins = grid.windows_covering(mask)
    roi = np.asarray(grid.roi)
    if not len(vox):
        return DomainWork(str(name), 0, 0, 0, 0.0)
    inside = np.stack([np.all((vox >= grid.starts[w]) & (vox < grid.starts[w] + roi), axis=1) for w in wins], axis=1)
    passes = int(inside.sum())
    # cells: voxels covered by the same windows share an update box (the box spanned by those windows)
    keys, counts = np.unique(inside, axis=0, return_counts=True)
    upd = 0.0
    for key, n in zip(keys, counts):
        cw = [w for w, on in zip(wins, key) if on]
        starts = np.asarray([grid.starts[w] for w in cw])
        box = (starts.max(axis=0) + roi) - starts.min(axis=0)
        upd += float(n) * float(np.prod(box)) / float(np.prod(roi))
    return DomainWork(str(name), int(len(vox)), len(wins), passes, upd)


@dataclass(frozen=True)
class UnitCosts:
    """Seconds on one device for one network (``noise_batch`` copies per forward, as the engine batches them)."""

    noise_batch: int
    forward_s: float  # one window forward of noise_batch copies, graph kept
    backward_s: float  # one window backward (one output voxel's VJP) over noise_batch copies
    update_s: float  # Eq. 3 running max over one window-sized box, noise_batch copies
    noise_s: float  # one full-image noise copy
    call_s: float  # fixed cost of one engine call (its memory probe: one window forward of one copy)
    write_s: float  # writing one float32 map of the image (the app keeps every map)
    cam_forward_s: float = 0.0  # one window forward of one copy without a graph (Grad-CAM++ full pass)
    cam_window_s: float = 0.0  # one window forward + backward of one copy (Grad-CAM++ per covering window)
    device: str = "cpu"
    measured_s: float = 0.0
    forward1_s: float | None = None  # the same at one copy per batch (a batch's time is not proportional to its
    backward1_s: float | None = None  # size: interpolated between 1 and noise_batch copies)

    def as_dict(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in self.__dict__.items()}

    def at(self, copies: int) -> tuple[float, float, float]:
        """(forward, backward, update) seconds for a batch of ``copies`` noise copies."""
        B = max(1, self.noise_batch)
        if B == 1 or self.forward1_s is None or self.backward1_s is None:
            f = copies / B
            return self.forward_s * f, self.backward_s * f, self.update_s * f
        t = (copies - 1) / (B - 1)
        return (self.forward1_s + t * (self.forward_s - self.forward1_s),
                self.backward1_s + t * (self.backward_s - self.backward1_s), self.update_s * copies / B)


@dataclass
class Estimate:
    method: str
    seconds: float
    chunks: int
    per_domain: dict[str, float] = field(default_factory=dict)
    voxels: int = 0
    map_bytes: int = 0
    n_samples: int = 0
    aggregation: str = ""

    def as_dict(self) -> dict:
        return {"method": self.method, "seconds": round(self.seconds, 1), "chunks": self.chunks,
                "domains": len(self.per_domain), "voxels": self.voxels, "map_bytes": self.map_bytes,
                "n_samples": self.n_samples, "aggregation": self.aggregation,
                "per_domain_s": {k: round(v, 1) for k, v in self.per_domain.items()}}


def _maps_per_domain(method: str, channels: int) -> int:
    return (channels if method == "smoothgrad" else 1) + 1  # the maps + the domain mask


def smoothgrad_domain_seconds(w: DomainWork, units: UnitCosts, n_samples: int, aggregation: str,
                              channels: int = 2) -> float:
    """Seconds of one domain explained alone (one engine call), written maps included."""
    total = units.call_s + n_samples * units.noise_s + _maps_per_domain("smoothgrad", channels) * units.write_s
    for nb in noise_batches(n_samples, units.noise_batch):
        f, b, u = units.at(nb)
        total += w.windows * f
        total += (w.window_passes * b + w.update_volume * u) if aggregation == "max" else w.windows * b
    return total


def estimate_smoothgrad(works: Sequence[DomainWork], units: UnitCosts, n_samples: int, aggregation: str,
                        image_voxels: int = 0, channels: int = 2) -> Estimate:
    per = {w.name: smoothgrad_domain_seconds(w, units, n_samples, aggregation, channels) for w in works}
    chunks = len(noise_batches(n_samples, units.noise_batch)) * len(works)
    return Estimate("smoothgrad", float(sum(per.values())), chunks, per, sum(w.voxels for w in works),
                    len(works) * channels * image_voxels * 4, int(n_samples), aggregation)


def estimate_gradcampp(works: Sequence[DomainWork], units: UnitCosts, total_windows: int,
                       image_voxels: int = 0) -> Estimate:
    per = {w.name: w.windows * units.cam_window_s + _maps_per_domain("gradcampp", 1) * units.write_s for w in works}
    full = total_windows * units.cam_forward_s
    if works:
        first = works[0].name
        per[first] += full  # the full-image pass runs with the first domain (one chunk)
    return Estimate("gradcampp", float(sum(per.values())), len(works), per, sum(w.voxels for w in works),
                    len(works) * image_voxels * 4)


def max_samples_within(works: Sequence[DomainWork], units: UnitCosts, aggregation: str, budget_s: float,
                       upper: int = 200) -> int:
    """The largest N (<= ``upper``) whose SmoothGrad estimate fits ``budget_s`` (0 if even N = 1 does not)."""
    lo, hi = 0, int(upper)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate_smoothgrad(works, units, mid, aggregation).seconds <= budget_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def fmt_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def narrowing_advice(works: Sequence[DomainWork], units: UnitCosts, n_samples: int, aggregation: str,
                     budget_s: float, max_samples: int = 200) -> list[str]:
    """Ways to bring a SmoothGrad request within ``budget_s``, each with its estimate."""
    out = []
    per = sorted(((smoothgrad_domain_seconds(w, units, n_samples, aggregation), w) for w in works),
                 key=lambda t: t[0])
    fit, total = [], 0.0
    for s, w in per:
        if total + s > budget_s:
            break
        fit.append(w)
        total += s
    ids = [w.name.replace("lesion_", "") for w in fit]
    if fit and len(fit) < len(works):
        out.append(f"fewer lesions: lesion={','.join(ids[:12])}{',...' if len(ids) > 12 else ''} "
                   f"({len(fit)} of {len(works)}) ~{fmt_seconds(total)}")
    n_fit = max_samples_within(works, units, aggregation, budget_s, upper=min(max_samples, n_samples))
    if 0 < n_fit < n_samples:
        out.append(f"fewer noise copies: samples={n_fit} ~"
                   f"{fmt_seconds(estimate_smoothgrad(works, units, n_fit, aggregation).seconds)}")
    if aggregation == "max":
        mean = estimate_smoothgrad(works, units, n_samples, "mean").seconds
        tip = (f"aggregation=mean (Eq. 2: one backward per noise copy instead of one per lesion voxel) "
               f"~{fmt_seconds(mean)}")
        if mean > budget_s:
            m_fit = max_samples_within(works, units, "mean", budget_s, upper=min(max_samples, n_samples))
            if m_fit:
                tip += (f", with samples={m_fit} ~"
                        f"{fmt_seconds(estimate_smoothgrad(works, units, m_fit, 'mean').seconds)}")
        out.append(tip)
    if not fit and n_fit == 0 and per:  # nothing above fits: one lesion, as many copies as the budget allows
        s, w = per[0]
        lid = w.name.replace("lesion_", "")
        for agg in (aggregation, "mean"):
            k = max_samples_within([w], units, agg, budget_s, upper=min(max_samples, n_samples))
            if k:
                out.append(f"one lesion with fewer copies: lesion={lid} samples={k}"
                           + (f" aggregation={agg}" if agg != aggregation else "")
                           + f" ~{fmt_seconds(estimate_smoothgrad([w], units, k, agg).seconds)}")
                break
        else:
            out.append(f"the cheapest lesion, {w.name} ({w.voxels} voxels), does not fit even with samples=1: "
                       f"this server needs a larger --conf explain_budget_s (or a GPU)")
    return out


# ----------------------------------------------------------------------------------------------- measuring
def measure_window_costs(network, spec, image, device=None, noise_batch: int | None = None,
                         max_batch: int | None = None) -> dict:
    """Time the engine's own window steps on ``device``: the forward and one backward of
    :class:`msxai.saliency.smoothgrad.WindowJacobian` (same back-end, noise batch and CPU kernels as the engine), its
    Eq. 3 update, the per-call memory probe, Grad-CAM++'s window passes. A warm-up pass runs first (the
    one-off kernel set-up is not a per-chunk cost); then the same with one copy: four window forwards and four
    backwards in all (two of them with one copy)."""
    import torch

    from msxai.saliency.sliding import check_image
    from msxai.saliency.smoothgrad import (
        WindowJacobian,
        _MaxAbs,
        _resolve_backend,
        _sub_box,
        _voxel_cotangents,
        explaining,
        graph_bytes_per_copy,
        network_device,
    )

    t_start = time.perf_counter()
    img = check_image(image).float()
    dev = torch.device(device) if device is not None else network_device(network)
    backend = _resolve_backend("auto", dev)
    B = int(noise_batch or (4 if dev.type == "cuda" else 8))
    # batched VJPs (CUDA) share one backward among K voxels; the CPU back-end runs one backward per voxel
    K = max(1, int(max_batch or (64 if dev.type == "cuda" else 32)) // B) if backend != "loop" else 1
    grid = spec.grid(img.shape[1:])
    w0 = 0
    box = grid.support_box([w0])
    region = _sub_box(grid.support_box([w0]), box)
    sl = tuple(slice(lo, hi) for lo, hi in box)
    centre = np.asarray(grid.starts[w0]) + np.asarray(grid.roi) // 2
    voxels = np.stack([centre + [0, 0, k] for k in range(K)])
    dtype = img.dtype

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def pass_once(b: int, k: int):
        xs = torch.stack([img[(slice(None), *sl)]] * b).to(dev).requires_grad_(True)
        sync()
        t0 = time.perf_counter()
        jac = WindowJacobian(network, grid, [w0], xs, box, backend=backend, cpu_kernels=True)
        sync()
        t1 = time.perf_counter()
        cots = _voxel_cotangents(grid, [w0], voxels[:k], b, dtype, dev)
        g = jac.vjp(cots, region)
        sync()
        t2 = time.perf_counter()
        best = _MaxAbs(xs.shape, dtype, dev)
        best.update(g, list(range(k)), region)
        sync()
        t3 = time.perf_counter()
        return t1 - t0, (t2 - t1) / k, (t3 - t2) / k

    out = {"noise_batch": B, "device": str(dev), "cam_forward_s": 0.0, "cam_window_s": 0.0}
    with explaining(network):
        pass_once(B, 1)  # warm-up
        out["forward_s"], out["backward_s"], out["update_s"] = pass_once(B, K)
        if B > 1:  # a batch of one copy (Grad-CAM++'s passes; small or last noise batches)
            pass_once(1, 1)  # warm-up of the one-copy kernels
            out["forward1_s"], out["backward1_s"], _ = pass_once(1, 1)
        else:
            out["forward1_s"], out["backward1_s"] = out["forward_s"], out["backward_s"]
        out["cam_window_s"] = out["forward1_s"] + out["backward1_s"]
        t0 = time.perf_counter()
        graph_bytes_per_copy(network, grid, img, dev)
        out["call_s"] = time.perf_counter() - t0
        from msxai.saliency.sliding import network_window_output

        xw = grid.pad_input(img[None])[(slice(None), slice(None), *grid.window_slices(w0))].to(dev)
        with torch.no_grad():  # Grad-CAM++'s full-image pass: one forward per window, no graph
            t0 = time.perf_counter()
            network_window_output(network, xw)
            sync()
            out["cam_forward_s"] = time.perf_counter() - t0
    out["measured_s"] = time.perf_counter() - t_start
    return out


def measure_io_costs(shape: Sequence[int]) -> dict:
    """Drawing one full-image noise copy (2 channels) and writing one float32 map of ``shape``."""
    import tempfile

    from msxai.io import save_volume
    from msxai.saliency.smoothgrad import noise_samples

    shape = tuple(int(s) for s in shape)
    gen = noise_samples((2, *shape), 2, 1.0, 0)
    next(gen)
    t0 = time.perf_counter()
    next(gen)
    noise = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="msxai_cost_") as d:
        arr = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        t0 = time.perf_counter()
        save_volume(f"{d}/m.nii.gz", arr, np.eye(4), dtype=np.float32)
        write = time.perf_counter() - t0
    return {"noise_s": noise, "write_s": write}


def unit_costs(window: Mapping, io: Mapping) -> UnitCosts:
    return UnitCosts(int(window["noise_batch"]), float(window["forward_s"]), float(window["backward_s"]),
                     float(window["update_s"]), float(io["noise_s"]), float(window["call_s"]), float(io["write_s"]),
                     float(window.get("cam_forward_s", 0.0)), float(window.get("cam_window_s", 0.0)),
                     str(window.get("device", "cpu")), float(window.get("measured_s", 0.0)),
                     window.get("forward1_s"), window.get("backward1_s"))


def measure_unit_costs(network, spec, image, device=None, **kw) -> UnitCosts:
    """:func:`measure_window_costs` and :func:`measure_io_costs` of this image in one :class:`UnitCosts`."""
    return unit_costs(measure_window_costs(network, spec, image, device, **kw),
                      measure_io_costs(tuple(image.shape[1:])))


def image_voxels(shape: Sequence[int]) -> int:
    return int(math.prod(int(s) for s in shape))


def works_of(grid: WindowGrid, domains: Mapping[str, np.ndarray]) -> list[DomainWork]:
    return [domain_work(grid, n, m) for n, m in domains.items()]
