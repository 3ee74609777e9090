"""``msxai lesions``: lesion instances (t = 0.3, 18-connectivity, >= 5 mm^3) of a probability map or mask.

    msxai lesions --prob P.nii.gz [--threshold 0.3] [--min-volume 5] [--truth T.nii.gz] --out DIR

Writes DIR/lesions.nii.gz (instance ids 1..n, ordered by the raster position of each lesion's first voxel),
DIR/lesions.json and DIR/lesions.csv (one row per lesion) and prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from msxai import MIN_LESION_MM3, THRESHOLD
from msxai.io import check_finite, check_same_grid, load_volume, save_volume
from msxai.lesions import format_lesion_table, lesion_table, prediction_instances, write_lesion_table


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "lesions",
        help="lesion instances and their table from a probability map or a binary mask",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--prob", type=Path, required=True,
                        help="probability map in [0, 1], binary mask or instance map (NIfTI)")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help=f"probability threshold (default {THRESHOLD})")
    parser.add_argument("--min-volume", type=float, default=MIN_LESION_MM3, dest="min_volume",
                        help=f"smallest lesion kept, in mm^3 (default {MIN_LESION_MM3:g})")
    parser.add_argument("--truth", type=Path, default=None, help="optional ground truth: adds the TP/FP class")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    prob = load_volume(args.prob, "probability map")
    check_finite(prob.array, "probability map")
    truth = None
    if args.truth is not None:
        truth_vol = load_volume(args.truth, "truth")
        check_finite(truth_vol.array, "truth")
        check_same_grid(prob, truth_vol, "probability map", "truth")
        truth = truth_vol.array
    labels = prediction_instances(prob.array, affine=prob.affine, threshold=args.threshold,
                                  min_volume_mm3=args.min_volume)
    # probability columns only for a real probability map (not for a 0/1 mask or an instance map)
    is_prob = float(prob.array.max(initial=0)) <= 1.0 and bool(np.any((prob.array > 0) & (prob.array < 1)))
    rows = lesion_table(labels, prob.affine, prob=prob.array if is_prob else None, truth=truth)
    out = Path(args.out)
    save_volume(out / "lesions.nii.gz", labels.astype(np.int32), prob.affine, dtype=np.int32)
    write_lesion_table(rows, out / "lesions.json", out / "lesions.csv")
    print(f"{len(rows)} lesion(s) in {args.prob} (threshold {args.threshold:g}, >= {args.min_volume:g} mm^3, "
          "18-connectivity)\n")
    print(format_lesion_table(rows))
    print(f"\nwrote {out / 'lesions.nii.gz'}, {out / 'lesions.json'}, {out / 'lesions.csv'}")
    return 0
