"""Load, run, evaluate and train the msxai MONAI bundles from their own configs.

Contract (used by the saliency engine and the MONAI Label app):

``load_bundle(path, device="cpu") -> Bundle`` with ``network`` (eval mode, weights from ``models/model.pt`` loaded
through the bundle's ``configs/inference.json`` with MONAI's ``ConfigParser``), ``inferer``
(``monai.inferers.SlidingWindowInferer``), ``threshold`` (0.3), ``min_volume_mm3`` (5.0), ``gradcam_layer`` (default
Grad-CAM++ target, a ``named_modules()`` path), ``name``, ``path``, ``device``, and the methods
``prepare(flair_path, t1_path) -> PreparedImage`` and ``segment(prepared) -> SegmentationResult``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from msxai.device import resolve_device
from msxai.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO_ROOT / "bundles"
BUNDLE_NAMES = ("msxai_unet", "msxai_dynunet", "msxai_swinunetr")


def config_bundle_root(name: str | None = None) -> str:
    """``bundle_root`` of a bundle config run by ``python -m monai.bundle run --config_file <bundle>/configs/X.json``:
    the folder holding the config's ``configs/`` (MONAI's ``ConfigWorkflow.config_root_path``). Loaders that know
    the folder (:func:`load_bundle`, ``--bundle_root DIR``) set ``bundle_root`` themselves and never reach this.
    Refuses (no guess, no fallback to a repository's ``bundles/<name>``) when the config is not run that way."""
    import inspect

    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            # MONAI's workflow answers unknown attributes from its config: read the instance's own dict only
            root = vars(owner).get("config_root_path") if type(owner).__name__ == "ConfigWorkflow" else None
            if root is not None:
                root = Path(root).resolve()
                root = root.parent if root.name == "configs" else root
                if (root / "configs").is_dir():
                    return str(root)
            frame = frame.f_back
    finally:
        del frame
    raise InputError(
        f"bundle_root of {name or 'this bundle'} is unknown: run it with `python -m monai.bundle run --config_file "
        "<bundle>/configs/inference.json ...`, pass `--bundle_root /path/to/bundle`, or load it with "
        "msxai.bundle.load_bundle(<bundle folder>)"
    )


def resolve_bundle_dir(path: str | Path) -> Path:
    """A bundle folder from a path or a short name (``unet``, ``msxai_unet``)."""
    p = Path(path)
    if not p.exists():
        for cand in (BUNDLES_DIR / str(path), BUNDLES_DIR / f"msxai_{path}"):
            if cand.is_dir():
                p = cand
                break
    if not (p / "configs" / "inference.json").is_file():
        raise InputError(f"not an msxai bundle (no configs/inference.json): {path}")
    return p.resolve()


def _parser(bundle_dir: Path, configs: tuple[str, ...], device, overrides: dict | None = None):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle_dir / "configs" / c) for c in configs])
    meta = bundle_dir / "configs" / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))
    parser["bundle_root"] = str(bundle_dir)
    if device is not None:  # else the config's own: msxai.device.resolve_device() (MSXAI_DEVICE, else auto)
        parser["device"] = f"$torch.device('{resolve_device(device)}')"
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


@dataclass
class Bundle:
    """A loaded msxai bundle (see the module docstring for the contract)."""

    name: str
    path: Path
    device: torch.device
    network: torch.nn.Module
    inferer: Any
    threshold: float
    min_volume_mm3: float
    gradcam_layer: str
    segmenter: Any
    metadata: dict = field(default_factory=dict)
    parser: Any = None

    def prepare(self, flair_path, t1_path):
        """FLAIR + T1 paths -> :class:`msxai.preprocess.PreparedImage` (z-scored ``[2, X, Y, Z]``)."""
        return self.segmenter.prepare(flair_path, t1_path)

    def segment(self, prepared):
        """PreparedImage -> :class:`msxai.inference.SegmentationResult` (prob, labels, table, affine)."""
        return self.segmenter.predict(prepared)

    def run(self, flair_path, t1_path, output_dir):
        """Segment and write probability/mask/lesions NIfTI + lesions.json/csv into ``output_dir``."""
        return self.segmenter.run(flair_path, t1_path, output_dir)

    @property
    def gradcam_layers(self) -> list[str]:
        return list(self.metadata.get("msxai", {}).get("gradcam_layers", [self.gradcam_layer]))


