"""Predicted vs true lesions on a held-out patient26 half: three axial slices of a slab of that half, FLAIR with the
true lesions (green) and the kept predicted lesions (red; t, 18-connected, >= 5 mm^3).

    python scripts/heldout_figure.py --prob runs/foldB/prob/avg.npy --half left --threshold 0.3 \
        --out bundles/msxai_unet/docs/heldout_foldB.png [--title "fold B: ..."]

``--prob``: a float16/32 .npy probability map of the whole image (scripts/eval_halves.py --save-prob)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prob", required=True)
    p.add_argument("--half", choices=("right", "left"), required=True)
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="")
    a = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from msxai.inference import resolve_cases
    from msxai.io import load_volume
    from msxai.lesions import instances_from_mask, lesion_instances
    from msxai.realtissue import hemisphere_mask

    case = resolve_cases("patient26")[0]
    flair = load_volume(case["flair"]).array
    truth = load_volume(case["label"])
    prob = np.load(a.prob).astype(np.float32)
    half = hemisphere_mask(flair.shape, truth.affine, a.half)
    pred = lesion_instances(prob, a.threshold, 5.0, truth.affine) > 0
    true = instances_from_mask(truth.array, truth.affine, 0.0) > 0
    score = ((pred | true) & half).sum((0, 1))
    centre = int(np.argmax(np.convolve(score, np.ones(9), "same")))
    slices = [centre - 6, centre, centre + 6]
    xs = np.flatnonzero(half.any((1, 2)) & (flair != 0).any((1, 2)))
    ys = np.flatnonzero((flair != 0).any((0, 2)))
    fig, ax = plt.subplots(1, 3, figsize=(12, 5.2))
    for k, z in enumerate(slices):
        sl = (slice(xs.min(), xs.max() + 1), slice(ys.min(), ys.max() + 1), z)
        ax[k].imshow(np.rot90(flair[sl]), cmap="gray")
        ax[k].contour(np.rot90(true[sl]), [0.5], colors="lime", linewidths=0.9)
        ax[k].contour(np.rot90(pred[sl]), [0.5], colors="red", linewidths=0.9)
        ax[k].set_title(f"axial {z}")
        ax[k].axis("off")
    fig.suptitle((a.title + "\n" if a.title else "") + f"patient26 {a.half} half (held out): true lesions green, "
                 f"predicted (t = {a.threshold}, >= 5 mm^3) red", fontsize=10)
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=90)
    print(a.out)


if __name__ == "__main__":
    main()
