"""``msxai demo`` (the README's main job) end to end on a small synthetic patient with the committed U-Net bundle."""

import json

import numpy as np

from msxai.cli import main
from msxai.io import load_volume
from msxai.synth import SynthConfig, generate_subject, write_subject


def test_demo_segments_scores_and_explains(tmp_path):
    subject = generate_subject(3, config=SynthConfig(voxel_size=2.0))
    paths = write_subject(subject, tmp_path / "in", "small")
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--flair", str(paths["flair"]), "--t1", str(paths["t1"]),
               "--truth", str(paths["label"]), "--explain", "1", "--samples", "1", "--device", "cpu",
               "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "demo.json").read_text())
    table = json.loads((out / "segmentation" / "lesions.json").read_text())
    labels = load_volume(out / "segmentation" / "lesions.nii.gz").array.astype(int)
    assert summary["n_lesions"] == len(table) == len(np.unique(labels[labels > 0]))
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["dice"] <= 1.0 and metrics["n_truth"] == len(np.unique(subject.lesions[subject.lesions > 0]))
    if table:  # the smallest lesion is explained, with one map per sequence on the input grid
        smallest = min(table, key=lambda r: (r["volume_mm3"], r["id"]))
        sal = json.loads((out / "saliency" / "saliency.json").read_text())
        assert list(sal["domains"]) == [f"lesion_{smallest['id']}"]
        for seq in ("flair", "mprage"):
            m = load_volume(out / "saliency" / f"lesion_{smallest['id']}_smoothgrad_{seq}.nii.gz")
            assert m.array.shape == subject.flair.shape and np.isfinite(m.array).all()
            assert np.allclose(m.affine, subject.affine)


def test_demo_refuses_half_given_inputs(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--flair", str(tmp_path / "f.nii.gz")])
    assert rc == 2
    assert "give both --flair and --t1" in capsys.readouterr().err
