"""The cases an experiment runs on: a synthetic cohort split (``dataset.json``) and/or the shared real patient."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from msxai.errors import InputError


@dataclass
class CaseSpec:
    id: str
    flair: str
    t1: str
    truth: str
    brain_mask: str | None = None
    source: str = ""


def cohort_cases(cohort: str | Path, split: str | None = "test") -> list[CaseSpec]:
    """Cases of a cohort folder or ``dataset.json``: the subjects of ``split`` (``None``/``"all"`` = every subject)."""
    from msxai.synth import load_dataset

    data = load_dataset(cohort)
    subjects = {s["id"]: s for s in data["subjects"]}
    if split in (None, "all"):
        ids = list(subjects)
    else:
        splits = data.get("splits", {})
        if split not in splits:
            raise InputError(f"{cohort}: no split named {split!r} (have {sorted(splits)})")
        ids = list(splits[split])
        if not ids:
            raise InputError(f"{cohort}: split {split!r} is empty")
    return [CaseSpec(i, subjects[i]["flair"], subjects[i]["t1"], subjects[i]["label"], subjects[i].get("brain_mask"),
                     f"{Path(data['root']).name}/{split or 'all'}") for i in ids]


def real_patient_case(folder: str | Path | None = None) -> CaseSpec:
    """The real patient (``folder``, else ``$MSXAI_REAL_DATA``, else beside a development checkout)."""
    from msxai.data import real_patient_missing_reason, real_patient_paths

    paths = real_patient_paths(folder)
    if paths is None:
        raise InputError(real_patient_missing_reason(folder))
    return CaseSpec("patient26", str(paths["flair"]), str(paths["t1"]), str(paths["truth"]), None, "open_ms_data")
