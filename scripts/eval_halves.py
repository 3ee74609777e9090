"""Score U-Net snapshots on one held-out hemisphere of patient26 (the fold protocol of the bundle's docs/README.md).

    python scripts/eval_halves.py --half right --normalization median_iqr \
        --checkpoint runs/foldA/ckpt/model_epoch=8.pt [--checkpoint ...] [--average] \
        [--tta-flips '[[0]]'] [--thresholds 0.2 0.3 0.4] --out runs/foldA/eval_right.json [--save-prob DIR]
    python scripts/eval_halves.py --half right --bundle bundles/msxai_dynunet --out ... --save-prob DIR  # own weights
    python scripts/eval_halves.py --half right --mean-of DIR/a.npy --mean-of DIR/b.npy --tag ensemble --out ...

Each checkpoint (or, with --average, the uniform average of all given checkpoints) is loaded into the bundle's own
inference pipeline (configs/inference.json, with the checkpoint, normalization and tta_flips overridden; without
--checkpoint the bundle's own weights and normalization), run on the whole patient26 image, and scored on the given half only (msxai.realtissue.evaluate_half: lesions by centroid,
voxels inside the half, unit-bootstrap 95 % CIs). Only the named half is printed or written: in fold A that is the
selection half, in fold B the report half. --baseline adds the FLAIR-threshold baseline with z chosen on the other
half (the training half). --mean-of scores the mean of probability maps saved by earlier runs (--save-prob): the
ensemble of ``msxai segment --ensemble``. Results are appended as one JSON object per line to --out."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--half", choices=("right", "left"), required=True, help="the half to score")
    p.add_argument("--bundle", default="bundles/msxai_unet")
    p.add_argument("--checkpoint", action="append", default=[], help="model .pt (repeatable)")
    p.add_argument("--average", action="store_true", help="score the uniform average of the given checkpoints")
    p.add_argument("--normalization", default=None, help="override (default: the bundle's own)")
    p.add_argument("--mean-of", action="append", default=[], help="saved probability .npy to average (repeatable)")
    p.add_argument("--tta-flips", default="[]", help="JSON list of axis lists, e.g. '[[0]]'")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.3])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--out", required=True, help="JSON-lines file the results are appended to")
    p.add_argument("--save-prob", default=None, help="folder for float16 probability maps (.npy)")
    p.add_argument("--tag", default=None, help="name of this entry (default: the checkpoint names)")
    p.add_argument("--baseline", action="store_true", help="also score the FLAIR-threshold baseline")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from msxai.bundle import load_bundle
    from msxai.inference import resolve_cases
    from msxai.io import load_volume, voxel_spacing
    from msxai.realtissue import choose_flair_z, evaluate_half, flair_threshold_map, other_side
    from msxai.training import average_checkpoints

    case = resolve_cases("patient26")[0]
    truth = load_volume(case["label"], "truth")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(entry: dict) -> None:
        with open(out, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        m = entry["metrics"][str(a.thresholds[0]) if str(a.thresholds[0]) in entry["metrics"] else "0.3"]
        print(f"{entry['tag']}: half {a.half} t={a.thresholds[0]} nDSC {m['ndsc']:.3f} {fmt(m['ci'].get('ndsc'))} "
              f"F1 {m['F1']:.3f} {fmt(m['ci'].get('F1'))} Dice {m['dice']:.3f} pred {m['n_pred']} "
              f"(TP {m['tp']}) truth {m['n_truth']} (detected {m['detected']})", flush=True)

    if a.baseline:
        from msxai.preprocess import foreground_mask

        flair = load_volume(case["flair"], "FLAIR")
        t1 = load_volume(case["t1"], "T1")
        brain = foreground_mask(np.stack([flair.array, t1.array]))
        z, rows = choose_flair_z(flair.array, brain, truth.array, truth.affine, other_side(a.half))
        mask = flair_threshold_map(flair.array, brain, z, spacing=voxel_spacing(truth.affine))
        write({"tag": f"flair_threshold z={z}", "half": a.half, "z_chosen_on": other_side(a.half), "z": z,
               "z_curve": rows, "metrics": {"0.3": evaluate_half(mask, truth.array, truth.affine, a.half,
                                                                 n_boot=a.n_boot)}})

    if a.mean_of:
        prob = np.mean([np.load(x).astype(np.float32) for x in a.mean_of], axis=0)
        metrics = {str(t): evaluate_half(prob, truth.array, truth.affine, a.half, threshold=t, n_boot=a.n_boot)
                   for t in a.thresholds}
        write({"tag": a.tag or "mean(" + ",".join(Path(x).stem for x in a.mean_of) + ")", "half": a.half,
               "mean_of": list(a.mean_of), "metrics": metrics})
        return
    groups = [a.checkpoint] if a.average else [[c] for c in a.checkpoint]
    if not groups:
        groups = [[]]  # the bundle's own weights
    for paths in groups:
        if not paths:
            ckpt = None
        elif len(paths) > 1:
            ckpt = Path(a.save_prob or out.parent) / f"avg_{abs(hash(tuple(paths))) % 10**8}.pt"
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save(average_checkpoints(paths), ckpt)
        else:
            ckpt = Path(paths[0])
        tag = a.tag or ("avg(" + ",".join(Path(x).stem for x in paths) + ")" if len(paths) > 1
                        else Path(paths[0]).stem if paths else Path(a.bundle).name)
        overrides = {"tta_flips": json.loads(a.tta_flips)}
        if ckpt is not None:
            overrides["checkpoint"] = str(Path(ckpt).resolve())
        if a.normalization:
            overrides["normalization"] = a.normalization
        b = load_bundle(a.bundle, **overrides)
        t0 = time.time()
        prepared = b.prepare(case["flair"], case["t1"])
        prob = b.probability(prepared.image)
        seconds = time.time() - t0
        if a.save_prob:
            Path(a.save_prob).mkdir(parents=True, exist_ok=True)
            np.save(Path(a.save_prob) / f"{tag}.npy", prob.astype(np.float16))
        metrics = {str(t): evaluate_half(prob, truth.array, truth.affine, a.half, threshold=t, n_boot=a.n_boot)
                   for t in a.thresholds}
        write({"tag": tag, "half": a.half, "bundle": b.name, "checkpoints": [str(x) for x in paths],
               "normalization": b.normalization,
               "tta_flips": json.loads(a.tta_flips), "seconds": round(seconds, 1), "metrics": metrics})


def fmt(ci) -> str:
    return "" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


if __name__ == "__main__":
    main()
