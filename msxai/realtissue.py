"""Real tissue in training: the real patient as a background for injected lesions, and its hemisphere halves.

The synthetic cohort (:mod:`msxai.synth`) teaches lesions on a deformed template; a network trained on it alone
meets real cortex, real normal-appearing white matter (NAWM) and real lesion rims only at test time. This module
turns the one real patient (patient26, 16 lesions, ~8 mL) into many training subjects:

1. **Hemisphere halves** (:func:`hemisphere_mask`): the patient is in MNI space, so the mid-sagittal plane is world
   x = 0. ``right`` = voxels whose centre has x > 0, ``left`` = x <= 0 (RAS world). A subject made for one half has
   the other half blanked *in the inputs* (FLAIR, T1 and label set to 0 there, i.e. outside the brain), so training
   on one half never sees the other; patient26 has no lesion crossing the plane (tested).
2. **Tissue and lesion sites** (:func:`tissue_probabilities`): a 3-class split of the T1 inside the brain
   (multi-Otsu; CSF < GM < WM, real lesions excluded) gives hard CSF/GM/WM maps, smoothed by 0.7 mm into
   partial-volume probabilities; :func:`msxai.synth.lesion_site_maps` finds the periventricular, deep and
   juxtacortical white-matter sites and the distance to the ventricles from them, as it does for synthetic subjects.
3. **Injected lesions** (:func:`inject_lesions`): irregular blobs placed by the synthetic generator's own
   placement (:func:`msxai.synth.place_lesions`: unions of perturbed ellipsoids, Dawson's fingers, confluent
   seeds; 5 mm^3 up to several mL) in the NAWM (real lesions and their 2 mm surroundings excluded), plus, for heavy
   loads, confluent periventricular caps of irregular thickness (:func:`periventricular_caps`). A load class is
   drawn per subject (:data:`LOAD_CLASSES`), up to ~30 mL in one hemisphere (~60 mL brain-equivalent).
4. **Intensities from the real lesions** (:class:`LesionIntensityModel`): each real lesion voxel's FLAIR and T1 as
   a ratio to the local NAWM level (NAWM-normalised Gaussian smoothing, 4 mm), binned by relative depth in its
   lesion (border to core, 4 bins) and kept as (FLAIR, T1) pairs sorted by the FLAIR ratio. An injected voxel of
   depth bin b takes the pair at rank ``u`` of bin b, where ``u`` mixes a per-lesion brightness and a smooth
   random field (so a lesion is coherent, and lesions differ as the real ones do); its intensity is the local NAWM
   level times the ratio; borders are blended over a partial-volume halo as in :mod:`msxai.synth`.

:func:`make_realtissue_cohort` writes such subjects as a cohort folder with a ``dataset.json`` like
``msxai synth`` does (``train`` split = every subject), to be mixed with the synthetic cohort in training
(``extra_cohorts`` of ``configs/train.json``). The folder holds patient data: keep it out of the repository
(``data/`` is git-ignored).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from msxai import MIN_LESION_MM3
from msxai.errors import InputError

HEMISPHERES = ("right", "left")
SIDES = HEMISPHERES + ("both",)
DEPTH_BINS = 4
BACKGROUND_SIGMA_MM = 4.0
EXCLUSION_MM = 2.0  # injected lesions keep this distance from the real ones
# load classes: (probability, lesion count range, median volume mm^3, confluent fraction, caps probability,
# cap thickness range mm); volumes are log-normal as in msxai.synth (sigma 1.35), counts are per hemisphere
LOAD_CLASSES = {
    "real_only": (0.12, (0, 0), 0.0, 0.0, 0.0, (0.0, 0.0)),
    "light": (0.28, (2, 12), 40.0, 0.15, 0.0, (0.0, 0.0)),
    "moderate": (0.30, (10, 30), 80.0, 0.3, 0.35, (2.0, 5.0)),
    "heavy": (0.30, (25, 50), 150.0, 0.45, 1.0, (3.0, 9.0)),
}
# most injected volume per hemisphere (mL): caps are trimmed to their part nearest the ventricles to stay below
MAX_INJECTED_ML = {"real_only": 0.0, "light": 3.0, "moderate": 10.0, "heavy": 30.0}


# ----------------------------------------------------------------------------------------------- halves
def hemisphere_mask(shape, affine, side: str, midline_mm: float = 0.0) -> np.ndarray:
    """Bool ``shape`` mask of the voxels of one hemisphere of an MNI-space grid: ``right`` = voxel centres with
    world x > ``midline_mm``, ``left`` = x <= ``midline_mm``, ``both`` = every voxel."""
    if side not in SIDES:
        raise InputError(f"hemisphere must be one of {', '.join(SIDES)}, got {side!r}")
    shape = tuple(int(s) for s in shape)
    if side == "both":
        return np.ones(shape, dtype=bool)
    a = np.asarray(affine, dtype=np.float64)
    ax = [np.arange(n, dtype=np.float64).reshape([-1 if k == d else 1 for k in range(3)]) for d, n in enumerate(shape)]
    x = a[0, 0] * ax[0] + a[0, 1] * ax[1] + a[0, 2] * ax[2] + a[0, 3]
    m = x > midline_mm if side == "right" else x <= midline_mm
    return np.broadcast_to(m, shape).copy()


def other_side(side: str) -> str:
    if side not in HEMISPHERES:
        raise InputError(f"hemisphere must be one of {', '.join(HEMISPHERES)}, got {side!r}")
    return HEMISPHERES[1 - HEMISPHERES.index(side)]


# ----------------------------------------------------------------------------------------------- tissue
def tissue_probabilities(t1: np.ndarray, brain: np.ndarray, lesions: np.ndarray, smooth_mm: float = 0.7,
                         spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """``[3, X, Y, Z]`` float32 CSF/GM/WM probabilities from a 3-class multi-Otsu split of the T1 in the brain
    (lesion voxels left out of the thresholds and counted as WM), Gaussian-smoothed by ``smooth_mm``."""
    from skimage.filters import threshold_multiotsu

    brain = np.asarray(brain, bool)
    les = np.asarray(lesions) > 0
    vals = np.asarray(t1)[brain & ~les]
    if vals.size < 100:
        raise InputError("tissue_probabilities: fewer than 100 brain voxels outside the lesions")
    lo, hi = threshold_multiotsu(vals, classes=3)
    cls = np.digitize(t1, [lo, hi])  # 0 CSF, 1 GM, 2 WM
    cls[les] = 2
    sig = [smooth_mm / s for s in spacing]
    p = np.stack([ndi.gaussian_filter(((cls == k) & brain).astype(np.float32), sig) for k in range(3)])
    return (p * brain).astype(np.float32)


def nawm_background(image: np.ndarray, nawm: np.ndarray, sigma_mm: float = BACKGROUND_SIGMA_MM,
                    spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Local NAWM intensity level: ``G * (image nawm) / G * nawm`` (normalised convolution), float32; where no NAWM
    is near, the NAWM median."""
    sig = [sigma_mm / s for s in spacing]
    w = ndi.gaussian_filter(nawm.astype(np.float32), sig)
    num = ndi.gaussian_filter(np.where(nawm, image, 0).astype(np.float32), sig)
    med = float(np.median(np.asarray(image)[nawm]))
    return np.where(w > 1e-3, num / np.maximum(w, 1e-6), med).astype(np.float32)


