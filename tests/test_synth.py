"""Tests of the synthetic MS cohort (msxai.synth, `msxai synth`). Mostly 2 mm subjects (fast); one 1 mm subject."""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

import msxai  # noqa: E402
from msxai import synth  # noqa: E402
from msxai.cli import main  # noqa: E402
from msxai.data import real_patient_dir, real_patient_missing_reason  # noqa: E402
from msxai.errors import InputError  # noqa: E402
from msxai.synth import anatomy  # noqa: E402
from msxai.synth import (  # noqa: E402
    MNI_AFFINE_1MM,
    SynthConfig,
    generate_cohort,
    generate_subject,
    lesion_instances_18,
    load_dataset,
    make_splits,
    subject_seed,
    write_subject,
)

try:
    import torch

    torch.set_num_threads(1)
except Exception:  # pragma: no cover - torch is not needed here
    pass

PATIENT = real_patient_dir()  # None when absent
CFG2 = SynthConfig(voxel_size=2.0, n_lesions=30)


# ------------------------------------------------------------------------------------------- slow twins


OFFSETS_18 = [
    (a, b, c)
    for a in (-1, 0, 1)
    for b in (-1, 0, 1)
    for c in (-1, 0, 1)
    if 0 < abs(a) + abs(b) + abs(c) <= 2
]


def slow_instances_18(binary: np.ndarray, voxel_mm3: float, min_mm3: float) -> np.ndarray:
    """Breadth-first flood fill over the 18 neighbours of every lesion voxel, in raster order; drop small ones."""
    binary = np.asarray(binary, bool)
    out = np.zeros(binary.shape, np.int32)
    seen = np.zeros(binary.shape, bool)
    next_id = 0
    for start in map(tuple, np.argwhere(binary)):  # argwhere is raster (C) order
        if seen[start]:
            continue
        comp = [start]
        seen[start] = True
        queue = deque([start])
        while queue:
            x, y, z = queue.popleft()
            for a, b, c in OFFSETS_18:
                q = (x + a, y + b, z + c)
                if all(0 <= q[i] < binary.shape[i] for i in range(3)) and binary[q] and not seen[q]:
                    seen[q] = True
                    comp.append(q)
                    queue.append(q)
        if len(comp) * voxel_mm3 >= min_mm3:
            next_id += 1
            for q in comp:
                out[q] = next_id
    return out


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when the two label maps define the same set of regions (ids may differ)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = set(zip(a[a > 0].tolist(), b[b > 0].tolist()))
    return len(pairs) == len(np.unique(a[a > 0])) == len(np.unique(b[b > 0]))


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def subj2():
    return generate_subject(3, config=CFG2)


@pytest.fixture(scope="module")
def subj1():
    """One full-size (1 mm) subject with the default configuration."""
    return generate_subject(11)


def wm_shell(labels: np.ndarray, wm: np.ndarray, width: int = 2) -> np.ndarray:
    les = labels > 0
    ring = ndi.binary_dilation(les, iterations=width) & ~ndi.binary_dilation(les, iterations=1)
    return ring & (wm > 0.8)


# ------------------------------------------------------------------------------------------- geometry


def test_grid_is_the_real_patients_mni_grid():
    shape, affine = SynthConfig().grid()
    assert shape == (182, 218, 182)
    np.testing.assert_allclose(affine, MNI_AFFINE_1MM)
    if PATIENT is not None:
        img = nib.load(str(PATIENT / "FLAIR.nii.gz"))
        assert img.shape == shape
        np.testing.assert_allclose(img.affine, affine, atol=1e-4)
    # 2 mm: same field of view, voxel corners aligned with the 1 mm grid's
    shape2, affine2 = SynthConfig(voxel_size=2).grid()
    assert shape2 == (91, 109, 91)
    np.testing.assert_allclose(np.abs(np.diag(affine2)[:3]), 2.0)
    corner1 = MNI_AFFINE_1MM @ np.array([-0.5, -0.5, -0.5, 1])
    corner2 = affine2 @ np.array([-0.5, -0.5, -0.5, 1])
    np.testing.assert_allclose(corner1, corner2)
    with pytest.raises(InputError, match="voxel_size"):
        SynthConfig(voxel_size=10).grid()


