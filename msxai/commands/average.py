"""``msxai average``: average the weights of several checkpoints (snapshots of one training run) into one."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "average",
        help="average the weights of checkpoints of one network (e.g. msxai train --save-every snapshots)",
        description="Uniform weight average of checkpoints of one network (stochastic weight averaging of the "
        "snapshots that `msxai train --save-every N` keeps); writes a plain state dict.",
    )
    p.add_argument("checkpoints", nargs="+", help="model_epoch=K.pt files (plain state dicts of one architecture)")
    p.add_argument("--out", required=True, help="output .pt (e.g. bundles/msxai_unet/models/model.pt)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from msxai.io import file_sha256
    from msxai.training import average_checkpoints

    state = average_checkpoints(args.checkpoints)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    print(f"averaged {len(args.checkpoints)} checkpoint(s) -> {out} (sha256 {file_sha256(out)[:16]})")
    return 0