def relative_depth(instances: np.ndarray) -> np.ndarray:
    """Per lesion voxel, ``(d - 1) / (d_max - 1)`` with ``d`` its Euclidean distance (voxels) to the nearest
    non-lesion voxel and ``d_max`` the largest ``d`` of its lesion: 0 on the border, 1 at the deepest voxel; 0 for
    a lesion that is all border, and outside lesions."""
    inst = np.asarray(instances)
    d = ndi.distance_transform_edt(inst > 0).astype(np.float32)
    n = int(inst.max())
    if n == 0:
        return np.zeros(inst.shape, np.float32)
    peak = np.asarray(ndi.maximum(d, inst, index=np.arange(1, n + 1)), dtype=np.float32)
    span = np.concatenate([[1.0], peak - 1.0])
    rel = np.where(span[inst] > 1e-6, (d - 1.0) / np.maximum(span[inst], 1e-6), 0.0)
    return np.where(inst > 0, np.clip(rel, 0.0, 1.0), 0.0).astype(np.float32)


def depth_bin(depth: np.ndarray, n_bins: int = DEPTH_BINS) -> np.ndarray:
    return np.minimum((np.asarray(depth) * n_bins).astype(np.int64), n_bins - 1)


@dataclass
class LesionIntensityModel:
    """(FLAIR, T1) ratios to the local NAWM level of the real lesion voxels, per relative-depth bin, each bin's
    pairs sorted by the FLAIR ratio (see the module notes)."""

    bins: list[np.ndarray]  # per depth bin: float32 [n, 2] (FLAIR ratio, T1 ratio), sorted by column 0

    @classmethod
    def fit(cls, flair, t1, truth_instances, bg_flair, bg_t1, n_bins: int = DEPTH_BINS) -> "LesionIntensityModel":
        inst = np.asarray(truth_instances)
        if not (inst > 0).any():
            raise InputError("lesion intensity model: the truth holds no lesion")
        b = depth_bin(relative_depth(inst), n_bins)
        sel = inst > 0
        pairs = np.stack([np.asarray(flair)[sel] / bg_flair[sel], np.asarray(t1)[sel] / bg_t1[sel]], 1)
        bins = []
        for k in range(n_bins):
            p = pairs[b[sel] == k]
            if len(p) == 0:  # a depth no lesion reaches (small lesions only): the deepest filled bin below
                filled = [j for j in range(k) if np.any(b[sel] == j)]
                p = pairs[b[sel] == filled[-1]] if filled else pairs
            bins.append(p[np.argsort(p[:, 0], kind="stable")].astype(np.float32))
        return cls(bins)

    def ratios(self, depth_bins: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """FLAIR and T1 ratios for voxels of the given depth bins at ranks ``u`` in [0, 1]."""
        fr = np.empty(depth_bins.shape, np.float32)
        tr = np.empty(depth_bins.shape, np.float32)
        for k, p in enumerate(self.bins):
            m = depth_bins == k
            if m.any():
                idx = np.clip(np.round(np.asarray(u)[m] * (len(p) - 1)).astype(np.int64), 0, len(p) - 1)
                fr[m], tr[m] = p[idx, 0], p[idx, 1]
        return fr, tr

    def per_lesion_means(self) -> tuple[float, float]:
        allp = np.concatenate(self.bins)
        return float(np.median(allp[:, 0])), float(np.median(allp[:, 1]))


# ----------------------------------------------------------------------------------------------- lesion shapes
def periventricular_caps(rng: np.random.Generator, dist_vent: np.ndarray, allowed: np.ndarray,
                         thickness_mm=(3.0, 9.0), coverage: float = 0.5, spacing: float = 1.0
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Confluent periventricular lesion caps: ``allowed`` voxels within a smoothly varying thickness (in
    ``thickness_mm``) of the ventricles, over a random ``coverage`` fraction of the ventricle surroundings (smooth
    random sectors), with an irregular (noise-perturbed) outer border. Returns the bool mask and each voxel's
    relative depth in its cap (distance to the ventricles / local thickness; <= 1 inside), used to trim a cap to
    its inner part."""
    from msxai.synth import smooth_noise

    shape = dist_vent.shape
    lo, hi = thickness_mm
    t = lo + (hi - lo) * _uniform_field(smooth_noise(rng, shape, 8.0 / spacing))
    t = t + 1.2 * smooth_noise(rng, shape, 1.5 / spacing, coarse=1)  # irregular outer border
    near = dist_vent <= hi + 3
    sector = smooth_noise(rng, shape, 15.0 / spacing)
    if near.any():
        cut = np.quantile(sector[near], 1.0 - float(np.clip(coverage, 0.0, 1.0)))
    else:
        cut = np.inf
    rel = dist_vent / np.maximum(t, 1e-3)
    return (rel <= 1.0) & (sector >= cut) & np.asarray(allowed, bool), rel.astype(np.float32)


def _uniform_field(g: np.ndarray) -> np.ndarray:
    """A standard-normal field mapped to [0, 1] by the normal CDF."""
    from scipy.special import ndtr

    return ndtr(g).astype(np.float32)


def draw_load(rng: np.random.Generator, load_class: str | None = None) -> dict:
    """A load specification: class name, lesion count, median volume, confluent fraction, caps (thickness,
    coverage or None)."""
    names = list(LOAD_CLASSES)
    if load_class is None:
        probs = np.array([LOAD_CLASSES[n][0] for n in names])
        load_class = names[int(rng.choice(len(names), p=probs / probs.sum()))]
    if load_class not in LOAD_CLASSES:
        raise InputError(f"unknown load class {load_class!r}: choose one of {', '.join(names)}")
    _, (n_lo, n_hi), median, confluent, caps_p, (t_lo, t_hi) = LOAD_CLASSES[load_class]
    caps = None
    if rng.random() < caps_p:
        caps = {"thickness_mm": (float(t_lo), float(rng.uniform(t_lo + 1, t_hi))), "coverage": float(rng.uniform(0.3, 0.8))}
    return {"class": load_class, "n_lesions": int(rng.integers(n_lo, n_hi + 1)), "median_mm3": float(median),
            "confluent_fraction": float(confluent), "caps": caps}


# ----------------------------------------------------------------------------------------------- background
@dataclass
class RealBackground:
    """The real patient prepared for injection (one hemisphere, or both)."""

    flair: np.ndarray  # float32, other half blanked
    t1: np.ndarray
    truth: np.ndarray  # bool, other half blanked
    brain: np.ndarray  # bool
    affine: np.ndarray
    side: str
    p: np.ndarray  # [3, ...] CSF/GM/WM probabilities
    sites: dict  # msxai.synth.lesion_site_maps output
    allowed: np.ndarray  # NAWM where lesions may be injected
    bg_flair: np.ndarray
    bg_t1: np.ndarray
    model: LesionIntensityModel

    @classmethod
    def build(cls, flair, t1, truth, affine, side: str = "both") -> "RealBackground":
        from msxai.io import voxel_spacing
        from msxai.lesions import instances_from_mask
        from msxai.synth import lesion_site_maps

        flair = np.asarray(flair, np.float32)
        t1 = np.asarray(t1, np.float32)
        truth = np.asarray(truth) > 0
        if not (flair.shape == t1.shape == truth.shape):
            raise InputError(f"real background: FLAIR {flair.shape}, T1 {t1.shape} and truth {truth.shape} differ")
        spacing = voxel_spacing(affine)
        if not np.allclose(spacing, spacing[0], rtol=1e-3):
            raise InputError(f"real background: isotropic voxels required, got {spacing}")
        v = float(spacing[0])
        # everything below is computed from the chosen half alone (the other half is blanked first), so nothing
        # of a held-out half reaches training: tissue thresholds, NAWM levels, the lesion intensity model
        half = hemisphere_mask(flair.shape, affine, side)
        outline = (flair != 0) | (t1 != 0)  # the whole brain's outline (no intensity) to tell ventricles from surface
        flair = np.where(half, flair, 0).astype(np.float32)
        t1 = np.where(half, t1, 0).astype(np.float32)
        truth = truth & half
        brain = (flair != 0) | (t1 != 0)
        p = tissue_probabilities(t1, brain, truth, spacing=spacing)
        near_les = ndi.distance_transform_edt(~truth, sampling=spacing) <= EXCLUSION_MM
        nawm = (p[2] > 0.5) & brain & ~near_les
        bg_f = nawm_background(flair, nawm, spacing=spacing)
        bg_t = nawm_background(t1, nawm, spacing=spacing)
        inst = instances_from_mask(truth, affine=affine, min_volume_mm3=MIN_LESION_MM3)
        model = LesionIntensityModel.fit(flair, t1, inst, bg_f, bg_t)
        # lesions may go into white matter away from the real lesions, never into the blanked half
        p_inj = p.copy()
        p_inj[2][near_les] = 0.0
        sites = lesion_site_maps(p_inj, outline, v)
        sites["centres"] = {k: c[brain[tuple(c.T)]] for k, c in sites["centres"].items()}
        allowed = ((p_inj[2] > 0.4) | ((p_inj[2] > 0.15) & (sites["dist_vent"] <= 3.0) & (p_inj[0] < 0.75))) & brain
        return cls(flair=flair, t1=t1, truth=truth, brain=brain, affine=np.asarray(affine, np.float64), side=side, p=p_inj,
                   sites=sites, allowed=allowed, bg_flair=bg_f, bg_t1=bg_t, model=model)


def inject_lesions(rng: np.random.Generator, bg: RealBackground, load: dict | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """One training subject: ``(flair, t1, label uint8, info)`` = the background with the lesions of ``load``
    (default: :func:`draw_load`) injected; label = real lesions | injected lesions (before the 5 mm^3 rule, which
    the training label reading does not apply)."""
    from msxai.io import voxel_spacing
    from msxai.synth import SynthConfig, place_lesions, smooth_noise

    load = draw_load(rng) if load is None else load
    v = float(voxel_spacing(bg.affine)[0])
    shape = bg.flair.shape
    inj = np.zeros(shape, bool)
    blobs = []
    if load["n_lesions"] > 0:
        cfg = SynthConfig(voxel_size=v, n_lesions=int(load["n_lesions"]),
                          lesion_volume_median_mm3=float(load["median_mm3"]),
                          confluent_fraction=float(load["confluent_fraction"]))
        inj, blobs = place_lesions(rng, cfg, bg.p, bg.brain, bg.sites)
    inj &= bg.allowed
    budget = MAX_INJECTED_ML.get(load["class"], np.inf) * 1000.0 / v**3 * (2 if bg.side == "both" else 1)
    if load.get("caps"):
        c = load["caps"]
        caps, rel = periventricular_caps(rng, bg.sites["dist_vent"], bg.allowed, c["thickness_mm"], c["coverage"], v)
        caps &= ~inj
        room = int(budget - inj.sum())
        if caps.sum() > max(room, 0):  # keep the cap voxels nearest the ventricles within the budget
            keep = np.zeros(caps.shape, bool)
            if room > 0:
                order = np.argsort(rel[caps], kind="stable")[:room]
                idx = np.flatnonzero(caps)[order]
                keep.flat[idx] = True
            caps = keep
        inj |= caps
    flair, t1 = bg.flair.copy(), bg.t1.copy()
    if inj.any():
        lab, n = ndi.label(inj, ndi.generate_binary_structure(3, 2))
        depth_b = depth_bin(relative_depth(lab))
        # rank field: per-lesion brightness (half the range) + a smooth random field inside the lesion
        per_lesion = rng.random(n + 1).astype(np.float32)
        sel = np.nonzero(inj)
        box = tuple(slice(int(s.min()), int(s.max()) + 1) for s in sel)
        field_ = _uniform_field(smooth_noise(rng, tuple(b.stop - b.start for b in box), 1.5 / v, coarse=1))
        u = np.zeros(shape, np.float32)
        u[box] = field_
        u = 0.5 * per_lesion[lab] + 0.5 * u
        fr, tr = bg.model.ratios(depth_b[sel], u[sel])
        ratio_f = np.ones(shape, np.float32)
        ratio_t = np.ones(shape, np.float32)
        ratio_f[sel], ratio_t[sel] = fr, tr
        # partial-volume halo: outside the lesions the ratio of the nearest lesion voxel, weight falls off
        _, idx = ndi.distance_transform_edt(~inj, return_indices=True)
        ratio_f = ratio_f[tuple(idx)]
        ratio_t = ratio_t[tuple(idx)]
        edge = float(rng.uniform(0.4, 0.9)) / v
        soft = np.clip(np.maximum(ndi.gaussian_filter(inj.astype(np.float32), edge) * 1.3, 0.9 * inj), 0, 1)
        soft *= bg.brain & ~bg.truth
        flair = flair * (1 - soft) + soft * bg.bg_flair * ratio_f
        t1 = t1 * (1 - soft) + soft * bg.bg_t1 * ratio_t
        flair = np.where(bg.brain, flair, 0).astype(np.float32)
        t1 = np.where(bg.brain, t1, 0).astype(np.float32)
    label = (bg.truth | inj).astype(np.uint8)
    vox = v**3
    info = {"load_class": load["class"], "n_blobs": len(blobs), "caps": load.get("caps"),
            "injected_ml": round(float(inj.sum()) * vox / 1000, 2),
            "real_ml": round(float(bg.truth.sum()) * vox / 1000, 2),
            "total_ml": round(float(label.sum()) * vox / 1000, 2)}
    return flair, t1, label, info


# ----------------------------------------------------------------------------------------------- cohort
def load_real_patient() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(flair, t1, truth, affine)`` of the real patient (InputError when it is absent)."""
    from msxai.data import REAL_PATIENT_MISSING_REASON, real_patient_paths
    from msxai.io import load_volume

    paths = real_patient_paths()
    if paths is None:
        raise InputError(REAL_PATIENT_MISSING_REASON)
    fl = load_volume(paths["flair"], "FLAIR")
    t1 = load_volume(paths["t1"], "T1")
    gt = load_volume(paths["truth"], "truth")
    return fl.array, t1.array, gt.array, fl.affine


def make_realtissue_cohort(out_dir, n: int, side: str, seed: int = 0, source=None, progress: bool = True) -> Path:
    """Write ``n`` real-tissue subjects of one hemisphere (``right``/``left``) or of the whole brain (``both``)
    into ``out_dir`` (``rt<side><k>_{FLAIR,T1,lesions,brainmask}.nii.gz`` + ``dataset.json``, all in the
    ``train`` split). Subject 0 is the real half alone (no injection); the others draw a load class each.
    ``source``: ``(flair, t1, truth, affine)`` (default: the real patient). Returns the dataset.json path."""
    from msxai.io import save_volume

    if int(n) < 1:
        raise InputError(f"n must be at least 1, got {n}")
    flair, t1, truth, affine = load_real_patient() if source is None else source
    bg = RealBackground.build(flair, t1, truth, affine, side)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    subjects = []
    for k in range(int(n)):
        rng = np.random.default_rng([int(seed), k])
        load = draw_load(rng, "real_only" if k == 0 else None)
        f, t, lab, info = inject_lesions(rng, bg, load)
        sid = f"rt{side}{k:03d}"
        files = {"flair": f"{sid}_FLAIR.nii.gz", "t1": f"{sid}_T1.nii.gz", "label": f"{sid}_lesions.nii.gz",
                 "brain_mask": f"{sid}_brainmask.nii.gz"}
        save_volume(out / files["flair"], f, affine)
        save_volume(out / files["t1"], t, affine)
        save_volume(out / files["label"], lab, affine, dtype=np.uint8)
        save_volume(out / files["brain_mask"], bg.brain.astype(np.uint8), affine, dtype=np.uint8)
        subjects.append({"id": sid, **files, **info})
        if progress:
            print(f"{sid}: {info}", flush=True)
    ids = [s["id"] for s in subjects]
    dataset = {"name": f"msxai-realtissue-{side}", "seed": int(seed), "side": side, "subjects": subjects,
               "splits": {"train": ids, "val": [], "test": []},
               "note": "derived from the real patient (patient26): never commit this folder"}
    path = out / "dataset.json"
    path.write_text(json.dumps(dataset, indent=1))
    return path


# ----------------------------------------------------------------------------------------------- held-out halves
def evaluate_half(pred, truth, affine, side: str, threshold: float = 0.3, n_boot: int = 2000, seed: int = 0,
                  min_volume_mm3: float = MIN_LESION_MM3) -> dict:
    """Score a prediction made on the *whole* image on one hemisphere only (:func:`msxai.metrics.evaluate_region`
    with :func:`hemisphere_mask`): lesions by centroid, voxels inside the half, Dice/nDSC against the truth as
    given, lesion-wise with the 5 mm^3 rule, unit-bootstrap 95 % CIs."""
    from msxai.metrics import evaluate_region

    region = hemisphere_mask(np.shape(truth), affine, side)
    out = evaluate_region(pred, truth, region, affine, threshold, min_volume_mm3, n_boot=n_boot, seed=seed)
    out["half"] = side
    return out


BASELINE_EROSION_MM = 3.0


def flair_threshold_map(flair: np.ndarray, brain: np.ndarray, z: float, erosion_mm: float = BASELINE_EROSION_MM,
                        spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """The FLAIR-threshold baseline: voxels of the brain eroded by ``erosion_mm`` (away from the cortex rim) whose
    FLAIR z-score (over the whole brain) exceeds ``z``; a bool mask (lesions follow from the usual >= 5 mm^3 rule)."""
    from msxai.preprocess import zscore

    brain = np.asarray(brain, bool)
    zf = zscore(np.asarray(flair, np.float32), brain)
    dist = ndi.distance_transform_edt(brain, sampling=spacing)
    return (zf > float(z)) & (dist > float(erosion_mm))


def choose_flair_z(flair, brain, truth, affine, side: str, zs=None) -> tuple[float, list[dict]]:
    """The baseline's z chosen on one half (its training half): the z of ``zs`` (default 1.0-4.0 by 0.1) that
    maximises nDSC + lesion F1 on that half. Returns ``(z, [{"z", "ndsc", "F1"}, ...])``."""
    from msxai.io import voxel_spacing

    zs = np.round(np.arange(1.0, 4.01, 0.1), 2) if zs is None else zs
    rows = []
    for z in zs:
        m = evaluate_half(flair_threshold_map(flair, brain, z, spacing=voxel_spacing(affine)), truth, affine, side,
                          n_boot=0)
        rows.append({"z": float(z), "ndsc": m["ndsc"], "F1": m["F1"], "n_pred": m["n_pred"]})
    best = max(rows, key=lambda r: (r["ndsc"] + r["F1"], -r["z"]))
    return best["z"], rows