def test_deformation_fast_path_matches_exact_mapping():
    cfg = SynthConfig(voxel_size=1.0, ventricle_enlargement=(0.45, 0.45), elastic_mm=(4.0, 4.0))
    shape, affine = cfg.grid()
    deform, crop, coords, _ = anatomy._deformation(np.random.default_rng(5), cfg, shape, affine, synth.mni_template())
    rng = np.random.default_rng(0)
    ijk = np.stack([rng.integers(c.start, c.stop, 3000) for c in crop])
    exact = deform.template_voxels(ijk)
    fast = coords[(slice(None), *(ijk - np.array([c.start for c in crop])[:, None]))]
    err = np.abs(exact - fast)
    assert err.max() < 0.15 and err.mean() < 0.01  # voxels: the ventricle pull's curvature within a lattice cell
    # and the deformation is not the identity: template coordinates move by millimetres
    ident = np.linalg.inv(deform.template_affine) @ affine @ np.vstack([ijk, np.ones(ijk.shape[1])])
    assert np.abs(exact - ident[:3]).mean() > 1.0


def test_affine_and_shapes(subj2):
    shape, affine = CFG2.grid()
    for arr in (subj2.flair, subj2.t1, subj2.lesions, subj2.brain_mask):
        assert arr.shape == shape
    assert subj2.flair.dtype == np.float32 and subj2.t1.dtype == np.float32
    assert subj2.lesions.dtype == np.int32 and subj2.brain_mask.dtype == np.uint8
    np.testing.assert_allclose(subj2.affine, affine)
    assert np.linalg.det(subj2.affine[:3, :3]) != 0


# ------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_subject_different_seed_different(subj2):
    again = generate_subject(3, config=CFG2)
    for name in ("flair", "t1", "lesions", "brain_mask"):
        np.testing.assert_array_equal(getattr(subj2, name), getattr(again, name))
    other = generate_subject(4, config=CFG2)
    assert not np.array_equal(subj2.brain_mask, other.brain_mask)
    assert not np.array_equal(subj2.lesions > 0, other.lesions > 0)
    assert not np.allclose(subj2.flair, other.flair)


