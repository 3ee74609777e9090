"""Brain mask, z-scoring (MONAI twin), N4, rigid registration and resampling (msxai.preprocess), and the bundles'
pre-processing chain on a pair (msxai.transforms through msxai.inference.default_preprocessing)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from msxai.data import REAL_PATIENT_MISSING_REASON, real_patient_paths
from msxai.errors import EmptyDomainError, InputError
from msxai.io import Volume, load_pair, save_volume
from msxai.preprocess import (
    brain_mask,
    estimate_rigid,
    foreground_mask,
    n4_bias_correct,
    register_rigid,
    resample_onto,
    sitk_affine,
    to_sitk,
    zscore,
)

sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def ellipsoid(shape, centre, radii):
    g = np.indices(shape).astype(float)
    return (((g - np.array(centre, float)[:, None, None, None]) / np.array(radii, float)[:, None, None, None]) ** 2).sum(0) <= 1


def phantom(shape=(40, 40, 40)):
    """An asymmetric head-like phantom: a brain ellipsoid holding blobs of different intensities (smoothed)."""
    c = (np.array(shape) - 1) / 2
    s = np.array(shape) / 40.0
    img = np.zeros(shape)
    img[ellipsoid(shape, c, 16 * s * [1, 14 / 16, 15 / 16])] = 60
    img[ellipsoid(shape, c + s * [-4.5, 2.5, 0.5], s * [6, 4, 7])] = 120
    img[ellipsoid(shape, c + s * [6.5, -4.5, -1.5], s * [4, 7, 3])] = 30
    img[ellipsoid(shape, c + s * [0.5, 8.5, 5.5], s * [3, 3, 5])] = 160
    img[ellipsoid(shape, c + s * [2.5, 0.5, -9.5], s * [5, 3, 2])] = 100
    return ndimage.gaussian_filter(img, 1.0).astype(np.float32)


def skull_stripped_pair(shape=(20, 22, 18), seed=0):
    rng = np.random.default_rng(seed)
    brain = ellipsoid(shape, (np.array(shape) - 1) / 2, np.array(shape) / 2.3)
    flair = np.where(brain, rng.normal(300, 40, shape), 0).astype(np.float32)
    t1 = np.where(brain, rng.normal(800, 120, shape), 0).astype(np.float32)
    return np.stack([flair, t1]), brain


# ------------------------------------------------------------------------------------------------ masks / z-score
def test_foreground_mask():
    image, brain = skull_stripped_pair()
    np.testing.assert_array_equal(foreground_mask(image), brain)
    np.testing.assert_array_equal(foreground_mask(image[1]), brain)
    only_t1 = image.copy()
    assert brain[10, 11, 9] and not brain[0, 0, 0]
    only_t1[0, 10, 11, 9] = 0.0
    only_t1[1, 0, 0, 0] = 5.0  # non-zero in one channel is enough
    assert foreground_mask(only_t1)[0, 0, 0] and foreground_mask(only_t1)[10, 11, 9]
    np.testing.assert_array_equal(brain_mask(image), brain)
    with pytest.raises(InputError, match="shape"):
        foreground_mask(np.zeros((3, 3)))


def test_zscore_formula_and_outside_zero():
    image, brain = skull_stripped_pair()
    z = zscore(image)
    assert z.dtype == np.float32 and z.shape == image.shape
    for c in range(2):
        vals = image[c][brain].astype(np.float64)
        np.testing.assert_allclose(z[c][brain], (vals - vals.mean()) / vals.std(), rtol=1e-5, atol=1e-5)
        assert np.all(z[c][~brain] == 0)
        assert abs(z[c][brain].mean()) < 1e-5 and abs(z[c][brain].std() - 1) < 1e-5
    # an explicit mask, and a 3-D volume
    m = brain.copy()
    m[:10] = False
    z3 = zscore(image[0], m)
    vals = image[0][m].astype(np.float64)
    np.testing.assert_allclose(z3[m], (vals - vals.mean()) / vals.std(), rtol=1e-5, atol=1e-5)
    assert np.all(z3[~m] == 0)


def monai_normalize(image):
    from monai.transforms import NormalizeIntensity

    out = NormalizeIntensity(nonzero=True, channel_wise=True)(image.copy())
    return np.asarray(out.detach().cpu().numpy() if hasattr(out, "detach") else out)


def test_zscore_equals_monai_normalize_intensity():
    image, _ = skull_stripped_pair(seed=3)
    np.testing.assert_allclose(zscore(image), monai_normalize(image), rtol=1e-5, atol=1e-5)


def test_zscore_refuses_degenerate_input():
    image, brain = skull_stripped_pair()
    const = image.copy()
    const[1][brain] = 7.0
    with pytest.raises(InputError, match=r"channel 1 \(MPRAGE\) is constant"):
        zscore(const)
    with pytest.raises(EmptyDomainError, match="empty"):
        zscore(image, np.zeros(brain.shape, bool))
    nan = image.copy()
    nan[0, 5, 5, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        zscore(nan)
    with pytest.raises(InputError, match="mask shape"):
        zscore(image, brain[:-1])


# ------------------------------------------------------------------------------------------------ N4
def test_n4_reduces_a_multiplicative_bias_field():
    shape = (36, 36, 36)
    rng = np.random.default_rng(0)
    c = (np.array(shape) - 1) / 2
    g = np.indices(shape).astype(float)
    brain = ellipsoid(shape, c, (16, 16, 16))
    inner = ellipsoid(shape, c, (8, 8, 8))
    tissue = np.where(inner, 100.0, 60.0) * brain
    bias = np.exp(0.4 * (g[0] - c[0]) / 18 + 0.25 * (g[2] - c[2]) / 18)
    vol = ((tissue * bias + rng.normal(0, 2, shape)) * brain).astype(np.float32)

    def cv(x):  # coefficient of variation inside each tissue class
        return [float(x[m].std() / x[m].mean()) for m in (brain & ~inner, inner)]

    corrected = n4_bias_correct(vol, shrink_factor=2, iterations=(20, 20))
    before, after = cv(vol), cv(corrected)
    assert all(a < 0.4 * b for a, b in zip(after, before)), (before, after)
    assert corrected.dtype == np.float32 and np.all(corrected[~brain] == 0)
    # non-positive voxels are left out of the fit but still corrected
    shifted = vol.copy()
    shifted[brain & (g[1] < 6)] = -1.0
    part = n4_bias_correct(shifted, shrink_factor=2, iterations=(20, 20))
    keep = brain & (g[1] >= 6)
    np.testing.assert_allclose(part[keep] / corrected[keep], np.median(part[keep] / corrected[keep]), rtol=0.1)
    with pytest.raises(EmptyDomainError, match="positive"):
        n4_bias_correct(-vol)


# ------------------------------------------------------------------------------------------------ geometry
def test_sitk_geometry_matches_the_affine():
    affine = np.array([[-0.9, 0, 0, 90], [0, 0, 2.0, -126], [0, 1.1, 0, -72], [0, 0, 0, 1]], float)
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    img = to_sitk(arr, affine)
    np.testing.assert_allclose(sitk_affine(img), affine, atol=1e-9)
    for idx in [(0, 0, 0), (3, 1, 5), (2, 4, 1)]:
        assert img[idx] == arr[idx]  # sitk index (i, j, k) = array[i, j, k]
        np.testing.assert_allclose(img.TransformIndexToPhysicalPoint(idx), (affine @ (*idx, 1))[:3], atol=1e-9)


def ramp(affine, shape, coef=(0.7, -0.3, 1.9), const=5.0):
    """A volume whose value at each voxel is a linear function of the voxel's world position."""
    idx = np.indices(shape).reshape(3, -1).T.astype(float)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    return (world @ np.array(coef) + const).reshape(shape).astype(np.float32)


