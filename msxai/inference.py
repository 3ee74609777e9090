"""The lesion segmentation pipeline shared by every bundle's ``inference.json``, ``msxai segment``, the MONAI Label
tasks and the DICOMweb path.

``LesionSegmentation(network, inferer, preprocessing, postprocessing, threshold, min_volume_mm3, device)``:

1. :meth:`prepare` runs the bundle's pre-processing chain (:mod:`msxai.transforms`: FLAIR/T1 from NIfTI or DICOM,
   reoriented and resampled onto the network grid, T1 aligned, brain mask, normalisation) -> ``PreparedImage``;
2. :meth:`predict` runs the bundle's ``monai.inferers.SlidingWindowInferer`` (96^3 windows, overlap 0.25, gaussian
   blending by default) and the post-processing chain: softmax, lesion probability ``softmax(logits)[1]``, inverted
   back to the FLAIR's native grid and orientation, thresholded at 0.3, 18-connected components of at least 5 mm^3
   (native mm^3);
3. :meth:`run` also writes ``probability.nii.gz`` (float32), ``mask.nii.gz`` (uint8, the kept lesions),
   ``lesions.nii.gz`` (int32 instance ids), ``lesions.json``, ``lesions.csv`` and ``preprocessing.json`` on the
   FLAIR's native grid.

Built without chains (a bare network, in tests), it keeps the FLAIR's grid (:func:`default_preprocessing` without
orientation and spacing). :func:`evaluate_cases` scores a segmenter on a list of cases (Dice, nDSC, lesion-wise
TPR/FDR/FNR/F1 via :mod:`msxai.metrics`, on the truth's grid = the FLAIR's) and :func:`resolve_cases` turns a cohort
folder / ``dataset.json`` / the word ``patient26`` into such a list.
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


def _require_path(value: Any, what: str, flag: str) -> Path:
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


class LesionSegmentation:
    """FLAIR + T1 -> lesion probability, instances and table with one network, one sliding-window inferer and the
    bundle's pre-/post-processing chains."""

    def __init__(
        self,
        network: torch.nn.Module,
        inferer,
        threshold: float = THRESHOLD,
        min_volume_mm3: float = MIN_LESION_MM3,
        device: str | torch.device = "cpu",
        register: str | bool = "auto",
        n4: bool = False,
        normalization: str = "zscore_brain",
        tta_flips=(),
        preprocessing=None,
        postprocessing=None,
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
        self.register = register
        self.n4 = bool(n4)
        self.normalization = check_normalization(normalization)
        self.tta_flips = check_tta_flips(tta_flips)
        self.preprocessing = preprocessing if preprocessing is not None else default_preprocessing(
            register=register, n4=n4, normalization=self.normalization)
        self.postprocessing = postprocessing if postprocessing is not None else default_postprocessing(
            self.preprocessing, self.threshold, self.min_volume_mm3)

    # ------------------------------------------------------------------ steps
    def prepare(self, flair_path, t1_path):
        """Run the pre-processing chain on a FLAIR/T1 pair -> :class:`msxai.preprocess.PreparedImage`."""
        from msxai.preprocess import PreparedImage
        from msxai.transforms import INFO_KEY, run_chain

        flair = _require_path(flair_path, "FLAIR image", "--flair")
        t1 = _require_path(t1_path, "T1 (MPRAGE) image", "--t1")
        d = run_chain(self.preprocessing, {"flair": str(flair), "t1": str(t1)})
        ref = d["flair"]
        native = ref.meta.get("original_affine")
        info = d.get(INFO_KEY, {})
        return PreparedImage(
            image=d["image"].detach().cpu().numpy().astype(np.float32),
            affine=np.asarray(ref.affine, dtype=np.float64),
            brain_mask=np.asarray(d["brain_mask"], bool),
            raw=np.asarray(d.get("raw", d["image"].detach().cpu().numpy()), np.float32),
            native_affine=np.asarray(native, dtype=np.float64) if native is not None else None,
            native_shape=tuple(info.get("flair", {}).get("shape", ref.shape[1:])),
            data=d,
            info=info,
            chain=self.preprocessing,
        )

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
        """Lesion probability ``softmax(logits)[1]`` as float32 ``[X, Y, Z]`` on the image's (network) grid; with
        ``tta_flips`` the mean of the softmax over the image and its flipped copies (each flipped back), one
        sliding-window pass each."""
        prob = torch.softmax(self.logits(image), dim=1)[0, 1]
        if self.tta_flips:
            x = torch.as_tensor(np.asarray(image, dtype=np.float32) if not torch.is_tensor(image) else image)
            for axes in self.tta_flips:
                dims = [a + 1 for a in axes]  # spatial axes of the [2, X, Y, Z] image
                p = torch.softmax(self.logits(torch.flip(x, dims)), dim=1)[0, 1]
                prob = prob + torch.flip(p, [a for a in axes])
            prob = prob / (1 + len(self.tta_flips))
        return prob.numpy().astype(np.float32)

    def network_pred(self, prepared) -> torch.Tensor:
        """The post-processing chain's ``pred`` ``[2, X, Y, Z]`` on the network grid: the logits; with ``tta_flips``
        the log of the averaged class probabilities ``(1 - p, p)`` (logits whose softmax is that average)."""
        if not self.tta_flips:
            return self.logits(prepared.image)[0]
        return probability_logits(self.probability(prepared.image))

    def postprocess(self, prob: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, list[dict]]:
        """Threshold + 18-connected components >= ``min_volume_mm3`` on the grid of ``prob`` -> (labels, table)."""
        from msxai.lesions import lesion_table
        from msxai.transforms import oriented_instances

        labels = oriented_instances(prob, affine, self.threshold, self.min_volume_mm3)
        return labels, lesion_table(labels, affine, prob=prob)

    def predict(self, prepared, output_dir=None) -> SegmentationResult:
        """Segment a :class:`msxai.preprocess.PreparedImage`: inferer, then the post-processing chain (results on
        the FLAIR's native grid; written to ``output_dir`` when given). Anything else with ``image`` and ``affine``
        is segmented on its own grid."""
        from monai.data import MetaTensor

        from msxai.transforms import run_chain

        t0 = time.perf_counter()
        pred = self.network_pred(prepared)
        prob_net = torch.softmax(pred, dim=0)[1].numpy().astype(np.float32)
        data = getattr(prepared, "data", None)
        if data is None:
            labels, table = self.postprocess(prob_net, prepared.affine)
            result = SegmentationResult(prob_net, labels, table, np.asarray(prepared.affine, np.float64),
                                        self.threshold, self.min_volume_mm3, prob_network=prob_net,
                                        network_affine=np.asarray(prepared.affine, np.float64))
        else:
            d = dict(data)
            d["pred"] = MetaTensor(pred, meta=dict(data["image"].meta))
            if output_dir is not None:
                d["output_dir"] = str(output_dir)
            d = run_chain(self._postprocessing_for(getattr(prepared, "chain", None)), d)
            result = segmentation_result(d)
            result.prob_network, result.network_affine = prob_net, np.asarray(prepared.affine, np.float64)
            result.info = dict(getattr(prepared, "info", {}) or {})
            if "files" in d:
                result.info["files"] = {k: str(v) for k, v in d["files"].items()}
        result.seconds = time.perf_counter() - t0
        return result

    def _postprocessing_for(self, chain):
        """The post-processing whose ``Invertd`` undoes ``chain`` (MONAI checks that the transforms it inverts are
        the very objects that ran): this segmenter's own, or a copy pointing at the chain of another segmenter that
        prepared the image (e.g. another instance of the same bundle)."""
        if chain is None or chain is self.preprocessing:
            return self.postprocessing
        import copy

        from monai.transforms import Compose, Invertd

        steps = []
        for t in self.postprocessing.transforms:
            if isinstance(t, Invertd) and t.transform is self.preprocessing:
                t = copy.copy(t)
                t.transform = chain
            steps.append(t)
        return Compose(steps)

    def segment(self, flair_path, t1_path) -> SegmentationResult:
        return self.predict(self.prepare(flair_path, t1_path))

    def run(self, flair_path, t1_path, output_dir) -> dict[str, Path]:
        """Segment and write the outputs into ``output_dir``; returns ``{kind: path}``."""
        out = _require_path(output_dir, "output folder", "--output_dir")
        result = self.predict(self.prepare(flair_path, t1_path), output_dir=out)
        return {k: Path(v) for k, v in result.info.get("files", {}).items()} or write_result(result, out)


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


class EnsembleSegmentation(LesionSegmentation):
    """Mean lesion probability of several :class:`LesionSegmentation` members (e.g. the three bundles), then the
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

    def predict(self, prepared, output_dir=None) -> SegmentationResult:
        result = super().predict(prepared, output_dir)
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
    segmenter: LesionSegmentation,
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
    metrics.update(info or {})  # e.g. the weights' sha256 (evaluate.json), checked by msxai.metadata
    if metrics_path is not None:
        metrics_path = Path(metrics_path)
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
