"""Figure of the real-tissue training subjects: FLAIR and T1 intensities (ratio to the local NAWM level) of the
injected lesions against the real lesions of the same half, the injected loads, and one heavy-load slice.

    python scripts/realtissue_figure.py --cohort data/realtissue_left --out bundles/msxai_unet/docs/realtissue.png

Needs the cohort (scripts/make_realtissue.py) and the real patient; writes the PNG and a JSON of the numbers next
to it (same name, .json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cohort", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-voxels", type=int, default=200_000, help="voxels sampled per class for the histograms")
    a = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from msxai.io import load_volume
    from msxai.realtissue import RealBackground, load_real_patient
    from msxai.synth import load_dataset

    data = load_dataset(a.cohort)
    side = data.get("side", "left")
    bg = RealBackground.build(*load_real_patient(), side=side)
    rng = np.random.default_rng(0)
    real = bg.truth
    fr_real = bg.flair[real] / bg.bg_flair[real]
    tr_real = bg.t1[real] / bg.bg_t1[real]
    inj_f, inj_t, loads, heavy = [], [], [], None
    for s in data["subjects"]:
        lab = load_volume(s["label"]).array > 0
        inj = lab & ~real
        loads.append((s["id"], s.get("load_class"), float(inj.sum()) / 1000.0))
        if not inj.any():
            continue
        f = load_volume(s["flair"]).array
        t = load_volume(s["t1"]).array
        inj_f.append(f[inj] / bg.bg_flair[inj])
        inj_t.append(t[inj] / bg.bg_t1[inj])
        if heavy is None or inj.sum() > heavy[3].sum():
            heavy = (s["id"], f, lab, inj)
    inj_f, inj_t = np.concatenate(inj_f), np.concatenate(inj_t)

    def sample(x):
        return x if x.size <= a.max_voxels else rng.choice(x, a.max_voxels, replace=False)

    fig, ax = plt.subplots(1, 4, figsize=(18, 4.2))
    for k, (name, r, i) in enumerate((("FLAIR", fr_real, inj_f), ("T1 (MPRAGE)", tr_real, inj_t))):
        bins = np.linspace(min(np.percentile(r, 0.5), np.percentile(i, 0.5)),
                           max(np.percentile(r, 99.5), np.percentile(i, 99.5)), 60)
        ax[k].hist(sample(r), bins, density=True, alpha=0.6, color="tab:green", label=f"real lesions ({r.size} vox)")
        ax[k].hist(sample(i), bins, density=True, alpha=0.5, color="tab:red", label=f"injected ({i.size} vox)")
        ax[k].axvline(1.0, color="k", lw=0.8, ls=":")
        ax[k].set_xlabel(f"{name} / local NAWM level")
        ax[k].set_title(f"{name}: median real {np.median(r):.2f}, injected {np.median(i):.2f}")
        ax[k].legend(fontsize=8)
    classes = ["real_only", "light", "moderate", "heavy"]
    colors = {"real_only": "grey", "light": "tab:blue", "moderate": "tab:orange", "heavy": "tab:red"}
    order = sorted(loads, key=lambda x: x[2])
    ax[2].bar(range(len(order)), [x[2] for x in order], color=[colors.get(x[1], "k") for x in order])
    ax[2].set_xlabel(f"subject ({len(order)}, sorted)")
    ax[2].set_ylabel(f"injected lesion volume in the {side} half (mL)")
    ax[2].set_title(f"loads (+ {real.sum() / 1000:.1f} mL real lesions each)")
    from matplotlib.patches import Patch

    ax[2].legend(handles=[Patch(color=colors[c], label=c) for c in classes], fontsize=8)
    sid, f, lab, inj = heavy
    z = int(np.argmax(inj.sum((0, 1))))
    xs = np.flatnonzero(bg.brain.any((1, 2)))
    ys = np.flatnonzero(bg.brain.any((0, 2)))
    sl = (slice(xs.min(), xs.max() + 1), slice(ys.min(), ys.max() + 1), z)
    ax[3].imshow(np.rot90(f[sl]), cmap="gray")
    ax[3].contour(np.rot90(inj[sl]), [0.5], colors="red", linewidths=0.7)
    ax[3].contour(np.rot90(real[sl]), [0.5], colors="lime", linewidths=0.7)
    ax[3].set_title(f"{sid}, axial slice {z}: injected (red), real (green)")
    ax[3].axis("off")
    fig.suptitle(f"Real-tissue training subjects ({Path(a.cohort).name}): patient26 {side} half with injected lesions",
                 fontsize=11)
    fig.tight_layout()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    stats = {"cohort": str(a.cohort), "side": side, "real_voxels": int(real.sum()), "injected_voxels": int(inj_f.size),
             "flair_ratio_median": {"real": float(np.median(fr_real)), "injected": float(np.median(inj_f))},
             "flair_ratio_iqr": {"real": [float(x) for x in np.percentile(fr_real, [25, 75])],
                                 "injected": [float(x) for x in np.percentile(inj_f, [25, 75])]},
             "t1_ratio_median": {"real": float(np.median(tr_real)), "injected": float(np.median(inj_t))},
             "t1_ratio_iqr": {"real": [float(x) for x in np.percentile(tr_real, [25, 75])],
                              "injected": [float(x) for x in np.percentile(inj_t, [25, 75])]},
             "loads_ml": [{"id": i, "class": c, "injected_ml": round(v, 2)} for i, c, v in loads]}
    out.with_suffix(".json").write_text(json.dumps(stats, indent=1) + "\n")
    print(out, json.dumps({k: v for k, v in stats.items() if k != "loads_ml"}))


if __name__ == "__main__":
    main()
