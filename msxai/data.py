"""Where the one real MS patient lives, and how to cite it.

The patient is *not* part of the repository: a folder holding ``{FLAIR,T1,consensus_gt}.nii.gz`` (open_ms_data
patient26: 182x218x182, 1 mm, MNI space, skull-stripped, N4-corrected; 16 lesions of at least 5 voxels with
18-connectivity), given as an argument or by ``$MSXAI_REAL_DATA``; a development checkout finds it beside the
repository, at ``<repo>/../shared/data/open_ms_data/patient26`` (:func:`msxai.paths.real_data_dir`). Code and tests
that use it call :func:`real_patient_dir` and skip (or refuse) with :func:`real_patient_missing_reason` when it
returns ``None``.
"""

from __future__ import annotations

from pathlib import Path

from msxai.paths import REAL_DATA_ENV, real_data_dir

REAL_PATIENT_FILES = ("FLAIR.nii.gz", "T1.nii.gz", "consensus_gt.nii.gz")

# Quoted from the dataset's README (../shared/data/open_ms_data/README.md).
REAL_PATIENT_CITATION = (
    'Lesjak Z., Pernus F., Likar B., Spiclin Z., "A Novel Public MR Image Dataset of Multiple Sclerosis Patients '
    'With Lesion Segmentations Based on Multi-rater Consensus", Neuroinformatics (2017), DOI 10.1007/s12021-017-9348-7. '
    'From the "3D MR image database of Multiple Sclerosis patients with white matter lesion segmentations"; '
    "License: Creative Commons Attribution (CC-BY)."
)


# Facts about the real patient that tests check against (from the dataset's README).
REAL_PATIENT_SHAPE = (182, 218, 182)
REAL_PATIENT_N_LESIONS = 16  # lesions of >= 5 voxels (= 5 mm^3 at 1 mm) with 18-connectivity


def real_patient_dir(folder: str | Path | None = None) -> Path | None:
    """The folder holding the real patient's FLAIR, T1 and consensus_gt (``folder``, else ``$MSXAI_REAL_DATA``, else
    beside a development checkout), or ``None`` when any file is absent."""
    d = Path(folder) if folder is not None else real_data_dir()
    if d is not None and all((d / name).is_file() for name in REAL_PATIENT_FILES):
        return d
    return None


def real_patient_missing_reason(folder: str | Path | None = None) -> str:
    """Why :func:`real_patient_dir` found no patient, and what to pass."""
    d = Path(folder) if folder is not None else real_data_dir()
    where = f"in {d}" if d is not None else f"(no folder given and {REAL_DATA_ENV} not set)"
    return (f"real MS patient not found: expected {', '.join(REAL_PATIENT_FILES)} {where}; pass the folder or set "
            f"{REAL_DATA_ENV} (open_ms_data patient26; a checkout looks in <repo>/../shared/data/open_ms_data/patient26; "
            "it is never copied into the repository)")


# The reason at import time, for callers that only print it.
REAL_PATIENT_MISSING_REASON = real_patient_missing_reason()


def real_patient_paths(folder: str | Path | None = None) -> dict[str, Path] | None:
    """``{"flair": ..., "t1": ..., "truth": ...}`` paths of the real patient, or ``None`` when absent."""
    folder = real_patient_dir(folder)
    if folder is None:
        return None
    return {
        "flair": folder / "FLAIR.nii.gz",
        "t1": folder / "T1.nii.gz",
        "truth": folder / "consensus_gt.nii.gz",
    }
