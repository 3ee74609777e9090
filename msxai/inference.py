"""The sliding-window lesion segmentation pipeline shared by every bundle's ``inference.json`` and ``msxai segment``.

``LesionSegmentation(network, inferer, threshold, min_volume_mm3, device)``:

1. :meth:`prepare` loads FLAIR + T1 (MPRAGE) with :func:`msxai.preprocess.prepare_image` (same grid required unless
   ``register=True``; per-channel z-score inside the brain);
2. :meth:`predict` runs the bundle's ``monai.inferers.SlidingWindowInferer`` (96^3 windows, overlap 0.25, gaussian
   blending by default), takes ``softmax(logits)[1]`` as the lesion probability, thresholds it at 0.3 and keeps the
   18-connected components of at least 5 mm^3 (:func:`msxai.lesions.lesion_instances`);
3. :meth:`run` writes ``probability.nii.gz`` (float32), ``mask.nii.gz`` (uint8, the kept lesions),
   ``lesions.nii.gz`` (int32 instance ids), ``lesions.json`` and ``lesions.csv`` on the input grid.

:func:`evaluate_cases` scores a segmenter on a list of cases (Dice, nDSC, lesion-wise TPR/FDR/FNR/F1 via
:mod:`msxai.metrics`) and :func:`resolve_cases` turns a cohort folder / ``dataset.json`` / the word ``patient26`` into
such a list.
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
from msxai.errors import InputError
from msxai.networks import plain_logits

OUTPUT_FILES = {
    "probability": "probability.nii.gz",
    "mask": "mask.nii.gz",
    "lesions": "lesions.nii.gz",
    "table_json": "lesions.json",
    "table_csv": "lesions.csv",
}


@dataclass
class SegmentationResult:
    """Output of one segmentation on the prepared grid.

    ``prob``: float32 ``[X, Y, Z]`` lesion probability ``softmax(logits)[1]``; ``labels``: int32 lesion instance ids
    (0 = background); ``table``: one dict per lesion (:func:`msxai.lesions.lesion_table`); ``affine``: voxel-to-world.
    """

    prob: np.ndarray
    labels: np.ndarray
    table: list[dict]
    affine: np.ndarray
    threshold: float = THRESHOLD
    min_volume_mm3: float = MIN_LESION_MM3
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray:
        """uint8 mask of the kept lesions (``labels > 0``)."""
        return (self.labels > 0).astype(np.uint8)


def _require_path(value: Any, what: str, flag: str) -> Path:
    if value is None or str(value).strip() == "":
        raise InputError(f"no {what} image given: pass {flag} PATH")
    return Path(str(value))


class LesionSegmentation:
    """FLAIR + T1 -> lesion probability, instances and table with one network and one sliding-window inferer."""

    def __init__(
        self,
        network: torch.nn.Module,
        inferer,
        threshold: float = THRESHOLD,
        min_volume_mm3: float = MIN_LESION_MM3,
        device: str | torch.device = "cpu",
        register: bool = False,
        n4: bool = False,
        normalization: str = "zscore_brain",
        tta_flips=(),
    ):
        from msxai.normalization import check_normalization

        if not 0.0 <= float(threshold) < 1.0:
            raise InputError(f"threshold must be in [0, 1), got {threshold}")
        if float(min_volume_mm3) < 0:
            raise InputError(f"min_volume_mm3 must be >= 0, got {min_volume_mm3}")
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.inferer = inferer
        self.threshold = float(threshold)
        self.min_volume_mm3 = float(min_volume_mm3)
        self.register = bool(register)
        self.n4 = bool(n4)
        self.normalization = check_normalization(normalization)
        self.tta_flips = check_tta_flips(tta_flips)

    # ------------------------------------------------------------------ steps
    def prepare(self, flair_path, t1_path):
        """Load and normalise a FLAIR/T1 pair (:func:`msxai.preprocess.prepare_image`)."""
        from msxai.preprocess import prepare_image

        flair = _require_path(flair_path, "FLAIR", "--flair")
        t1 = _require_path(t1_path, "T1 (MPRAGE)", "--t1")
        return prepare_image(flair, t1, register=self.register, n4=self.n4, normalization=self.normalization)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return plain_logits(self.network(x))

    @torch.no_grad()
    def logits(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Sliding-window logits ``[1, 2, X, Y, Z]`` (float32, on CPU) of a ``[2, X, Y, Z]`` image."""
        x = torch.as_tensor(np.asarray(image, dtype=np.float32) if not torch.is_tensor(image) else image)
        if x.ndim != 4 or x.shape[0] != 2:
            raise InputError(f"expected a [2, X, Y, Z] image (FLAIR, T1), got shape {tuple(x.shape)}")
        self.network.eval()
        out = self.inferer(x[None].to(self.device, torch.float32), self._forward)
        out = out.as_tensor() if hasattr(out, "as_tensor") else out
        return out.float().cpu()

    def probability(self, image) -> np.ndarray:
        """Lesion probability ``softmax(logits)[1]`` as float32 ``[X, Y, Z]``; with ``tta_flips`` the mean of the
        softmax over the image and its flipped copies (each flipped back), one sliding-window pass each."""
        prob = torch.softmax(self.logits(image), dim=1)[0, 1]
        if self.tta_flips:
            x = torch.as_tensor(np.asarray(image, dtype=np.float32) if not torch.is_tensor(image) else image)
            for axes in self.tta_flips:
                dims = [a + 1 for a in axes]  # spatial axes of the [2, X, Y, Z] image
                p = torch.softmax(self.logits(torch.flip(x, dims)), dim=1)[0, 1]
                prob = prob + torch.flip(p, [a for a in axes])
            prob = prob / (1 + len(self.tta_flips))
        return prob.numpy().astype(np.float32)

    def postprocess(self, prob: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, list[dict]]:
        """Threshold + 18-connected components >= ``min_volume_mm3`` -> (int32 labels, lesion table)."""
        from msxai.lesions import lesion_instances, lesion_table

        labels = lesion_instances(prob, threshold=self.threshold, min_volume_mm3=self.min_volume_mm3, affine=affine)
        labels = np.asarray(labels, dtype=np.int32)
        return labels, lesion_table(labels, affine, prob=prob)

    def predict(self, prepared) -> SegmentationResult:
        """Segment a :class:`msxai.preprocess.PreparedImage` (or anything with ``image`` and ``affine``)."""
        t0 = time.perf_counter()
        prob = self.probability(prepared.image)
        labels, table = self.postprocess(prob, prepared.affine)
        return SegmentationResult(
            prob=prob,
            labels=labels,
            table=table,
            affine=np.asarray(prepared.affine, dtype=np.float64),
            threshold=self.threshold,
            min_volume_mm3=self.min_volume_mm3,
            seconds=time.perf_counter() - t0,
        )

    def segment(self, flair_path, t1_path) -> SegmentationResult:
        return self.predict(self.prepare(flair_path, t1_path))

    def run(self, flair_path, t1_path, output_dir) -> dict[str, Path]:
        """Segment and write the outputs into ``output_dir``; returns ``{kind: path}``."""
        out_dir = _require_path(output_dir, "output folder", "--output_dir")
        result = self.segment(flair_path, t1_path)
        return write_result(result, out_dir)


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


