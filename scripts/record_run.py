"""Append one training run (its <log-dir>/training.json) to a bundle's docs/training_record.json.

    python scripts/record_run.py --log-dir runs/foldA/norm_median_iqr --bundle bundles/msxai_unet \
        --list runs --name "fold A, median_iqr" --fold A --command "msxai train ..." \
        [--set key=JSON ...]   # extra fields, e.g. selection metrics

``--list``: ``runs`` (every run of the fold protocol, adopted or not) or ``stages`` (the runs that made the shipped
models/model.pt). A run already recorded under the same name is replaced."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log-dir", required=True)
    p.add_argument("--bundle", default="bundles/msxai_unet")
    p.add_argument("--list", choices=("runs", "stages"), default="runs")
    p.add_argument("--name", required=True)
    p.add_argument("--fold", default=None)
    p.add_argument("--command", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON")
    a = p.parse_args()
    rec = json.loads((Path(a.log_dir) / "training.json").read_text())
    rec = {"name": a.name, "fold": a.fold, **rec, "command": a.command, "log_dir": str(a.log_dir),
           "machine": f"{os.cpu_count()} CPU cores shared with other agents; training in its own autogroup "
                      "(nice -10), 2 torch threads"}
    rec.pop("epoch_loss", None) if len(rec.get("epoch_loss", [])) > 80 else None
    for item in a.set:
        k, _, v = item.partition("=")
        try:
            rec[k] = json.loads(v)
        except json.JSONDecodeError:
            rec[k] = v
    path = Path(a.bundle) / "docs" / "training_record.json"
    doc = json.loads(path.read_text())
    lst = [r for r in doc.get(a.list, []) if r.get("name") != a.name]
    lst.append(rec)
    doc[a.list] = lst
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{path}: {a.list} += {a.name} ({rec.get('epochs')} epochs, {rec.get('minutes')} min)")


if __name__ == "__main__":
    main()
