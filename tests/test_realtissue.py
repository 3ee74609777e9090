"""Real tissue as a training background (msxai.realtissue): hemisphere halves against a per-voxel twin, the real
patient's lesions never crossing the mid-sagittal plane, relative lesion depth against a brute-force twin, the
intensity model, and injected subjects (other half blanked, lesions only in allowed NAWM, intensities from the
model, heavy loads reached, reproducible), on a 2 mm synthetic subject standing in for the patient."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

from msxai.errors import InputError
from msxai.realtissue import (
    LesionIntensityModel,
    RealBackground,
    depth_bin,
    draw_load,
    hemisphere_mask,
    inject_lesions,
    make_realtissue_cohort,
    relative_depth,
)
from msxai.synth import SynthConfig, generate_subject


def test_hemisphere_mask_matches_per_voxel_world_x():
    shape = (7, 6, 5)
    affine = np.array([[-1.5, 0.2, 0.0, 4.0], [0.1, 1.0, 0.0, -3.0], [0.0, 0.3, 2.0, 1.0], [0, 0, 0, 1]])
    right = hemisphere_mask(shape, affine, "right")
    left = hemisphere_mask(shape, affine, "left")
    for v in np.ndindex(*shape):
        x = (affine @ np.array([*v, 1.0]))[0]
        assert right[v] == (x > 0) and left[v] == (x <= 0)
    assert hemisphere_mask(shape, affine, "both").all()
    with pytest.raises(InputError, match="hemisphere"):
        hemisphere_mask(shape, affine, "top")


@pytest.mark.realdata
def test_real_patient_lesions_stay_in_one_half():
    from msxai.data import REAL_PATIENT_MISSING_REASON, real_patient_paths
    from msxai.io import load_volume
    from msxai.lesions import instances_from_mask

    paths = real_patient_paths()
    if paths is None:
        pytest.skip(REAL_PATIENT_MISSING_REASON)
    gt = load_volume(paths["truth"])
    inst = instances_from_mask(gt.array, gt.affine, min_volume_mm3=0)  # every component, tiny ones too
    right = hemisphere_mask(gt.array.shape, gt.affine, "right")
    per_side = [(np.unique(inst[right & (inst > 0)]), np.unique(inst[~right & (inst > 0)]))]
    r, l = per_side[0]
    assert len(set(r) & set(l)) == 0 and len(r) > 0 and len(l) > 0


def test_relative_depth_matches_brute_force():
    rng = np.random.default_rng(0)
    inst = np.zeros((12, 12, 12), np.int32)
    inst[2:9, 2:8, 3:9] = 1
    inst[9:11, 9:11, 9:11] = 2
    inst[1, 10, 1] = 3
    inst[(rng.random(inst.shape) > 0.93) & (inst == 1)] = 0  # holes
    depth = relative_depth(inst)
    outside = np.argwhere(inst == 0)
    for lid in (1, 2, 3):
        vox = np.argwhere(inst == lid)
        d = np.array([np.sqrt(((outside - v) ** 2).sum(1)).min() for v in vox])
        ref = (d - 1) / (d.max() - 1) if d.max() > 1 else np.zeros_like(d)
        np.testing.assert_allclose(depth[tuple(vox.T)], ref, atol=1e-5)
    assert np.all(depth[inst == 0] == 0)
    assert list(depth_bin(np.array([0.0, 0.24, 0.25, 0.99, 1.0]))) == [0, 0, 1, 3, 3]


def test_intensity_model_ratios_by_rank():
    model = LesionIntensityModel([np.array([[1.1, 0.9], [1.3, 0.8], [1.5, 0.7]], np.float32),
                                  np.array([[1.6, 0.6]], np.float32)])
    fr, tr = model.ratios(np.array([0, 0, 0, 1]), np.array([0.0, 0.5, 1.0, 0.3]))
    np.testing.assert_allclose(fr, [1.1, 1.3, 1.5, 1.6])
    np.testing.assert_allclose(tr, [0.9, 0.8, 0.7, 0.6])


@pytest.fixture(scope="module")
def source():
    s = generate_subject(3, config=SynthConfig(voxel_size=2.0, n_lesions=12))
    return s.flair, s.t1, (s.lesions > 0).astype(np.uint8), s.affine


@pytest.fixture(scope="module")
def left_background(source):
    return RealBackground.build(*source, side="left")


def test_injected_subject_keeps_the_other_half_blank(source, left_background):
    bg = left_background
    flair, t1, truth, affine = source
    right = hemisphere_mask(flair.shape, affine, "right")
    rng = np.random.default_rng(1)
    f, t, lab, info = inject_lesions(rng, bg, draw_load(rng, "heavy"))
    assert np.all(f[right] == 0) and np.all(t[right] == 0) and np.all(lab[right] == 0)
    assert np.all(lab[(truth > 0) & ~right] == 1)  # the real lesions of the half stay labelled
    injected = (lab > 0) & ~(truth > 0)
    assert injected.any() and np.all(bg.allowed[injected])
    assert 5 < info["injected_ml"] <= 30 and info["load_class"] == "heavy"  # heavy, capped at 30 mL per half
    # outside the injected lesions and their 2-voxel halo, the half is the source image unchanged
    from scipy import ndimage

    far = ~ndimage.binary_dilation(injected, np.ones((3, 3, 3), bool), iterations=3) & ~right
    np.testing.assert_array_equal(f[far], flair[far])
    # intensities come from the model: FLAIR/T1 ratios to the local NAWM level within the model's range
    inner = ndimage.binary_erosion(injected)
    fr = f[inner] / bg.bg_flair[inner]
    allp = np.concatenate(bg.model.bins)
    assert allp[:, 0].min() - 1e-3 <= np.median(fr) <= allp[:, 0].max() + 1e-3
    # reproducible
    rng2 = np.random.default_rng(1)
    f2, _, lab2, _ = inject_lesions(rng2, bg, draw_load(rng2, "heavy"))
    np.testing.assert_array_equal(lab, lab2)
    np.testing.assert_array_equal(f, f2)


def test_intensity_model_uses_only_the_training_half(source, left_background):
    flair, t1, truth, affine = source
    bg = left_background
    right = hemisphere_mask(flair.shape, affine, "right")
    changed = flair.copy()
    changed[right & (truth > 0)] *= 3.0  # the held-out half's lesions must not reach the model
    bg2 = RealBackground.build(changed, t1, truth, affine, side="left")
    for a, b in zip(bg.model.bins, bg2.model.bins):
        np.testing.assert_array_equal(a, b)


def test_cohort_is_readable_by_the_training_datalist(source, tmp_path):
    from msxai.training import mixed_datalist

    path = make_realtissue_cohort(tmp_path / "rt", 2, "right", seed=0, source=source, progress=False)
    cases = mixed_datalist(tmp_path / "rt", "train")
    assert [c["id"] for c in cases] == ["rtright000", "rtright001"] and path.name == "dataset.json"
    with pytest.raises(InputError):
        make_realtissue_cohort(tmp_path / "rt0", 0, "right", source=source)


def test_flair_threshold_baseline_and_half_scoring():
    from msxai.metrics import evaluate_region
    from msxai.realtissue import choose_flair_z, evaluate_half, flair_threshold_map

    rng = np.random.default_rng(4)
    shape = (16, 12, 10)
    affine = np.array([[-1.0, 0, 0, 8.0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    brain = np.zeros(shape, bool)
    brain[1:15, 1:11, 1:9] = True
    flair = np.where(brain, rng.normal(100, 5, shape), 0).astype(np.float32)
    truth = np.zeros(shape, np.uint8)
    truth[4:7, 4:7, 4:6] = 1  # right half (x = 8 - i > 0)
    truth[10:13, 5:8, 4:6] = 1  # left half
    flair[truth > 0] += 40
    mask = flair_threshold_map(flair, brain, 2.0, erosion_mm=1.5)
    vals = flair[brain]
    zf = (flair - vals.mean()) / vals.std()
    outside = np.argwhere(~brain)
    for v in np.ndindex(*shape):
        d = np.sqrt(((outside - v) ** 2).sum(1)).min() if brain[v] else 0.0
        assert mask[v] == (brain[v] and zf[v] > 2.0 and d > 1.5), v
    region = hemisphere_mask(shape, affine, "right")
    a = evaluate_half(mask, truth, affine, "right", n_boot=20)
    b = evaluate_region(mask, truth, region, affine, n_boot=20)
    assert a["half"] == "right" and {k: a[k] for k in b} == b
    z, rows = choose_flair_z(flair, brain, truth, affine, "left", zs=[0.5, 1.5, 2.5, 6.0])
    best = max(rows, key=lambda r: r["ndsc"] + r["F1"])
    assert z == best["z"] and [r["z"] for r in rows] == [0.5, 1.5, 2.5, 6.0]