def test_resample_onto_matches_index_arithmetic():
    rng = np.random.default_rng(0)
    arr = rng.random((6, 7, 5)).astype(np.float32)
    affine = np.array([[2.0, 0, 0, 10], [0, 1.0, 0, -4], [0, 0, 1.5, 3], [0, 0, 0, 1]], float)
    # target grid: x flipped, shifted by one voxel in y, same voxel centres -> pure index arithmetic
    target = affine.copy()
    target[:3, 0] = -affine[:3, 0]
    target[:3, 3] = (affine @ np.array([5, 1, 0, 1.0]))[:3]
    for order in (0, 1):
        out = resample_onto(Volume(arr, affine), target, (6, 5, 5), order=order).array
        slow = np.zeros((6, 5, 5), np.float32)
        for i, j, k in np.ndindex(6, 5, 5):  # target (i, j, k) is source (5 - i, j + 1, k)
            slow[i, j, k] = arr[5 - i, j + 1, k]
        np.testing.assert_allclose(out, slow, atol=1e-6)
    # outside the source: the default value
    far = affine.copy()
    far[:3, 3] += 1000.0
    assert np.all(resample_onto(Volume(arr, affine), far, (2, 2, 2)).array == 0)
    with pytest.raises(InputError, match="order"):
        resample_onto(Volume(arr, affine), affine, arr.shape, order=2)