def test_smooth_noise_is_deterministic_and_standardised():
    a = synth.smooth_noise(np.random.default_rng(1), (40, 30, 20), 3.0)
    b = synth.smooth_noise(np.random.default_rng(1), (40, 30, 20), 3.0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (40, 30, 20)
    assert abs(a.mean()) < 1e-5 and abs(a.std() - 1) < 1e-4
    # smooth: neighbours are strongly correlated
    assert np.corrcoef(a[1:].ravel(), a[:-1].ravel())[0, 1] > 0.8


# ------------------------------------------------------------------------------------------- lesions


def test_lesion_instances_18_matches_flood_fill_twin():
    rng = np.random.default_rng(0)
    for trial in range(6):
        binary = ndi.gaussian_filter(rng.random((18, 16, 14)), 1.0) > 0.53
        for vox in (1.0, 0.7, 2.0):
            fast = lesion_instances_18(binary, vox, 5.0)
            slow = slow_instances_18(binary, vox, 5.0)
            assert same_partition(fast, slow), (trial, vox)
            np.testing.assert_array_equal(fast, slow)  # same ids too (raster order of first voxel)
    # 18- not 26-connectivity: two voxels touching only at a corner are separate lesions
    b = np.zeros((4, 4, 4), bool)
    b[1, 1, 1] = b[2, 2, 2] = True
    assert lesion_instances_18(b, 10.0, 5.0).max() == 2
    b[2, 2, 1] = True  # now an edge neighbour joins them
    assert lesion_instances_18(b, 10.0, 5.0).max() == 1


def test_lesion_labels_are_final_18_components_of_min_volume(subj2):
    labels = subj2.lesions
    n = int(labels.max())
    assert n >= 5
    np.testing.assert_array_equal(np.unique(labels), np.arange(n + 1))
    vox = msxai.io.voxel_volume_mm3(subj2.affine)
    np.testing.assert_array_equal(slow_instances_18(labels > 0, vox, msxai.MIN_LESION_MM3), labels)
    sizes = np.bincount(labels.ravel())[1:] * vox
    assert sizes.min() >= msxai.MIN_LESION_MM3
    assert subj2.meta["lesion_volumes_mm3"] == [round(float(s), 1) for s in sizes]


def test_lesions_only_in_white_matter_inside_the_brain(subj2, subj1):
    for s in (subj2, subj1):
        les = s.lesions > 0
        assert les.any()
        assert np.all(s.brain_mask[les] == 1)
        wm = s.tissues[2]
        # white matter, or the partial-volume white matter of the ventricle wall (periventricular lesions)
        near_vent = anatomy.lesion_site_maps(s.tissues, s.brain_mask > 0, s.meta["voxel_size"])["dist_vent"] <= 3.0
        assert np.all((wm[les] > 0.4) | ((wm[les] > 0.15) & near_vent[les] & (s.tissues[0][les] < 0.75)))
        assert wm[les].mean() > 0.7
        # and lesions are not in the CSF
        assert s.tissues[0][les].mean() < 0.1


def test_lesion_sites_and_volumes(subj1):
    blobs = subj1.meta["blobs"]
    sites = {b["site"] for b in blobs}
    assert len(blobs) >= 1
    assert sites <= set(synth.LESION_SITES)
    vols = np.array(subj1.meta["lesion_volumes_mm3"])
    if len(vols):
        assert vols.min() >= 5.0
    # pooled over several fast subjects: heavy-tailed volumes, median in the paper's range, some large lesions
    pooled, counts = [], []
    for seed in range(4):
        s = generate_subject(100 + seed, config=SynthConfig(voxel_size=2.0))
        pooled += s.meta["lesion_volumes_mm3"]
        counts.append(int(s.lesions.max()))
    pooled = np.array(pooled)
    assert 15 <= np.median(pooled) <= 250
    assert pooled.max() >= 500
    assert np.mean(pooled) > np.median(pooled)  # right-skewed
    assert max(counts) <= 80 and len(set(counts)) > 1


def test_lesion_count_can_be_fixed_or_zero():
    s = generate_subject(9, config=SynthConfig(voxel_size=2.0, n_lesions=0))
    assert s.lesions.max() == 0 and s.meta["blobs"] == []
    assert np.all(s.flair[s.brain_mask == 0] == 0)


# ------------------------------------------------------------------------------------------- contrasts


def _contrasts(s):
    csf, gm, wm = s.tissues
    m = (s.brain_mask > 0) & (s.lesions == 0)
    les = s.lesions > 0
    shell = wm_shell(s.lesions, wm) & m
    out = {}
    for name in ("flair", "t1"):
        img = getattr(s, name)
        w = img[m & (wm > 0.9)].mean()
        out[name] = {
            "csf": img[m & (csf > 0.9)].mean() / w,
            "gm": img[m & (gm > 0.9)].mean() / w,
            "lesion": img[les].mean() / img[shell].mean(),
        }
    return out


@pytest.mark.parametrize("which", ["subj2", "subj1"])
def test_tissue_and_lesion_contrasts(which, request):
    s = request.getfixturevalue(which)
    c = _contrasts(s)
    # FLAIR: CSF suppressed (darker than WM), GM brighter than WM, lesions hyperintense to surrounding WM
    assert c["flair"]["csf"] < 0.5
    assert c["flair"]["gm"] > 1.0
    assert c["flair"]["lesion"] > 1.1
    # MPRAGE: WM bright, GM darker, CSF darkest, lesions hypo- or isointense
    assert c["t1"]["csf"] < c["t1"]["gm"] < 1.0
    assert c["t1"]["lesion"] < 1.02
    # per lesion: most lesions are brighter than their own WM surroundings on FLAIR
    brighter = 0
    n = int(s.lesions.max())
    for i in range(1, n + 1):
        li = s.lesions == i
        ring = ndi.binary_dilation(li, iterations=2) & ~ndi.binary_dilation(li) & (s.tissues[2] > 0.8) & (s.lesions == 0)
        if ring.sum() >= 3:
            brighter += s.flair[li].mean() > s.flair[ring].mean()
    assert brighter >= 0.8 * n


def test_intensities_are_heterogeneous_not_constant(subj1):
    les = subj1.lesions > 0
    rel_sd = subj1.flair[les].std() / subj1.flair[les].mean()
    assert rel_sd > 0.03
    # contrasts differ between subjects (models cannot key on one intensity)
    other = generate_subject(12, config=SynthConfig(voxel_size=2.0))
    assert abs(_contrasts(other)["flair"]["gm"] - _contrasts(subj1)["flair"]["gm"]) > 1e-3
    assert subj1.meta["acquisition"]["flair"]["wm_level"] != other.meta["acquisition"]["flair"]["wm_level"]


@pytest.mark.skipif(PATIENT is None, reason=real_patient_missing_reason())
def test_contrast_direction_matches_the_real_patient(subj1):
    """The real patient's lesions are FLAIR-hyperintense and T1-hypointense relative to normal WM, like ours."""
    f = nib.load(str(PATIENT / "FLAIR.nii.gz")).get_fdata()
    t = nib.load(str(PATIENT / "T1.nii.gz")).get_fdata()
    gt = nib.load(str(PATIENT / "consensus_gt.nii.gz")).get_fdata() > 0
    shell = ndi.binary_dilation(gt, iterations=3) & ~ndi.binary_dilation(gt, iterations=1) & (f != 0)
    real_f = f[gt].mean() / f[shell].mean()
    real_t = t[gt].mean() / t[shell].mean()
    c = _contrasts(subj1)
    assert real_f > 1.0 and c["flair"]["lesion"] > 1.0
    assert real_t < 1.0 and c["t1"]["lesion"] < 1.0


# ------------------------------------------------------------------------------------------- skull


def test_brain_extracted_by_default_and_skull_option(subj2):
    outside = subj2.brain_mask == 0
    assert np.all(subj2.flair[outside] == 0) and np.all(subj2.t1[outside] == 0)
    sk = generate_subject(3, skull=True, config=CFG2)
    # same brain and lesions, plus a head around it
    np.testing.assert_array_equal(sk.brain_mask, subj2.brain_mask)
    np.testing.assert_array_equal(sk.lesions, subj2.lesions)
    o = sk.brain_mask == 0
    assert np.count_nonzero(sk.flair[o]) > 0.5 * o.sum()
    # the head (scalp fat, bright on T1) is much brighter than the air background noise
    corner = sk.t1[:5, :5, -5:]
    near = ndi.binary_dilation(sk.brain_mask > 0, iterations=6) & o
    assert np.percentile(sk.t1[near], 90) > 5 * corner.mean()


@pytest.mark.parametrize("which", ["subj2", "subj1"])
def test_brain_mask_holds_all_brain_tissue_and_no_holes(which, request):
    s = request.getfixturevalue(which)
    csf, gm, wm = s.tissues
    m = s.brain_mask > 0
    assert np.all(m[(gm + wm) > 0.5])
    assert np.all(s.tissues[:, ~m] == 0)
    np.testing.assert_array_equal(ndi.binary_fill_holes(m), m)  # like the real patient's skull-stripped mask
    # every brain voxel is some tissue (CSF, GM or WM)
    assert np.allclose(s.tissues[:, m].sum(0), 1.0, atol=1e-4)


# ------------------------------------------------------------------------------------------- files & cohort


def test_write_subject_names_affines_dtypes(subj2, tmp_path):
    paths = write_subject(subj2, tmp_path, "synth042")
    expected = {
        "flair": "synth042_FLAIR.nii.gz",
        "t1": "synth042_T1.nii.gz",
        "label": "synth042_lesions.nii.gz",
        "brain_mask": "synth042_brainmask.nii.gz",
    }
    for key, name in expected.items():
        assert paths[key] == tmp_path / name and paths[key].exists()
        img = nib.load(str(paths[key]))
        np.testing.assert_allclose(img.affine, subj2.affine)
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    lab = nib.load(str(paths["label"]))
    assert lab.get_data_dtype() == np.int32
    np.testing.assert_array_equal(np.asarray(lab.dataobj), subj2.lesions)
    np.testing.assert_array_equal(np.asarray(nib.load(str(paths["flair"])).dataobj), subj2.flair)
    pair, aff = msxai.io.load_pair(paths["flair"], paths["t1"])
    assert pair.shape == (2, *subj2.flair.shape)
    meta = json.loads(paths["meta"].read_text())
    assert meta["seed"] == 3 and meta["skull"] is False


def test_make_splits_disjoint_covering_deterministic():
    for n in range(1, 41):
        ids = [f"s{i:03d}" for i in range(n)]
        sp = make_splits(ids, seed=n)
        assert sp == make_splits(ids, seed=n)
        allm = sp["train"] + sp["val"] + sp["test"]
        assert sorted(allm) == ids and len(set(allm)) == n
        if n >= 3:
            assert sp["val"] and sp["test"] and sp["train"]
        if n >= 20:
            assert abs(len(sp["train"]) / n - 0.7) < 0.1
    assert make_splits(["a"], 0) == {"train": [], "val": [], "test": ["a"]}
    with pytest.raises(InputError):
        make_splits(["a", "b"], 0, (0.5, -0.1, 0.6))


def test_generate_cohort_dataset_json_and_workers(tmp_path):
    cfg = SynthConfig(voxel_size=2.0)
    p1 = generate_cohort(tmp_path / "a", 3, seed=5, config=cfg, progress=False)
    p2 = generate_cohort(tmp_path / "b", 3, seed=5, config=cfg, workers=2, progress=False)
    d1 = json.loads(p1.read_text())
    d2 = json.loads(p2.read_text())
    assert d1 == d2
    assert d1["seed"] == 5 and d1["name"]
    ids = [s["id"] for s in d1["subjects"]]
    assert ids == ["synth000", "synth001", "synth002"]
    for s in d1["subjects"]:
        assert s["flair"] == f"{s['id']}_FLAIR.nii.gz" and s["t1"] == f"{s['id']}_T1.nii.gz"
        assert s["label"] == f"{s['id']}_lesions.nii.gz" and s["brain_mask"] == f"{s['id']}_brainmask.nii.gz"
        # the parallel run wrote the very same images
        a = np.asarray(nib.load(str(tmp_path / "a" / s["flair"])).dataobj)
        b = np.asarray(nib.load(str(tmp_path / "b" / s["flair"])).dataobj)
        np.testing.assert_array_equal(a, b)
    sp = d1["splits"]
    allm = sp["train"] + sp["val"] + sp["test"]
    assert sorted(allm) == ids and len(set(allm)) == len(ids)
    # load_dataset resolves absolute paths
    ds = load_dataset(p1)
    for s in ds["subjects"]:
        for key in ("flair", "t1", "label", "brain_mask"):
            assert Path(s[key]).is_absolute() and Path(s[key]).exists()
    assert load_dataset(tmp_path / "a")["subjects"][0]["flair"] == ds["subjects"][0]["flair"]
    (tmp_path / "a" / "synth001_T1.nii.gz").unlink()
    with pytest.raises(InputError, match="synth001"):
        load_dataset(p1)
    with pytest.raises(InputError, match="not found"):
        load_dataset(tmp_path / "nowhere" / "dataset.json")


def test_cli_single_subject_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["synth", "--out", str(out), "--n", "1", "--seed", "7", "--voxel-size", "2", "--no-progress"])
    assert rc == 0
    d = json.loads((out / "dataset.json").read_text())
    assert [s["id"] for s in d["subjects"]] == ["synth000"]
    assert d["splits"] == {"train": [], "val": [], "test": ["synth000"]}
    ref = generate_subject(subject_seed(7, 0), config=SynthConfig(voxel_size=2.0))
    got = np.asarray(nib.load(str(out / "synth000_FLAIR.nii.gz")).dataobj)
    np.testing.assert_array_equal(got, ref.flair)
    assert str(out / "dataset.json") in capsys.readouterr().out


