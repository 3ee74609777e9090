#!/usr/bin/env python
"""Seconds per volume and peak memory of each msxai bundle's inference on this machine.

Each bundle runs in its own child process (so the peak resident memory, ``ru_maxrss``, is that bundle's alone):
load the bundle, prepare the input (z-scoring; not timed), then time ``Bundle.segment`` = sliding-window inference
(96^3 windows, overlap 0.25, gaussian) + softmax + threshold 0.3 + 18-connected lesions >= 5 mm^3 + lesion table.

Input: the real patient (``<repo>/../shared/data/open_ms_data/patient26``, 182x218x182) when present, else
``--flair/--t1``, else a random brain-shaped volume of ``--shape``.

    .venv/bin/python scripts/bench_inference.py                       # all three bundles, 1 thread
    .venv/bin/python scripts/bench_inference.py --bundles msxai_unet --threads 2 --json runs/bench.json
    .venv/bin/python scripts/bench_inference.py --bundles msxai_unet --tta-flips '[[0]]'   # flip TTA cost
    .venv/bin/python scripts/bench_inference.py --bundles msxai_unet ensemble               # ensemble cost

``ensemble`` is the mean probability of the three bundles (``msxai segment --ensemble``); ``--tta-flips`` overrides
the ``tta_flips`` key of every bundle's inference.json (one extra sliding-window pass per entry). Compare rows of
one run (same load) for the cost ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def child(args) -> dict:
    import resource

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from msxai.bundle import load_bundle

    overrides = {"tta_flips": json.loads(args.tta_flips)} if args.tta_flips else {}
    if args.child == "ensemble":
        from msxai.bundle import BUNDLE_NAMES
        from msxai.inference import EnsembleSegmentation

        members = [load_bundle(REPO / "bundles" / n, device=args.device, **overrides) for n in BUNDLE_NAMES]
        ens = EnsembleSegmentation(members)

        class _Ensemble:  # the two Bundle methods used below
            device = ens.device
            network = torch.nn.ModuleList([m.network for m in members])
            prepare = staticmethod(ens.prepare)
            segment = staticmethod(ens.predict)

        bundle = _Ensemble()
    else:
        bundle = load_bundle(REPO / "bundles" / args.child, device=args.device, **overrides)
    if args.flair and args.t1:
        prepared = bundle.prepare(args.flair, args.t1)
        source = Path(args.flair).name
    else:
        from msxai.data import real_patient_paths

        paths = real_patient_paths()
        if paths is not None:
            prepared = bundle.prepare(paths["flair"], paths["t1"])
            source = "patient26"
        else:
            from msxai.preprocess import PreparedImage, zscore

            shape = tuple(args.shape)
            g = np.indices(shape).astype(np.float32)
            c = (np.array(shape) - 1)[:, None, None, None] / 2
            brain = (((g - c) / (np.array(shape)[:, None, None, None] * 0.45)) ** 2).sum(0) < 1
            raw = np.stack([brain * (100 + np.random.default_rng(0).normal(0, 5, shape))] * 2).astype(np.float32)
            prepared = PreparedImage(zscore(raw, brain), np.eye(4), brain, raw)
            source = f"random {shape}"
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        result = bundle.segment(prepared)
        times.append(time.perf_counter() - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {
        "bundle": args.child,
        "tta_flips": json.loads(args.tta_flips) if args.tta_flips else [],
        "input": source,
        "shape": list(prepared.image.shape[1:]),
        "threads": args.threads,
        "device": str(bundle.device),
        "seconds": round(min(times), 2),
        "seconds_all": [round(t, 2) for t in times],
        "peak_rss_mb": round(peak_mb, 1),
        "lesions": len(result.table),
        "parameters": int(sum(p.numel() for p in bundle.network.parameters())),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundles", nargs="+", default=["msxai_unet", "msxai_dynunet", "msxai_swinunetr"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--flair")
    p.add_argument("--t1")
    p.add_argument("--shape", type=int, nargs=3, default=(182, 218, 182))
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--tta-flips", default=None, help="JSON list of flip-axis lists for every bundle, e.g. '[[0]]'")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("BENCH " + json.dumps(child(args)), flush=True)
        return 0
    rows = []
    for name in args.bundles:
        cmd = [sys.executable, __file__, "--child", name, "--threads", str(args.threads), "--device", args.device,
               "--repeat", str(args.repeat), "--shape", *map(str, args.shape)]
        if args.flair and args.t1:
            cmd += ["--flair", args.flair, "--t1", args.t1]
        if args.tta_flips:
            cmd += ["--tta-flips", args.tta_flips]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
        if proc.returncode != 0 or not line:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(line[0][6:]))
        if args.json:  # written after every bundle, so a partial run keeps its rows
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"rows": rows, "loadavg": os.getloadavg()[0], "cpus": os.cpu_count()}, indent=2))
    load = os.getloadavg()[0]
    print(f"{'bundle':<18} {'tta':<10} {'input':<12} {'shape':<15} {'threads':>7} {'s/volume':>9} {'peak MB':>8} "
          f"{'params':>10}")
    for r in rows:
        print(f"{r['bundle']:<18} {json.dumps(r['tta_flips']):<10} {r['input']:<12} {'x'.join(map(str, r['shape'])):<15} {r['threads']:>7} "
              f"{r['seconds']:>9.1f} {r['peak_rss_mb']:>8.0f} {r['parameters']:>10,}")
    print(f"(load average at the end: {load:.1f} on {os.cpu_count()} CPUs; peak = resident set of the child process)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "loadavg": load, "cpus": os.cpu_count()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
