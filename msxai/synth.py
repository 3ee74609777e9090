"""The synthetic MS cohort: FLAIR + MPRAGE/T1 pairs with instance-labelled white-matter lesions.

Each subject is built from the MNI152 2009a (symmetric, 1 mm) T1 template and its GM/WM probability maps that
ship inside the nilearn wheel (nothing is downloaded):

1. **Anatomy.** A random smooth deformation (global scale, small rotation/translation, an elastic field and an
   optional ventricle enlargement mimicking atrophy) maps the output grid into the template. GM/WM/CSF maps are
   resampled through it (CSF = the remaining intracranial space). The template's blurred cortex is turned into
   gyri and sulci (GM beyond a random cortical thickness from the WM becomes sulcal CSF, plus random thin sulcal
   sheets), and the maps are sharpened with random smooth logit noise so that sulci, cortex and ventricles differ
   between subjects. The brain mask imitates a skull-stripping tool (tissue closed over sulci, grown 0.5-3 mm).
2. **Lesions.** Irregular blobs (a union of randomly oriented ellipsoids whose implicit field is perturbed by
   smooth noise and cut to a sampled volume) placed in white matter at periventricular, deep and juxtacortical
   sites; periventricular lesions point away from the ventricles (Dawson's fingers) and may abut them; some are
   seeded next to an earlier lesion so that confluent lesions occur. Volumes are log-normal (heavy-tailed;
   median ~70-100 mm^3 after merging).
   The label map stores the 18-connected components of the final binary mask that have at least
   ``msxai.MIN_LESION_MM3`` mm^3 (from the voxel size); smaller components are removed from label and images.
3. **Sequences.** FLAIR (CSF suppressed, GM brighter than WM, lesions hyperintense) and MPRAGE (WM bright, GM
   darker, CSF dark, lesions hypo/isointense) from per-subject random tissue contrasts calibrated on the real
   patient (open_ms_data patient26: FLAIR GM/WM 1.11, CSF/WM 0.1-0.55, lesion/WM 1.35; T1 GM/WM 0.71,
   CSF/WM 0.25, lesion/WM 0.81), heterogeneous lesion intensities with partial-volume edges, anatomical
   texture, periventricular FLAIR caps, smooth multiplicative bias fields, optional blur and Rician noise.
4. **Skull** (optional): CSF rim, inner/outer tables, diploe, scalp and neck around the brain. Without it the
   images are brain-extracted like the shared real patient (voxels outside the brain mask are 0).

The output grid is the FSL MNI152 1 mm grid (182 x 218 x 182, affine ``diag(-1, 1, 1)`` with origin
(90, -126, -72)), the grid of the real patient; ``SynthConfig(voxel_size=2)`` gives the same field of view at
2 mm for fast tests.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from msxai import MIN_LESION_MM3
from msxai.errors import InputError
from msxai.io import save_volume, voxel_volume_mm3

# FSL MNI152 1 mm grid (the real patient's grid): world = affine @ voxel.
MNI_SHAPE_1MM = (182, 218, 182)
MNI_AFFINE_1MM = np.array(
    [[-1.0, 0.0, 0.0, 90.0], [0.0, 1.0, 0.0, -126.0], [0.0, 0.0, 1.0, -72.0], [0.0, 0.0, 0.0, 1.0]]
)
BRAIN_CENTER_MM = np.array([0.0, -18.0, 12.0])  # rotation/scale centre of the deformation (MNI mm)
VENTRICLE_CENTER_MM = np.array([0.0, -8.0, 14.0])  # centre of the lateral ventricles (MNI mm)
CONNECTIVITY_18 = ndi.generate_binary_structure(3, 2)
LESION_SITES = ("periventricular", "deep", "juxtacortical")
FILE_KEYS = {"flair": "FLAIR", "t1": "T1", "label": "lesions", "brain_mask": "brainmask"}


@dataclass
class SynthConfig:
    """Ranges of the random subject parameters. Every ``(lo, hi)`` pair is sampled uniformly per subject."""

    voxel_size: float = 1.0  # mm, isotropic; the field of view stays the MNI box
    # anatomy
    scale_range: tuple[float, float] = (0.8, 1.02)  # global size (the real patient's brain is ~0.85 MNI)
    anisotropy: float = 0.04  # per-axis scale jitter
    rotation_deg: float = 4.0
    translation_mm: float = 3.0
    elastic_mm: tuple[float, float] = (1.5, 4.0)  # max elastic displacement
    elastic_sigma_mm: float = 14.0
    ventricle_enlargement: tuple[float, float] = (0.0, 0.4)
    cortical_thickness_mm: tuple[float, float] = (3.6, 5.0)  # GM within this distance of template WM; beyond: sulcal CSF
    thin_sulci: tuple[float, float] = (0.3, 0.9)  # depth of random thin sulcal sheets in the cortex
    mask_margin_mm: tuple[float, float] = (0.5, 3.0)  # CSF kept around the brain by the (simulated) skull stripping
    tissue_sharpening: tuple[float, float] = (1.2, 2.2)  # logit gain; >1 makes sulci/cortex crisper
    tissue_noise: tuple[float, float] = (0.4, 1.0)  # logit noise amplitude (per-subject gyral variation)
    atrophy: tuple[float, float] = (0.0, 0.6)  # logit shift towards CSF (wider sulci)
    # lesions
    n_lesions: int | None = None  # fixed lesion count; None = random
    lesion_count_range: tuple[int, int] = (0, 80)
    lesion_count_mean: float = 22.0
    lesion_volume_median_mm3: float = 70.0
    lesion_volume_sigma: float = 1.35  # of log-volume
    lesion_volume_max_mm3: float = 6000.0
    confluent_fraction: float = 0.25  # fraction of lesions seeded next to an earlier one
    site_weights: tuple[float, float, float] = (0.5, 0.3, 0.2)  # periventricular, deep, juxtacortical
    min_lesion_mm3: float = MIN_LESION_MM3
    # contrasts (relative to white matter = 1)
    flair_gm: tuple[float, float] = (1.08, 1.35)
    flair_gm_heterogeneity: tuple[float, float] = (0.04, 0.15)  # local GM brightness variation (unlabelled)
    flair_csf: tuple[float, float] = (0.04, 0.2)
    flair_lesion: tuple[float, float] = (1.25, 1.9)
    flair_caps: tuple[float, float] = (0.0, 0.3)
    flair_caps_mm: tuple[float, float] = (2.0, 6.0)  # decay length of the caps away from the ventricles
    # normal-appearing WM heterogeneity on FLAIR (unlabelled): diffuse "dirty-appearing" patches and small faint
    # hyperintense foci, so that moderately bright WM is not always a lesion (patient26: WM FLAIR z p95 = 1.1)
    flair_dawm: tuple[float, float] = (0.03, 0.2)
    flair_foci: tuple[float, float] = (0.05, 0.25)
    t1_gm: tuple[float, float] = (0.62, 0.8)
    t1_csf: tuple[float, float] = (0.15, 0.35)
    t1_lesion: tuple[float, float] = (0.55, 0.97)
    black_hole_fraction: float = 0.15  # lesions with a markedly hypointense T1 core
    lesion_heterogeneity: tuple[float, float] = (0.03, 0.1)
    lesion_edge_mm: tuple[float, float] = (0.4, 1.0)  # partial-volume blur of lesion borders
    texture: tuple[float, float] = (0.015, 0.08)
    # acquisition
    bias_strength: tuple[float, float] = (0.02, 0.08)
    blur_sigma_mm: tuple[float, float] = (0.0, 0.6)
    flair_noise: tuple[float, float] = (0.035, 0.08)  # Rician sigma / WM
    t1_noise: tuple[float, float] = (0.015, 0.04)
    flair_wm_level: tuple[float, float] = (60.0, 600.0)  # arbitrary units
    t1_wm_level: tuple[float, float] = (200.0, 1200.0)

    def grid(self) -> tuple[tuple[int, int, int], np.ndarray]:
        """Shape and affine of the output grid (the MNI box at ``voxel_size``)."""
        v = float(self.voxel_size)
        if not (0.5 <= v <= 4.0):
            raise InputError(f"voxel_size must be between 0.5 and 4 mm, got {v}")
        shape = tuple(int(round(s / v)) for s in MNI_SHAPE_1MM)
        affine = MNI_AFFINE_1MM.copy()
        affine[:3, :3] *= v
        # keep the centre of the first voxel's corner where the 1 mm grid has it
        affine[:3, 3] = MNI_AFFINE_1MM[:3, 3] + (np.diag(affine[:3, :3]) - np.diag(MNI_AFFINE_1MM[:3, :3])) / 2
        return shape, affine


@dataclass
class SynthSubject:
    """One synthetic subject on the output grid (arrays in NIfTI voxel order [X, Y, Z])."""

    flair: np.ndarray  # float32
    t1: np.ndarray  # float32
    lesions: np.ndarray  # int32 instance ids, 0 = background (18-connected components >= min volume)
    brain_mask: np.ndarray  # uint8
    affine: np.ndarray  # 4x4
    tissues: np.ndarray | None = None  # float32 [3, X, Y, Z] probabilities of CSF, GM, WM (not written)
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- template


def _nilearn_data_dir() -> Path:
    """nilearn's bundled data folder, found without importing nilearn (its import takes seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed; it ships the MNI152 2009a templates msxai.synth needs")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


