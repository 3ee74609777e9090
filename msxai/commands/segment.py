"""``msxai segment``: segment MS lesions with a bundle's own inference config (the same code path as
``python -m monai.bundle run --config_file <bundle>/configs/inference.json``)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment MS lesions in a FLAIR + T1 pair with an msxai bundle",
        description="Run a bundle (sliding-window inference, softmax, threshold 0.3, 18-connected lesions >= 5 mm^3) "
        "and write OUT/probability.nii.gz, OUT/mask.nii.gz, OUT/lesions.nii.gz (instance ids), OUT/lesions.json "
        "and OUT/lesions.csv on the input grid.",
    )
    p.add_argument("--bundle", default=None,
                   help="bundle folder or name (e.g. bundles/msxai_unet, unet, dynunet); required without --ensemble")
    p.add_argument("--ensemble", action="store_true",
                   help="mean lesion probability of the three bundles (msxai_unet, msxai_dynunet, msxai_swinunetr; "
                   "each with its own normalisation and test-time augmentation), then threshold 0.3 and the lesion "
                   "rule; about the sum of the three bundles' times")
    p.add_argument("--flair", required=True, help="FLAIR NIfTI")
    p.add_argument("--t1", required=True, help="T1/MPRAGE NIfTI (same grid as FLAIR unless --register)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--register", action="store_true", help="rigidly register T1 onto FLAIR first")
    p.add_argument("--n4", action="store_true", help="N4 bias-field correction first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from msxai.bundle import load_bundle
    from msxai.errors import InputError
    from msxai.lesions import format_lesion_table

    if args.threads:
        torch.set_num_threads(int(args.threads))
    overrides = {}
    if args.register:
        overrides["register"] = "always"
    if args.n4:
        overrides["n4"] = True
    if args.ensemble == (args.bundle is not None):
        raise InputError("segment: give either --bundle NAME or --ensemble")
    if args.ensemble:
        from msxai.bundle import BUNDLE_NAMES
        from msxai.inference import EnsembleSegmentation

        members = [load_bundle(name, device=args.device, **overrides) for name in BUNDLE_NAMES]
        segmenter = EnsembleSegmentation([b.segmenter for b in members])
        name = "ensemble of " + ", ".join(b.name for b in members)
    else:
        bundle = load_bundle(args.bundle, device=args.device, **overrides)
        segmenter, name = bundle.segmenter, bundle.name
    result = segmenter.segment(args.flair, args.t1)
    from msxai.inference import write_result

    paths = write_result(result, args.out)
    print(f"{name}: {len(result.table)} lesion(s) in {result.seconds:.1f} s (threshold {segmenter.threshold}, "
          f">= {segmenter.min_volume_mm3} mm^3)")
    print(format_lesion_table(result.table))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
