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
        "and OUT/lesions.csv on the FLAIR's own grid, and OUT/preprocessing.json (what was done to the inputs). "
        "FLAIR and T1: NIfTI files or DICOM series folders, any orientation and voxel size (docs/inputs.md).",
    )
    p.add_argument("--bundle", default=None,
                   help="bundle folder, or name (unet, dynunet, swinunetr) in $MSXAI_BUNDLES or a checkout's bundles/; "
                   "required without --ensemble")
    p.add_argument("--ensemble", action="store_true",
                   help="mean lesion probability of the three bundles (msxai_unet, msxai_dynunet, msxai_swinunetr; "
                   "each with its own normalisation and test-time augmentation), then threshold 0.3 and the lesion "
                   "rule; about the sum of the three bundles' times")
    p.add_argument("--flair", required=True, help="FLAIR: a NIfTI file or a DICOM series folder")
    p.add_argument("--t1", required=True, help="T1/MPRAGE: a NIfTI file or a DICOM series folder (any grid: it is "
                   "resampled onto the FLAIR's, and registered when measured misaligned)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--register", action="store_true",
                   help="always register the T1 rigidly onto the FLAIR (default: only when measured misaligned)")
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
        segmenter = EnsembleSegmentation(members)
        name = "ensemble of " + ", ".join(b.name for b in members)
    else:
        bundle = load_bundle(args.bundle, device=args.device, **overrides)
        segmenter, name = bundle, bundle.name
    from msxai.inference import write_result
    from msxai.transforms import describe_preprocessing

    prepared = segmenter.prepare(args.flair, args.t1)
    result = segmenter.segment(prepared, output_dir=args.out)  # the chain's writers
    paths = result.info.get("files") or write_result(result, args.out)
    for line in describe_preprocessing(result.info):
        print(line)
    print(f"{name}: {len(result.table)} lesion(s) in {result.seconds:.1f} s (threshold {segmenter.threshold}, "
          f">= {segmenter.min_volume_mm3} mm^3)")
    print(format_lesion_table(result.table))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
