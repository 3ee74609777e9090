"""``msxai metadata``: keep a bundle's ``configs/metadata.json`` true to its weights and evaluation files."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "metadata",
        help="refresh (or check) a bundle's metadata.json from models/model.pt and eval/*.json",
        description="Write the sha256 of models/model.pt under its version (new weights need --version and "
        "--changelog) and eval_metrics from eval/metrics_*.json (4 decimals). --check only lists disagreements "
        "(exit 1 when there are any).",
    )
    p.add_argument("--bundle", required=True, help="bundle folder")
    p.add_argument("--version", default=None, help="the new version for new weights (MAJOR.MINOR.PATCH)")
    p.add_argument("--changelog", default=None, help="what changed in the new version (one line)")
    p.add_argument("--check", action="store_true", help="only check; exit 1 when the metadata disagrees")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from msxai.errors import InputError
    from msxai.metadata import metadata_problems, refresh_metadata

    bundle = Path(args.bundle)
    if not (bundle / "configs" / "metadata.json").is_file():
        raise InputError(f"not a bundle (no configs/metadata.json): {bundle}")
    if args.check:
        problems = metadata_problems(bundle)
        for p in problems:
            print(f"{bundle.name}: {p}")
        if not problems:
            print(f"{bundle.name}: metadata agrees with the weights and the evaluation files")
        return 1 if problems else 0
    meta = refresh_metadata(bundle, args.version, args.changelog)
    print(f"{bundle.name} {meta['version']}: weights sha256 {meta['weights_sha256'][meta['version']][:12]}..., "
          f"eval_metrics {', '.join(meta['eval_metrics'])}")
    return 0
