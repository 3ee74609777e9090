"""How realistic a synthetic cohort is, measured alike on real and synthetic scans: lesion volumes and tissue
contrasts relative to white matter (``scripts/synth_figure.py``, ``docs/synth_cohort.md``)."""

from __future__ import annotations

import numpy as np

from msxai import MIN_LESION_MM3
from msxai.io import voxel_volume_mm3
from msxai.synth.lesions import lesion_instances_18

def summarize(values) -> dict:
    """n, median, quartiles, min, max and mean of a list of numbers (NaN for an empty list)."""
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        nan = float("nan")
        return {"n": 0, "median": nan, "q1": nan, "q3": nan, "min": nan, "max": nan, "mean": nan}
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    return {"n": int(x.size), "median": float(med), "q1": float(q1), "q3": float(q3),
            "min": float(x.min()), "max": float(x.max()), "mean": float(x.mean())}


def lesion_volumes_mm3(labels: np.ndarray, affine: np.ndarray, min_mm3: float = MIN_LESION_MM3) -> list[float]:
    """Volumes (mm^3) of the 18-connected lesions (>= ``min_mm3``) of a label or binary map."""
    vox = voxel_volume_mm3(affine)
    inst = lesion_instances_18(np.asarray(labels) > 0, vox, min_mm3)
    return [float(c) * vox for c in np.bincount(inst.ravel())[1:]]


def tissue_contrasts(flair: np.ndarray, t1: np.ndarray, lesions: np.ndarray, brain: np.ndarray | None = None,
                     iterations: int = 30) -> dict:
    """Median FLAIR and T1 intensities of CSF, GM and lesions relative to WM, from a 3-class k-means on the T1.

    The same unsupervised tissue split is applied to real and synthetic scans so that they are compared alike.
    """
    brain = (flair != 0) if brain is None else np.asarray(brain, bool)
    les = np.asarray(lesions) > 0
    sel = brain & ~les
    x = t1[sel].astype(np.float64)
    fx = flair[sel].astype(np.float64)
    c = np.percentile(x, [10, 50, 90])
    lab = np.zeros(x.shape, int)
    for _ in range(iterations):
        lab = np.argmin(np.abs(x[:, None] - c[None]), axis=1)
        c = np.array([x[lab == i].mean() if np.any(lab == i) else c[i] for i in range(3)])
    wm_f, wm_t = np.median(fx[lab == 2]), np.median(x[lab == 2])
    out = {"csf_fraction": float(np.mean(lab == 0)), "gm_fraction": float(np.mean(lab == 1)),
           "wm_fraction": float(np.mean(lab == 2)), "brain_voxels": int(brain.sum())}
    for name, img, wm, vals in (("flair", flair, wm_f, fx), ("t1", t1, wm_t, x)):
        out[f"{name}_csf"] = float(np.median(vals[lab == 0]) / wm)
        out[f"{name}_gm"] = float(np.median(vals[lab == 1]) / wm)
        out[f"{name}_lesion"] = float(np.median(img[les]) / wm) if les.any() else float("nan")
    return out