def test_rigid_registration_recovers_a_known_motion():
    fixed = Volume(phantom(), np.eye(4))
    centre = (np.array(fixed.array.shape) - 1) / 2
    truth = sitk.Euler3DTransform()
    truth.SetCenter(tuple(centre))
    truth.SetRotation(0.02, -0.03, np.deg2rad(6))
    truth.SetTranslation((2.0, -1.5, 1.0))
    moved = resample_onto(fixed, np.eye(4), fixed.array.shape, truth.GetInverse())
    # a different contrast (inverted inside the head), as between FLAIR and T1: mutual information handles it
    moving = Volume(np.where(moved.array > 1, 200 - moved.array, 0).astype(np.float32), np.eye(4))
    pts = np.argwhere(fixed.array > 1)[::40].astype(float)
    for init in ("world", "moments"):
        est = estimate_rigid(moving, fixed, init=init)
        err = [np.linalg.norm(np.subtract(est.TransformPoint(tuple(p)), truth.TransformPoint(tuple(p)))) for p in pts]
        assert max(err) < 0.6, (init, max(err))  # mm, for a motion of up to ~3 mm and 6 degrees
    with pytest.raises(InputError, match="init"):
        estimate_rigid(moving, fixed, init="nope")
    out = register_rigid(moving, fixed)
    assert out.array.shape == fixed.array.shape and np.allclose(out.affine, fixed.affine)
    head = fixed.array > 5
    before = np.corrcoef(moving.array[head], fixed.array[head])[0, 1]
    after = np.corrcoef(out.array[head], fixed.array[head])[0, 1]
    assert after < -0.9 and abs(after) > abs(before) + 0.1  # inverted contrast: strongly anti-correlated once aligned


# ------------------------------------------------------------------------------------------ the chain on a pair
def write_pair(tmp_path, flair, t1, affine_flair, affine_t1=None):
    f = save_volume(tmp_path / "flair.nii.gz", flair, affine_flair)
    t = save_volume(tmp_path / "t1.nii.gz", t1, affine_flair if affine_t1 is None else affine_t1)
    return f, t


def _chain(f, t, **kw):
    from msxai.inference import default_preprocessing
    from msxai.transforms import run_chain

    return run_chain(default_preprocessing(**kw), {"flair": str(f), "t1": str(t)})


