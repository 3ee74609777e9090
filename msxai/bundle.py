"""Load, run, evaluate and train the msxai MONAI bundles from their own configs.

:class:`Bundle` is the one model wrapper of a bundle: ``configs/inference.json`` builds it (its ``segmenter``), and
``msxai segment``, ``python -m monai.bundle run``, the MONAI Label app, the cohort runs and the experiments use it.
Contract:

``load_bundle(path, device="cpu", **overrides) -> Bundle`` with ``network`` (eval mode, weights from
``models/model.pt``), ``inferer`` (``monai.inferers.SlidingWindowInferer``) and ``spec`` (its exact blending),
``preprocessing`` / ``postprocessing`` (the MONAI chains of :mod:`msxai.transforms`), ``threshold`` (0.3),
``min_volume_mm3`` (5.0), ``gradcam_layer`` (default Grad-CAM++ target, a ``named_modules()`` path), ``name``,
``path``, ``device``, ``source`` (where the weights came from, with their sha256) and the methods
``prepare(flair, t1) -> PreparedImage`` (the one prepare: NIfTI or DICOM in, network grid out),
``segment(prepared) -> SegmentationResult`` (on the FLAIR's native grid), ``segment_files(flair, t1)``,
``run(flair, t1, output_dir)``, ``probability(image, region=None)``, ``lesions(prob, affine)``,
``explain(image, domains, ...)`` and ``randomized(seed)``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from msxai import MIN_LESION_MM3, THRESHOLD
from msxai.device import resolve_device
from msxai.errors import InputError
from msxai.networks import plain_logits
from msxai.paths import BUNDLES_ENV, bundles_dir, checkout_path

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
    """A bundle folder from a path, or from a short name (``unet``, ``msxai_unet``) in
    :func:`msxai.paths.bundles_dir` (``$MSXAI_BUNDLES``, or a development checkout's ``bundles/``)."""
    p = Path(path)
    root = bundles_dir()
    if not p.exists() and root is not None:
        for cand in (root / str(path), root / f"msxai_{path}"):
            if cand.is_dir():
                p = cand
                break
    if not (p / "configs" / "inference.json").is_file():
        if not p.exists() and root is None:
            raise InputError(f"bundle {str(path)!r} not found: pass the bundle folder (--bundle DIR), or set "
                             f"{BUNDLES_ENV} to the folder holding msxai_<name>/ to use short names")
        raise InputError(f"not an msxai bundle (no configs/inference.json): {path}"
                         + (f" (short names are looked up in {root})" if not p.exists() else ""))
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


class Bundle:
    """One msxai bundle: its network (with weights), sliding-window inferer, pre-/post-processing chains and lesion
    rule, and every way of running them. The one model wrapper: ``configs/inference.json`` builds it (its
    ``segmenter``), :func:`load_bundle` returns it, and the CLI, the MONAI Label app, the cohort runs and the
    experiments use it (see the module docstring for the contract)."""

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
        name: str = "",
        path: str | Path | None = None,
        gradcam_layer: str | None = None,
        metadata: dict | None = None,
        source: str = "",
        info: dict | None = None,
    ):
        from msxai.inference import check_tta_flips, default_postprocessing, default_preprocessing
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
        self.name = str(name or "")
        self.path = Path(path) if path not in (None, "") else None
        self.gradcam_layer = None if gradcam_layer in (None, "") else str(gradcam_layer)
        self.metadata = dict(metadata or {})
        self.source = str(source or "")
        self.info = dict(info or {})
        self.parser = None

    @property
    def spec(self):
        """The inferer as a :class:`msxai.saliency.sliding.SlidingWindowSpec` (the exact window blending)."""
        from msxai.saliency.sliding import SlidingWindowSpec

        return SlidingWindowSpec.from_inferer(self.inferer)

    @property
    def gradcam_layers(self) -> list[str]:
        return list(self.metadata.get("msxai", {}).get("gradcam_layers", [self.gradcam_layer]))

    # ------------------------------------------------------------------------------------------ the one prepare
    def prepare(self, flair_path, t1_path):
        """Run the pre-processing chain on a FLAIR/T1 pair (files or DICOM series folders) ->
        :class:`msxai.preprocess.PreparedImage` on the network grid."""
        from msxai.inference import require_path
        from msxai.preprocess import PreparedImage
        from msxai.transforms import INFO_KEY, run_chain

        flair = require_path(flair_path, "FLAIR image", "--flair")
        t1 = require_path(t1_path, "T1 (MPRAGE) image", "--t1")
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

    # -------------------------------------------------------------------------------------- the network grid
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

    def probability(self, image, region: np.ndarray | None = None) -> np.ndarray:
        """Lesion probability ``softmax(logits)[1]`` as float32 ``[X, Y, Z]`` on the image's (network) grid; with
        ``tta_flips`` the mean of the softmax over the image and its flipped copies (each flipped back), one
        sliding-window pass each. With ``region`` (bool mask; no flips) only the windows covering it are evaluated,
        through the exact sliding-window function of :mod:`msxai.saliency.sliding`: values are exact inside the
        region and 0 outside the windows' union (do not read them there)."""
        if region is not None and not self.tta_flips:
            return self._region_probability(image, region)
        prob = torch.softmax(self.logits(image), dim=1)[0, 1]
        if self.tta_flips:
            x = torch.as_tensor(np.asarray(image, dtype=np.float32) if not torch.is_tensor(image) else image)
            for axes in self.tta_flips:
                dims = [a + 1 for a in axes]  # spatial axes of the [2, X, Y, Z] image
                p = torch.softmax(self.logits(torch.flip(x, dims)), dim=1)[0, 1]
                prob = prob + torch.flip(p, [a for a in axes])
            prob = prob / (1 + len(self.tta_flips))
        return prob.numpy().astype(np.float32)

    @torch.no_grad()
    def _region_probability(self, image, region) -> np.ndarray:
        from msxai.saliency.sliding import sliding_window_logits
        from msxai.saliency.smoothgrad import explaining, network_device

        spec = self.spec
        img = torch.as_tensor(np.asarray(image, np.float32))
        grid = spec.grid(img.shape[1:])
        windows = grid.windows_covering(np.asarray(region, bool))
        if not windows:
            raise InputError("probability: the region is empty")
        with explaining(self.network):
            logits = sliding_window_logits(self.network, img[None].to(network_device(self.network)), spec,
                                           windows=windows, grid=grid)
        prob = torch.softmax(logits[0].float(), dim=0)[1].cpu().numpy()
        pm = np.zeros(grid.padded_shape, bool)
        for w in windows:
            pm[grid.window_slices(w)] = True
        covered = grid.crop_output(torch.as_tensor(pm)).numpy()
        return np.where(covered, prob, 0.0).astype(np.float32)

    def network_pred(self, prepared) -> torch.Tensor:
        """The post-processing chain's ``pred`` ``[2, X, Y, Z]`` on the network grid: the logits; with ``tta_flips``
        the log of the averaged class probabilities ``(1 - p, p)`` (logits whose softmax is that average)."""
        from msxai.inference import probability_logits

        if not self.tta_flips:
            return self.logits(prepared.image)[0]
        return probability_logits(self.probability(prepared.image))

    def lesions(self, prob: np.ndarray, affine) -> np.ndarray:
        """Lesion instances of a probability on its grid (threshold, 18-connected, >= ``min_volume_mm3``), ids in
        the raster order of the training orientation."""
        from msxai.transforms import oriented_instances

        return oriented_instances(prob, affine, self.threshold, self.min_volume_mm3)

    def postprocess(self, prob: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, list[dict]]:
        """:meth:`lesions` and their table."""
        from msxai.lesions import lesion_table

        labels = self.lesions(prob, affine)
        return labels, lesion_table(labels, affine, prob=prob)

    def explain(self, image: np.ndarray, domains: dict, n_samples: int, aggregation: str = "max", seed: int = 0,
                sigma_fraction: float = 0.05):
        """Instance SmoothGrad maps ``[C, X, Y, Z]`` of several domains on the network grid: yields
        ``(name, map)``."""
        from msxai.saliency.smoothgrad import instance_smoothgrad_many

        yield from instance_smoothgrad_many(self.network, image, domains, self.spec, n_samples=n_samples,
                                            sigma_fraction=sigma_fraction, aggregation=aggregation, seed=seed)

    # --------------------------------------------------------------------------------------- back to the scan
    def segment(self, prepared, output_dir=None):
        """Segment a :class:`msxai.preprocess.PreparedImage`: inferer, then the post-processing chain (results on
        the FLAIR's native grid, :class:`msxai.inference.SegmentationResult`; written to ``output_dir`` when
        given). Anything else with ``image`` and ``affine`` is segmented on its own grid."""
        from monai.data import MetaTensor

        from msxai.inference import SegmentationResult, segmentation_result
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
        the very objects that ran): this bundle's own, or a copy pointing at the chain of another instance that
        prepared the image."""
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

    def segment_files(self, flair_path, t1_path):
        """:meth:`prepare` then :meth:`segment`."""
        return self.segment(self.prepare(flair_path, t1_path))

    def run(self, flair_path, t1_path, output_dir) -> dict[str, Path]:
        """Segment and write the outputs into ``output_dir`` (``python -m monai.bundle run``); returns
        ``{kind: path}``."""
        from msxai.inference import require_path, write_result

        out = require_path(output_dir, "output folder", "--output_dir")
        result = self.segment(self.prepare(flair_path, t1_path), output_dir=out)
        return {k: Path(v) for k, v in result.info.get("files", {}).items()} or write_result(result, out)

    # -------------------------------------------------------------------------------------------- experiments
    def randomized(self, seed: int = 0) -> "Bundle":
        """The same architecture with re-initialised weights (model-randomisation sanity check, Adebayo et al. 2018).

        Every submodule with ``reset_parameters`` is re-initialised with its own default initialiser (seeded with
        ``torch.manual_seed(seed)``); parameters that this leaves unchanged (e.g. a Swin transformer's relative
        position tables, created without such a method) have their elements randomly permuted, so no trained weight
        keeps its place. Constant parameters (e.g. norm weights still at 1) stay constant."""
        import copy

        net = copy.deepcopy(self.network)
        original = {n: p.detach().clone() for n, p in self.network.named_parameters()}
        torch.manual_seed(int(seed))
        for m in net.modules():
            if m is not net and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for n, p in net.named_parameters():
                if p.numel() > 1 and torch.equal(p.detach().cpu(), original[n].cpu()):
                    perm = torch.randperm(p.numel(), generator=gen).to(p.device)
                    p.copy_(p.detach().reshape(-1)[perm].reshape(p.shape))
        out = copy.copy(self)
        out.network = net.eval()
        out.name = f"{self.name} (randomised)"
        return out


def _weights_source(bundle_dir: Path) -> tuple[str, dict]:
    """``"<dir> (models/model.pt sha256 <12>, modified <date>)"`` and ``{"weights_sha256", ...}`` for reports."""
    import datetime as _dt

    from msxai.io import file_sha256

    f = bundle_dir / "models" / "model.pt"
    if not f.is_file():
        return f"{bundle_dir} (weights file not found)", {"bundle_dir": str(bundle_dir)}
    full = file_sha256(f)
    stamp = _dt.datetime.fromtimestamp(f.stat().st_mtime, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{bundle_dir} (models/model.pt sha256 {full[:12]}, modified {stamp})",
            {"weights_sha256": full, "weights_modified": stamp, "bundle_dir": str(bundle_dir)})


def load_bundle(path: str | Path, device: str | torch.device = "cpu", **overrides) -> Bundle:
    """The bundle of ``path`` as its ``configs/inference.json`` builds it (``segmenter``: network with
    ``models/model.pt``, inferer, chains, lesion rule), ``bundle_root`` = that folder; ``overrides`` set config
    entries (``register="always"``, ``tta_flips=[[0]]``, ...)."""
    bundle_dir = resolve_bundle_dir(path)
    parser = _parser(bundle_dir, ("inference.json",), device, overrides)
    bundle = parser.get_parsed_content("segmenter")
    if not isinstance(bundle, Bundle):
        raise InputError(f"{bundle_dir}: configs/inference.json's segmenter is a {type(bundle).__name__}, not "
                         "msxai.bundle.Bundle")
    meta = parser.get("_meta_", {}) or {}
    bundle.name = str(bundle_dir.name)
    bundle.path = bundle_dir
    if bundle.gradcam_layer is None:
        layer = parser.get("gradcam_layer") or meta.get("msxai", {}).get("gradcam_layer")
        bundle.gradcam_layer = str(layer) if layer else None
    bundle.metadata = {**meta, "display_name": meta.get("name") or bundle_dir.name}
    bundle.source, bundle.info = _weights_source(bundle_dir)
    bundle.parser = parser
    return bundle


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
    """``monai.bundle verify_metadata`` offline, against the project's schema (``configs/bundle_schema.json`` of a
    development checkout unless ``schema`` is given)."""
    from monai.bundle import verify_metadata

    bundle_dir = resolve_bundle_dir(bundle_dir)
    schema = Path(schema) if schema is not None else checkout_path("configs", "bundle_schema.json")
    if schema is None:
        raise InputError("no metadata schema: pass schema= (the repository's configs/bundle_schema.json)")
    if not schema.is_file():
        raise InputError(f"schema not found: {schema}")
    verify_metadata(meta_file=str(bundle_dir / "configs" / "metadata.json"), filepath=str(schema))
