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

Modules: :mod:`~msxai.synth.config` (grid, :class:`SynthConfig`), :mod:`~msxai.synth.anatomy` (1, 4),
:mod:`~msxai.synth.lesions` (2), :mod:`~msxai.synth.subject` (3 and :func:`generate_subject`),
:mod:`~msxai.synth.cohort` (files, splits, :func:`generate_cohort`, :func:`load_dataset`) and
:mod:`~msxai.synth.realism` (lesion volumes and tissue contrasts, real vs synthetic); the names below are the API.
"""

from msxai.synth.anatomy import (
    Deformation,
    lesion_site_maps,
    mni_template,
    resample_linear,
    smooth_noise,
    upsample_strided,
)
from msxai.synth.cohort import generate_cohort, load_dataset, make_splits, subject_files, subject_seed, write_subject
from msxai.synth.config import (
    BRAIN_CENTER_MM,
    CONNECTIVITY_18,
    FILE_KEYS,
    LESION_SITES,
    MNI_AFFINE_1MM,
    MNI_SHAPE_1MM,
    VENTRICLE_CENTER_MM,
    SynthConfig,
    SynthSubject,
)
from msxai.synth.lesions import lesion_instances_18, place_lesions
from msxai.synth.realism import lesion_volumes_mm3, summarize, tissue_contrasts
from msxai.synth.subject import generate_subject

__all__ = [
    "BRAIN_CENTER_MM", "CONNECTIVITY_18", "FILE_KEYS", "LESION_SITES", "MNI_AFFINE_1MM", "MNI_SHAPE_1MM",
    "VENTRICLE_CENTER_MM", "Deformation", "SynthConfig", "SynthSubject", "generate_cohort", "generate_subject",
    "lesion_instances_18", "lesion_site_maps", "lesion_volumes_mm3", "load_dataset", "make_splits", "mni_template",
    "place_lesions", "resample_linear", "smooth_noise", "subject_files", "subject_seed", "summarize",
    "tissue_contrasts", "upsample_strided", "write_subject",
]
