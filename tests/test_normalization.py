"""Normalisations selectable by name (msxai.normalization): the default is the z-score of msxai.preprocess, the
robust ones against twins written from their definitions and against known distributions, lesion-load
invariance, bad input, and the bundle's pre-processing chain using the named one."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

from msxai.errors import EmptyDomainError, InputError
from msxai.normalization import (
    NORMALIZATIONS,
    check_normalization,
    median_iqr,
    mode_stats,
    nawm_mode,
    normalize,
)
from msxai.preprocess import zscore


def brain_image(seed=0, shape=(24, 26, 22), lesion_fraction=0.0):
    """Two channels: a 'white matter' peak (FLAIR 100 +- 8, T1 300 +- 20) over most of an ellipsoid brain, a
    darker 'CSF' part, and optionally a hyperintense/hypointense lesion fraction."""
    rng = np.random.default_rng(seed)
    g = np.indices(shape).astype(float)
    c = (np.array(shape) - 1)[:, None, None, None] / 2
    brain = (((g - c) / (np.array(shape)[:, None, None, None] * 0.45)) ** 2).sum(0) < 1
    flair = rng.normal(100, 8, shape)
    t1 = rng.normal(300, 20, shape)
    csf = brain & (rng.random(shape) < 0.15)
    flair[csf] = rng.normal(30, 5, csf.sum())
    t1[csf] = rng.normal(90, 10, csf.sum())
    les = brain & ~csf & (rng.random(shape) < lesion_fraction)
    flair[les] *= 1.6
    t1[les] *= 0.75
    img = np.stack([flair, t1]) * brain
    return img.astype(np.float32), brain, les


def test_default_is_the_paper_zscore():
    img, brain, _ = brain_image()
    np.testing.assert_array_equal(normalize(img, brain), zscore(img, brain))
    np.testing.assert_array_equal(normalize(img, brain, "zscore_brain"), zscore(img, brain))
    assert check_normalization(None) == "zscore_brain" and set(NORMALIZATIONS) == {"zscore_brain", "median_iqr",
                                                                                  "nawm_mode"}


def test_median_iqr_matches_sorted_list_twin():
    img, brain, _ = brain_image(1)
    out = median_iqr(img, brain)
    for c in range(2):
        vals = sorted(float(v) for v in img[c][brain])
        n = len(vals)

        def pct(q):  # linear interpolation between closest ranks (numpy's default)
            pos = q / 100 * (n - 1)
            lo = int(pos)
            return vals[lo] + (vals[min(lo + 1, n - 1)] - vals[lo]) * (pos - lo)

        med, iqr = pct(50), pct(75) - pct(25)
        np.testing.assert_allclose(out[c][brain], (img[c][brain] - med) / (iqr / 1.3489795003921634), rtol=1e-4,
                                   atol=1e-4)
        assert np.all(out[c][~brain] == 0)


def test_mode_stats_finds_the_tissue_peak_under_a_lesion_tail():
    rng = np.random.default_rng(2)
    peak = rng.normal(100.0, 10.0, 200_000)
    for tail_fraction in (0.0, 0.05, 0.15):
        tail = rng.normal(170.0, 15.0, int(tail_fraction * peak.size))
        mode, sd = mode_stats(np.concatenate([peak, tail]))
        assert mode == pytest.approx(100.0, abs=1.0) and sd == pytest.approx(10.0, rel=0.06), tail_fraction
    # a narrow and a wide peak: the width follows the peak, not the range
    assert mode_stats(rng.normal(5.0, 0.5, 100_000))[1] == pytest.approx(0.5, rel=0.06)


@pytest.mark.parametrize("name", ["median_iqr", "nawm_mode"])
def test_robust_normalisations_barely_move_with_the_lesion_load(name):
    """The same tissue with 0 % and 12 % lesions: normal tissue keeps its normalised value under the robust
    normalisations much better than under the whole-brain z-score."""
    shifts = {}
    for method in ("zscore_brain", name):
        a_img, brain, _ = brain_image(3, lesion_fraction=0.0)
        b_img, _, les = brain_image(3, lesion_fraction=0.12)
        a, b = normalize(a_img, brain, method), normalize(b_img, brain, method)
        normal = brain & ~les & (a_img[0] > 60)
        shifts[method] = float(abs(np.median(a[0][normal]) - np.median(b[0][normal])))
    assert shifts[name] < 0.5 * shifts["zscore_brain"], shifts


def test_bad_input_is_named():
    img, brain, _ = brain_image()
    with pytest.raises(InputError, match="unknown normalization 'minmax'"):
        normalize(img, brain, "minmax")
    with pytest.raises(EmptyDomainError):
        nawm_mode(img, np.zeros_like(brain))
    const = img.copy()
    const[1][brain] = 7.0
    with pytest.raises(InputError, match="channel 1"):
        median_iqr(const, brain)
    with pytest.raises(InputError, match="channel 1"):
        nawm_mode(const, brain)
    bad = img.copy()
    bad[0, 3, 3, 3] = np.nan
    with pytest.raises(InputError):
        median_iqr(bad, brain)


def test_the_chain_uses_the_named_normalisation(tmp_path):
    from msxai.inference import default_preprocessing
    from msxai.io import save_volume
    from msxai.transforms import run_chain

    img, brain, _ = brain_image(4, lesion_fraction=0.05)
    save_volume(tmp_path / "f.nii.gz", img[0], np.eye(4))
    save_volume(tmp_path / "t.nii.gz", img[1], np.eye(4))
    files = {"flair": str(tmp_path / "f.nii.gz"), "t1": str(tmp_path / "t.nii.gz")}
    for name in NORMALIZATIONS:
        d = run_chain(default_preprocessing(normalization=name), files)
        np.testing.assert_allclose(d["image"].numpy(), normalize(d["raw"], d["brain_mask"], name), atol=1e-6)
        np.testing.assert_array_equal(d["raw"], img.astype(np.float32))
    with pytest.raises(InputError, match="unknown normalization"):
        default_preprocessing(normalization="nope")