def test_chain_plain_pair_and_a_t1_on_a_shifted_grid(tmp_path):
    image, brain = skull_stripped_pair()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    f, t = write_pair(tmp_path, image[0], image[1], affine)
    d = _chain(f, t)
    np.testing.assert_array_equal(d["raw"], load_pair(f, t)[0])
    np.testing.assert_array_equal(d["brain_mask"], brain)
    np.testing.assert_allclose(d["image"].numpy(), zscore(image), atol=1e-6)
    np.testing.assert_allclose(d["flair"].affine.numpy(), affine)
    # the T1 written on a grid shifted by whole voxels, registration off: re-indexed onto the FLAIR's (world
    # coordinates kept), 0 where it has no voxel
    shifted = affine.copy()
    shifted[:3, 3] = (4.0, -2.0, 0.0)
    f2, t2 = write_pair(tmp_path, image[0], image[1], affine, shifted)
    d2 = _chain(f2, t2, register=False)
    expected = np.zeros_like(image[1])
    expected[4:, : image.shape[2] - 2] = image[1][:-4, 2:]
    np.testing.assert_array_equal(d2["raw"][1], expected)
    assert d2["msxai_info"]["registration"]["resampled"] is True


def test_chain_registers_a_moved_t1_resamples_and_corrects(tmp_path):
    shape = (32, 32, 32)
    flair = phantom(shape)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    # T1: another contrast, on another grid (coarser, shifted origin), moved by a small rigid motion
    motion = sitk.Euler3DTransform()
    motion.SetCenter(tuple((np.array(shape) - 1) / 2 * 1.5))
    motion.SetRotation(0.0, 0.0, np.deg2rad(4))
    motion.SetTranslation((1.5, -1.0, 0.5))
    t1_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    t1_affine[:3, 3] = (-2.0, 1.0, 0.5)
    t1 = resample_onto(Volume(flair, affine), t1_affine, (26, 26, 26), motion.GetInverse())
    t1_arr = np.where(t1.array > 1, 200 - t1.array, 0).astype(np.float32)
    f, t = write_pair(tmp_path, flair, t1_arr, affine, t1_affine)
    head = flair > 5
    plain = _chain(f, t, register="never")
    d = _chain(f, t, register="always")
    assert d["image"].shape == (2, *shape) and np.allclose(d["flair"].affine.numpy(), affine)
    before = np.corrcoef(plain["raw"][1][head], flair[head])[0, 1]
    after = np.corrcoef(d["raw"][1][head], flair[head])[0, 1]
    assert after < -0.85 and after < before - 0.05  # T1 now aligned with FLAIR (inverted contrast)
    reg = d["msxai_info"]["registration"]
    assert reg["registered"] is True and reg["residual_mm"] is not None
    both = _chain(f, t, register="always", n4=True, orientation="LAS", pixdim=(1.0, 1.0, 1.0))
    assert both["image"].shape == (2, 48, 48, 48)  # 1 mm over the FLAIR's 32 x 1.5 mm field of view (MONAI's Spacingd)
    np.testing.assert_allclose(np.sqrt((both["flair"].affine.numpy()[:3, :3] ** 2).sum(0)), (1.0, 1.0, 1.0))
    mask = both["brain_mask"]
    for c in range(2):
        vals = both["image"][c].numpy()[mask]
        assert abs(vals.mean()) < 1e-4 and abs(vals.std() - 1) < 1e-4
        assert np.all(both["image"][c].numpy()[~mask] == 0)


# ------------------------------------------------------------------------------------------------ real patient
@pytest.mark.realdata
def test_real_patient_zscore_equals_monai():
    paths = real_patient_paths()
    if paths is None:
        pytest.skip(REAL_PATIENT_MISSING_REASON)
    image, _ = load_pair(paths["flair"], paths["t1"])
    # skull-stripped: FLAIR and T1 share their non-zero voxels, so the union mask is MONAI's per-channel mask
    np.testing.assert_array_equal(image[0] != 0, image[1] != 0)
    np.testing.assert_allclose(zscore(image), monai_normalize(image), rtol=1e-4, atol=1e-4)
