"""Training pieces added for real tissue: RandSpatialDeformd (rotation/scale/elastic in one resampling) against a
voxel-loop twin, the centre crop it falls back to, mixed_datalist of several cohorts, and the bundle's own
pre-processing chain (train.json) being cached by CacheDataset with the bundle's normalisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_bundles import _subject

from msxai.normalization import normalize
from msxai.training import RandSpatialDeformd, mixed_datalist

torch.set_num_threads(1)


def loop_twin(image: np.ndarray, matrix: np.ndarray, out_size) -> np.ndarray:
    """out[c, v] = image[c, R v + centre_in] for centred integer output coordinates v (0 outside)."""
    in_size = image.shape[1:]
    out = np.zeros((image.shape[0],) + tuple(out_size), image.dtype)
    for v in np.ndindex(*out_size):
        w = np.array(v) - (np.array(out_size) - 1) / 2
        src = matrix @ w + (np.array(in_size) - 1) / 2
        idx = np.rint(src).astype(int)
        assert np.allclose(src, idx)  # the test matrices map voxels onto voxels
        if np.all(idx >= 0) and np.all(idx < in_size):
            out[(slice(None),) + v] = image[(slice(None),) + tuple(idx)]
    return out


@pytest.mark.parametrize("angles", [(0, 0, 90), (90, 0, 0), (0, 180, 90)])
def test_rotation_matches_voxel_loop(angles):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 9, 11, 7)).astype(np.float32)
    label = (rng.random((1, 9, 11, 7)) > 0.7).astype(np.float32)
    t = RandSpatialDeformd(prob=1.0, out_size=(7, 9, 5))
    m = t.rotation(np.deg2rad(angles))
    out = t.resample({"image": torch.from_numpy(image), "label": torch.from_numpy(label)},
                     t.source_coordinates((9, 11, 7), (7, 9, 5), m, None))
    np.testing.assert_allclose(out["image"].numpy(), loop_twin(image, np.round(m), (7, 9, 5)), atol=1e-5)
    np.testing.assert_array_equal(out["label"].numpy(), loop_twin(label, np.round(m), (7, 9, 5)))


def test_no_transform_is_the_centre_crop_and_elastic_keeps_labels_binary():
    rng = np.random.default_rng(1)
    d = {"image": torch.randn(2, 12, 12, 12), "label": (torch.rand(1, 12, 12, 12) > 0.8).float()}
    off = RandSpatialDeformd(prob=0.0, out_size=(8, 8, 8))(d)
    assert torch.equal(off["image"], d["image"][:, 2:10, 2:10, 2:10])
    assert torch.equal(off["label"], d["label"][:, 2:10, 2:10, 2:10])
    t = RandSpatialDeformd(prob=1.0, rotate_deg=20, scale=0.2, elastic_vox=3.0, out_size=(8, 8, 8))
    t.set_random_state(int(rng.integers(1000)))
    on = t(d)
    assert on["image"].shape == (2, 8, 8, 8) and set(on["label"].unique().tolist()) <= {0.0, 1.0}
    assert not torch.allclose(on["image"], off["image"])
    # a point moves by at most the rotation/scale of its offset plus the elastic bound
    single = {"image": torch.zeros(1, 21, 21, 21), "label": torch.zeros(1, 21, 21, 21)}
    single["label"][0, 10, 10, 10] = 1
    single["image"][0, 10, 10, 10] = 1
    t2 = RandSpatialDeformd(prob=1.0, rotate_deg=10, scale=0.1, elastic_vox=2.0, grid=3)
    for seed in range(5):
        t2.set_random_state(seed)
        lab = t2(single)["label"][0]
        for p in np.argwhere(lab.numpy() > 0):
            assert np.abs(p - 10).max() <= 2 + 1, p


def test_mixed_datalist_and_cached_prepared_subjects(tmp_path):
    from monai.data import CacheDataset
    from monai.transforms import Compose

    cohorts = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        subj = [_subject(np.random.default_rng(i), out, f"s{i}") for i in range(2)]
        (out / "dataset.json").write_text(json.dumps({"subjects": subj, "splits": {"train": ["s0", "s1"],
                                                                                    "val": ["s1"]}}))
        cohorts.append(out)
    cases = mixed_datalist(cohorts[0], "train", [cohorts[1]])
    assert [c["id"] for c in cases] == ["s0", "s1", "b/s0", "b/s1"]
    assert cases[2]["flair"].startswith(str(cohorts[1]))
    assert [c["id"] for c in mixed_datalist(cohorts[0], "val")] == ["s1"]
    from pathlib import Path

    import nibabel as nib
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "bundles" / "msxai_unet" / "configs" / "train.json"))
    parser["bundle_root"] = str(tmp_path)
    parser["normalization"] = "median_iqr"
    ds = CacheDataset(cases[:1], parser.get_parsed_content("train#preprocessing"), progress=False)
    cached = ds._cache[0]
    assert isinstance(cached, dict) and "image" in cached  # the prepared subject is cached, not the file names
    # twin: nibabel + the pure normalisation, cropped to the brain's box grown by 8 voxels
    raw = np.stack([np.asarray(nib.load(cases[0][k]).dataobj, np.float32) for k in ("flair", "t1")])
    brain = np.any(raw != 0, axis=0)
    full = normalize(raw, brain, "median_iqr")
    idx = np.argwhere(brain)
    sl = tuple(slice(max(a - 8, 0), min(b + 9, n)) for a, b, n in zip(idx.min(0), idx.max(0), brain.shape))
    np.testing.assert_allclose(np.asarray(cached["image"]), full[(slice(None),) + sl], atol=1e-6)
    label = np.asarray(nib.load(cases[0]["label"]).dataobj)[sl] > 0
    np.testing.assert_array_equal(np.asarray(cached["label"])[0], label)
