"""``msxai synth``: write a synthetic MS cohort (FLAIR, T1, lesion instance labels, brain masks, dataset.json)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synth",
        help="generate a synthetic MS cohort from the MNI152 2009a template (no download)",
        description="Generate N synthetic subjects (<id>_FLAIR/_T1/_lesions/_brainmask.nii.gz) and DIR/dataset.json "
        "with deterministic train/val/test splits. `--n 1 --seed 7` writes a single demo subject.",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=24, help="number of subjects (default 24)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    p.add_argument("--skull", action="store_true", help="add skull and scalp (default: brain-extracted)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--voxel-size", type=float, default=1.0, help="isotropic voxel size in mm (default 1)")
    p.add_argument("--splits", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"),
                   help="split fractions (default 0.7 0.15 0.15)")
    p.add_argument("--name", default="msxai-synth", help="dataset name stored in dataset.json")
    p.add_argument("--prefix", default="synth", help="subject id prefix (ids are <prefix>000, ...)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from msxai.synth import SynthConfig, generate_cohort

    path = generate_cohort(
        args.out,
        args.n,
        seed=args.seed,
        skull=args.skull,
        workers=args.workers,
        splits=tuple(args.splits),
        config=SynthConfig(voxel_size=args.voxel_size),
        name=args.name,
        prefix=args.prefix,
        progress=not args.no_progress,
    )
    print(path)
    return 0
