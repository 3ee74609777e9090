"""``msxai experiments``: the paper's experiments on a cohort, per bundle, as CSV tables, PNGs and report.html."""

from __future__ import annotations

import os
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "experiments",
        help="reproduce the paper's saliency experiments and write an HTML report",
        description="Run the experiments of Spagnolo et al. (Sci Rep 2026) - aggregation, FLAIR vs MPRAGE signs, "
        "TP/FP/FN/TN peaks, sanity domains, transplants, context dilation, model randomisation - and the "
        "saliency-based error flag, per bundle, on a cohort split and/or the real patient.",
    )
    p.add_argument("--bundle", action="append", default=[], metavar="B",
                   help="bundle folder or short name (unet, msxai_dynunet, ...) running every experiment; repeat for "
                        "several")
    p.add_argument("--context-only-bundle", action="append", default=[], metavar="B",
                   help="a bundle that runs the context-dilation experiment only (forward passes; cheap); repeatable")
    p.add_argument("--cohort", metavar="DIR|dataset.json", help="synthetic cohort (msxai synth output)")
    p.add_argument("--from-cohort", action="append", default=[], metavar="RUN_DIR",
                   help="experiments 2, 3 and the error flag from the files of an msxai batch run with --explain "
                        "domains (no network; repeat to pool runs); experiments 1, 4-6 still need --bundle")
    p.add_argument("--split", default="test", help="cohort split to use (default test; 'all' = every subject)")
    p.add_argument("--real-patient", nargs="?", const=True, default=None, metavar="DIR",
                   help="add the real MS patient (patient26): the folder DIR holding FLAIR/T1/consensus_gt.nii.gz, "
                        "else $MSXAI_REAL_DATA, else (in a checkout) ../shared/data/open_ms_data/patient26")
    p.add_argument("--out", required=True, metavar="REPORT_DIR", help="output folder (report.html, CSVs, PNGs)")
    p.add_argument("--samples", type=int, default=8, help="SmoothGrad noise samples N (paper: 50; default 8)")
    p.add_argument("--max-lesions-per-class", type=int, default=6, metavar="K",
                   help="explained TP/FP/FN/TN domains per class over the cohort (default 6)")
    p.add_argument("--aggregation", choices=("max", "mean"), default="max",
                   help="aggregation of the bulk maps: max = Eq. 3 (paper, default), mean = Eq. 2 (much cheaper)")
    p.add_argument("--min-abs", type=float, default=0.1,
                   help="experiment 2: discard |g| below this (paper: 0.1, for Eq. 3 maps)")
    p.add_argument("--min-abs-relative", type=float, default=None, metavar="F",
                   help="experiment 2: discard |g| below F x the lesion's peak |g| instead (for Eq. 2 maps, whose "
                        "values shrink with the lesion size)")
    p.add_argument("--exp1-samples", type=int, default=None, help="N for experiment 1 (default: --samples)")
    p.add_argument("--exp1-max-voxels", type=int, default=100000,
                   help="largest lesion (voxels) used as the 'large' lesion of experiment 1")
    p.add_argument("--transplant-lesions", type=int, default=1)
    p.add_argument("--context-lesions", type=int, default=2)
    p.add_argument("--context-max-mm", type=float, default=35.0)
    p.add_argument("--context-step-mm", type=float, default=1.0)
    p.add_argument("--context-radii", default="", metavar="R1,R2,...",
                   help="explicit context radii in mm (e.g. 0,1,2,3,5,8,12,20,35) instead of --context-max-mm/--context-step-mm")
    p.add_argument("--randomization-lesions", type=int, default=2)
    p.add_argument("--max-domain-windows", type=int, default=0, metavar="W",
                   help="do not explain TP/FP/FN lesions read by more than W sliding windows (0 = no limit)")
    p.add_argument("--max-domain-cost", type=float, default=0.0, metavar="C",
                   help="explain in bulk only domains whose Eq. 3 cost (sum over the domain's voxels of the sliding "
                        "windows covering each) is at most C voxel-windows (0 = no limit; CPU budget)")
    p.add_argument("--exp1-max-cost", type=float, default=0.0, metavar="C",
                   help="the 'large' lesion of experiment 1 is the largest TP costing at most C voxel-windows")
    p.add_argument("--bulk-minutes", type=float, default=0.0, metavar="M",
                   help="stop starting new bulk maps after M minutes (0 = no limit); domains are taken in turn "
                        "TP, FP, FN, TN so the classes stay balanced")
    p.add_argument("--tn-mm3", type=float, default=93.0,
                   help="volume of the TN balls and of the healthy-WM ball (paper: 93 mm^3)")
    p.add_argument("--classes", default="TP,FP,FN,TN", help="domain classes explained in bulk (default TP,FP,FN,TN)")
    p.add_argument("--skip", action="append", default=[], choices=("exp1", "exp4", "exp5", "exp6", "randomization"),
                   help="an experiment not to run (CPU budget); repeatable")
    p.add_argument("--results-dir", metavar="DIR", help="also pickle each model's results here (for --include-results)")
    p.add_argument("--include-results", action="append", default=[], metavar="PKL",
                   help="add a model's results from an earlier run (results_<model>.pkl); a --context-only-bundle "
                        "of the same model replaces its context-dilation rows; repeatable")
    p.add_argument("--ship-error-flag", action="store_true",
                   help="install each full bundle's fitted error flag as <bundle>/models/error_flag.json (read by "
                        "msxai explain and the MONAI Label app)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from msxai.errors import InputError
    from msxai.experiments import run_experiments
    from msxai.experiments.cohort import cohort_cases, real_patient_case
    from msxai.bundle import load_bundle
    from msxai.experiments.state import ExperimentConfig

    torch.set_num_threads(int(args.threads or os.environ.get("OMP_NUM_THREADS", 1) or 1))
    if args.from_cohort:
        return _run_from_cohort(args)
    if args.samples < 1:
        raise InputError(f"--samples must be >= 1, got {args.samples}")
    if args.max_lesions_per_class < 1:
        raise InputError(f"--max-lesions-per-class must be >= 1, got {args.max_lesions_per_class}")
    cases = []
    if args.cohort:
        cases += cohort_cases(args.cohort, None if args.split == "all" else args.split)
    if args.real_patient:
        cases.append(real_patient_case(None if args.real_patient is True else args.real_patient))
    if not cases and (args.bundle or args.context_only_bundle):
        raise InputError("no cases: give --cohort DIR and/or --real-patient")
    if not (args.bundle or args.context_only_bundle or args.include_results):
        raise InputError("no bundle: give --bundle B (every experiment), --context-only-bundle B, or "
                         "--include-results PKL (report only)")
    models = [load_bundle(_resolve(b)) for b in args.bundle]
    light = [load_bundle(_resolve(b)) for b in args.context_only_bundle]
    cfg = ExperimentConfig(
        samples=args.samples, max_lesions_per_class=args.max_lesions_per_class, seed=args.seed,
        aggregation=args.aggregation, min_abs=args.min_abs, min_abs_relative=args.min_abs_relative,
        exp1_samples=args.exp1_samples, exp1_max_voxels=args.exp1_max_voxels,
        transplant_lesions=args.transplant_lesions, context_lesions=args.context_lesions,
        context_max_mm=args.context_max_mm, context_step_mm=args.context_step_mm,
        context_radii_mm=_radii(args.context_radii),
        randomization_lesions=args.randomization_lesions, max_domain_windows=args.max_domain_windows,
        bulk_budget_s=60.0 * args.bulk_minutes, classes=_classes(args.classes), skip=tuple(args.skip), max_domain_cost=args.max_domain_cost, exp1_max_cost=args.exp1_max_cost, tn_mm3=args.tn_mm3,
        n_boot=args.n_boot, progress=not args.no_progress,
    )
    from msxai.experiments import load_results

    included = [load_results(p) for p in args.include_results]
    settings = {
        "cohort": (", ".join(sorted({c.source for c in cases})) + f" ({', '.join(c.id for c in cases)})") if cases
        else "see each model's run",
        "command": "msxai experiments " + " ".join(f"--bundle {b}" for b in args.bundle),
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch threads": torch.get_num_threads(),
        "arguments": {k: v for k, v in vars(args).items() if k != "func"},
    }
    if light:
        settings["command"] += " " + " ".join(f"--context-only-bundle {b}" for b in args.context_only_bundle)
    if included and not (models or light):  # report only: the runs' own settings are in each model section
        settings["command"] = "msxai experiments (report from the results of the runs below)"
        settings["arguments"] = {k: getattr(args, k) for k in ("include_results", "out", "ship_error_flag")}
    if included:
        settings["included results"] = ", ".join(f"{r.model} ({p})" for r, p in zip(included, args.include_results))
    path, results = run_experiments(models + light, cases, args.out, cfg, settings, context_only=light,
                                    included=included, results_dir=args.results_dir)
    for r in results:
        print(f"{r.model}: {len(r.lesions)} domains explained, {len(r.exp6)} context steps, "
              f"{r.timings.get('total_s', 0):.0f} s")
    if args.ship_error_flag:
        from msxai.experiments.error_flag import BUNDLE_MODEL_FILE

        for r in results:
            if r.kind != "full":
                continue
            bundle_dir = (r.error_flag_model.info.get("bundle") if r.error_flag_model is not None else None)
            if r.error_flag_model is None or not bundle_dir:
                print(f"{r.model}: no error flag fitted ({r.error_flag.get('status', 'not run')}); nothing shipped")
                continue
            dest = r.error_flag_model.save(Path(bundle_dir) / BUNDLE_MODEL_FILE)
            print(f"{r.model}: error flag installed as {dest}")
    print(f"report: {path}")
    return 0


def _run_from_cohort(args) -> int:
    from msxai.batch.experiments import report_from_cohort
    from msxai.errors import InputError
    from msxai.experiments.runner import ExperimentConfig

    if args.bundle or args.context_only_bundle or args.cohort or args.real_patient or args.include_results:
        raise InputError("--from-cohort reads a cohort run's files only: experiments 1, 4, 5, 6 and the "
                         "randomisation check need the network, run them separately (--bundle B --cohort C)")
    cfg = ExperimentConfig(min_abs=args.min_abs, min_abs_relative=args.min_abs_relative, n_boot=args.n_boot,
                           seed=args.seed, progress=not args.no_progress)
    settings = {"cohort": "cohort run(s) " + ", ".join(args.from_cohort),
                "command": "msxai experiments " + " ".join(f"--from-cohort {d}" for d in args.from_cohort),
                "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    path, results = report_from_cohort(args.from_cohort, args.out, cfg, settings)
    for r in results:
        print(f"{r.model}: {len(r.lesions)} domains from {len(r.segmentation)} cases; experiments 2, 3 and the "
              f"error flag ({r.error_flag.get('status', '')}); experiments 1, 4, 5, 6 and the randomisation check "
              "need the network and were not run")
        if args.ship_error_flag:
            from msxai.experiments.error_flag import BUNDLE_MODEL_FILE

            bundle_dir = r.error_flag_model.info.get("bundle") if r.error_flag_model is not None else None
            if not bundle_dir:
                print(f"{r.model}: no error flag fitted ({r.error_flag.get('status', 'not run')}); nothing shipped")
            else:
                print(f"{r.model}: error flag installed as {r.error_flag_model.save(Path(bundle_dir) / BUNDLE_MODEL_FILE)}")
    print(f"report: {path}")
    return 0


def _resolve(b: str):
    from msxai.bundle import resolve_bundle_dir

    return resolve_bundle_dir(b)


def _classes(text: str) -> tuple:
    from msxai.errors import InputError
    from msxai.experiments.selection import CLASSES

    got = tuple(c.strip().upper() for c in text.split(",") if c.strip())
    bad = [c for c in got if c not in CLASSES]
    if bad or not got:
        raise InputError(f"--classes: use a comma-separated subset of {','.join(CLASSES)}, got {text!r}")
    return got


def _radii(text: str) -> tuple:
    from msxai.errors import InputError

    if not text.strip():
        return ()
    try:
        out = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--context-radii: comma-separated numbers in mm, got {text!r}") from None
    if any(r < 0 for r in out):
        raise InputError(f"--context-radii: radii must be >= 0, got {text!r}")
    return out
