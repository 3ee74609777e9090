"""Skull present or absent, and the brain mask of a head image.

The networks were trained on skull-stripped FLAIR/T1 pairs z-scored over the brain (:func:`msxai.preprocess.zscore`,
0 outside). A head image is brought to that form before it reaches a network:

1. :func:`has_skull` decides by measurement: the volume of the non-zero voxels. A skull-stripped image is zero
   outside the brain (brain + CSF rim: 1.1 - 1.3 L in the synthetic cohort and patient26; no adult brain mask
   reaches 2 L); a head image holds scalp, skull and usually noise in the air around it (3 - 7 L).
2. :func:`head_brain_mask` finds the brain of a head image: the MNI152 2009a template brain (nilearn's wheel) is
   registered to the T1 (similarity, then affine; mutual information over the template's brain only, on 3 mm
   binned copies) and its brain mask warped onto the image; the mask is then fitted to this brain's own boundary:
   within the warped mask grown by ``search_mm``, the voxels of T1 brain tissue (above the CSF level between the
   template's CSF and white matter), the component that holds the warped mask's core, closed over sulci and grown by
   ``margin_mm`` (the CSF rim a skull-stripping tool keeps).
3. Outside the mask both sequences are set to 0 (stripped), and z-scoring runs over the mask as for stripped data.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

from msxai.errors import InputError
from msxai.io import Volume, voxel_volume_mm3

SKULL_MIN_FOREGROUND_CM3 = 2000.0


def foreground_cm3(image: np.ndarray, affine: np.ndarray) -> float:
    """Volume (cm³) of the voxels that are non-zero in any channel of ``image`` ``[C, X, Y, Z]`` (or ``[X, Y, Z]``)."""
    a = np.asarray(image)
    fg = np.any(a != 0, axis=0) if a.ndim == 4 else a != 0
    return float(fg.sum()) * voxel_volume_mm3(affine) / 1000.0


def has_skull(image: np.ndarray, affine: np.ndarray, limit_cm3: float = SKULL_MIN_FOREGROUND_CM3) -> tuple[bool, float]:
    """``(skull present, foreground cm³)``: present when the non-zero voxels fill more than ``limit_cm3``."""
    v = foreground_cm3(image, affine)
    return v > limit_cm3, v


def _distance_outside(mask: np.ndarray, spacing) -> np.ndarray:
    """Distance (mm) of every voxel to ``mask`` (0 inside; negative depth inside), SimpleITK's signed Maurer map."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing))
    d = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return sitk.GetArrayFromImage(d).transpose(2, 1, 0)


def _grow(mask: np.ndarray, mm: float, spacing) -> np.ndarray:
    """Voxels within ``mm`` millimetres of ``mask``."""
    if mm <= 0 or not mask.any():
        return mask
    return _distance_outside(mask, spacing) <= mm


def _shrink(mask: np.ndarray, mm: float, spacing) -> np.ndarray:
    """Voxels of ``mask`` more than ``mm`` millimetres from its outside."""
    if mm <= 0 or mask.all() or not mask.any():
        return mask
    return _distance_outside(~mask, spacing) > mm


@lru_cache(maxsize=1)
def _template_t1() -> Volume:
    """nilearn's MNI152 2009a T1 template (brain-extracted: 0 outside the brain)."""
    import nibabel as nib

    from msxai.synth.anatomy import _nilearn_data_dir

    path = _nilearn_data_dir() / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not path.is_file():
        raise FileNotFoundError(f"nilearn's MNI152 2009a T1 template is missing: {path}")
    img = nib.load(str(path))
    return Volume(np.asarray(img.dataobj, np.float32), np.asarray(img.affine, np.float64))


