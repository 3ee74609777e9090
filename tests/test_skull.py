"""Skull present or absent (issue 14, item 3): the bundle measures whether a head image still has its skull and, if
so, finds the brain (msxai.brainmask) before z-scoring; a synthetic ``--skull`` subject (scalp, skull, neck and a
Rician noise floor in the air) then segments like the same subject skull-stripped with its true brain mask: lesion
F1 and Dice within 0.05. ``scripts/skull_evidence.py`` runs the same comparison on more subjects (docs/inputs.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from geometry_helpers import save_nifti

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "msxai_unet"
SEED = 102
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    from msxai.synth import generate_subject

    d = tmp_path_factory.mktemp("skull")
    s = generate_subject(SEED, skull=True)
    brain = s.brain_mask > 0
    assert np.mean(s.flair[~brain] != 0) > 0.99  # noise everywhere outside the brain: nothing is exactly 0
    paths = {
        "skull": (save_nifti(d / "skull_FLAIR.nii.gz", s.flair, s.affine), save_nifti(d / "skull_T1.nii.gz", s.t1, s.affine)),
        "stripped": (save_nifti(d / "strip_FLAIR.nii.gz", s.flair * brain, s.affine),
                     save_nifti(d / "strip_T1.nii.gz", s.t1 * brain, s.affine)),
    }
    return {"paths": paths, "truth": s.lesions > 0, "brain": brain, "affine": s.affine}


def test_skull_is_measured_and_the_head_segments_like_the_stripped_subject(subject):
    from msxai.bundle import load_bundle
    from msxai.metrics import evaluate_case

    bundle = load_bundle(BUNDLE)
    out = {}
    for kind in ("skull", "stripped"):
        prepared = bundle.prepare(*subject["paths"][kind])
        result = bundle.segment(prepared)
        out[kind] = (prepared, evaluate_case(result.labels, subject["truth"], result.affine))
    head, stripped = out["skull"][0], out["stripped"][0]
    assert head.info["skull"]["present"] is True and head.info["skull"]["decided_by"] == "measurement"
    assert stripped.info["skull"]["present"] is False
    mask = head.brain_mask
    dice_mask = 2 * (mask & subject["brain"]).sum() / (mask.sum() + subject["brain"].sum())
    assert dice_mask > 0.95
    assert not np.any(head.image[:, ~mask])  # stripped outside the measured brain, as the training data
    a, b = out["skull"][1], out["stripped"][1]
    print(f"skull: Dice {a['dice']:.3f} F1 {a['F1']:.3f}; stripped: Dice {b['dice']:.3f} F1 {b['F1']:.3f}; "
          f"brain mask Dice {dice_mask:.3f}")
    assert abs(a["dice"] - b["dice"]) <= 0.05 and abs(a["F1"] - b["F1"]) <= 0.05
