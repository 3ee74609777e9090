"""``msxai explain``: instance-level saliency (SmoothGrad Eq. 2/3 or Grad-CAM++) of lesions or of a drawn region.

Thin wrapper around :func:`msxai.saliency.engine.explain_to_files` (which writes with the one
explain-and-write path, :func:`msxai.saliency.engine.write_explanation`)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "explain",
        help="per-lesion saliency maps (instance SmoothGrad or Grad-CAM++) and their summary",
        description="Explain predicted lesions (or a user-drawn region) of a FLAIR/T1 pair with a bundle's network "
        "and sliding-window inferer. Writes float32 NIfTI maps on the FLAIR grid and saliency.json/.csv.",
    )
    p.add_argument("--bundle", default="unet",
                   help="bundle folder, or short name (unet, dynunet, ...) in $MSXAI_BUNDLES or a checkout's bundles/ "
                        "(default unet)")
    p.add_argument("--flair", required=True, help="FLAIR NIfTI")
    p.add_argument("--t1", required=True, help="T1/MPRAGE NIfTI on the FLAIR grid")
    p.add_argument("--lesions", help="lesion instance map (lesions.nii.gz of `msxai segment`) on the FLAIR grid")
    p.add_argument("--lesion-id", default="all", help="lesion id K, a comma-separated list, or 'all' (default)")
    p.add_argument("--domain", help="explain this mask (NIfTI, voxels > 0) instead of predicted lesions")
    p.add_argument("--method", choices=("smoothgrad", "gradcampp"), default="smoothgrad")
    p.add_argument("--aggregation", choices=("max", "mean"), default="max",
                   help="max = Eq. 3 (default), mean = Eq. 2")
    p.add_argument("--samples", type=int, default=50, help="SmoothGrad noise copies N (default 50)")
    p.add_argument("--sigma", type=float, default=0.05, help="noise sigma as a fraction of the FLAIR range (0.05)")
    p.add_argument("--sigma-abs", type=float, default=None, help="absolute noise sigma (overrides --sigma)")
    p.add_argument("--layer", default=None, help="Grad-CAM++ layer (named_modules path; default: the bundle's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto",
                   help="auto (default: $MSXAI_DEVICE if set, else CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--max-batch", type=int, default=None, help="vector-Jacobian products per backward (memory knob)")
    p.add_argument("--noise-batch", type=int, default=None, help="noise copies per forward")
    p.add_argument("--error-flag", default="auto", metavar="auto|none|FILE",
                   help="saliency-based error flag: auto (default) = the bundle's models/error_flag.json when it "
                        "ships one; FILE = this fitted model; none = no error score")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from msxai.bundle import load_bundle
    from msxai.device import resolve_device
    from msxai.errors import InputError
    from msxai.experiments.error_flag import load_bundle_flag
    from msxai.saliency.engine import explain_to_files

    if args.samples < 1:
        raise InputError(f"--samples must be >= 1, got {args.samples}")
    device = resolve_device(args.device)
    bundle = load_bundle(args.bundle, device=device)
    flag_file = None if args.error_flag in ("auto", "none") else args.error_flag
    if flag_file is not None:
        # a bad --error-flag FILE is refused before the maps are computed
        load_bundle_flag(getattr(bundle, "path", None), flag_file)
    result = explain_to_files(
        bundle, args.flair, args.t1, args.out, lesions_path=args.lesions, lesion_ids=args.lesion_id,
        domain_path=args.domain, method=args.method, aggregation=args.aggregation, n_samples=args.samples,
        sigma_fraction=args.sigma, sigma=args.sigma_abs, layer=args.layer, seed=args.seed,
        error_flag=None if args.error_flag == "none" else (flag_file or "auto"),
        progress=not args.no_progress, max_batch=args.max_batch, noise_batch=args.noise_batch,
    )
    if args.error_flag != "none":
        scores = result["summaries"]
        for name, s in scores.items():
            if s["error_score"] is not None:
                print(f"{name}: error score (P false positive) {s['error_score']:.3f}"
                      f"{'  FLAGGED' if s['error_flag'] else ''}")
        reasons = sorted({s["error_flag_reason"] for s in scores.values() if s["error_flag_reason"]})
        for r in reasons:
            print(f"error score not given: {r}")
    n = len(result["files"])
    print(f"explained {n} {'domain' if args.domain else 'lesion'}{'s' if n != 1 else ''} with {args.method}: "
          f"{result['json']}, {result['csv']}")
    return 0
