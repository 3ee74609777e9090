#!/usr/bin/env python
"""The explain cost estimate (msxai/saliency/cost.py, what the app's admission control uses) against the measured
time, on three lesions of different sizes, in one run.

Like the app: the unit costs are measured once on the device (``measure_unit_costs``), then every lesion is explained
alone by the saliency engine (one engine call per lesion with a checkpoint after every noise batch, as the app's
jobs run) and its maps are written (FLAIR, MPRAGE, domain). For each lesion the estimate, the measured wall time,
the measured CPU time and measured / estimate are printed; the target is a ratio within [0.5, 2]. The load average
is printed before and after (other processes sharing the CPUs slow the measured run; the unit costs, measured in
the same run, see the same machine).

Default study: the real patient ``<repo>/../shared/data/open_ms_data/patient26`` (FLAIR, T1, consensus_gt; 1 mm);
the lesions are the connected components of its consensus mask, picked closest to ``--voxels`` (three sizes).

Example (CPU, 1 thread)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_explain_cost.py --samples 8
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PATIENT = ROOT.parent / "shared" / "data" / "open_ms_data" / "patient26"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "bundles" / "msxai_unet"))
    ap.add_argument("--flair", default=str(PATIENT / "FLAIR.nii.gz"))
    ap.add_argument("--t1", default=str(PATIENT / "T1.nii.gz"))
    ap.add_argument("--lesions", default=str(PATIENT / "consensus_gt.nii.gz"), help="lesion mask or instance map")
    ap.add_argument("--voxels", default="6,20,50", help="three target lesion sizes (voxels)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--aggregation", choices=("max", "mean"), default="max")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    import torch

    from msxai.bundle import load_bundle
    from msxai.io import Volume, load_volume, save_volume
    from msxai.lesions import instances_from_mask, lesion_ids
    from msxai.preprocess import resample_onto
    from msxai.saliency import cost
    from msxai.saliency.engine import explain
    from msxai.saliency.sliding import SlidingWindowSpec

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load0 = os.getloadavg()
    bundle = load_bundle(args.bundle, device=args.device)
    prep = bundle.prepare(args.flair, args.t1)
    shape = tuple(prep.image.shape[1:])
    affine = np.asarray(prep.affine)
    les = load_volume(args.lesions, "lesions", dtype=np.float32)
    if les.array.shape != shape or not np.allclose(les.affine, affine, atol=1e-3):
        les = resample_onto(Volume(les.array, les.affine), affine, shape, order=0)
    labels = instances_from_mask(les.array, affine=affine)  # 18-connected components >= 5 mm3 of a mask
    sizes = {i: int((labels == i).sum()) for i in lesion_ids(labels)}
    picked = []
    for target in (int(v) for v in args.voxels.split(",")):
        i = min((i for i in sizes if i not in picked), key=lambda i: abs(sizes[i] - target))
        picked.append(i)
    spec = SlidingWindowSpec.from_inferer(bundle.inferer)
    grid = spec.grid(shape)
    print(f"study {Path(args.flair).parent.name} {shape}, {len(sizes)} lesions; bundle {bundle.name}; device "
          f"{args.device}; N = {args.samples}, aggregation {args.aggregation}; load average {load0}")
    t0 = time.perf_counter()
    units = cost.measure_unit_costs(bundle.network, spec, prep.image, args.device)
    print(f"unit costs measured in {time.perf_counter() - t0:.1f} s: {units.as_dict()}")
    prob = np.zeros(shape, np.float32)  # the summaries' lesion probability is not what is timed
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_cost_") as out:
        for i in picked:
            mask = labels == i
            name = f"lesion_{i}"
            work = cost.domain_work(grid, name, mask)
            est = cost.estimate_smoothgrad([work], units, args.samples, args.aggregation, int(np.prod(shape)),
                                           int(prep.image.shape[0]))
            chunks = []
            w0, c0 = time.perf_counter(), time.process_time()
            for e in explain(bundle, prep.image, {name: mask}, method="smoothgrad", aggregation=args.aggregation,
                             n_samples=args.samples, seed=0, prob=prob, affine=affine, checkpoint=chunks.append):
                for k, m in e.maps.items():
                    save_volume(Path(out) / f"{name}_{k}.nii.gz", m, affine, dtype=np.float32)
                save_volume(Path(out) / f"{name}_domain.nii.gz", mask.astype(np.uint8), affine, dtype=np.uint8)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            ratio = wall / est.seconds
            rows.append((name, work, est.seconds, wall, cpu, ratio, len(chunks), est.chunks))
            print(f"  {name}: {work.voxels} voxels, {work.windows} windows, {work.window_passes} window passes: "
                  f"estimate {est.seconds:.1f} s, measured {wall:.1f} s wall ({cpu:.1f} s CPU), "
                  f"measured/estimate {ratio:.2f}, chunks {len(chunks)}/{est.chunks}", flush=True)
    load1 = os.getloadavg()
    print("\n| lesion | voxels | windows | window passes | estimate (s) | measured wall (s) | CPU (s) | measured / "
          "estimate |")
    print("|---|---|---|---|---|---|---|---|")
    for name, work, e, wall, cpu, ratio, _, _ in rows:
        print(f"| {name} | {work.voxels} | {work.windows} | {work.window_passes} | {e:.1f} | {wall:.1f} | {cpu:.1f} | "
              f"{ratio:.2f} |")
    ok = all(0.5 <= r[5] <= 2.0 for r in rows)
    print(f"\nwithin 2x: {'yes' if ok else 'NO'} (ratios {', '.join(f'{r[5]:.2f}' for r in rows)}); load average "
          f"before {load0}, after {load1}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
