"""``msxai train``: train a bundle with its own ``configs/train.json`` (MONAI SupervisedTrainer/Evaluator)."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an msxai bundle on a cohort (dataset.json train/val splits)",
        description="Train a bundle with its configs/train.json (normalized Dice + blob loss, pos/neg patch sampling, "
        "validation Dice on the val split); the best network by validation Dice is written to "
        "<bundle>/models/model.pt and the training record to runs/<bundle>/training.json.",
    )
    p.add_argument("--bundle", required=True, help="bundle folder, or name (unet, dynunet, swinunetr) in $MSXAI_BUNDLES or a checkout's bundles/")
    p.add_argument("--cohort", required=True, help="cohort folder holding dataset.json (msxai synth --out DIR)")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: the config's)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this many minutes (default: config's)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the config's)")
    p.add_argument("--val-interval", type=int, default=None, help="validate every N epochs (default: the config's)")
    p.add_argument("--log-dir", default=None, help="folder for training.json and model_final.pt (default runs/<bundle>)")
    p.add_argument("--init", default=None, metavar="MODEL_PT",
                   help="start from these weights (e.g. the bundle's models/model.pt to continue training)")
    p.add_argument("--ckpt-dir", default=None, help="folder for the best model.pt (default <bundle>/models)")
    p.add_argument("--learning-rate", type=float, default=None, metavar="LR",
                   help="initial learning rate of the cosine schedule (default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override any train.json entry, e.g. --set 'patch_size=[96,96,96]' --set samples_per_volume=1 "
                   "(value parsed as JSON, else kept as a string); repeatable")
    p.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="also keep the network every N epochs as <log-dir>/checkpoints/model_epoch=K.pt")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from msxai.bundle import train_bundle

    overrides = {}
    if args.val_interval is not None:
        overrides["val_interval"] = int(args.val_interval)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"msxai train: --set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    if args.learning_rate is not None:
        if not args.learning_rate > 0:
            raise SystemExit(f"msxai train: --learning-rate must be positive, got {args.learning_rate}")
        overrides["learning_rate"] = float(args.learning_rate)
    if args.log_dir is not None:
        overrides["log_dir"] = str(args.log_dir)
    if args.init is not None:
        from pathlib import Path

        overrides["init_checkpoint"] = str(Path(args.init).resolve())
    if args.ckpt_dir is not None:
        overrides["ckpt_dir"] = str(args.ckpt_dir)
    summary = train_bundle(args.bundle, args.cohort, epochs=args.epochs, max_minutes=args.max_minutes,
                           device=args.device, num_threads=args.threads, save_every=args.save_every,
                           **overrides)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("epoch_loss",)}, indent=2))
    return 0
