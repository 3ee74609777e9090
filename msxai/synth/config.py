"""The synthetic cohort's grid (the FSL MNI152 1 mm box), its constants and the ranges of the random subject
parameters (:class:`SynthConfig`); :class:`SynthSubject` is one generated subject."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from msxai import MIN_LESION_MM3
from msxai.errors import InputError

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
