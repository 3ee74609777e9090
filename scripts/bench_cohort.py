#!/usr/bin/env python
"""Cohort throughput of ``msxai batch`` here (1 vs 2 processes, in one run) and a cost model for a large cohort.

``measure`` (default part 1): the same K cases (the real patient26 repeated under K ids, or a generated
brain-shaped phantom when it is absent) are segmented with a bundle by ``msxai batch`` in one process, then by
``torchrun --nproc-per-node 2`` (gloo, 127.0.0.1), each process with one thread, into fresh folders. Reported per
run: cases/hour from the run's own clock (``cohort.json``: first claim to merged summary, model loading excluded)
and end to end (process start to exit), the ratio 2 vs 1 process, and the load average before and after (this
machine is shared: read the ratio with the load).

``model`` (part 2): predicted hours for a cohort of ``--cohort`` scans on N GPUs. Per case::

    T = t_io + W_seg * t_fwd                                  (segmentation: every window once)
          + N_samples * (W_cov * t_fwd_grad + V * t_bwd)      (Eq. 3 explanation, when --explain)

``W_seg``: sliding windows of the image (27 for 182x218x182 with 96^3, overlap 0.25); ``W_cov``: windows covering
the explained domains (at most W_seg); ``V``: the case's Eq. 3 cost in voxel-windows (sum over its explained
voxels - every lesion, or TP/FP/FN + 10 TN balls - of the windows covering each voxel), drawn per case from a
log-normal whose median is measured on patient26 (truth lesions + 10 TN balls of 93 mm^3, the bundle's windows) and
whose 1st-99th percentile ratio is ``--load-spread`` (default 100: lesion loads differ ~100x between patients).
``t_fwd``, ``t_fwd_grad``, ``t_bwd`` (s per window forward, per window forward with graph and per vector-Jacobian
product of one voxel through one window for one noise copy) are **parameters**: the defaults are ASSUMED GPU
figures (no GPU was available to measure them), and ``--unit-costs`` measures them here on the CPU for the
bundle's network (1 thread). The cases are scheduled as msxai batch does (each to the first free GPU, in list
order: dynamic) and, for comparison, statically (case i on GPU i mod N).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_cohort.py measure --cases 4
    .venv/bin/python scripts/bench_cohort.py model --cohort 4000 --gpus 1,2,4,8,16,32 --samples 50
    .venv/bin/python scripts/bench_cohort.py model --t-fwd 0.05 --t-bwd 0.002   # your GPU's measured figures
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# ASSUMED GPU unit costs (not measured: no GPU here) for the msxai U-Net, 96^3 windows, fp32, one modern data-centre
# GPU: a window forward ~30 ms, ~60 ms with the autograd graph kept, and ~2 ms per vector-Jacobian product when
# 32-64 of them are batched in one backward. Replace them with measured figures (scripts/bench_saliency.py --device
# cuda gives the backward time per copy and window).
ASSUMED_GPU = {"t_fwd": 0.03, "t_fwd_grad": 0.06, "t_bwd": 0.002, "t_io": 2.0}


# --------------------------------------------------------------------------------------------------- measure
def _phantom(folder: Path, shape=(160, 192, 160)) -> tuple[Path, Path]:
    from msxai.io import save_volume

    rng = np.random.default_rng(0)
    g = np.indices(shape).astype(np.float32)
    c = (np.array(shape) - 1)[:, None, None, None] / 2
    brain = (((g - c) / (np.array(shape)[:, None, None, None] * 0.42)) ** 2).sum(0) < 1
    flair = brain * (100 + rng.normal(0, 5, shape))
    for _ in range(12):
        p = rng.integers(40, 120, 3)
        flair[p[0]:p[0] + 4, p[1]:p[1] + 4, p[2]:p[2] + 4] += 60
    t1 = brain * (80 + rng.normal(0, 5, shape))
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    save_volume(folder / "ph_FLAIR.nii.gz", flair.astype(np.float32), aff)
    save_volume(folder / "ph_T1.nii.gz", t1.astype(np.float32), aff)
    return folder / "ph_FLAIR.nii.gz", folder / "ph_T1.nii.gz"


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc: int, datalist: Path, out: Path, args) -> dict:
    batch = ["-m", "msxai.cli", "batch", "--bundle", args.bundle, "--cohort", str(datalist), "--out", str(out),
             "--device", "cpu", "--no-progress", "--explain", args.explain, "--samples", str(args.samples)]
    if nproc == 1:
        cmd = [sys.executable, *batch]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *batch]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=str(REPO))
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{nproc} process(es) failed:\n{(p.stdout + p.stderr)[-4000:]}")
    s = json.loads((out / "cohort.json").read_text())
    n = s["counts"]["done"]
    return {"processes": nproc, "cases": n, "run_wall_s": s["wall_s"], "end_to_end_s": round(wall, 1),
            "cases_per_hour_run": round(3600 * n / s["wall_s"], 2),
            "cases_per_hour_end_to_end": round(3600 * n / wall, 2),
            "mean_case_s": round(s["seconds_in_cases"] / n, 2)}


def measure(args) -> dict:
    from msxai.data import real_patient_paths

    tmp = Path(tempfile.mkdtemp(prefix="bench_cohort_"))
    paths = real_patient_paths()
    if paths is not None:
        flair, t1, source = paths["flair"], paths["t1"], "patient26 (182x218x182, 1 mm)"
    else:
        flair, t1 = _phantom(tmp)
        source = "generated phantom 160x192x160"
    items = [{"id": f"case{i:03d}", "flair": str(flair), "t1": str(t1)} for i in range(args.cases)]
    (tmp / "datalist.json").write_text(json.dumps({"testing": items}))
    load0 = os.getloadavg()
    runs = [_run(n, tmp / "datalist.json", tmp / f"out{n}", args) for n in (1, 2)]
    load1 = os.getloadavg()
    res = {"source": f"{source} x {args.cases} ids", "bundle": args.bundle, "explain": args.explain,
           "samples": args.samples, "threads_per_process": 1, "cpu_cores": os.cpu_count(), "runs": runs,
           "speedup_2_vs_1_run": round(runs[1]["cases_per_hour_run"] / runs[0]["cases_per_hour_run"], 2),
           "speedup_2_vs_1_end_to_end": round(runs[1]["cases_per_hour_end_to_end"]
                                              / runs[0]["cases_per_hour_end_to_end"], 2),
           "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in load1],
           "when_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "folder": str(tmp)}
    for r in runs:
        print(f"{r['processes']} process(es): {r['cases']} cases, {r['cases_per_hour_run']} cases/h (run clock, "
              f"{r['run_wall_s']:.0f} s), {r['cases_per_hour_end_to_end']} cases/h end to end "
              f"({r['end_to_end_s']:.0f} s), {r['mean_case_s']} s per case")
    print(f"2 vs 1 process: x{res['speedup_2_vs_1_run']} (run clock), x{res['speedup_2_vs_1_end_to_end']} (end to "
          f"end); load average {res['loadavg_before']} -> {res['loadavg_after']} on {os.cpu_count()} cores")
    return res


# ----------------------------------------------------------------------------------------------------- model
def patient26_load(bundle_name: str, n_tn: int = 10) -> dict:
    """Eq. 3 cost (voxel-windows) of patient26's true lesions + ``n_tn`` TN balls with the bundle's windows, its
    windows per image and windows covering the lesions (no network run: the truth stands for the lesions)."""
    from msxai.bundle import load_bundle
    from msxai.data import real_patient_paths
    from msxai.experiments.selection import domain_costs, window_count_map
    from msxai.io import load_volume, voxel_volume_mm3
    from msxai.lesions import ball_structure, instances_from_mask, tn_sphere_radius_mm
    from msxai.saliency.sliding import SlidingWindowSpec

    paths = real_patient_paths()
    if paths is None:
        return {}
    b = load_bundle(bundle_name)
    spec = SlidingWindowSpec.from_inferer(b.inferer)
    truth = load_volume(paths["truth"], "truth")
    inst = instances_from_mask(truth.array, truth.affine)
    wmap = window_count_map(spec, inst.shape)
    lesion_cost = sum(domain_costs(spec, inst, wmap).values())
    ball = ball_structure(tn_sphere_radius_mm(), (1.0, 1.0, 1.0))
    tn_cost = n_tn * int(ball.sum()) * float(np.median(wmap[wmap > 0]))
    grid = spec.grid(inst.shape)
    padded = grid.domain_to_padded(inst > 0)
    cov = {w for w in range(grid.num_windows) if padded[grid.window_slices(w)].any()}
    return {"voxel_windows": lesion_cost + tn_cost, "lesion_voxels": int((inst > 0).sum()),
            "lesion_mm3": float((inst > 0).sum() * voxel_volume_mm3(truth.affine)), "n_lesions": int(inst.max()),
            "windows": int(grid.num_windows), "windows_covering_lesions": len(cov) or int(grid.num_windows)}


def unit_costs(bundle_name: str, copies: int = 2) -> dict:
    """t_fwd, t_fwd_grad, t_bwd of the bundle's network on one 96^3 window here (CPU, current thread count)."""
    import torch

    from msxai.bundle import load_bundle
    from msxai.networks import plain_logits

    b = load_bundle(bundle_name)
    roi = tuple(int(r) for r in b.inferer.roi_size)
    x = torch.randn(1, 2, *roi)
    with torch.no_grad():
        plain_logits(b.network(x))
        t0 = time.perf_counter()
        plain_logits(b.network(x))
        t_fwd = time.perf_counter() - t0
    xg = torch.randn(copies, 2, *roi, requires_grad=True)
    t0 = time.perf_counter()
    y = plain_logits(b.network(xg))
    t_fwd_grad = (time.perf_counter() - t0) / copies
    c = tuple(r // 2 for r in roi)
    t0 = time.perf_counter()
    torch.autograd.grad(y[:, 1, c[0], c[1], c[2]].sum(), xg)
    t_bwd = (time.perf_counter() - t0) / copies
    return {"t_fwd": t_fwd, "t_fwd_grad": t_fwd_grad, "t_bwd": t_bwd, "threads": torch.get_num_threads(),
            "roi": list(roi)}


def schedule(times: np.ndarray, n: int) -> tuple[float, float]:
    """Makespan (s) of ``times`` on ``n`` workers: dynamic (each case, in order, to the first free worker: what
    the store claims do) and static (case i on worker i mod n)."""
    import heapq

    free = [0.0] * n
    heapq.heapify(free)
    for t in times:
        heapq.heappush(free, heapq.heappop(free) + float(t))
    static = max(float(times[k::n].sum()) for k in range(n))
    return max(free), static


def model(args, load: dict, costs: dict) -> dict:
    rng = np.random.default_rng(args.seed)
    median_v = args.load_median or load.get("voxel_windows") or 20000.0
    sigma = np.log(args.load_spread) / (2 * 2.3263)
    v = median_v * np.exp(rng.normal(0.0, sigma, args.cohort))
    w_seg = args.windows or load.get("windows") or 27
    w_cov = min(w_seg, args.windows_covered or load.get("windows_covering_lesions") or w_seg)
    t = np.full(args.cohort, costs["t_io"] + w_seg * costs["t_fwd"])
    if args.explain:
        t = t + args.samples * (w_cov * costs["t_fwd_grad"] + v * costs["t_bwd"])
    rows = []
    for n in args.gpus:
        dyn, sta = schedule(t, n)
        rows.append({"gpus": n, "dynamic_h": round(dyn / 3600, 2), "static_h": round(sta / 3600, 2),
                     "ideal_h": round(float(t.sum()) / n / 3600, 2),
                     "dynamic_efficiency": round(float(t.sum()) / n / dyn, 3)})
    seg_case = costs["t_io"] + w_seg * costs["t_fwd"]
    out = {"cohort": args.cohort, "explain": bool(args.explain), "samples": args.samples, "unit_costs": costs,
           "segmentation_case_s": seg_case,
           "voxel_windows_median": median_v, "load_spread_p99_over_p1": args.load_spread, "windows": w_seg,
           "windows_covered": w_cov, "case_s_median": float(np.median(t)), "case_s_max": float(t.max()),
           "gpu_hours_total": round(float(t.sum()) / 3600, 1), "rows": rows}
    print(f"cost model: {args.cohort} scans, {'Eq. 3 explanation of every domain, N = ' + str(args.samples) if args.explain else 'segmentation only'}; "
          f"unit costs {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in costs.items()})}")
    print(f"  per case: W_seg {w_seg}, W_cov {w_cov}, V median {median_v:.0f} voxel-windows (p99/p1 = "
          f"{args.load_spread:g}); case time median {np.median(t):.0f} s, max {t.max():.0f} s; "
          f"{out['gpu_hours_total']} device-hours in all")
    print(f"  segmentation alone: {seg_case:.1f} s per case predicted (t_io + W_seg x t_fwd)")
    print("  GPUs | dynamic (store claims) h | static (i mod N) h | ideal h | dynamic efficiency")
    for r in rows:
        print(f"  {r['gpus']:4d} | {r['dynamic_h']:24.2f} | {r['static_h']:18.2f} | {r['ideal_h']:7.2f} | "
              f"{r['dynamic_efficiency']:.3f}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", nargs="?", choices=("measure", "model", "both"), default="both")
    ap.add_argument("--bundle", default="msxai_unet")
    ap.add_argument("--cases", type=int, default=4, help="measure: cases per run (default 4)")
    ap.add_argument("--explain", default="none", choices=("none", "lesions"), help="measure: explain mode")
    ap.add_argument("--samples", type=int, default=50, help="noise copies N (model; measure with --explain)")
    ap.add_argument("--cohort", type=int, default=4000, help="model: scans in the cohort (default 4000)")
    ap.add_argument("--gpus", default="1,2,4,8,16,32", help="model: GPU counts")
    ap.add_argument("--no-explain", dest="model_explain", action="store_false",
                    help="model: segmentation only (default: Eq. 3 of every domain)")
    ap.add_argument("--t-fwd", type=float, default=None, help="s per 96^3 window forward (default: ASSUMED GPU)")
    ap.add_argument("--t-fwd-grad", type=float, default=None, help="s per window forward keeping the graph")
    ap.add_argument("--t-bwd", type=float, default=None, help="s per vector-Jacobian product (voxel, window, copy)")
    ap.add_argument("--t-io", type=float, default=None, help="s per case to read, prepare and write")
    ap.add_argument("--unit-costs", action="store_true", help="model: measure the unit costs here (CPU)")
    ap.add_argument("--load-median", type=float, default=None, help="median Eq. 3 voxel-windows per case")
    ap.add_argument("--load-spread", type=float, default=100.0, help="p99/p1 ratio of the per-case load")
    ap.add_argument("--windows", type=int, default=None, help="windows per image (default: patient26's)")
    ap.add_argument("--windows-covered", type=int, default=None, help="windows covering the explained domains")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    args.gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
    result = {}
    if args.part in ("measure", "both"):
        result["measure"] = measure(args)
    if args.part in ("model", "both"):
        load = patient26_load(args.bundle)
        costs = dict(ASSUMED_GPU, source="ASSUMED GPU figures (not measured)")
        if args.unit_costs:
            costs.update(unit_costs(args.bundle), source="measured here on the CPU", t_io=ASSUMED_GPU["t_io"])
        for k in ("t_fwd", "t_fwd_grad", "t_bwd", "t_io"):
            if getattr(args, k) is not None:
                costs[k] = getattr(args, k)
                costs["source"] = "given on the command line"
        a2 = argparse.Namespace(**{**vars(args), "explain": args.model_explain})
        result["model"] = model(a2, load, costs)
        result["model"]["patient26"] = load
        if "measure" in result and args.unit_costs:
            m = result["measure"]["runs"][0]["mean_case_s"]
            print(f"check: segmentation predicted {result['model']['segmentation_case_s']:.1f} s per case with the "
                  f"unit costs measured here, measured {m:.1f} s per case (1 process)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
