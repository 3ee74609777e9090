"""``msxai evaluate``: Dice, nDSC and lesion-wise metrics of a prediction against a ground truth.

    msxai evaluate --pred P.nii.gz --truth T.nii.gz [--threshold 0.3] [--min-volume 5] [--out metrics.json]

The prediction may be a probability map, a binary mask or an instance map (see ``msxai.metrics.evaluate_case``).
Modes: ``run`` picks the mode from the arguments; the pair mode is ``evaluate_pair``. Another mode (e.g. a bundle
over a cohort) adds its arguments in ``register`` and a branch in ``run``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from msxai import MIN_LESION_MM3, THRESHOLD
from msxai.errors import InputError
from msxai.io import check_finite, check_same_grid, json_default, load_volume
from msxai.metrics import evaluate_case, format_metrics_table


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="Dice, nDSC and lesion-wise TPR/FNR/FDR/F1 of a prediction against a truth",
        description=__doc__.split("\n\n")[0],
    )
    add_pair_arguments(parser)
    add_common_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", type=Path, help="prediction NIfTI: probability map, binary mask or instance map")
    parser.add_argument("--truth", type=Path, help="ground-truth NIfTI: binary mask or instance map")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help=f"probability threshold (default {THRESHOLD})")
    parser.add_argument("--min-volume", type=float, default=MIN_LESION_MM3, dest="min_volume",
                        help=f"smallest lesion kept, in mm^3 (default {MIN_LESION_MM3:g})")
    parser.add_argument("--out", type=Path, default=None, help="write the metrics as JSON here")


def run(args) -> int:
    if args.pred is not None or args.truth is not None:
        return evaluate_pair(args)
    raise InputError("evaluate: give --pred and --truth")


def evaluate_files(pred_path: Path, truth_path: Path, threshold: float = THRESHOLD,
                   min_volume_mm3: float = MIN_LESION_MM3) -> dict:
    """Load a prediction and a truth NIfTI (same grid required) and return ``evaluate_case``'s metrics."""
    pred = load_volume(pred_path, "prediction")
    truth = load_volume(truth_path, "truth")
    check_finite(pred.array, "prediction")
    check_finite(truth.array, "truth")
    check_same_grid(pred, truth, "prediction", "truth")
    return evaluate_case(pred.array, truth.array, pred.affine, threshold=threshold, min_volume_mm3=min_volume_mm3)


def evaluate_pair(args) -> int:
    if args.pred is None or args.truth is None:
        raise InputError("evaluate: --pred and --truth must be given together")
    metrics = evaluate_files(args.pred, args.truth, args.threshold, args.min_volume)
    report = {"pred": str(args.pred), "truth": str(args.truth), "threshold": args.threshold,
              "min_volume_mm3": args.min_volume, "metrics": metrics}
    print(f"prediction: {args.pred}\ntruth:      {args.truth}\n")
    print(format_metrics_table(metrics))
    write_json(report, args.out)
    return 0


def write_json(report: dict, path: Path | None) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=json_default) + "\n")
    print(f"\nwrote {path}")
