"""The pieces of a bundle's segmentation that are not the wrapper itself (:class:`msxai.bundle.Bundle`):

- :func:`default_preprocessing` / :func:`default_postprocessing`: the chains of :mod:`msxai.transforms` as the
  bundles' ``inference.json`` lists them (used when a bundle is built in Python, e.g. around a test network: then
  without orientation and spacing, the FLAIR's grid is the network grid);
- :class:`SegmentationResult` (on the FLAIR's native grid, with the network-grid probability) and
  :func:`write_result` (``probability.nii.gz``, ``mask.nii.gz``, ``lesions.nii.gz``, ``lesions.json``,
  ``lesions.csv``);
- :class:`EnsembleSegmentation`: the mean probability of several bundles through one bundle's chains;
- :func:`evaluate_cases` scores a bundle on a list of cases (Dice, nDSC, lesion-wise TPR/FDR/FNR/F1 via
  :mod:`msxai.metrics`, on the truth's grid = the FLAIR's) and :func:`resolve_cases` turns a cohort folder /
  ``dataset.json`` / the word ``patient26`` into such a list.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from msxai import MIN_LESION_MM3, THRESHOLD
from msxai.bundle import Bundle
from msxai.errors import InputError

OUTPUT_FILES = {
    "probability": "probability.nii.gz",
    "mask": "mask.nii.gz",
    "lesions": "lesions.nii.gz",
    "table_json": "lesions.json",
    "table_csv": "lesions.csv",
}


@dataclass
class SegmentationResult:
    """Output of one segmentation on the FLAIR's native grid.

    ``prob``: float32 ``[X, Y, Z]`` lesion probability ``softmax(logits)[1]``; ``labels``: int32 lesion instance ids
    (0 = background); ``table``: one dict per lesion (:func:`msxai.lesions.lesion_table`); ``affine``: voxel-to-world.
    ``prob_network`` / ``network_affine``: the probability on the network grid (where saliency is computed);
    ``info``: what the pre-processing did.
    """

    prob: np.ndarray
    labels: np.ndarray
    table: list[dict]
    affine: np.ndarray
    threshold: float = THRESHOLD
    min_volume_mm3: float = MIN_LESION_MM3
    seconds: float = 0.0
    info: dict = field(default_factory=dict)
    prob_network: np.ndarray | None = None
    network_affine: np.ndarray | None = None

    @property
    def mask(self) -> np.ndarray:
        """uint8 mask of the kept lesions (``labels > 0``)."""
        return (self.labels > 0).astype(np.uint8)


def require_path(value: Any, what: str, flag: str) -> Path:
    if value is None or str(value).strip() == "":
        raise InputError(f"no {what} given: pass {flag} PATH")
    return Path(str(value))


def default_preprocessing(orientation: str | None = None, pixdim=None, register: str | bool = "auto",
                          n4: bool = False, skull: str = "auto", normalization: str = "zscore_brain"):
    """The pre-processing chain of :mod:`msxai.transforms` as the bundles' ``inference.json`` lists it (there with
    ``orientation="LAS"`` and ``pixdim=[1, 1, 1]``; ``None`` keeps the FLAIR's grid)."""
    from monai.transforms import Compose, ConcatItemsd, Orientationd, Spacingd

    from msxai.transforms import AlignT1d, BiasCorrectd, BrainMaskd, LoadSequenced, NormalizeIntensityd

    steps = [LoadSequenced(["flair", "t1"])]
    if orientation:
        steps.append(Orientationd("flair", axcodes=orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if pixdim is not None:
        steps.append(Spacingd("flair", pixdim=pixdim, mode="bilinear"))
    steps += [AlignT1d("t1", "flair", register=register), BiasCorrectd(["flair", "t1"], enabled=n4),
              BrainMaskd(["flair", "t1"], skull=skull), NormalizeIntensityd(["flair", "t1"], method=normalization),
              ConcatItemsd(["flair", "t1"], "image")]
    return Compose(steps)


def default_postprocessing(preprocessing, threshold: float = THRESHOLD, min_volume_mm3: float = MIN_LESION_MM3,
                           orientation: str = "LAS"):
    """The post-processing chain as ``inference.json`` lists it: softmax, lesion probability, ``Invertd`` onto the
    FLAIR's native grid, lesion instances, writers."""
    from monai.transforms import Activationsd, Compose, InvertibleTransform, Invertd

    from msxai.transforms import LesionInstancesd, LesionProbabilityd, WriteSegmentationd

    geometric = any(isinstance(t, InvertibleTransform) for t in preprocessing.flatten().transforms)
    return Compose([
        Activationsd("pred", softmax=True),
        LesionProbabilityd("pred", "prob"),
        *([Invertd("prob", transform=preprocessing, orig_keys="flair", nearest_interp=False)] if geometric else []),
        LesionInstancesd("prob", threshold=threshold, min_volume_mm3=min_volume_mm3, orientation=orientation),
        WriteSegmentationd(),
    ])


def probability_logits(prob: np.ndarray) -> torch.Tensor:
    """``[2, X, Y, Z]`` logits ``(log(1 - p), log p)`` whose softmax gives back the lesion probability ``p``."""
    p = torch.as_tensor(np.asarray(prob, dtype=np.float32))
    tiny = torch.finfo(torch.float32).tiny
    return torch.log(torch.stack([1.0 - p, p]).clamp_min(tiny))


def segmentation_result(d: dict) -> SegmentationResult:
    """The :class:`SegmentationResult` of a post-processed data dictionary (``prob``, ``labels``, ``table``,
    ``affine``, ``lesion_rule``)."""
    rule = d.get("lesion_rule", {})
    return SegmentationResult(
        prob=np.asarray(d["prob"], np.float32), labels=np.asarray(d["labels"], np.int32), table=d["table"],
        affine=np.asarray(d["affine"], np.float64), threshold=float(rule.get("threshold", THRESHOLD)),
        min_volume_mm3=float(rule.get("min_volume_mm3", MIN_LESION_MM3)),
    )


def check_tta_flips(tta_flips) -> tuple[tuple[int, ...], ...]:
    """Flip test-time augmentation of a bundle (``tta_flips`` in ``inference.json``): a list of spatial-axis lists,
    each one extra pass on the image flipped along those axes (``[[0]]`` = left-right at 1 mm MNI/RAS-like grids);
    ``[]`` = none."""
    out = []
    for axes in tta_flips or ():
        if isinstance(axes, (int, np.integer)):
            axes = [axes]
        try:
            t = tuple(sorted({int(a) for a in axes}))
        except (TypeError, ValueError):
            raise InputError(f"tta_flips: each entry must be a list of spatial axes 0-2, got {axes!r}") from None
        if not t or any(a not in (0, 1, 2) for a in t):
            raise InputError(f"tta_flips: each entry must be a non-empty list of spatial axes 0-2, got {axes!r}")
        out.append(t)
    return tuple(out)


class EnsembleSegmentation(Bundle):
    """Mean lesion probability of several :class:`msxai.bundle.Bundle` members (e.g. the three bundles), then the
    same post-processing (back to the FLAIR's native grid, threshold and lesion rule). The input is prepared once,
    with the first member's pre-processing chain; a member whose normalisation differs gets the prepared raw image
    normalised its way."""

    def __init__(self, members, threshold: float = THRESHOLD, min_volume_mm3: float = MIN_LESION_MM3):
        members = list(members)
        if not members:
            raise InputError("ensemble: no member segmenters")
        first = members[0]
        super().__init__(first.network, first.inferer, threshold, min_volume_mm3, first.device, first.register,
                         first.n4, first.normalization, (), preprocessing=first.preprocessing,
                         postprocessing=first.postprocessing)
        self.members = members

    def network_pred(self, prepared) -> torch.Tensor:
        from msxai.normalization import normalize

        prob = np.zeros(prepared.shape, dtype=np.float64)
        for m in self.members:
            image = prepared.image if m.normalization == self.normalization else normalize(
                prepared.raw, prepared.brain_mask, m.normalization)
            prob += m.probability(image)
        return probability_logits((prob / len(self.members)).astype(np.float32))

    def segment(self, prepared, output_dir=None) -> SegmentationResult:
        result = super().segment(prepared, output_dir)
        result.info["ensemble"] = len(self.members)
        return result


def write_result(result: SegmentationResult, output_dir: str | Path) -> dict[str, Path]:
    """Write a :class:`SegmentationResult` as NIfTI maps + lesion table (JSON and CSV) on its grid."""
    from msxai.io import save_volume
    from msxai.lesions import write_lesion_table

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / v for k, v in OUTPUT_FILES.items()}
    save_volume(paths["probability"], result.prob.astype(np.float32), result.affine)
    save_volume(paths["mask"], result.mask, result.affine, dtype=np.uint8)
    save_volume(paths["lesions"], result.labels.astype(np.int32), result.affine, dtype=np.int32)
    write_lesion_table(result.table, paths["table_json"], paths["table_csv"])
    return paths


# ---------------------------------------------------------------------------------------------- evaluation
def resolve_cases(cohort_or_cases, split: str = "test") -> list[dict]:
    """Cases ``[{"id", "flair", "t1", "label"}]`` from a cohort folder or ``dataset.json`` (its ``split``), the word
    ``patient26`` / ``real`` (the real MS patient), or an explicit list of such dicts."""
    if isinstance(cohort_or_cases, (list, tuple)):
        cases = [dict(c) for c in cohort_or_cases]
        for c in cases:
            missing = [k for k in ("flair", "t1", "label") if k not in c]
            if missing:
                raise InputError(f"case {c.get('id', '?')} lacks {missing}")
            c.setdefault("id", Path(str(c["flair"])).name)
        if not cases:
            raise InputError("no cases to evaluate")
        return cases
    key = str(cohort_or_cases)
    if key in ("patient26", "real"):
        from msxai.data import REAL_PATIENT_MISSING_REASON, real_patient_paths

        paths = real_patient_paths()
        if paths is None:
            raise InputError(REAL_PATIENT_MISSING_REASON)
        return [{"id": "patient26", "flair": str(paths["flair"]), "t1": str(paths["t1"]), "label": str(paths["truth"])}]
    from msxai.synth import load_dataset

    data = load_dataset(key)
    splits = data.get("splits", {})
    if split in (None, "all"):
        ids = [s["id"] for s in data["subjects"]]
    elif split not in splits:
        raise InputError(f"{key}: no split {split!r} (splits: {sorted(splits)})")
    else:
        ids = list(splits[split])
    by_id = {s["id"]: s for s in data["subjects"]}
    cases = [{"id": i, "flair": by_id[i]["flair"], "t1": by_id[i]["t1"], "label": by_id[i]["label"]} for i in ids]
    if not cases:
        raise InputError(f"{key}: split {split!r} is empty")
    return cases


def evaluate_cases(
    segmenter: Bundle,
    cases: Iterable[dict],
    metrics_path: str | Path | None = None,
    predictions_dir: str | Path | None = None,
    progress: bool = True,
    info: dict | None = None,
) -> dict:
    """Dice, nDSC and lesion-wise TPR/FDR/FNR/F1 of ``segmenter`` on ``cases`` (:func:`msxai.metrics.evaluate_case`
    on the kept lesion instances, on the truth's grid), aggregated (:func:`msxai.metrics.aggregate`), plus ``info``;
    written to ``metrics_path``."""
    from msxai.io import load_volume
    from msxai.metrics import aggregate, evaluate_case

    rows = []
    cases = list(cases)
    for i, case in enumerate(cases):
        result = segmenter.segment(segmenter.prepare(case["flair"], case["t1"]))
        truth = load_volume(case["label"], "label")
        if truth.array.shape != result.labels.shape:
            raise InputError(
                f"{case['id']}: label grid {tuple(truth.array.shape)} differs from the image grid {result.labels.shape}"
            )
        row = {"id": case["id"]}
        row.update(evaluate_case(result.labels, truth.array, result.affine, segmenter.threshold, segmenter.min_volume_mm3))
        row["seconds"] = round(result.seconds, 2)
        rows.append(row)
        if predictions_dir is not None:
            write_result(result, Path(predictions_dir) / str(case["id"]))
        if progress:
            print(f"[{i + 1}/{len(cases)}] {case['id']}: dice {row['dice']:.3f} ndsc {row['ndsc']:.3f} "
                  f"F1 {row.get('F1', float('nan')):.3f} ({row['seconds']:.0f} s)", flush=True)
    metrics = aggregate(rows)
    metrics["threshold"] = segmenter.threshold
    metrics["min_volume_mm3"] = segmenter.min_volume_mm3
    metrics.update(info or {})  # e.g. the weights' sha256 (evaluate.json), checked by msxai.metadata
    if metrics_path is not None:
        metrics_path = Path(metrics_path)
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
