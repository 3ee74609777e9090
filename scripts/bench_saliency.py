#!/usr/bin/env python
"""Benchmark the fast instance SmoothGrad against the naive loop (the authors' approach: one ``torch.autograd.grad``
per output voxel over MONAI's full sliding-window inference of the whole image).

One model (a small MONAI UNet with random weights, or a bundle's network and inferer with ``--bundle``), one
synthetic image and a few lesion domains (balls). Each phase runs in its own subprocess so that its peak memory is
its own (CPU: peak RSS; CUDA: ``torch.cuda.max_memory_allocated``), both in the same run:

* ``naive``: the reference loop on the first ``--naive-voxels`` voxels (raster order) of every lesion and
  ``--naive-samples`` noise copies (its cost is linear in voxels × copies plus one full forward per copy);
* ``fast-subset``: the engine on exactly the same sub-domains and copies -> the like-for-like speed-up and the max
  abs difference of the maps;
* ``fast-subset-nb1`` / ``fast-subset-plain``: the same with one copy per forward / without the CPU kernel
  rerouting (``cpu_kernels=False``), for the exactness and the gain of each;
* ``fast``: the engine on the full lesions with ``--samples`` copies (``--samples 50``: the method's default); the
  naive time for that work is extrapolated from the measured naive time per (voxel, copy) and per full forward
  (stated as such in the output).

Every phase reports its wall time and its CPU time (``time.process_time``; with one thread the CPU time is what the
phase itself computed, much less sensitive than the wall time to other processes sharing the machine); speed-ups
are given for both, and the load average (``os.getloadavg``) before and after the run.

Example (CPU, 1 thread)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_saliency.py            # bundle-sized UNet, 64^3, ROI 32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(args):
    import torch
    from monai.inferers import SlidingWindowInferer
    from scipy import ndimage

    torch.manual_seed(args.seed)
    if args.bundle:
        from msxai.bundle import load_bundle

        bundle = load_bundle(args.bundle, device=args.device)
        net, inferer = bundle.network, bundle.inferer
    else:
        from monai.networks.nets import UNet

        ch = tuple(int(c) for c in args.channels.split(","))
        net = UNet(3, 2, 2, channels=ch, strides=(2,) * (len(ch) - 1), num_res_units=args.res_units, norm="instance")
        net = net.to(args.device).eval()
        inferer = SlidingWindowInferer((args.roi,) * 3, overlap=args.overlap, mode="gaussian")
    rng = np.random.default_rng(args.seed)
    shape = (args.size,) * 3
    img = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 1.5) for _ in range(2)]).astype(np.float32)
    img = (img - img.mean()) / img.std()
    grid = np.indices(shape)
    domains = {}
    radii = [float(r) for r in args.radii.split(",")]
    for k in range(args.lesions):
        c = rng.integers(args.size // 5, args.size - args.size // 5, 3)
        r = radii[k % len(radii)]
        domains[f"lesion_{k + 1}"] = ((grid - c[:, None, None, None]) ** 2).sum(0) <= r * r
    return net, inferer, torch.as_tensor(img), domains


def subset(domains, n):
    out = {}
    for k, d in domains.items():
        m = np.zeros_like(d)
        idx = np.argwhere(d)[:n]
        m[tuple(idx.T)] = True
        out[k] = m
    return out


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def phase(args):
    import torch

    from msxai.saliency.sliding import SlidingWindowSpec
    from msxai.saliency.smoothgrad import instance_smoothgrad_many, noise_sigma, noise_samples

    torch.set_num_threads(args.threads)
    net, inferer, img, domains = build(args)
    spec = SlidingWindowSpec.from_inferer(inferer)
    dev = torch.device(args.device)
    n = args.naive_samples
    info = {"windows_total": spec.grid(img.shape[1:]).num_windows,
            "windows_per_lesion": {k: len(spec.grid(img.shape[1:]).windows_covering(d)) for k, d in domains.items()},
            "voxels_per_lesion": {k: int(d.sum()) for k, d in domains.items()}}
    maps = {}
    t0, c0 = time.perf_counter(), time.process_time()
    if args.phase == "naive":
        sub = subset(domains, args.naive_voxels)
        sig = noise_sigma(img, 0.05)
        fwd = fwd_cpu = 0.0
        for name, dom in sub.items():
            voxels = np.argwhere(dom)
            total = torch.zeros_like(img)
            for eps in noise_samples(img.shape, n, sig, args.seed):
                x = (img + eps)[None].to(dev).requires_grad_(True)
                tf, cf = time.perf_counter(), time.process_time()
                y = inferer(x, net)[0, 1]
                fwd += time.perf_counter() - tf
                fwd_cpu += time.process_time() - cf
                best = torch.zeros_like(x[0])
                for v in voxels:
                    g = torch.autograd.grad(y[tuple(v)], x, retain_graph=True)[0][0]
                    best = torch.where(g.abs() > best.abs(), g, best)
                total += best.cpu()
                del y
            maps[name] = (total / n).numpy()
        info["forward_seconds"] = fwd
        info["forward_cpu_seconds"] = fwd_cpu
        info["voxel_copies"] = int(sum(d.sum() for d in sub.values()) * n)
        info["forwards"] = len(sub) * n
    else:
        sub = args.phase.startswith("fast-subset")
        doms = subset(domains, args.naive_voxels) if sub else domains
        samples = n if sub else args.samples
        nbatch = 1 if args.phase == "fast-subset-nb1" else args.noise_batch
        ac = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.autocast)
        for name, m in instance_smoothgrad_many(net, img, doms, spec, n_samples=samples, seed=args.seed, device=dev,
                                                max_batch=args.max_batch, noise_batch=nbatch,
                                                autocast_dtype=ac if args.phase == "fast-autocast" else None,
                                                cpu_kernels=args.phase != "fast-subset-plain"):
            maps[name] = m
    if dev.type == "cuda":
        torch.cuda.synchronize()
    info["seconds"] = time.perf_counter() - t0
    info["cpu_seconds"] = time.process_time() - c0
    info["peak_memory_mb"] = peak_memory_mb(args.device)
    np.savez(Path(args.tmp) / f"{args.phase}.npz", **maps)
    (Path(args.tmp) / f"{args.phase}.json").write_text(json.dumps(info))


def run_phase(name, argv, tmp):
    cmd = [sys.executable, __file__, *argv, "--phase", name, "--tmp", tmp]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    info = json.loads((Path(tmp) / f"{name}.json").read_text())
    maps = dict(np.load(Path(tmp) / f"{name}.npz"))
    return info, maps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="use this bundle's network and inferer instead of a random small UNet")
    p.add_argument("--size", type=int, default=64, help="synthetic image edge (voxels)")
    p.add_argument("--roi", type=int, default=32, help="ROI edge of the random UNet's inferer")
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--channels", default="16,32,64,128,256", help="random UNet channels (default: the bundle's)")
    p.add_argument("--res-units", type=int, default=2, help="random UNet residual units (default: the bundle's)")
    p.add_argument("--lesions", type=int, default=2)
    p.add_argument("--radii", default="1.5,2", help="lesion ball radii (voxels), cycled")
    p.add_argument("--samples", type=int, default=4, help="noise copies of the full fast run")
    p.add_argument("--naive-samples", type=int, default=4)
    p.add_argument("--naive-voxels", type=int, default=2, help="voxels per lesion in the naive/like-for-like runs")
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--noise-batch", type=int, default=None)
    p.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none",
                   help="also run the full fast path under autocast and report its error against fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-full", action="store_true", help="only the like-for-like comparison")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:
        return phase(args)
    own = [a for a in (argv if argv is not None else sys.argv[1:])]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        naive, nmaps = run_phase("naive", own, tmp)
        fsub, fmaps = run_phase("fast-subset", own, tmp)
        f1, f1maps = run_phase("fast-subset-nb1", own, tmp)
        fp, fpmaps = run_phase("fast-subset-plain", own, tmp)
        diff = max(float(np.abs(nmaps[k] - fmaps[k]).max()) for k in nmaps)
        diff1 = max(float(np.abs(nmaps[k] - f1maps[k]).max()) for k in nmaps)
        diffp = max(float(np.abs(nmaps[k] - fpmaps[k]).max()) for k in nmaps)
        scale = max(float(np.abs(nmaps[k]).max()) for k in nmaps)
        flips = sum(int((np.abs(nmaps[k] - fmaps[k]) > 1e-4 * scale).sum()) for k in nmaps)
        nonzero = sum(int((nmaps[k] != 0).sum()) for k in nmaps)

        def ratio(a, b):
            return f"{a['seconds'] / b['seconds']:6.1f} x wall, {a['cpu_seconds'] / b['cpu_seconds']:6.1f} x CPU"

        def times(r):
            return f"{r['seconds']:8.2f} s wall {r['cpu_seconds']:8.2f} s CPU"

        print(f"device {args.device}, threads {args.threads}, image {args.size}^3, "
              f"{naive['windows_total']} windows, lesions: voxels {naive['voxels_per_lesion']}, "
              f"windows covering {naive['windows_per_lesion']}")
        print(f"like-for-like ({args.naive_voxels} voxels/lesion, {args.naive_samples} copies, max aggregation):")
        print(f"  naive loop   {times(naive)}  peak {naive['peak_memory_mb']:8.0f} MB")
        print(f"  fast engine  {times(fsub)}  peak {fsub['peak_memory_mb']:8.0f} MB")
        print(f"  speed-up     {ratio(naive, fsub)}   max |diff| {diff:.3g} "
              f"(max |map| {scale:.3g}, relative {diff / scale:.2g}; {flips} of {nonzero} non-zero voxels differ by"
              f" > 1e-4 max |map|)")
        print(f"  fast, 1 copy per forward      {times(f1)}  speed-up {ratio(naive, f1)}"
              f"   max |diff| {diff1:.3g} (relative {diff1 / scale:.2g})")
        print(f"  fast, no CPU kernel rerouting {times(fp)}  speed-up {ratio(naive, fp)}"
              f"   max |diff| {diffp:.3g} (relative {diffp / scale:.2g})")
        result = {"naive": naive, "fast_subset": fsub, "fast_subset_noise_batch_1": f1, "fast_subset_plain": fp,
                  "max_abs_diff": diff, "max_abs_diff_noise_batch_1": diff1, "max_abs_diff_plain": diffp,
                  "max_abs_map": scale, "voxels_over_1e-4": flips}
        if not args.skip_full:
            full, fullmaps = run_phase("fast", own, tmp)
            vc = sum(full_v for full_v in naive["voxels_per_lesion"].values()) * args.samples
            est = {}
            for key, fkey in (("seconds", "forward_seconds"), ("cpu_seconds", "forward_cpu_seconds")):
                per_vc = (naive[key] - naive[fkey]) / naive["voxel_copies"]
                per_fwd = naive[fkey] / naive["forwards"]
                est[key] = (per_vc * vc + per_fwd * args.lesions * args.samples, per_vc, per_fwd)
            print(f"full lesions ({sum(naive['voxels_per_lesion'].values())} voxels, {args.samples} copies):")
            print(f"  fast engine  {times(full)}  peak {full['peak_memory_mb']:8.0f} MB")
            print(f"  naive loop   {est['seconds'][0]:8.2f} s wall {est['cpu_seconds'][0]:8.2f} s CPU  (extrapolated:"
                  f" {est['seconds'][1]:.3f} s wall / {est['cpu_seconds'][1]:.3f} s CPU per voxel-copy measured above"
                  f" + {est['seconds'][2]:.3f} / {est['cpu_seconds'][2]:.3f} s per full forward)")
            print(f"  speed-up     {est['seconds'][0] / full['seconds']:6.1f} x wall, "
                  f"{est['cpu_seconds'][0] / full['cpu_seconds']:6.1f} x CPU (extrapolated naive / measured fast)")
            result["fast_full"] = full
            result["naive_full_extrapolated_seconds"] = est["seconds"][0]
            result["naive_full_extrapolated_cpu_seconds"] = est["cpu_seconds"][0]
            if args.autocast != "none":
                ac, acmaps = run_phase("fast-autocast", own, tmp)
                err = max(float(np.abs(acmaps[k] - fullmaps[k]).max() / np.abs(fullmaps[k]).max()) for k in fullmaps)
                print(f"  {args.autocast} autocast {ac['seconds']:9.2f} s, max |diff| / max |map| vs fp32: {err:.3g}")
                result["autocast"] = {"dtype": args.autocast, "seconds": ac["seconds"], "relative_error": err}
        load_after = os.getloadavg()
        print(f"load average (1/5/15 min): before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
              f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
        result["load_average_before"], result["load_average_after"] = load_before, load_after
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
