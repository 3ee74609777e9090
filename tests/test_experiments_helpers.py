"""Tiny synthetic cohort and a tiny hand-made segmentation network for the experiment tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from msxai.io import save_volume
from msxai.saliency.sliding import SlidingWindowSpec

SHAPE = (28, 28, 28)
AFFINE = np.diag([-2.0, 2.0, 2.0, 1.0])  # 2 mm voxels (a TN sphere of 93 mm^3 is ~11 voxels: cheap Eq. 3 maps)
AFFINE[:3, 3] = (28.0, -28.0, -28.0)


class BlobNet(torch.nn.Module):
    """Lesion logit = a smooth function of the local mean FLAIR minus the local mean T1 (bright FLAIR blobs with
    darker T1 are lesions); conv -> softplus -> 1x1 conv, deterministic weights."""

    def __init__(self, gain: float = 3.0, bias: float = -2.5):
        super().__init__()
        self.c1 = torch.nn.Conv3d(2, 2, 3, padding=1)
        self.c2 = torch.nn.Conv3d(2, 2, 1)
        with torch.no_grad():
            self.c1.weight.zero_()
            self.c1.weight[0, 0] = 1.0 / 27  # local mean FLAIR
            self.c1.weight[1, 1] = 1.0 / 27  # local mean T1
            self.c1.bias.zero_()
            self.c2.weight.zero_()
            self.c2.weight[1, 0, 0, 0, 0] = gain
            self.c2.weight[1, 1, 0, 0, 0] = -0.5
            self.c2.bias.copy_(torch.tensor([0.0, bias]))

    def forward(self, x):
        return self.c2(torch.nn.functional.softplus(self.c1(x), beta=2.0))


def ball(centre, radius, shape=SHAPE):
    g = np.indices(shape).astype(float)
    return ((g[0] - centre[0]) ** 2 + (g[1] - centre[1]) ** 2 + (g[2] - centre[2]) ** 2) <= radius**2


def make_subject(seed: int):
    """FLAIR/T1/truth/brain of a phantom: 2 TP blobs (bright, labelled), 1 FP blob (bright, unlabelled), 1 FN
    (labelled, not bright)."""
    rng = np.random.default_rng(seed)
    c = np.array(SHAPE) / 2
    brain = ball(c, 9.5)
    flair = np.where(brain, 1.0, 0.0) + brain * rng.normal(0, 0.05, SHAPE)
    t1 = np.where(brain, 1.0, 0.0) + brain * rng.normal(0, 0.05, SHAPE)
    shift = rng.integers(-1, 2, size=3)
    tp1, tp2 = ball(c + (-4, 0, 0) + shift, 1.5), ball(c + (4, 3, 1) + shift, 1.8)
    fp, fn = ball(c + (-1, -5, 3) + shift, 1.6), ball(c + (1, 1, -5) + shift, 1.2)
    for m in (tp1, tp2, fp):
        flair[m] = 2.6 + rng.normal(0, 0.05, int(m.sum()))
        t1[m] = 0.7
    truth = np.zeros(SHAPE, np.int32)
    truth[tp1], truth[tp2], truth[fn] = 1, 2, 3
    return flair.astype(np.float32), t1.astype(np.float32), truth, brain.astype(np.uint8)


def write_cohort(root: Path, n: int = 2) -> Path:
    root = Path(root)
    subjects = []
    for i in range(n):
        sid = f"tiny{i:02d}"
        flair, t1, truth, brain = make_subject(i)
        files = {"flair": f"{sid}_FLAIR.nii.gz", "t1": f"{sid}_T1.nii.gz", "label": f"{sid}_lesions.nii.gz",
                 "brain_mask": f"{sid}_brainmask.nii.gz"}
        save_volume(root / files["flair"], flair, AFFINE)
        save_volume(root / files["t1"], t1, AFFINE)
        save_volume(root / files["label"], truth, AFFINE, np.int32)
        save_volume(root / files["brain_mask"], brain, AFFINE, np.uint8)
        subjects.append({"id": sid, **files})
    ids = [s["id"] for s in subjects]
    (root / "dataset.json").write_text(json.dumps({"subjects": subjects, "splits": {"train": [], "val": [],
                                                                                    "test": ids}}))
    return root / "dataset.json"


def tiny_model(name: str = "tiny"):
    from msxai.bundle import Bundle

    spec = SlidingWindowSpec(roi_size=(16, 16, 16), overlap=0.25, mode="gaussian")
    return Bundle(BlobNet().eval(), spec.to_inferer(), name=name, source="BlobNet (hand-set weights)")
