"""Where the one real MS patient lives, and how to cite it.

The patient is *not* part of the repository: it sits beside it, at
``<repo>/../shared/data/open_ms_data/patient26/{FLAIR,T1,consensus_gt}.nii.gz`` (182x218x182, 1 mm, MNI space,
skull-stripped, N4-corrected; 16 lesions of at least 5 voxels with 18-connectivity). Code and tests that use it call
:func:`real_patient_dir` and skip (or refuse) with :data:`REAL_PATIENT_MISSING_REASON` when it returns ``None``.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_PATIENT_DIR = REPO_ROOT.parent / "shared" / "data" / "open_ms_data" / "patient26"
REAL_PATIENT_FILES = ("FLAIR.nii.gz", "T1.nii.gz", "consensus_gt.nii.gz")

# Quoted from the dataset's README (../shared/data/open_ms_data/README.md).
REAL_PATIENT_CITATION = (
    'Lesjak Z., Pernus F., Likar B., Spiclin Z., "A Novel Public MR Image Dataset of Multiple Sclerosis Patients '
    'With Lesion Segmentations Based on Multi-rater Consensus", Neuroinformatics (2017), DOI 10.1007/s12021-017-9348-7. '
    'From the "3D MR image database of Multiple Sclerosis patients with white matter lesion segmentations"; '
    "License: Creative Commons Attribution (CC-BY)."
)

REAL_PATIENT_MISSING_REASON = (
    f"real MS patient not found: expected {', '.join(REAL_PATIENT_FILES)} in {REAL_PATIENT_DIR} "
    "(<repo>/../shared/data/open_ms_data/patient26; it is never copied into the repository)"
)

# Facts about the real patient that tests check against (from the dataset's README).
REAL_PATIENT_SHAPE = (182, 218, 182)
REAL_PATIENT_N_LESIONS = 16  # lesions of >= 5 voxels (= 5 mm^3 at 1 mm) with 18-connectivity


def real_patient_dir() -> Path | None:
    """The folder holding the real patient's FLAIR, T1 and consensus_gt, or ``None`` when any file is absent."""
    if all((REAL_PATIENT_DIR / name).is_file() for name in REAL_PATIENT_FILES):
        return REAL_PATIENT_DIR
    return None


def real_patient_paths() -> dict[str, Path] | None:
    """``{"flair": ..., "t1": ..., "truth": ...}`` paths of the real patient, or ``None`` when absent."""
    folder = real_patient_dir()
    if folder is None:
        return None
    return {
        "flair": folder / "FLAIR.nii.gz",
        "t1": folder / "T1.nii.gz",
        "truth": folder / "consensus_gt.nii.gz",
    }