def load_bundle(path: str | Path, device: str | torch.device = "cpu", **overrides) -> Bundle:
    """Instantiate a bundle's network (with ``models/model.pt``), inferer and segmenter from its inference.json."""
    bundle_dir = resolve_bundle_dir(path)
    parser = _parser(bundle_dir, ("inference.json",), device, overrides)
    segmenter = parser.get_parsed_content("segmenter")
    meta = parser.get("_meta_", {}) or {}
    name = meta.get("name") or bundle_dir.name
    gradcam_layer = parser.get("gradcam_layer") or meta.get("msxai", {}).get("gradcam_layer")
    return Bundle(
        name=str(bundle_dir.name),
        path=bundle_dir,
        device=segmenter.device,
        network=segmenter.network,
        inferer=segmenter.inferer,
        threshold=segmenter.threshold,
        min_volume_mm3=segmenter.min_volume_mm3,
        gradcam_layer=str(gradcam_layer),
        segmenter=segmenter,
        metadata={**meta, "display_name": name},
        parser=parser,
    )


def evaluate_bundle(
    bundle_dir: str | Path,
    cohort_or_cases,
    split: str = "test",
    device: str | torch.device = "cpu",
    metrics_path: str | Path | None = None,
    predictions_dir: str | Path | None = None,
    **overrides,
) -> dict:
    """Run ``configs/evaluate.json`` (merged over inference.json) on a cohort split, ``patient26`` or a case list.

    Returns the aggregated metrics (``{"n_cases", "mean", "std", "cases", ...}``, see :func:`msxai.metrics.aggregate`)
    and writes them to ``metrics_path`` (default: the config's, ``<bundle>/eval/metrics_<split>.json``).
    """
    from msxai.inference import resolve_cases

    bundle_dir = resolve_bundle_dir(bundle_dir)
    cases = resolve_cases(cohort_or_cases, split)
    ov = dict(overrides)
    ov["cases"] = cases
    ov["split"] = "patient26" if str(cohort_or_cases) in ("patient26", "real") else split
    if metrics_path is not None:
        ov["metrics_path"] = str(metrics_path)
    if predictions_dir is not None:
        ov["predictions_dir"] = str(predictions_dir)
    parser = _parser(bundle_dir, ("inference.json", "evaluate.json"), device, ov)
    return parser.get_parsed_content("evaluate")


def train_bundle(
    bundle_dir: str | Path,
    cohort: str | Path,
    epochs: int | None = None,
    max_minutes: float | None = None,
    device: str | torch.device | None = None,
    num_threads: int | None = None,
    save_every: int | None = None,
    **overrides,
) -> dict:
    """Run ``configs/train.json`` of a bundle on a cohort (its train/val splits); the best network by validation
    Dice is written to ``<bundle>/models/model.pt``. With ``save_every=N`` the network is also kept every N epochs
    as ``<log_dir>/checkpoints/model_epoch=K.pt`` (to pick a checkpoint on other data afterwards, e.g. a real
    validation patient). Returns a summary (best metric, epoch, minutes, log folder)."""
    bundle_dir = resolve_bundle_dir(bundle_dir)
    cohort = Path(cohort)
    if not (cohort / "dataset.json").is_file() and not (cohort.is_file() and cohort.name.endswith(".json")):
        raise InputError(f"cohort has no dataset.json: {cohort} (make one with `msxai synth --out DIR`)")
    ov = dict(overrides)
    ov["cohort"] = str(cohort.resolve())
    if epochs is not None:
        ov["epochs"] = int(epochs)
    if max_minutes is not None:
        ov["max_minutes"] = float(max_minutes)
    if num_threads is not None:
        ov["num_threads"] = int(num_threads)
    parser = _parser(bundle_dir, ("train.json",), device, ov)
    if save_every is not None:
        if int(save_every) < 1:
            raise InputError(f"save_every must be a positive number of epochs, got {save_every}")
        parser["train"]["handlers"].append({
            "_target_": "CheckpointSaver",
            "save_dir": "$@log_dir + '/checkpoints'",
            "save_dict": {"model": "@network"},
            "save_interval": int(save_every),
            "epoch_level": True,
            "n_saved": None,
            "file_prefix": "",
        })
    for i in range(len(parser["initialize"])):
        parser.get_parsed_content(f"initialize#{i}")
    trainer = parser.get_parsed_content("trainer")
    trainer.run()
    return parser.get_parsed_content("summary")


def verify_bundle_metadata(bundle_dir: str | Path, schema: str | Path | None = None) -> None:
    """``monai.bundle verify_metadata`` offline, against the project's schema (``configs/bundle_schema.json``)."""
    from monai.bundle import verify_metadata

    bundle_dir = resolve_bundle_dir(bundle_dir)
    schema = Path(schema) if schema is not None else REPO_ROOT / "configs" / "bundle_schema.json"
    if not schema.is_file():
        raise InputError(f"schema not found: {schema}")
    verify_metadata(meta_file=str(bundle_dir / "configs" / "metadata.json"), filepath=str(schema))
