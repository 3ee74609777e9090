"""Skull present vs stripped on synthetic subjects (issue 14, item 3): for each seed, the ``--skull`` subject and the
same subject stripped with its true brain mask go through a bundle; prints lesion F1 and Dice of both, their
differences, the skull decision and the Dice of the measured brain mask against the true one.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python scripts/skull_evidence.py --seeds 102 103 104 105
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def save(path, array, affine):
    img = nib.Nifti1Image(np.asarray(array, np.float32), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="bundles/msxai_unet")
    ap.add_argument("--seeds", type=int, nargs="+", default=[102, 103, 104, 105])
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()

    from msxai.bundle import load_bundle
    from msxai.metrics import evaluate_case
    from msxai.synth import generate_subject

    bundle = load_bundle(args.bundle)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            s = generate_subject(seed, skull=True)
            brain = s.brain_mask > 0
            row = {"seed": seed, "true_lesions": int(s.lesions.max())}
            for kind, (f, t) in (("skull", (s.flair, s.t1)), ("stripped", (s.flair * brain, s.t1 * brain))):
                fp, tp = save(Path(tmp) / f"{kind}_F.nii.gz", f, s.affine), save(Path(tmp) / f"{kind}_T.nii.gz", t, s.affine)
                t0 = time.perf_counter()
                prep = bundle.prepare(fp, tp)
                res = bundle.segment(prep)
                m = evaluate_case(res.labels, s.lesions > 0, res.affine)
                row[kind] = {"dice": round(m["dice"], 4), "F1": round(m["F1"], 4), "n_pred": m["n_pred"],
                             "skull_present": prep.info["skull"]["present"],
                             "seconds": round(time.perf_counter() - t0, 1)}
                if kind == "skull":
                    mk = prep.brain_mask
                    row["brain_mask_dice"] = round(float(2 * (mk & brain).sum() / (mk.sum() + brain.sum())), 4)
            row["d_dice"] = round(row["skull"]["dice"] - row["stripped"]["dice"], 4)
            row["d_F1"] = round(row["skull"]["F1"] - row["stripped"]["F1"], 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"largest |difference|: Dice {max(abs(r['d_dice']) for r in rows):.4f}, "
          f"F1 {max(abs(r['d_F1']) for r in rows):.4f} over {len(rows)} subjects")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