class EnsembleSegmentation(LesionSegmentation):
    """Mean lesion probability of several :class:`LesionSegmentation` members (e.g. the three bundles), then the
    same threshold and lesion rule. The input is prepared once (``register``/``n4`` of the first member); a member
    whose normalisation differs gets the prepared raw image normalised its way."""

    def __init__(self, members, threshold: float = THRESHOLD, min_volume_mm3: float = MIN_LESION_MM3):
        members = list(members)
        if not members:
            raise InputError("ensemble: no member segmenters")
        first = members[0]
        super().__init__(first.network, first.inferer, threshold, min_volume_mm3, first.device, first.register,
                         first.n4, first.normalization, ())
        self.members = members

    def predict(self, prepared) -> SegmentationResult:
        from msxai.normalization import normalize

        t0 = time.perf_counter()
        prob = np.zeros(prepared.shape, dtype=np.float64)
        for m in self.members:
            image = prepared.image if m.normalization == self.normalization else normalize(
                prepared.raw, prepared.brain_mask, m.normalization)
            prob += m.probability(image)
        prob = (prob / len(self.members)).astype(np.float32)
        labels, table = self.postprocess(prob, prepared.affine)
        return SegmentationResult(prob=prob, labels=labels, table=table,
                                  affine=np.asarray(prepared.affine, dtype=np.float64), threshold=self.threshold,
                                  min_volume_mm3=self.min_volume_mm3, seconds=time.perf_counter() - t0,
                                  info={"ensemble": len(self.members)})


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
    segmenter: LesionSegmentation,
    cases: Iterable[dict],
    metrics_path: str | Path | None = None,
    predictions_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Dice, nDSC and lesion-wise TPR/FDR/FNR/F1 of ``segmenter`` on ``cases`` (:func:`msxai.metrics.evaluate_case`
    on the kept lesion instances), aggregated (:func:`msxai.metrics.aggregate`); written to ``metrics_path``."""
    from msxai.io import load_volume
    from msxai.metrics import aggregate, evaluate_case

    rows = []
    cases = list(cases)
    for i, case in enumerate(cases):
        prepared = segmenter.prepare(case["flair"], case["t1"])
        result = segmenter.predict(prepared)
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
    if metrics_path is not None:
        metrics_path = Path(metrics_path)
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
