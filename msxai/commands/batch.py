"""``msxai batch``: segment (and explain) a whole cohort, in one process or many under ``torchrun``.

Thin wrapper around :mod:`msxai.batch` (see docs/cohort.md)."""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "batch",
        help="segment (and explain) every case of a cohort; one process or many (torchrun), resumable",
        description="Segment every case of a cohort with a bundle and, optionally, explain every lesion (--explain "
        "lesions) or the TP/FP/FN/TN lesion domains (--explain domains, needs the truth). Run it as it is (one "
        "process) or under torchrun (one process per GPU, several nodes): cases are claimed one at a time through "
        "torch.distributed's store. Each case goes to OUT/cases/<id>/ with a done-marker; a rerun skips finished "
        "cases and redoes those whose settings, weights or inputs changed; failures are recorded in "
        "OUT/failures/ and the cohort goes on. The summary: OUT/cases.csv|json, OUT/domains.csv|json, "
        "OUT/cohort.json.",
    )
    p.add_argument("--bundle", default="bundles/msxai_unet", help="bundle folder or short name (unet, dynunet, ...)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cohort", metavar="DIR|dataset.json|datalist.json",
                     help="a folder of studies (naming rule of docs/monailabel.md), an msxai synth cohort, or a "
                          "MONAI datalist")
    src.add_argument("--summary-of", metavar="OUT", help="only merge the summary of an earlier run's folder")
    p.add_argument("--split", default="all", help="split of an msxai synth dataset.json (default all)")
    p.add_argument("--datalist-key", default=None, help="key of the case list in a datalist (default testing)")
    p.add_argument("--base-dir", default=None, help="folder that relative datalist paths start from")
    p.add_argument("--out", help="output folder (required with --cohort)")
    p.add_argument("--explain", choices=("none", "lesions", "domains"), default="none",
                   help="none (segmentation only, default), lesions (every predicted lesion) or domains (TP/FP/FN/TN "
                        "against the truth)")
    p.add_argument("--method", choices=("smoothgrad", "gradcampp"), default="smoothgrad")
    p.add_argument("--aggregation", choices=("max", "mean"), default="max", help="max = Eq. 3 (default), mean = Eq. 2")
    p.add_argument("--samples", type=int, default=50, help="SmoothGrad noise copies N (default 50)")
    p.add_argument("--sigma", type=float, default=0.05, help="noise sigma as a fraction of the FLAIR range")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layer", default=None, help="Grad-CAM++ layer (default: the bundle's)")
    p.add_argument("--classes", default="TP,FP,FN,TN", help="domain classes for --explain domains")
    p.add_argument("--n-tn", type=int, default=10, help="TN balls per case for --explain domains (paper: 10)")
    p.add_argument("--tn-mm3", type=float, default=93.0, help="volume of a TN ball (paper: 93 mm^3)")
    p.add_argument("--error-flag", default="auto", metavar="auto|none|FILE",
                   help="error score of each explained predicted lesion, as msxai explain gives it")
    p.add_argument("--device", default="auto",
                   help="auto (cuda:<LOCAL_RANK> when CUDA is available, else cpu), cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: "
                                                             "OMP_NUM_THREADS or torch's)")
    p.add_argument("--max-batch", type=int, default=None, help="vector-Jacobian products per backward (memory)")
    p.add_argument("--noise-batch", type=int, default=None, help="noise copies per forward (memory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the per-case lines stay)")
    p.set_defaults(func=run)


def settings_from_args(args):
    from msxai.batch.case import BatchSettings

    return BatchSettings(
        explain=args.explain, method=args.method, aggregation=args.aggregation, samples=args.samples,
        sigma_fraction=args.sigma, seed=args.seed, layer=args.layer,
        classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()), n_tn=args.n_tn,
        tn_mm3=args.tn_mm3, error_flag=args.error_flag, max_batch=args.max_batch, noise_batch=args.noise_batch,
    ).validate()


def run(args: argparse.Namespace) -> int:
    import torch

    from msxai.errors import InputError

    if args.summary_of:
        from msxai.batch.summary import summarize

        s = summarize(args.summary_of)
        print(f"{args.summary_of}: {s['counts']} ({s['n_cases']} cases)")
        return 0 if s["counts"]["failed"] == 0 else 1
    if not args.out:
        raise InputError("--out DIR is required")
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", 0) or 0)
    if threads:
        torch.set_num_threads(threads)
    from msxai.batch.cases import load_cases
    from msxai.batch.dist import init_distributed
    from msxai.batch.run import check_cases, run_batch
    from msxai.bundle import load_bundle

    settings = settings_from_args(args)
    cases = load_cases(args.cohort, split=args.split, key=args.datalist_key, base_dir=args.base_dir)
    check_cases(cases, settings)
    if args.error_flag not in ("auto", "none"):
        from msxai.experiments.error_flag import load_bundle_flag

        load_bundle_flag(None, args.error_flag)  # a bad FILE is refused before any work
    ctx = init_distributed(args.device)
    try:
        bundle = load_bundle(args.bundle, device=ctx.device)
        result = run_batch(bundle, cases, args.out, settings, ctx, progress=not args.no_progress)
    finally:
        ctx.close()
    summary = result.get("summary")
    if summary is None:
        return 0
    return 0 if summary["counts"]["failed"] == 0 and summary["counts"]["missing"] == 0 else 1
