"""A synthetic cohort on disk: file names of a subject, per-subject seeds, the train/val/test split,
:func:`generate_cohort` (``msxai synth``; subjects in parallel processes) and :func:`load_dataset` (a cohort's
``dataset.json`` with absolute paths)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from msxai.errors import InputError
from msxai.io import save_volume
from msxai.synth.config import FILE_KEYS, SynthConfig, SynthSubject
from msxai.synth.subject import generate_subject

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
