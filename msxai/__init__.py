"""msxai: explainable multiple-sclerosis lesion segmentation.

Library layout (the app, the bundles and the scripts are thin wrappers around it):

- ``msxai.io``          NIfTI reading/writing and FLAIR/T1 pair loading with geometry checks
- ``msxai.errors``      the exceptions that name bad input
- ``msxai.synth``       the synthetic MS cohort built from nilearn's MNI152 2009a templates
- ``msxai.preprocess``  z-scoring in the brain, optional N4 and rigid FLAIR->T1 registration
- ``msxai.lesions``     lesion instances (t = 0.3, 18-connectivity, >= 5 mm^3), TP/FP/FN/TN
- ``msxai.metrics``     Dice, nDSC, lesion-wise TPR/FDR/FNR/F1
- ``msxai.networks``, ``msxai.losses``, ``msxai.inference``, ``msxai.bundle``: the three bundles' logic
- ``msxai.saliency``    instance SmoothGrad (Eq. 2/3) and Grad-CAM++ (class and instance level)
"""

__version__ = "0.1.0"

# The paper's constants (Spagnolo et al., Sci Rep 2026).
THRESHOLD = 0.3
MIN_LESION_MM3 = 5.0
# The input sequences in channel order ([C, X, Y, Z]: 0 = FLAIR, 1 = MPRAGE/T1): their display names, and the
# lower-case keys of file and column names (smoothgrad_flair.nii.gz, flair_peak_max, ...).
SEQUENCES = ("FLAIR", "MPRAGE")
SEQUENCE_KEYS = tuple(s.lower() for s in SEQUENCES)
