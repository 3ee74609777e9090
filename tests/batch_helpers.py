"""A tiny bundle (hand-set 2-layer network, 16^3 windows) and tiny phantom cases for the cohort-run tests.

The bundle is a real bundle folder (``configs/inference.json`` + ``models/model.pt``) with the project's
``batch_inference.json`` and ``multi_gpu_inference.json`` copied from ``bundles/msxai_unet``, so that
``msxai batch --bundle DIR`` and ``python -m monai.bundle run`` load it exactly as they load the real ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from msxai.io import save_volume
from test_experiments_helpers import AFFINE, BlobNet, ball

BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"

NETWORK_EXPR = ("$torch.nn.Sequential(torch.nn.Conv3d(2, 2, 3, padding=1), torch.nn.Softplus(beta=2.0), "
                "torch.nn.Conv3d(2, 2, 1))")


def write_tiny_bundle(root: Path) -> Path:
    root = Path(root)
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    inf = json.loads((BUNDLES_DIR / "msxai_unet" / "configs" / "inference.json").read_text())
    inf.update({"bundle_name": "tiny_bundle", "bundle_root": str(root), "network_def": NETWORK_EXPR,
                "gradcam_layer": "0"})
    inf["inferer"]["roi_size"] = [16, 16, 16]
    inf["pixdim"] = [2.0, 2.0, 2.0]  # the phantoms' own 2 mm grid: the network grid is the native one (cheap Eq. 3)
    (root / "configs" / "inference.json").write_text(json.dumps(inf, indent=1))
    for name in ("batch_inference.json", "multi_gpu_inference.json"):
        shutil.copy(BUNDLES_DIR / "msxai_unet" / "configs" / name, root / "configs" / name)
    net = BlobNet()
    state = {"0.weight": net.c1.weight, "0.bias": net.c1.bias, "2.weight": net.c2.weight, "2.bias": net.c2.bias}
    torch.save({k: v.detach().clone() for k, v in state.items()}, root / "models" / "model.pt")
    return root


def phantom(seed: int, shape=(28, 28, 28), n_blobs: int = 3, n_missed: int = 1, radius: float = 9.5):
    """FLAIR, T1, truth, brain of a ball-shaped 'brain' with bright FLAIR blobs (lesions the network finds; the
    first ``n_blobs - 1`` are in the truth, the last is a false positive) and ``n_missed`` labelled blobs that are
    not bright (false negatives)."""
    rng = np.random.default_rng(seed)
    c = np.array(shape) / 2
    brain = ball(c, radius, shape)
    flair = brain * (1.0 + rng.normal(0, 0.05, shape))
    t1 = brain * (1.0 + rng.normal(0, 0.05, shape))
    truth = np.zeros(shape, np.int32)
    taken = np.zeros(shape, bool)
    label = 0
    for k in range(n_blobs + n_missed):
        for _ in range(200):
            centre = c + rng.uniform(-radius + 3, radius - 3, 3)
            m = ball(centre, rng.uniform(1.3, 1.8), shape)
            near = ball(centre, 4.5, shape)
            if not (near & taken).any() and (m <= brain).all():
                break
        taken |= m
        if k < n_blobs:
            flair[m] = 2.6 + rng.normal(0, 0.05, int(m.sum()))
            t1[m] = 0.7
        if k < n_blobs - 1 or k >= n_blobs:
            label += 1
            truth[m] = label
    return flair.astype(np.float32), t1.astype(np.float32), truth, brain.astype(np.uint8)


def write_case(folder: Path, cid: str, seed: int, **kw) -> dict:
    flair, t1, truth, brain = phantom(seed, **kw)
    files = {"flair": f"{cid}_FLAIR.nii.gz", "t1": f"{cid}_T1.nii.gz", "label": f"{cid}_lesions.nii.gz",
             "brain_mask": f"{cid}_brainmask.nii.gz"}
    save_volume(folder / files["flair"], flair, AFFINE)
    save_volume(folder / files["t1"], t1, AFFINE)
    save_volume(folder / files["label"], truth, AFFINE, np.int32)
    save_volume(folder / files["brain_mask"], brain, AFFINE, np.uint8)
    return {"id": cid, **files}


def write_datalist(folder: Path, items: list[dict], name: str = "datalist.json") -> Path:
    p = Path(folder) / name
    p.write_text(json.dumps({"testing": items}, indent=1))
    return p
