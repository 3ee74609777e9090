"""``msxai demo``: the README's main job on the embedded default.

Generates a synthetic MS patient from a fixed seed, segments it with a bundle (U-Net by default), prints and writes
the lesion table, scores it against the synthetic truth, and explains the patient's lesions with instance
SmoothGrad. Every step is a library call that the other commands use too (``msxai synth``, ``msxai segment``,
``msxai evaluate``, ``msxai explain``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="main job: synthetic patient -> segmentation -> lesion table -> metrics -> per-lesion saliency",
        description="Generate a synthetic MS patient (fixed seed), segment it with a bundle, write and print the "
        "lesion table and metrics, and explain its lesions with instance SmoothGrad (Eq. 3 by default).",
    )
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--seed", type=int, default=7, help="synthetic patient seed (default 7)")
    p.add_argument("--flair", help="explain this FLAIR instead of a synthetic patient (with --t1)")
    p.add_argument("--t1", help="T1/MPRAGE on the FLAIR grid (with --flair)")
    p.add_argument("--truth", help="optional ground-truth lesion mask for --flair/--t1")
    p.add_argument("--bundle", default="msxai_unet", help="bundle folder or short name (default msxai_unet)")
    p.add_argument("--method", choices=("smoothgrad", "gradcampp"), default="smoothgrad")
    p.add_argument("--aggregation", choices=("max", "mean"), default="max", help="max = Eq. 3, mean = Eq. 2")
    p.add_argument("--samples", type=int, default=None,
                   help="SmoothGrad noise copies N (default: 50 as in the paper on CUDA, 4 on the CPU)")
    p.add_argument("--explain", default=None,
                   help="how many lesions to explain, smallest first (the cost of Eq. 3 grows with the lesion's "
                   "voxels), or 'all', or 0 to skip (default: all on CUDA, 1 on the CPU)")
    p.add_argument("--device", default="auto",
                   help="auto (default: $MSXAI_DEVICE if set, else CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _explained_ids(table: list[dict], how: str) -> list[int]:
    from msxai.errors import InputError

    if how.strip().lower() == "all":
        return [int(r["id"]) for r in table]
    try:
        k = int(how)
    except ValueError:
        raise InputError(f"--explain must be a number of lesions or 'all', got {how!r}") from None
    if k < 0:
        raise InputError(f"--explain must be >= 0, got {k}")
    smallest = sorted(table, key=lambda r: (float(r["volume_mm3"]), int(r["id"])))
    return sorted(int(r["id"]) for r in smallest[:k])


def run(args: argparse.Namespace) -> int:
    from msxai.bundle import load_bundle
    from msxai.device import resolve_device
    from msxai.errors import InputError
    from msxai.inference import write_result
    from msxai.io import json_default, load_volume
    from msxai.lesions import format_lesion_table
    from msxai.metrics import evaluate_case, format_metrics_table
    from msxai.saliency.engine import explain_to_files

    out = Path(args.out)
    t_start = time.perf_counter()
    if (args.flair is None) != (args.t1 is None):
        raise InputError("give both --flair and --t1, or neither (then a synthetic patient is generated)")
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    samples = args.samples if args.samples is not None else (50 if on_gpu else 4)
    how_many = args.explain if args.explain is not None else ("all" if on_gpu else "1")
    if samples < 1:
        raise InputError(f"--samples must be >= 1, got {samples}")

    # 1. the patient
    if args.flair is None:
        from msxai.synth import generate_subject, write_subject

        t0 = time.perf_counter()
        subject_id = f"synth_demo_seed{args.seed}"
        paths = write_subject(generate_subject(args.seed), out / "patient", subject_id)
        flair, t1, truth = paths["flair"], paths["t1"], paths["label"]
        print(f"[1/4] synthetic patient {subject_id} (seed {args.seed}) in {time.perf_counter() - t0:.1f} s -> "
              f"{out / 'patient'}")
    else:
        flair, t1, truth = Path(args.flair), Path(args.t1), (Path(args.truth) if args.truth else None)
        print(f"[1/4] patient: FLAIR {flair}, T1 {t1}")

    # 2. segmentation with the bundle's own inference pipeline
    bundle = load_bundle(args.bundle, device=device)
    t0 = time.perf_counter()
    seg_dir = out / "segmentation"
    result = bundle.segment(bundle.prepare(flair, t1))
    write_result(result, seg_dir)
    print(f"[2/4] {bundle.name} on {device}: {len(result.table)} lesion(s) in {time.perf_counter() - t0:.1f} s -> "
          f"{seg_dir}")
    print(format_lesion_table(result.table))

    # 3. metrics against the truth
    summary = {"bundle": bundle.name, "flair": str(flair), "t1": str(t1), "n_lesions": len(result.table)}
    if truth is not None:
        truth_vol = load_volume(truth, "truth")
        metrics = evaluate_case(result.labels, truth_vol.array, result.affine)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=json_default))
        summary["metrics"] = str(out / "metrics.json")
        print("[3/4] metrics against the truth:")
        print(format_metrics_table(metrics))
    else:
        print("[3/4] no truth given: metrics skipped")

    # 4. per-lesion saliency
    ids = _explained_ids(result.table, how_many)
    if ids:
        t0 = time.perf_counter()
        sal = explain_to_files(
            bundle, flair, t1, out / "saliency", lesions_path=seg_dir / "lesions.nii.gz", lesion_ids=ids,
            method=args.method, aggregation=args.aggregation, n_samples=samples, seed=0,
            progress=not args.no_progress,
        )
        summary["saliency"] = str(sal["json"])
        print(f"[4/4] {args.method} ({args.aggregation}, N={samples}) of lesion(s) {ids} in "
              f"{time.perf_counter() - t0:.1f} s -> {out / 'saliency'}")
        _print_saliency(sal["summaries"])
    else:
        print("[4/4] no lesion to explain")
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    print(f"done in {summary['seconds']} s; summary: {out / 'demo.json'}")
    return 0


def _print_saliency(summaries: dict) -> None:
    """One line per lesion: the peak min/max of each map inside the lesion domain Ω."""
    for name, s in summaries.items():
        parts = []
        for map_name, m in s["maps"].items():
            parts.append(f"{map_name} in Ω [{m['peak_min_in_domain']:+.3g}, {m['peak_max_in_domain']:+.3g}]")
        prob = s.get("mean_probability")
        mean_p = "" if prob is None else f" (mean p = {prob:.2f})"
        print(f"  {name}, {s['domain_volume_mm3']:.0f} mm³{mean_p}: " + ", ".join(parts))
