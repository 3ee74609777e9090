"""Inference options of a bundle: the `normalization` and `tta_flips` keys of inference.json, flip test-time
augmentation and the three-bundle ensemble (`msxai segment --ensemble`), each against a twin built from single
zero-padded windows of the networks (a tiny volume is one 96^3 window whose gaussian weight cancels)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from test_bundles import AFFINE, BUNDLES_DIR, SHAPE, _subject

from msxai.bundle import load_bundle
from msxai.cli import main
from msxai.errors import InputError
from msxai.inference import EnsembleSegmentation, check_tta_flips
from msxai.io import load_volume
from msxai.normalization import normalize

BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    out = tmp_path_factory.mktemp("tta")
    s = _subject(np.random.default_rng(7), out, "one")
    return out / s["flair"], out / s["t1"]


def window_prob(network, image: np.ndarray, flip=()) -> np.ndarray:
    """softmax[1] of one zero-padded 96^3 window of ``image`` (flipped along ``flip`` and back)."""
    x = torch.from_numpy(np.ascontiguousarray(np.flip(image, [a + 1 for a in flip]) if flip else image))[None]
    pads = [96 - s for s in SHAPE]
    padded = torch.nn.functional.pad(x, [p for s in reversed(pads) for p in (s // 2, s - s // 2)])
    with torch.no_grad():
        prob = torch.softmax(network(padded), 1)[0, 1].numpy()
    prob = prob[tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, SHAPE))]
    return np.flip(prob, list(flip)).copy() if flip else prob


def test_config_defaults_keep_todays_outputs():
    # the U-Net 0.3.0 was trained with the normalisation chosen on fold A (median_iqr, its docs/README.md); the
    # DynUNet and the Swin UNETR keep the z-score they were trained with; no TTA by default (not chosen on fold A)
    expected = {"msxai_unet": "median_iqr", "msxai_dynunet": "zscore_brain", "msxai_swinunetr": "zscore_brain"}
    for name, norm in expected.items():
        cfg = json.loads((BUNDLES_DIR / name / "configs" / "inference.json").read_text())
        assert cfg["normalization"] == norm and cfg["tta_flips"] == [], name
        train = json.loads((BUNDLES_DIR / name / "configs" / "train.json").read_text())
        assert train["normalization"] == cfg["normalization"], name  # trained as served


def test_flip_tta_is_the_mean_over_flipped_passes(subject):
    b = load_bundle(BUNDLES_DIR / "msxai_unet", tta_flips=[[0], [1, 2]])
    assert b.tta_flips == ((0,), (1, 2))
    prepared = b.prepare(*subject)
    prob = b.segment(prepared).prob
    twin = (window_prob(b.network, prepared.image) + window_prob(b.network, prepared.image, (0,))
            + window_prob(b.network, prepared.image, (1, 2))) / 3
    np.testing.assert_allclose(prob, twin, atol=3e-5)
    plain = load_bundle(BUNDLES_DIR / "msxai_unet").segment(prepared).prob
    assert not np.allclose(prob, plain, atol=1e-3)  # the network is not flip-invariant: TTA changes the output


def test_normalization_key_reaches_the_prepared_image(subject):
    b = load_bundle(BUNDLES_DIR / "msxai_unet", normalization="nawm_mode")
    p = b.prepare(*subject)
    np.testing.assert_allclose(p.image, normalize(p.raw, p.brain_mask, "nawm_mode"), atol=1e-6)
    with pytest.raises(Exception) as info:  # MONAI's config parser wraps the InputError
        load_bundle(BUNDLES_DIR / "msxai_unet", normalization="minmax")
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("unknown normalization 'minmax'" in c for c in chain), chain


def test_ensemble_is_the_mean_of_its_members(subject):
    unet = load_bundle(BUNDLES_DIR / "msxai_unet")
    dyn = load_bundle(BUNDLES_DIR / "msxai_dynunet")  # each member normalises as it was trained
    assert (unet.normalization, dyn.normalization) == ("median_iqr", "zscore_brain")
    ens = EnsembleSegmentation([unet, dyn])
    prepared = ens.prepare(*subject)
    result = ens.segment(prepared)
    twin = (window_prob(unet.network, normalize(prepared.raw, prepared.brain_mask, "median_iqr"))
            + window_prob(dyn.network, normalize(prepared.raw, prepared.brain_mask, "zscore_brain"))) / 2
    np.testing.assert_allclose(result.prob, twin, atol=3e-5)
    from msxai.lesions import lesion_instances

    np.testing.assert_array_equal(result.labels, lesion_instances(twin, 0.3, 5.0, AFFINE))
    with pytest.raises(InputError, match="no member"):
        EnsembleSegmentation([])


def test_segment_ensemble_command(subject, tmp_path, capsys):
    flair, t1 = subject
    out = tmp_path / "ens"
    assert main(["segment", "--ensemble", "--flair", str(flair), "--t1", str(t1), "--out", str(out),
                 "--threads", "1"]) == 0
    assert "ensemble of msxai_unet, msxai_dynunet, msxai_swinunetr" in capsys.readouterr().out
    prob = load_volume(out / "probability.nii.gz").array
    members = [load_bundle(BUNDLES_DIR / n) for n in ("msxai_unet", "msxai_dynunet", "msxai_swinunetr")]
    twin = np.mean([m.segment(m.prepare(flair, t1)).prob for m in members], axis=0)  # each its own normalisation
    np.testing.assert_allclose(prob, twin, atol=3e-5)
    assert main(["segment", "--flair", str(flair), "--t1", str(t1), "--out", str(out)]) == 2
    assert main(["segment", "--ensemble", "--bundle", "unet", "--flair", str(flair), "--t1", str(t1),
                 "--out", str(out)]) == 2


def test_bad_tta_flips_are_named():
    assert check_tta_flips([]) == () and check_tta_flips([0, [2, 1]]) == ((0,), (1, 2))
    for bad in ([[3]], [[]], [["x"]]):
        with pytest.raises(InputError, match="tta_flips"):
            check_tta_flips(bad)