@lru_cache(maxsize=1)
def mni_template() -> dict:
    """MNI152 2009a T1 (scaled to [0, 1]), GM, WM and CSF probabilities and intracranial mask, from nilearn.

    The T1 template is brain-extracted: its non-zero voxels are the intracranial space; CSF is what GM and WM
    leave of it. Returned arrays are float32 on the template grid, with ``affine``.
    """
    d = _nilearn_data_dir()
    out = {}
    for key in ("t1", "gm", "wm"):
        path = d / f"mni_icbm152_{key}_tal_nlin_sym_09a_converted.nii.gz"
        if not path.exists():
            raise FileNotFoundError(f"nilearn's MNI152 2009a {key} template is missing: {path}")
        img = nib.load(str(path))
        out[key] = np.asarray(img.dataobj, dtype=np.float32) / 255.0
        out["affine"] = np.asarray(img.affine, dtype=np.float64)
    icv = (out["t1"] > 0).astype(np.float32)
    # smooth the intracranial edge a little so that the mask resamples to a smooth boundary
    icv = np.clip(ndi.gaussian_filter(icv, 0.6) * 1.2, 0, 1)
    out["icv"] = icv.astype(np.float32)
    out["csf"] = np.clip(icv - out["gm"] - out["wm"], 0, 1).astype(np.float32)
    nz = np.argwhere(out["t1"] > 0)
    out["bbox"] = (nz.min(0), nz.max(0))
    return out


# ----------------------------------------------------------------------------------------------- random fields


def _u(rng: np.random.Generator, lohi) -> float:
    lo, hi = lohi
    return float(rng.uniform(lo, hi))


def resample_linear(a: np.ndarray, positions) -> np.ndarray:
    """Separable (tri)linear interpolation of ``a`` at the outer product of per-axis source ``positions``.

    ``out[i, j, k] = a(positions[0][i], positions[1][j], positions[2][k])`` with positions clamped to the array
    (edge values repeat), i.e. ``scipy.ndimage.map_coordinates(a, grid, order=1, mode="nearest")`` on the grid,
    done axis by axis in float32 (a fraction of the cost).
    """
    out = np.asarray(a, dtype=np.float32)
    for axis, pos in enumerate(positions):
        n = out.shape[axis]
        pos = np.clip(np.asarray(pos, dtype=np.float64), 0, n - 1)
        if n == 1:
            out = np.take(out, np.zeros(pos.shape, np.intp), axis=axis)
            continue
        i0 = np.minimum(np.floor(pos).astype(np.intp), n - 2)
        shp = [1] * out.ndim
        shp[axis] = -1
        w = (pos - i0).astype(np.float32).reshape(shp)
        a0 = np.take(out, i0, axis=axis)
        out = a0 + (np.take(out, i0 + 1, axis=axis) - a0) * w
    return out