def _template_mask(t1: Volume, seed: int = 0) -> tuple[np.ndarray, dict]:
    """The MNI152 brain mask registered (similarity, then affine) onto ``t1``'s grid; bool ``[X, Y, Z]``."""
    import SimpleITK as sitk

    from msxai.preprocess import binned, from_sitk, to_sitk

    tpl_t1 = _template_t1()
    tpl_brain = Volume((tpl_t1.array > 0).astype(np.float32), tpl_t1.affine)
    fixed_small = binned(t1, 3.0)
    moving_small = binned(tpl_t1, 3.0)
    fixed = to_sitk(fixed_small.array.astype(np.float32), fixed_small.affine)
    moving = to_sitk(moving_small.array.astype(np.float32), moving_small.affine)
    moving_mask = to_sitk((binned(tpl_brain, 3.0).array > 0.5).astype(np.uint8), moving_small.affine)

    def run(transform, iterations, shrink, smooth):
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        reg.SetMetricMovingMask(moving_mask)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.1, seed=int(seed) + 1)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=iterations,
                                                     relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(list(shrink))
        reg.SetSmoothingSigmasPerLevel(list(smooth))
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        reg.SetInitialTransform(transform, inPlace=True)
        reg.Execute(fixed, moving)
        return reg.GetMetricValue()

    similarity = sitk.Similarity3DTransform(sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Similarity3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS))
    m1 = run(similarity, 100, (2, 1), (6.0, 3.0))
    affine_t = sitk.AffineTransform(3)
    affine_t.SetMatrix(similarity.GetMatrix())
    affine_t.SetTranslation(similarity.GetTranslation())
    affine_t.SetCenter(similarity.GetCenter())
    m2 = run(affine_t, 100, (2, 1), (3.0, 0.0))
    reference = to_sitk(np.zeros(t1.array.shape, np.float32), t1.affine)
    warped = sitk.Resample(to_sitk(tpl_brain.array, tpl_brain.affine), reference, affine_t, sitk.sitkLinear, 0.0,
                           sitk.sitkFloat32)
    info = {"template": "MNI152 2009a (nilearn)", "scale": round(float(similarity.GetScale()), 3),
            "metric": [round(float(m1), 4), round(float(m2), 4)]}
    return from_sitk(warped) > 0.5, info


def head_brain_mask(flair: Volume, t1: Volume, search_mm: float = 6.0, margin_mm: float = 1.5,
                    close_mm: float = 4.0, seed: int = 0) -> tuple[np.ndarray, dict]:
    """The brain mask (bool ``[X, Y, Z]`` on the grid shared by ``flair`` and ``t1``) of a head image; see the module
    docstring. Returns the mask and what was done (template fit, volumes)."""
    if flair.array.shape != t1.array.shape or not np.allclose(flair.affine, t1.affine, atol=1e-4):
        raise InputError("head_brain_mask: FLAIR and T1 must be on one grid")
    spacing = t1.spacing
    template, info = _template_mask(t1, seed=seed)
    if not template.any():
        raise InputError("no brain found in the head image (the template registration failed)")
    pad = np.ceil((search_mm + margin_mm + close_mm + 2) / np.asarray(spacing)).astype(int)
    box = _box(template, pad)
    template_c = template[box]
    region = _grow(template_c, search_mm, spacing)
    core = _shrink(template_c, search_mm, spacing)
    a = np.asarray(t1.array, np.float32)[box]
    # T1 tissue vs CSF inside the search region: Otsu's threshold between the dark (CSF, bone) and bright modes
    threshold = _otsu(a[region])
    tissue = region & (a > threshold)
    lab, n = ndimage.label(tissue)
    if n == 0:
        raise InputError("no brain tissue found in the head image")
    inside = lab[core & tissue] if (core & tissue).any() else lab[tissue]
    counts = np.bincount(inside.ravel(), minlength=n + 1)
    counts[0] = 0
    brain_c = lab == int(np.argmax(counts))
    brain_c = _shrink(_grow(brain_c, close_mm, spacing), close_mm, spacing)  # closed over sulci
    brain_c = ndimage.binary_fill_holes(brain_c)
    brain_c = ndimage.binary_fill_holes(_grow(brain_c, margin_mm, spacing) & region)
    brain = np.zeros(template.shape, bool)
    brain[box] = brain_c
    vox = voxel_volume_mm3(t1.affine)
    info.update({"t1_threshold": round(float(threshold), 4), "template_cm3": round(float(template.sum()) * vox / 1e3, 1),
                 "brain_cm3": round(float(brain.sum()) * vox / 1e3, 1)})
    return brain, info


def _box(mask: np.ndarray, pad) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    if not len(idx):
        return tuple(slice(0, n) for n in mask.shape)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + 1 + pad, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    v = np.asarray(values, np.float64)
    lo, hi = np.percentile(v, [0.5, 99.5])
    hist, edges = np.histogram(np.clip(v, lo, hi), bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between))])