def test_cli_bad_input_names_the_problem(tmp_path, capsys):
    rc = main(["synth", "--out", str(tmp_path / "x"), "--n", "0", "--no-progress"])
    assert rc == 2
    assert "--n must be at least 1" in capsys.readouterr().err
    rc = main(["synth", "--out", str(tmp_path / "x"), "--n", "1", "--voxel-size", "20", "--no-progress"])
    assert rc == 2
    assert "voxel_size" in capsys.readouterr().err


def test_subject_seeds_are_distinct_and_stable():
    seeds = [subject_seed(0, i) for i in range(100)]
    assert len(set(seeds)) == 100
    assert seeds == [subject_seed(0, i) for i in range(100)]
    assert subject_seed(1, 0) != subject_seed(0, 0)
    with pytest.raises(InputError):
        generate_subject(-1)


def test_resample_linear_matches_map_coordinates_twin():
    rng = np.random.default_rng(3)
    a = rng.random((7, 9, 5)).astype(np.float32)
    pos = [rng.uniform(-2, 9, 11), rng.uniform(-1, 10, 6), np.linspace(0, 4, 13)]
    grid = np.stack(np.meshgrid(*pos, indexing="ij"))
    ref = ndi.map_coordinates(a.astype(np.float64), grid, order=1, mode="nearest")
    np.testing.assert_allclose(synth.resample_linear(a, pos), ref, atol=1e-5)
    # strided upsampling reproduces a linear function exactly where it is sampled
    shape = (9, 8, 7)
    ii = np.indices(shape).astype(np.float32)
    full = 1 + 2 * ii[0] - ii[1] + 0.5 * ii[2]
    up = synth.upsample_strided(full[::2, ::2, ::2], 2, shape)
    np.testing.assert_allclose(up[:9, :7, :7], full[:9, :7, :7], atol=1e-5)
    assert up.shape == shape