def smooth_noise(rng: np.random.Generator, shape, sigma_vox: float, coarse: int | None = None) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ``sigma_vox`` voxels.

    Large correlation lengths are generated on a grid coarsened by ``coarse`` and upsampled (trilinear).
    """
    shape = tuple(int(s) for s in shape)
    if coarse is None:
        coarse = max(1, int(sigma_vox // 3))
    cshape = shape if coarse <= 1 else tuple(max(2, -(-s // coarse) + 1) for s in shape)
    f = rng.standard_normal(cshape, dtype=np.float32)
    f = ndi.gaussian_filter(f, sigma_vox / coarse, mode="wrap")
    if coarse > 1:  # corners aligned: output i reads the coarse grid at i * (c - 1) / (s - 1)
        f = resample_linear(f, [np.arange(s) * ((c - 1) / max(1, s - 1)) for s, c in zip(shape, cshape)])
    f -= f.mean()
    sd = f.std()
    return (f / sd if sd > 0 else f).astype(np.float32)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


# ----------------------------------------------------------------------------------------------- anatomy


@dataclass
class Deformation:
    """The per-subject map from output voxels to template voxels.

    template world = c + R diag(1/s) (w - c - t) + u(w), then a pull towards the ventricle centre
    (ventricle enlargement), where ``w`` is the output world position, ``c`` the brain centre and ``u`` an elastic
    displacement given by its values on a lattice of every ``step``-th output voxel (trilinear in between).
    """

    linear: np.ndarray  # 3x3
    shift: np.ndarray  # 3
    disp: np.ndarray  # [3, *lattice] mm
    step: int
    ventricle_enlargement: float
    affine: np.ndarray  # output voxel -> world
    template_affine: np.ndarray  # template voxel -> world

    def template_voxels(self, ijk: np.ndarray) -> np.ndarray:
        """Exact template voxel coordinates ``[3, N]`` of output voxel coordinates ``ijk`` ``[3, N]``."""
        ijk = np.asarray(ijk, dtype=float)
        w = self.affine[:3, :3] @ ijk + self.affine[:3, 3:4]
        tw = self.linear @ (w - BRAIN_CENTER_MM[:, None] - self.shift[:, None]) + BRAIN_CENTER_MM[:, None]
        lat = ijk / self.step
        tw = tw + np.stack([ndi.map_coordinates(self.disp[k], lat, order=1, mode="nearest") for k in range(3)])
        d = tw - VENTRICLE_CENTER_MM[:, None]
        g = np.exp(-0.5 * ((d[0] / 14.0) ** 2 + (d[1] / 30.0) ** 2 + (d[2] / 16.0) ** 2))
        tw = tw - self.ventricle_enlargement * d * g
        tinv = np.linalg.inv(self.template_affine)
        return tinv[:3, :3] @ tw + tinv[:3, 3:4]

    def lattice_voxels(self) -> np.ndarray:
        """Template voxel coordinates ``[3, *lattice]`` at the lattice points (output voxels ``step * n``)."""
        cshape = self.disp.shape[1:]
        ci = np.stack(np.meshgrid(*[np.arange(c) * self.step for c in cshape], indexing="ij")).reshape(3, -1)
        return self.template_voxels(ci).reshape(3, *cshape)

    def crop_voxels(self, crop: tuple[slice, ...], lattice: np.ndarray | None = None) -> np.ndarray:
        """Fast path: template voxel coordinates ``[3, *crop]`` by trilinear upsampling of the lattice values.

        Matches ``template_voxels`` up to the (tiny) curvature of the ventricle pull within one lattice cell.
        """
        tv = self.lattice_voxels() if lattice is None else lattice
        pos = [np.arange(c.start, c.stop) / self.step for c in crop]
        return np.stack([resample_linear(tv[k], pos) for k in range(3)])


def _deformation(rng, cfg: SynthConfig, shape, affine, tpl, pad_mm: float = 30.0
                 ) -> tuple[Deformation, tuple[slice, ...], np.ndarray, dict]:
    """A random deformation, the crop around the deformed brain (grown by ``pad_mm``) and its template voxel
    coordinates ``[3, *crop]``."""
    v = float(cfg.voxel_size)
    scale = _u(rng, cfg.scale_range)
    scales = scale * (1 + rng.uniform(-cfg.anisotropy, cfg.anisotropy, 3))
    rot = _rotation(rng, cfg.rotation_deg)
    shift = rng.uniform(-cfg.translation_mm, cfg.translation_mm, 3)
    elastic = _u(rng, cfg.elastic_mm)
    vent = _u(rng, cfg.ventricle_enlargement)
    step = max(1, int(round(4 / v)))
    cshape = tuple(-(-s // step) + 1 for s in shape)
    sig_c = cfg.elastic_sigma_mm / (step * v)
    disp = np.stack([smooth_noise(rng, cshape, sig_c, coarse=1) for _ in range(3)])
    disp *= elastic / max(1e-6, float(np.abs(disp).max()))
    deform = Deformation(rot @ np.diag(1.0 / scales), shift, disp.astype(np.float64), step, vent,
                         np.asarray(affine, float), np.asarray(tpl["affine"], float))
    tv = deform.lattice_voxels()
    # crop: the lattice points that land in the template's intracranial space, grown by a lattice cell + pad_mm
    inside = ndi.map_coordinates(tpl["icv"], tv.reshape(3, -1), order=1, mode="constant", cval=0.0) > 0
    idx = np.argwhere(inside.reshape(tv.shape[1:]))
    if idx.size == 0:
        raise RuntimeError("the deformed template left the field of view")
    pad = int(np.ceil(pad_mm / v)) + step
    c0 = np.maximum(idx.min(0) * step - pad, 0)
    c1 = np.minimum(idx.max(0) * step + pad + 1, shape)
    crop = tuple(slice(int(a), int(b)) for a, b in zip(c0, c1))
    coords = deform.crop_voxels(crop, tv)
    meta = {
        "scale": [round(float(s), 4) for s in scales],
        "rotation_deg_max": cfg.rotation_deg,
        "translation_mm": [round(float(s), 3) for s in shift],
        "elastic_mm": round(elastic, 3),
        "ventricle_enlargement": round(vent, 3),
    }
    return deform, crop, coords, meta


def _tissues(rng, cfg: SynthConfig, tpl, coords) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Deformed, sharpened CSF/GM/WM probabilities ``[3, *crop]``, intracranial mask and the template T1 residual."""
    coords = np.asarray(coords, dtype=np.float64)  # converted once, not once per warped map
    warp = lambda a: ndi.map_coordinates(a, coords, order=1, mode="constant", cval=0.0, prefilter=False)  # noqa: E731
    icv = warp(tpl["icv"])
    gm, wm, t1 = warp(tpl["gm"]), warp(tpl["wm"]), warp(tpl["t1"])
    csf = np.clip(icv - gm - wm, 0, 1)
    # the template's own fine contrast (deep nuclei etc.) relative to its tissue model, used for the MPRAGE
    t1 = (t1 / 0.87 - (csf * 0.31 + gm * 0.75 + wm)) * (icv > 0.5)
    v = float(cfg.voxel_size)
    # Sulci. The template is an average, so its cortex is a thick blur with few sulci. Cortical grey matter lies
    # within a (random, smoothly varying) thickness of the white matter; template GM farther out than that is
    # sulcal CSF (the cerebellum, whose folia the template cannot resolve, is left alone).
    thick = _u(rng, cfg.cortical_thickness_mm)
    thickness = thick * (1 + 0.15 * smooth_noise(rng, icv.shape, 8.0 / v))
    d_wm = ndi.distance_transform_edt(wm < 0.5, sampling=v).astype(np.float32)
    tw = np.tensordot(tpl["affine"][:3, :3], coords, axes=1) + tpl["affine"][:3, 3, None, None, None]
    cereb = (
        ((tw[0] / 55.0) ** 2 + ((tw[1] + 62.0) / 34.0) ** 2 + ((tw[2] + 30.0) / 26.0) ** 2) < 1.0
    ) | ((tw[2] < -30.0) & (np.abs(tw[0]) < 14.0))  # cerebellum and brainstem
    del tw
    sulcal = np.clip((d_wm - thickness) / 1.2 + 0.5, 0, 1)
    # thin sulci: the zero sheets of a smooth random field, inside the cortex away from the white matter
    sheets = np.exp(-((smooth_noise(rng, icv.shape, 4.0 / v) / 0.15) ** 2)) * np.clip((d_wm - 1.5) / 1.0, 0, 1)
    sulcal = np.maximum(sulcal, _u(rng, cfg.thin_sulci) * sheets) * ~cereb
    moved = gm * sulcal
    gm = gm - moved
    csf = csf + moved
    del d_wm, thickness, sulcal, moved, sheets
    gain = _u(rng, cfg.tissue_sharpening)
    amp = _u(rng, cfg.tissue_noise)
    atrophy = _u(rng, cfg.atrophy)
    shape = icv.shape
    logits = np.log(np.stack([csf, gm, wm]) + 0.02) * gain
    logits[0] += atrophy
    for k in range(3):
        logits[k] += amp * smooth_noise(rng, shape, 1.5 / v, coarse=1) * 0.6
        logits[k] += amp * smooth_noise(rng, shape, 6.0 / v) * 0.4
    logits -= logits.max(0, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(0, keepdims=True)
    mask = _skull_stripped_mask(icv > 0.5, gm + wm, v, _u(rng, cfg.mask_margin_mm))
    # like a skull-stripping tool's mask, ours has no holes: enclosed cisterns left out above are CSF
    filled = ndi.binary_fill_holes(mask)
    hole = filled & ~mask
    mask = filled
    p *= mask[None]
    p[0][hole], p[1][hole], p[2][hole] = 1.0, 0.0, 0.0
    meta = {"cortical_thickness_mm": round(thick, 3), "tissue_gain": round(gain, 3), "tissue_noise": round(amp, 3), "atrophy": round(atrophy, 3)}
    return p.astype(np.float32), mask, t1.astype(np.float32), meta


def upsample_strided(a: np.ndarray, f: int, shape) -> np.ndarray:
    """Trilinear upsampling of ``a = full[::f, ::f, ::f]`` back to ``shape``: full voxel ``i`` reads ``a`` at ``i / f``.

    Beyond the last strided sample the edge value is repeated.
    """
    return resample_linear(a, [np.arange(s) / f for s in shape])


def _skull_stripped_mask(icv: np.ndarray, tissue: np.ndarray, v: float, margin_mm: float) -> np.ndarray:
    """Brain mask like a skull-stripping tool's: the brain tissue closed over sulci (4 mm), holes (ventricles)
    filled, grown by about ``margin_mm`` into the surrounding CSF and kept inside the intracranial space.

    The closing runs on a ~2 mm strided grid; its upsampled result, united with the full-resolution tissue, is
    smoothed (Gaussian, 1.2 mm) and thresholded at the level a blurred flat edge has ``margin_mm`` outside.
    """
    from math import erfc, sqrt

    f = max(1, int(round(2.0 / v)))
    t = tissue[::f, ::f, ::f] > 0.5
    vs = v * f
    radius = 4.0
    grown = ndi.distance_transform_edt(~t, sampling=vs) <= radius
    closed = ndi.distance_transform_edt(np.pad(grown, 1), sampling=vs)[1:-1, 1:-1, 1:-1] > radius
    closed = ndi.binary_fill_holes(closed | t)
    fine_tissue = tissue > 0.5
    c = np.maximum(upsample_strided(closed, f, icv.shape), fine_tissue)
    sigma = 1.2
    smooth = ndi.gaussian_filter(c, sigma / v)
    level = 0.5 * erfc(margin_mm / (sigma * sqrt(2)))
    return icv & ((smooth > max(level, 1e-3)) | fine_tissue)


# ----------------------------------------------------------------------------------------------- lesions


def _site_maps(p: np.ndarray, mask: np.ndarray, v: float) -> dict:
    """Candidate centres (voxel indices) per lesion site and the distance-to-ventricle field (mm).

    Distances are computed on a grid of about 2 mm (strided) for speed; centres are returned on the full grid.
    """
    f = max(1, int(round(2.0 / v)))
    csf, gm, wm = p[0, ::f, ::f, ::f], p[1, ::f, ::f, ::f], p[2, ::f, ::f, ::f]
    m = mask[::f, ::f, ::f]
    vs = v * f
    ventricles = (csf > 0.5) & (ndi.distance_transform_edt(m, sampling=vs) > 12.0)
    lab, n = ndi.label(ventricles)
    if n:
        sizes = np.bincount(lab.ravel())[1:]
        keep = np.flatnonzero(sizes >= max(2, 0.05 * sizes.max())) + 1
        ventricles = np.isin(lab, keep)
    if ventricles.any():
        dist_vent = ndi.distance_transform_edt(~ventricles, sampling=vs).astype(np.float32)
    else:
        dist_vent = np.full(csf.shape, 99.0, np.float32)
    dist_gm = ndi.distance_transform_edt(gm < 0.5, sampling=vs)
    core = (wm > 0.6) & m
    sites = {
        "periventricular": core & (dist_vent <= 9.0),
        "deep": core & (dist_vent > 9.0) & (dist_gm > 4.0),
        "juxtacortical": (wm > 0.5) & (dist_gm > 0.5) & (dist_gm <= 3.0 + vs / 2),
    }
    dist_vent = upsample_strided(dist_vent, f, mask.shape)
    return {"centres": {k: np.argwhere(s_) * f for k, s_ in sites.items()}, "dist_vent": dist_vent.astype(np.float32)}


def _lesion_count(rng, cfg: SynthConfig) -> int:
    if cfg.n_lesions is not None:
        return int(cfg.n_lesions)
    lo, hi = cfg.lesion_count_range
    n = int(round(rng.gamma(1.3, cfg.lesion_count_mean / 1.3)))
    return int(np.clip(n, lo, hi))


def _blob(rng, radius_vox: float, direction: np.ndarray | None) -> tuple[np.ndarray, int]:
    """Implicit field of an irregular blob in a cube of half-size ``h`` (higher = more inside), centred."""
    h = int(np.ceil(2.2 * radius_vox + 2))
    ax = np.arange(-h, h + 1, dtype=np.float32)
    X = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"))
    n_ell = int(rng.integers(1, 5))
    field_ = np.full(X.shape[1:], -np.inf, dtype=np.float32)
    for k in range(n_ell):
        if direction is not None and k == 0:
            # Dawson's finger: long axis along the direction away from the ventricles
            z = direction / (np.linalg.norm(direction) + 1e-9)
            a = np.cross(z, [1.0, 0, 0] if abs(z[0]) < 0.9 else [0, 1.0, 0])
            a /= np.linalg.norm(a)
            R = np.stack([z, a, np.cross(z, a)], axis=1)
            axes = radius_vox * np.array([rng.uniform(1.4, 2.2), rng.uniform(0.6, 0.9), rng.uniform(0.6, 0.9)])
        else:
            R = _random_rotation(rng)
            axes = radius_vox * rng.uniform(0.55, 1.35, 3)
        off = rng.uniform(-0.6, 0.6, 3) * radius_vox if k else np.zeros(3)
        Y = np.tensordot(R.T, X - off[:, None, None, None].astype(np.float32), axes=1)
        q = np.sqrt(((Y / np.maximum(axes, 0.5)[:, None, None, None]) ** 2).sum(0))
        field_ = np.maximum(field_, 1.0 - q)
    sig = max(0.8, radius_vox / 2.5)
    field_ += rng.uniform(0.25, 0.6) * smooth_noise(rng, field_.shape, sig, coarse=1)
    return field_, h


def _place_lesions(rng, cfg: SynthConfig, p: np.ndarray, mask: np.ndarray, sites: dict) -> tuple[np.ndarray, list[dict]]:
    """Binary lesion mask and the list of generated blobs (site, target/actual volume)."""
    v = float(cfg.voxel_size)
    vox_mm3 = v**3
    shape = mask.shape
    lesion = np.zeros(shape, dtype=bool)
    n = _lesion_count(rng, cfg)
    if n == 0:
        return lesion, []
    wm = p[2]
    # white matter; next to the ventricles also the partial-volume WM of the ventricle wall, so that
    # periventricular lesions can abut the ventricles as they do in MS
    allowed = ((wm > 0.4) | ((wm > 0.15) & (sites["dist_vent"] <= 3.0) & (p[0] < 0.75))) & mask
    w = np.asarray(cfg.site_weights, dtype=float) * rng.dirichlet(np.full(3, 4.0)) * 3
    blobs: list[dict] = []
    centres: list[np.ndarray] = []
    for _ in range(n):
        avail = [k for k, s in enumerate(LESION_SITES) if len(sites["centres"][s])]
        if not avail:
            break
        confluent = bool(centres) and rng.random() < cfg.confluent_fraction
        site_i = int(rng.choice(avail, p=w[avail] / w[avail].sum()))
        site = LESION_SITES[site_i]
        vol = float(np.exp(rng.normal(np.log(cfg.lesion_volume_median_mm3), cfg.lesion_volume_sigma)))
        if site == "periventricular":
            vol *= 2.0
        elif site == "juxtacortical":
            vol *= 0.7
        vol = float(np.clip(vol, cfg.min_lesion_mm3 * 1.2, cfg.lesion_volume_max_mm3))
        r = (3 * vol / (4 * np.pi)) ** (1 / 3) / v
        if confluent:
            prev = centres[int(rng.integers(len(centres)))]
            c = np.clip(np.round(prev + rng.normal(0, 1, 3) * max(2.0, r)), 0, np.array(shape) - 1).astype(int)
            if not allowed[tuple(c)]:
                cand = sites["centres"][site]
                c = cand[int(rng.integers(len(cand)))]
                confluent = False
        else:
            cand = sites["centres"][site]
            c = cand[int(rng.integers(len(cand)))]
        direction = None
        if site == "periventricular":
            dv = sites["dist_vent"]
            sl = tuple(slice(max(0, ci - 1), ci + 2) for ci in c)
            gr = np.array([np.gradient(dv[sl], axis=a).mean() if dv[sl].shape[a] > 1 else 0.0 for a in range(3)])
            direction = gr if np.linalg.norm(gr) > 1e-6 else None
        fld, h = _blob(rng, r, direction)
        lo = c - h
        hi = c + h + 1
        slo = np.maximum(lo, 0)
        shi = np.minimum(hi, shape)
        fsl = tuple(slice(int(a - b), int(a - b + (d - a))) for a, b, d in zip(slo, lo, shi))
        osl = tuple(slice(int(a), int(b)) for a, b in zip(slo, shi))
        f = np.where(allowed[osl], fld[fsl], -np.inf)
        n_vox = max(1, int(round(vol / vox_mm3)))
        flat = f.ravel()
        ok = np.isfinite(flat) & (flat > -0.35)
        if not ok.any():
            continue
        n_vox = min(n_vox, int(ok.sum()))
        thr = np.partition(flat[ok], -n_vox)[-n_vox]
        blob = f >= thr
        # keep the component holding the blob's peak
        lab, nl = ndi.label(blob, CONNECTIVITY_18)
        if nl > 1:
            peak = np.unravel_index(int(np.argmax(np.where(blob, f, -np.inf))), f.shape)
            blob = lab == lab[peak]
        lesion[osl] |= blob
        centres.append(c)
        blobs.append(
            {"site": site, "target_mm3": round(vol, 1), "mm3": round(float(blob.sum()) * vox_mm3, 1), "confluent": confluent}
        )
    return lesion, blobs


def lesion_instances_18(binary: np.ndarray, voxel_mm3: float, min_mm3: float = MIN_LESION_MM3) -> np.ndarray:
    """18-connected components of ``binary`` with at least ``min_mm3`` mm^3, numbered 1..n (int32), in scan order.

    The project's one lesion-instance rule, :func:`msxai.lesions.lesion_instances`, on isotropic voxels of
    ``voxel_mm3``."""
    from msxai.lesions import lesion_instances

    side = float(voxel_mm3) ** (1.0 / 3.0)
    return lesion_instances(np.asarray(binary, dtype=bool), min_volume_mm3=min_mm3,
                            affine=np.diag([side, side, side, 1.0]))


# ----------------------------------------------------------------------------------------------- intensities


def _rician(rng, img: np.ndarray, sigma: float) -> np.ndarray:
    n1 = rng.standard_normal(img.shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(img.shape, dtype=np.float32) * sigma
    return np.sqrt((img + n1) ** 2 + n2**2)


def _intensities(rng, cfg, p, mask, t1_tpl, labels, dist_vent) -> tuple[np.ndarray, np.ndarray, dict]:
    v = float(cfg.voxel_size)
    csf, gm, wm = p
    shape = mask.shape
    c = {
        "flair_gm": _u(rng, cfg.flair_gm),
        "flair_csf": _u(rng, cfg.flair_csf),
        "t1_gm": _u(rng, cfg.t1_gm),
        "t1_csf": _u(rng, cfg.t1_csf),
        "flair_caps": _u(rng, cfg.flair_caps),
        "flair_caps_mm": _u(rng, cfg.flair_caps_mm),
        "flair_dawm": _u(rng, cfg.flair_dawm),
        "flair_foci": _u(rng, cfg.flair_foci),
        "flair_gm_het": _u(rng, cfg.flair_gm_heterogeneity),
        "texture": _u(rng, cfg.texture),
    }
    # tissue model (WM = 1)
    # cortex: bright on FLAIR with local variation (real cortex has bright spots that are not lesions)
    gm_field = 1 + c["flair_gm_het"] * np.clip(smooth_noise(rng, shape, 2.0 / v, coarse=1), -2.5, 2.5)
    flair = csf * c["flair_csf"] + gm * c["flair_gm"] * gm_field + wm
    # MPRAGE: the tissue model plus the template's own fine contrast (deep nuclei, etc.)
    t1 = csf * c["t1_csf"] + gm * c["t1_gm"] + wm
    t1 = t1 + 0.5 * t1_tpl * (1 - csf)
    # periventricular caps on FLAIR (normal-appearing, thin hyperintense rim around the ventricles)
    if dist_vent is not None:
        flair = flair * (1 + c["flair_caps"] * np.exp(-dist_vent / c["flair_caps_mm"]) * wm)
    # normal-appearing WM heterogeneity (not lesions, not labelled): diffuse patches (~6 mm correlation) and small
    # faint foci (~1.5 mm), positive parts only, inside WM
    dawm = np.clip(smooth_noise(rng, shape, 6.0 / v), 0, 2.0)
    foci = np.clip(smooth_noise(rng, shape, 1.5 / v, coarse=1) - 1.5, 0, 1.0)
    flair = flair * (1 + (c["flair_dawm"] * dawm + c["flair_foci"] * foci) * wm)
    # anatomical texture: shared part + sequence-specific part
    shared = smooth_noise(rng, shape, 1.0 / v, coarse=1)
    flair *= 1 + c["texture"] * (0.7 * shared + 0.7 * smooth_noise(rng, shape, 1.0 / v, coarse=1))
    t1 *= 1 + 0.6 * c["texture"] * (0.7 * shared + 0.7 * smooth_noise(rng, shape, 1.0 / v, coarse=1))
    # lesions: per-lesion contrast, internal heterogeneity, partial-volume edges
    n = int(labels.max())
    meta_l: dict = {"n_lesions": n}
    if n:
        f_les = rng.uniform(*cfg.flair_lesion, n + 1).astype(np.float32)
        t_les = rng.uniform(*cfg.t1_lesion, n + 1).astype(np.float32)
        black = rng.random(n + 1) < cfg.black_hole_fraction
        t_les[black] = rng.uniform(0.35, 0.55, int(black.sum()))
        ext = labels.copy()
        for _ in range(2):
            ext = np.where(ext > 0, ext, ndi.grey_dilation(ext, footprint=CONNECTIVITY_18))
        binary = (labels > 0).astype(np.float32)
        edge = _u(rng, cfg.lesion_edge_mm)
        soft = ndi.gaussian_filter(binary, edge / v) * 1.3
        soft = np.clip(np.maximum(soft, 0.85 * binary), 0, 1) * (ext > 0) * mask
        het = _u(rng, cfg.lesion_heterogeneity)
        hf = 1 + het * smooth_noise(rng, shape, 1.5 / v, coarse=1)
        # contrast profile: full contrast in the lesion's core, a fraction `rim` of it at its border
        depth = ndi.gaussian_filter(binary, 1.5 / v) * binary
        peak = np.asarray(ndi.maximum(depth, labels, index=np.arange(1, n + 1)), dtype=np.float32)
        depth_n = np.where(labels > 0, depth / np.maximum(np.concatenate([[1.0], peak])[labels], 1e-6), 0.0)
        rim = rng.uniform(0.5, 0.9, n + 1).astype(np.float32)
        profile = rim[ext] + (1 - rim[ext]) * depth_n
        fl = 1 + (f_les[ext] * hf - 1) * profile
        tl = 1 + (t_les[ext] * (2 - hf) - 1) * profile
        c["lesion_edge_mm"] = round(edge, 3)
        flair = flair * (1 - soft) + soft * fl
        t1 = t1 * (1 - soft) + soft * tl
        meta_l.update({"flair_lesion_mean": round(float(f_les[1:].mean()), 3), "t1_lesion_mean": round(float(t_les[1:].mean()), 3), "black_holes": int(black[1:].sum())})
    flair *= mask
    t1 *= mask
    c.update(meta_l)
    return flair.astype(np.float32), t1.astype(np.float32), c


def _skull(rng, cfg, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FLAIR/T1 (WM = 1 units) of the CSF rim, skull tables, diploe, scalp and neck outside ``mask``; head mask."""
    v = float(cfg.voxel_size)
    shape = mask.shape
    d = ndi.distance_transform_edt(~mask, sampling=v)
    # the neck: below the lowest brain slice + 25 mm, extrude the head cross-section downwards
    zs = np.flatnonzero(mask.any(axis=(0, 1)))
    wob = lambda s: 1 + 0.25 * smooth_noise(rng, shape, 20.0 / v)  # noqa: E731
    rim = rng.uniform(1.0, 3.0) * wob(0)
    inner = rim + rng.uniform(1.0, 2.0)
    diploe = inner + rng.uniform(1.5, 4.0) * wob(0)
    outer = diploe + rng.uniform(1.0, 2.0)
    scalp = outer + rng.uniform(4.0, 8.0) * wob(0)
    skin = scalp + 1.5
    flair = np.zeros(shape, np.float32)
    t1 = np.zeros(shape, np.float32)
    layers = [  # (outer edge, FLAIR, T1)
        (rim, 0.12, 0.25),
        (inner, 0.03, 0.05),
        (diploe, 0.75, 0.95),
        (outer, 0.03, 0.05),
        (scalp, 1.05, 1.15),
        (skin, 0.7, 0.7),
    ]
    inside = mask.copy()
    prev = np.zeros(shape)
    for edge, fv, tv in layers:
        shell = (d > prev) & (d <= edge) & ~inside
        flair[shell] = fv
        t1[shell] = tv
        inside |= shell
        prev = edge
    head = inside
    if zs.size:
        z0 = min(shape[2] - 1, int(zs[0] + 25 / v))
        section = head[:, :, z0]
        d2 = ndi.distance_transform_edt(section, sampling=v)
        for z in range(0, z0):
            neck = section & (d2 > (z0 - z) * v * 0.3)  # the head narrows towards the neck
            add = neck & ~head[:, :, z]
            flair[:, :, z][add] = np.where(d2[add] < (z0 - z) * v * 0.3 + 3.0, 1.0, 0.6)  # fat rim, muscle
            t1[:, :, z][add] = np.where(d2[add] < (z0 - z) * v * 0.3 + 3.0, 1.1, 0.55)
            head[:, :, z] |= neck
    # tissue texture so that the extra-cerebral layers are not flat
    tex = 1 + 0.12 * smooth_noise(rng, shape, 2.0 / v, coarse=1)
    return flair * tex, t1 * tex, head


def generate_subject(seed: int, skull: bool = False, config: SynthConfig | None = None) -> SynthSubject:
    """One synthetic subject, fully determined by ``seed`` (and ``skull``/``config``)."""
    cfg = config or SynthConfig()
    seed = int(seed)
    if seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed}")
    ss = np.random.SeedSequence(seed)
    r_anat, r_les, r_int, r_acq, r_skull = (np.random.default_rng(s) for s in ss.spawn(5))
    tpl = mni_template()
    shape, affine = cfg.grid()
    v = float(cfg.voxel_size)
    # the anatomy, lesions and contrasts live in a crop around the brain that does not depend on `skull`,
    # so a subject with --skull has exactly the brain and lesions of the same seed without it
    deform, crop, coords, meta_def = _deformation(r_anat, cfg, shape, affine, tpl, 6.0)
    p, mask, t1_tpl, meta_t = _tissues(r_anat, cfg, tpl, coords)
    del coords
    sites = _site_maps(p, mask, v)
    lesion, blobs = _place_lesions(r_les, cfg, p, mask, sites)
    vox_mm3 = voxel_volume_mm3(affine)
    labels = lesion_instances_18(lesion, vox_mm3, cfg.min_lesion_mm3)
    flair, t1, meta_c = _intensities(r_int, cfg, p, mask, t1_tpl, labels, sites["dist_vent"])
    acq = crop  # the region the acquisition step simulates
    if skull:
        grow = int(np.ceil(28.0 / v))
        acq = tuple(slice(max(0, c.start - grow), min(n, c.stop + grow)) for c, n in zip(crop, shape))
        inner = tuple(slice(c.start - a.start, c.stop - a.start) for c, a in zip(crop, acq))
        acq_shape = tuple(a.stop - a.start for a in acq)

        def grown(arr):
            out = np.zeros(acq_shape, dtype=arr.dtype)
            out[inner] = arr
            return out

        mask_acq = grown(mask)
        sf, st, _head = _skull(r_skull, cfg, mask_acq)
        flair = np.where(mask_acq, grown(flair), sf)
        t1 = np.where(mask_acq, grown(t1), st)
    else:
        mask_acq = mask
    # acquisition: partial-volume blur, smooth bias field, Rician noise, arbitrary scale
    meta_a = {}
    for name in ("flair", "t1"):
        img = flair if name == "flair" else t1
        blur = _u(r_acq, cfg.blur_sigma_mm)
        if blur > 0.05:
            img = ndi.gaussian_filter(img, blur / v)
        strength = _u(r_acq, cfg.bias_strength)
        bias = np.exp(strength * smooth_noise(r_acq, img.shape, 40.0 / v))
        img = img * bias
        sigma = _u(r_acq, cfg.flair_noise if name == "flair" else cfg.t1_noise)
        img = _rician(r_acq, img, sigma)  # with --skull the air keeps its Rician noise floor
        level = _u(r_acq, cfg.flair_wm_level if name == "flair" else cfg.t1_wm_level)
        img = img * level
        if not skull:
            img = img * mask_acq  # brain-extracted: 0 outside the brain mask
        meta_a[name] = {"blur_mm": round(blur, 3), "bias": round(strength, 3), "noise": round(sigma, 4),
                        "wm_level": round(level, 1)}
        if name == "flair":
            flair = img
        else:
            t1 = img

    # place the crops into the full grid
    def full(a, dtype, region):
        out = np.zeros(shape, dtype=dtype)
        out[region] = a
        return out

    flair_f = full(flair, np.float32, acq)
    t1_f = full(t1, np.float32, acq)
    if skull:  # Rician noise floor (of zero signal) everywhere outside the simulated region too
        outside = np.ones(shape, bool)
        outside[acq] = False
        n_out = int(outside.sum())
        for arr, name in ((flair_f, "flair"), (t1_f, "t1")):
            sd = meta_a[name]["noise"] * meta_a[name]["wm_level"]
            arr[outside] = np.hypot(r_acq.standard_normal(n_out, dtype=np.float32) * sd,
                                    r_acq.standard_normal(n_out, dtype=np.float32) * sd)
    tissues = np.zeros((3, *shape), np.float32)
    tissues[(slice(None), *crop)] = p
    subject = SynthSubject(
        flair=flair_f,
        t1=t1_f,
        lesions=full(labels, np.int32, crop),
        brain_mask=full(mask.astype(np.uint8), np.uint8, crop),
        affine=affine.copy(),
        tissues=tissues,
        meta={
            "seed": seed,
            "skull": bool(skull),
            "voxel_size": v,
            "deformation": meta_def,
            "tissues": meta_t,
            "contrast": {k: (round(x, 4) if isinstance(x, float) else x) for k, x in meta_c.items()},
            "acquisition": meta_a,
            "blobs": blobs,
            "lesion_volumes_mm3": [
                round(float(x) * vox_mm3, 1) for x in np.bincount(labels.ravel())[1:]
            ],
        },
    )
    return subject


# ----------------------------------------------------------------------------------------------- files & cohort


def subject_files(subject_id: str) -> dict[str, str]:
    """File names of one subject: keys ``flair``, ``t1``, ``label``, ``brain_mask``."""
    return {k: f"{subject_id}_{suffix}.nii.gz" for k, suffix in FILE_KEYS.items()}


def write_subject(subject: SynthSubject, out_dir: str | Path, subject_id: str) -> dict[str, Path]:
    """Write ``<id>_FLAIR``, ``<id>_T1``, ``<id>_lesions`` and ``<id>_brainmask`` NIfTIs (+ ``<id>_meta.json``)."""
    out_dir = Path(out_dir)
    names = subject_files(subject_id)
    paths = {
        "flair": save_volume(out_dir / names["flair"], subject.flair, subject.affine, np.float32),
        "t1": save_volume(out_dir / names["t1"], subject.t1, subject.affine, np.float32),
        "label": save_volume(out_dir / names["label"], subject.lesions, subject.affine, np.int32),
        "brain_mask": save_volume(out_dir / names["brain_mask"], subject.brain_mask, subject.affine, np.uint8),
    }
    meta_path = out_dir / f"{subject_id}_meta.json"
    meta_path.write_text(json.dumps(subject.meta, indent=1))
    paths["meta"] = meta_path
    return paths


def subject_seed(cohort_seed: int, index: int) -> int:
    """Seed of subject ``index`` in the cohort with seed ``cohort_seed`` (independent streams per subject)."""
    return int(np.random.SeedSequence([int(cohort_seed), int(index)]).generate_state(1, np.uint32)[0])


def make_splits(ids: list[str], seed: int, fractions=(0.7, 0.15, 0.15)) -> dict[str, list[str]]:
    """Deterministic disjoint train/val/test split covering all ``ids``.

    With at least 3 subjects val and test get at least one each; a single subject goes to ``test`` (the demo).
    """
    fr = np.asarray(fractions, dtype=float)
    if fr.shape != (3,) or np.any(fr < 0) or fr.sum() <= 0:
        raise InputError(f"splits must be three non-negative fractions (train, val, test), got {fractions}")
    fr = fr / fr.sum()
    n = len(ids)
    order = list(np.random.default_rng(np.random.SeedSequence([int(seed), 1729])).permutation(n))
    if n == 1:
        return {"train": [], "val": [], "test": list(ids)}
    n_val = int(round(fr[1] * n))
    n_test = int(round(fr[2] * n))
    if n >= 3:
        n_val = max(n_val, 1 if fr[1] > 0 else 0)
        n_test = max(n_test, 1 if fr[2] > 0 else 0)
    n_train = n - n_val - n_test
    if n_train < 0 or (n_train == 0 and fr[0] > 0 and n >= 3):
        n_train = max(1, n - n_val - n_test) if fr[0] > 0 else 0
        n_val = min(n_val, n - n_train)
        n_test = n - n_train - n_val
    pick = [ids[i] for i in order]
    return {
        "train": sorted(pick[:n_train]),
        "val": sorted(pick[n_train : n_train + n_val]),
        "test": sorted(pick[n_train + n_val :]),
    }


def _worker(args) -> dict:
    out_dir, sid, s, skull, cfg_dict = args
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = SynthConfig(**cfg_dict)
    subj = generate_subject(s, skull=skull, config=cfg)
    write_subject(subj, out_dir, sid)
    return {"id": sid, "seed": s, "n_lesions": int(subj.lesions.max())}


def generate_cohort(
    out_dir: str | Path,
    n_subjects: int,
    seed: int = 0,
    skull: bool = False,
    workers: int = 1,
    splits=(0.7, 0.15, 0.15),
    config: SynthConfig | None = None,
    name: str = "msxai-synth",
    prefix: str = "synth",
    progress: bool = True,
) -> Path:
    """Generate ``n_subjects`` subjects into ``out_dir`` and write ``out_dir/dataset.json``; returns its path."""
    from tqdm import tqdm

    n_subjects = int(n_subjects)
    if n_subjects < 1:
        raise InputError(f"--n must be at least 1, got {n_subjects}")
    if int(workers) < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = config or SynthConfig()
    cfg.grid()  # validates the voxel size before any work
    ids = [f"{prefix}{i:03d}" for i in range(n_subjects)]
    jobs = [(str(out_dir), sid, subject_seed(seed, i), bool(skull), asdict(cfg)) for i, sid in enumerate(ids)]
    results: dict[str, dict] = {}
    bar = tqdm(total=n_subjects, desc="synth", unit="subject", disable=not progress)
    if int(workers) == 1:
        for job in jobs:
            r = _worker(job)
            results[r["id"]] = r
            bar.update(1)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=int(workers), mp_context=mp.get_context("spawn")) as ex:
            futs = [ex.submit(_worker, job) for job in jobs]
            for fut in as_completed(futs):
                r = fut.result()
                results[r["id"]] = r
                bar.update(1)
    bar.close()
    subjects = []
    for sid in ids:
        files = subject_files(sid)
        subjects.append({"id": sid, "seed": results[sid]["seed"], "n_lesions": results[sid]["n_lesions"], **files})
    dataset = {
        "name": name,
        "seed": int(seed),
        "skull": bool(skull),
        "voxel_size": float(cfg.voxel_size),
        "subjects": subjects,
        "splits": make_splits(ids, seed, splits),
    }
    path = out_dir / "dataset.json"
    path.write_text(json.dumps(dataset, indent=1))
    return path


def load_dataset(dataset_json: str | Path) -> dict:
    """Read a cohort's ``dataset.json`` and resolve every subject's file names to absolute paths.

    Returns the same dict with ``root`` added and, per subject, ``flair``/``t1``/``label``/``brain_mask`` as
    absolute path strings; raises ``InputError`` naming a missing file or malformed entry.
    """
    path = Path(dataset_json)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.exists():
        raise InputError(f"dataset.json not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc
    root = path.parent.resolve()
    if "subjects" not in data or not isinstance(data["subjects"], list):
        raise InputError(f"{path}: no 'subjects' list")
    for s in data["subjects"]:
        for key in FILE_KEYS:
            if key not in s:
                raise InputError(f"{path}: subject {s.get('id', '?')} has no '{key}' entry")
            p = Path(s[key])
            p = p if p.is_absolute() else root / p
            if not p.exists():
                raise InputError(f"{path}: subject {s.get('id', '?')}: {key} file is missing: {p}")
            s[key] = str(p)
    ids = {s["id"] for s in data["subjects"]}
    for split, members in data.get("splits", {}).items():
        unknown = set(members) - ids
        if unknown:
            raise InputError(f"{path}: split '{split}' names unknown subjects {sorted(unknown)}")
    data["root"] = str(root)
    return data


# ----------------------------------------------------------------------------------------------- realism report


def summarize(values) -> dict:
    """n, median, quartiles, min, max and mean of a list of numbers (NaN for an empty list)."""
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        nan = float("nan")
        return {"n": 0, "median": nan, "q1": nan, "q3": nan, "min": nan, "max": nan, "mean": nan}
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    return {"n": int(x.size), "median": float(med), "q1": float(q1), "q3": float(q3),
            "min": float(x.min()), "max": float(x.max()), "mean": float(x.mean())}


def lesion_volumes_mm3(labels: np.ndarray, affine: np.ndarray, min_mm3: float = MIN_LESION_MM3) -> list[float]:
    """Volumes (mm^3) of the 18-connected lesions (>= ``min_mm3``) of a label or binary map."""
    vox = voxel_volume_mm3(affine)
    inst = lesion_instances_18(np.asarray(labels) > 0, vox, min_mm3)
    return [float(c) * vox for c in np.bincount(inst.ravel())[1:]]


def tissue_contrasts(flair: np.ndarray, t1: np.ndarray, lesions: np.ndarray, brain: np.ndarray | None = None,
                     iterations: int = 30) -> dict:
    """Median FLAIR and T1 intensities of CSF, GM and lesions relative to WM, from a 3-class k-means on the T1.

    The same unsupervised tissue split is applied to real and synthetic scans so that they are compared alike.
    """
    brain = (flair != 0) if brain is None else np.asarray(brain, bool)
    les = np.asarray(lesions) > 0
    sel = brain & ~les
    x = t1[sel].astype(np.float64)
    fx = flair[sel].astype(np.float64)
    c = np.percentile(x, [10, 50, 90])
    lab = np.zeros(x.shape, int)
    for _ in range(iterations):
        lab = np.argmin(np.abs(x[:, None] - c[None]), axis=1)
        c = np.array([x[lab == i].mean() if np.any(lab == i) else c[i] for i in range(3)])
    wm_f, wm_t = np.median(fx[lab == 2]), np.median(x[lab == 2])
    out = {"csf_fraction": float(np.mean(lab == 0)), "gm_fraction": float(np.mean(lab == 1)),
           "wm_fraction": float(np.mean(lab == 2)), "brain_voxels": int(brain.sum())}
    for name, img, wm, vals in (("flair", flair, wm_f, fx), ("t1", t1, wm_t, x)):
        out[f"{name}_csf"] = float(np.median(vals[lab == 0]) / wm)
        out[f"{name}_gm"] = float(np.median(vals[lab == 1]) / wm)
        out[f"{name}_lesion"] = float(np.median(img[les]) / wm) if les.any() else float("nan")
    return out
