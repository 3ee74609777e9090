"""The cases of a cohort run: from a synthetic cohort (``dataset.json``), a MONAI datalist or a folder of studies.

Files are not opened here (a damaged scan fails its own case, not the listing); ids must be unique and usable as
folder names.

* ``dataset.json`` of ``msxai synth`` (a folder holding one, or the file): its ``subjects`` (``split``: one split or
  ``all``), with truth (``label``) and brain mask.
* A MONAI datalist (``.json``): a list of items, or a dict whose ``key`` (default ``testing``, else the only list in
  it) is that list. An item is ``{"flair": F, "t1": T}`` or ``{"image": [F, T]}``, optionally ``"label"`` (truth),
  ``"brain_mask"`` and ``"id"`` (default: the FLAIR's name without extension and sequence token). Relative paths are
  read from ``base_dir`` (default: the datalist's folder), as ``monai.data.load_decathlon_datalist`` does.
* A folder: every FLAIR by the studies naming rule (:mod:`msxai.studies`: ``<stem>_FLAIR.nii.gz`` beside
  ``<stem>_T1.nii.gz``, or ``<study>/FLAIR.nii.gz`` beside ``T1.nii.gz``) in the folder and its direct sub-folders;
  the truth, when present, is ``<stem>_lesions``/``_consensus_gt``/``_label``/``_gt`` (``consensus_gt``/``lesions``/
  ``label``/``gt`` in a study folder).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from msxai.errors import InputError

CASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
TRUTH_TOKENS = ("lesions", "consensus_gt", "label", "gt")


@dataclass(frozen=True)
class Case:
    id: str
    flair: str
    t1: str
    truth: str | None = None
    brain_mask: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def load_cases(source, split: str | None = "all", key: str | None = None, base_dir=None) -> list[Case]:
    """Cases of ``source`` (a folder, ``dataset.json``, a datalist ``.json`` or a list of dicts), in their order."""
    if isinstance(source, (list, tuple)):
        return _checked([_item_case(dict(it), Path(base_dir or "."), i) for i, it in enumerate(source)], "list")
    if source is None or str(source).strip() == "":
        raise InputError("no cohort given: pass a folder, a dataset.json or a datalist .json")
    p = Path(str(source))
    if not p.exists():
        raise InputError(f"cohort not found: {p}")
    if p.is_dir() and not (p / "dataset.json").is_file():
        return _checked(_folder_cases(p), str(p))
    jp = p / "dataset.json" if p.is_dir() else p
    try:
        data = json.loads(jp.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{jp}: not a readable JSON file ({exc})") from exc
    if isinstance(data, dict) and "subjects" in data:
        return _checked(_synth_cases(jp, split), str(jp))
    items = _datalist_items(data, key, jp)
    root = Path(base_dir) if base_dir is not None else jp.parent
    return _checked([_item_case(it, root, i) for i, it in enumerate(items)], str(jp))


def _checked(cases: list[Case], where: str) -> list[Case]:
    if not cases:
        raise InputError(f"{where}: no case found")
    seen: dict[str, Case] = {}
    for c in cases:
        if not CASE_ID_RE.match(c.id):
            raise InputError(f"{where}: case id {c.id!r} is not usable as a folder name (letters, digits, '.', "
                             "'_', '+', '-'; give an 'id')")
        if c.id in seen:
            raise InputError(f"{where}: case id {c.id!r} appears twice ({seen[c.id].flair} and {c.flair})")
        seen[c.id] = c
    return cases


def _synth_cases(dataset_json: Path, split: str | None) -> list[Case]:
    from msxai.synth import load_dataset

    data = load_dataset(dataset_json)
    subjects = {s["id"]: s for s in data["subjects"]}
    if split in (None, "all"):
        ids = list(subjects)
    else:
        splits = data.get("splits", {})
        if split not in splits:
            raise InputError(f"{dataset_json}: no split {split!r} (have {sorted(splits)} or 'all')")
        ids = list(splits[split])
    return [Case(str(i), subjects[i]["flair"], subjects[i]["t1"], subjects[i].get("label"),
                 subjects[i].get("brain_mask")) for i in ids]


def _datalist_items(data, key: str | None, path: Path) -> list[dict]:
    if isinstance(data, list):
        items = data
    elif isinstance(data, dict):
        if key is not None:
            if key not in data:
                raise InputError(f"{path}: no key {key!r} (have {sorted(data)})")
            items = data[key]
        elif "testing" in data:
            items = data["testing"]
        else:
            lists = [k for k, v in data.items() if isinstance(v, list)]
            if len(lists) != 1:
                raise InputError(f"{path}: say which list holds the cases (key=...; lists: {lists})")
            items = data[lists[0]]
    else:
        raise InputError(f"{path}: a datalist is a list of cases or a dict of such lists")
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise InputError(f"{path}: the cases must be a list of objects")
    return items


def _resolve(root: Path, value) -> str:
    p = Path(str(value))
    return str(p if p.is_absolute() else root / p)


def _item_case(item: dict, root: Path, index: int) -> Case:
    if "flair" in item and "t1" in item:
        flair, t1 = item["flair"], item["t1"]
    elif isinstance(item.get("image"), (list, tuple)) and len(item["image"]) == 2:
        flair, t1 = item["image"]
    else:
        raise InputError(f"datalist item {index}: give 'flair' and 't1', or 'image': [FLAIR, T1] (got keys "
                         f"{sorted(item)})")
    truth = item.get("label", item.get("truth"))
    cid = item.get("id") or _stem_id(Path(str(flair)))
    return Case(str(cid), _resolve(root, flair), _resolve(root, t1), _resolve(root, truth) if truth else None,
                _resolve(root, item["brain_mask"]) if item.get("brain_mask") else None)


_FLAIR_STEM_RE = re.compile(r"^(?P<prefix>.*?)(?P<sep>[_-]?)flair$", re.IGNORECASE)


def _flair_prefix(flair: Path) -> tuple[str, str]:
    """``sub01_FLAIR.nii.gz -> ("sub01", "_")``; ``FLAIR.nii.gz -> ("", "")``."""
    from msxai.studies import split_nifti_name

    stem = split_nifti_name(flair.name)[0]
    m = _FLAIR_STEM_RE.match(stem)
    return (m.group("prefix"), m.group("sep")) if m else (stem, "")


def _stem_id(flair: Path) -> str:
    return _flair_prefix(flair)[0] or flair.parent.name


def _companion(flair: Path, tokens) -> str | None:
    from msxai.studies import NIFTI_EXTENSIONS

    prefix, sep = _flair_prefix(flair)
    present = {q.name.lower(): q for q in flair.parent.iterdir() if q.is_file()}
    found = [present[n.lower()] for t in tokens for e in NIFTI_EXTENSIONS
             for n in [f"{prefix}{sep}{t}{e}"] if n.lower() in present]
    return str(found[0]) if found else None


def _folder_cases(folder: Path) -> list[Case]:
    from msxai.studies import find_t1, sequence_of

    flairs = []
    for d in [folder] + sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        flairs += sorted(p for p in d.iterdir() if p.is_file() and sequence_of(p.name) == "FLAIR")
    cases = []
    for f in flairs:
        cases.append(Case(_stem_id(f), str(f), str(find_t1(f)), _companion(f, TRUTH_TOKENS),
                          _companion(f, ("brainmask",))))
    return cases
