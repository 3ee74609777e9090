"""Pieces the bundles' ``configs/train.json`` assembles into MONAI/ignite engines.

- :func:`cohort_datalist`: a cohort's split as ``[{"id", "flair", "t1", "label"}]`` (``dataset.json`` of ``msxai synth``);
  :func:`mixed_datalist` appends the subjects of extra cohorts (real tissue, :mod:`msxai.realtissue`);
- the subjects go through the bundle's own pre-processing chain (the ``preprocessing`` of ``inference.json``, listed
  again at the head of ``train.json``: :mod:`msxai.transforms`), then their label is resampled onto the network grid
  (nearest) and both are cropped to the brain (:class:`msxai.transforms.CropToBraind`, :func:`brain_bbox`);
- :class:`LesionMaskd`: validation post-processing, 2-class logits -> one-hot of ``softmax[1] > 0.3``;
- :class:`TimeLimit`: stops training after ``max_minutes`` (checked at epoch end, after a last validation);
- :class:`TrainingRecord`: writes ``training.json`` (epochs, minutes, best validation Dice and epoch, losses).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Randomizable

from msxai import THRESHOLD
from msxai.errors import InputError
from msxai.paths import checkout_path


def default_cohort() -> str:
    """``<repo>/data/synth`` of a development checkout (made by ``msxai synth --out data/synth --n 24 --seed 0``);
    an installed msxai has no default cohort."""
    path = checkout_path("data", "synth")
    if path is None:
        raise InputError("no cohort given: pass --cohort DIR (a folder holding dataset.json, made by msxai synth)")
    return str(path)


def default_run_dir(name: str) -> str:
    """``<repo>/runs/<name>`` of a development checkout, else ``runs/<name>`` in the current folder."""
    return str((checkout_path("runs") or Path.cwd() / "runs") / name)


def cohort_datalist(cohort, split: str, limit: int | None = None) -> list[dict]:
    """``[{"id", "flair", "t1", "label"}]`` of a cohort split (absolute paths); the first ``limit`` when given."""
    from msxai.inference import resolve_cases

    cases = resolve_cases(cohort, split)
    return cases if limit in (None, 0) else cases[: int(limit)]


def mixed_datalist(cohort, split: str, extra_cohorts=()) -> list[dict]:
    """The ``split`` of ``cohort`` followed by the ``train`` split of every cohort in ``extra_cohorts`` (e.g. the
    real-tissue subjects of :func:`msxai.realtissue.make_realtissue_cohort`); ids are prefixed by their cohort's
    folder name when the cohorts share one."""
    cases = cohort_datalist(cohort, split)
    seen = {c["id"] for c in cases}
    for extra in extra_cohorts or ():
        for c in cohort_datalist(extra, "train"):
            if c["id"] in seen:
                c = {**c, "id": f"{Path(str(extra)).name}/{c['id']}"}
            seen.add(c["id"])
            cases.append(c)
    return cases


def brain_bbox(mask: np.ndarray, margin: int = 8) -> tuple[slice, ...]:
    """Bounding box of the non-zero voxels of ``mask`` grown by ``margin`` voxels (clipped to the grid)."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        return tuple(slice(0, s) for s in mask.shape)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


class RandSpatialDeformd(Randomizable):
    """Random rotation, scaling and smooth elastic deformation of a patch in one resampling (a cheap stand-in for
    MONAI's ``RandAffined`` + ``Rand3DElasticd``, whose dense Gaussian smoothing costs seconds per 64^3 patch on a
    CPU): output voxel ``v`` (centred coordinates of an ``out_size`` grid) reads the input at
    ``R S v + u(v)``, where ``R`` rotates by up to ``rotate_deg`` about each axis, ``S = diag(1 + U(-scale, scale))``
    and ``u`` is a displacement of up to ``elastic_vox`` voxels (standard deviation ``elastic_vox / 2``) drawn on a
    ``grid`` ^3 control lattice and upsampled trilinearly. Images are interpolated linearly, ``label_keys``
    by nearest neighbour; outside the input reads 0. With probability ``1 - prob`` (or all ranges 0) the output is
    the centre crop of ``out_size``. ``out_size`` None keeps the input size. Patches are ``[C, X, Y, Z]``."""

    def __init__(self, keys=("image", "label"), label_keys=("label",), prob: float = 0.5, rotate_deg: float = 15.0,
                 scale: float = 0.15, elastic_vox: float = 3.0, grid: int = 5, out_size=None):
        self.keys = tuple(keys)
        self.label_keys = set(label_keys)
        self.prob = float(prob)
        self.rotate_deg, self.scale, self.elastic_vox = float(rotate_deg), float(scale), float(elastic_vox)
        self.grid = int(grid)
        self.out_size = None if out_size is None else tuple(int(s) for s in out_size)

    def randomize(self, data=None) -> None:  # draws happen in __call__ (from self.R, seeded by MONAI)
        pass

    @staticmethod
    def rotation(angles_rad) -> np.ndarray:
        ax, ay, az = angles_rad
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        return rz @ ry @ rx

    def source_coordinates(self, in_size, out_size, matrix: np.ndarray, disp: np.ndarray | None) -> torch.Tensor:
        """``[*out_size, 3]`` input voxel coordinates (x, y, z) read by each output voxel."""
        axes = [torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in out_size]
        v = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)  # centred output coordinates
        src = v @ torch.as_tensor(matrix, dtype=torch.float64).T
        if disp is not None:
            up = torch.nn.functional.interpolate(torch.as_tensor(disp, dtype=torch.float64)[None], size=out_size,
                                                 mode="trilinear", align_corners=True)[0]
            src = src + up.permute(1, 2, 3, 0)
        return src + torch.tensor([(n - 1) / 2 for n in in_size], dtype=torch.float64)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        ref = torch.as_tensor(d[self.keys[0]])
        in_size = tuple(ref.shape[1:])
        out_size = self.out_size or in_size
        do = self.R.rand() < self.prob and (self.rotate_deg > 0 or self.scale > 0 or self.elastic_vox > 0)
        if not do:
            lo = [(i - o) // 2 for i, o in zip(in_size, out_size)]
            if any(x < 0 for x in lo):
                raise InputError(f"RandSpatialDeformd: patch {in_size} is smaller than the output {out_size}")
            sl = (slice(None),) + tuple(slice(a, a + o) for a, o in zip(lo, out_size))
            for k in self.keys:
                d[k] = torch.as_tensor(d[k])[sl]
            return d
        angles = np.deg2rad(self.R.uniform(-self.rotate_deg, self.rotate_deg, 3))
        matrix = self.rotation(angles) @ np.diag(1.0 + self.R.uniform(-self.scale, self.scale, 3))
        disp = None
        if self.elastic_vox > 0:
            disp = self.R.normal(0.0, self.elastic_vox / 2.0, (3,) + (self.grid,) * 3)
            disp = np.clip(disp, -self.elastic_vox, self.elastic_vox)
        return self.resample(d, self.source_coordinates(in_size, out_size, matrix, disp))

    def resample(self, data: dict, src: torch.Tensor) -> dict:
        """Read every key at the input voxel coordinates ``src`` (``[*out, 3]``, x y z): linear for images,
        nearest for labels, 0 outside."""
        d = dict(data)
        in_size = tuple(torch.as_tensor(d[self.keys[0]]).shape[1:])
        # grid_sample: normalised (align_corners=True) coordinates, last axis ordered (z, y, x) for [N, C, X, Y, Z]
        norm = src / torch.tensor([(n - 1) / 2 for n in in_size], dtype=torch.float64) - 1
        grid = norm.flip(-1)[None].float()
        for k in self.keys:
            x = torch.as_tensor(d[k])
            mode = "nearest" if k in self.label_keys else "bilinear"
            out = torch.nn.functional.grid_sample(x[None].float(), grid, mode=mode, padding_mode="zeros",
                                                  align_corners=True)[0]
            d[k] = out.to(x.dtype) if x.is_floating_point() else out.round().to(x.dtype)
        return d


class LesionMaskd:
    """Validation post-processing: ``pred`` 2-class logits ``[2, ...]`` -> one-hot ``[2, ...]`` of
    ``softmax[1] > threshold``; ``label`` ``[1, ...]`` -> one-hot ``[2, ...]``."""

    def __init__(self, threshold: float = THRESHOLD, pred_key: str = "pred", label_key: str = "label"):
        self.threshold = float(threshold)
        self.pred_key, self.label_key = pred_key, label_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        pred = d[self.pred_key]
        fg = (torch.softmax(torch.as_tensor(pred).float(), dim=0)[1:2] > self.threshold).float()
        d[self.pred_key] = torch.cat([1 - fg, fg], 0)
        if self.label_key in d:
            lab = (torch.as_tensor(d[self.label_key]).float()[:1] > 0.5).float()
            d[self.label_key] = torch.cat([1 - lab, lab], 0)
        return d


class TimeLimit:
    """Terminate the trainer once ``max_minutes`` have passed. Checked after every iteration (a late iteration ends
    its epoch early) and at each epoch end. If the epoch that hits the limit was not a validation epoch,
    ``validation`` (a :class:`monai.handlers.ValidationHandler`) is run first so the best checkpoint sees the last
    weights."""

    def __init__(self, max_minutes: float | None, validation=None):
        self.max_minutes = None if max_minutes in (None, 0) else float(max_minutes)
        self.validation = validation
        self.start = None
        self.stopped_early = False

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _iteration(self, engine) -> None:
        if self.max_minutes is not None and self.minutes() >= self.max_minutes:
            engine.terminate_epoch()  # EPOCH_COMPLETED still fires: validation, then __call__ stops training

    def _started(self, engine) -> None:
        self.start = time.monotonic()

    def minutes(self) -> float:
        return 0.0 if self.start is None else (time.monotonic() - self.start) / 60.0

    def __call__(self, engine) -> None:
        if self.max_minutes is None or self.minutes() < self.max_minutes:
            return
        v = self.validation
        if v is not None and engine.state.epoch % int(v.interval) != 0:
            v.validator.run(engine.state.epoch)
        self.stopped_early = True
        engine.logger.info(f"TimeLimit: {self.minutes():.1f} min >= {self.max_minutes} min, stopping")
        engine.terminate()


class TrainingRecord:
    """Write ``path`` (JSON) at every epoch end and at completion: epochs run, wall minutes, mean training loss per
    epoch, validation Dice per validation, best Dice and its epoch."""

    def __init__(self, path, validator=None, time_limit: TimeLimit | None = None, info: dict | None = None):
        self.path = Path(path)
        self.validator = validator
        self.time_limit = time_limit
        self.info = dict(info or {})
        self.losses: list[float] = []
        self._epoch_losses: list[float] = []
        self.validations: list[dict] = []
        self.start = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        engine.add_event_handler(Events.COMPLETED, self._epoch)
        if self.validator is not None:
            self.validator.add_event_handler(Events.COMPLETED, self._validated)

    def _started(self, engine) -> None:
        self.start = time.monotonic()

    def _iteration(self, engine) -> None:
        out = engine.state.output
        loss = out[0]["loss"] if isinstance(out, list) else out.get("loss") if isinstance(out, dict) else out
        self._epoch_losses.append(float(torch.as_tensor(loss).detach().float().mean()))

    def _validated(self, evaluator) -> None:
        self.validations.append({"epoch": int(evaluator.state.epoch), "minutes": round(self.minutes(), 2),
                                 **{k: float(v) for k, v in evaluator.state.metrics.items()}})

    def minutes(self) -> float:
        return 0.0 if self.start is None else (time.monotonic() - self.start) / 60.0

    def summary(self) -> dict:
        best = None
        if self.validator is not None and self.validator.state is not None:
            best = {"metric": float(self.validator.state.best_metric), "epoch": int(self.validator.state.best_metric_epoch)}
        return {
            **self.info,
            "epochs": len(self.losses),
            "minutes": round(self.minutes(), 2),
            "stopped_by_time_limit": bool(self.time_limit.stopped_early) if self.time_limit else False,
            "best_val_dice": best["metric"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "epoch_loss": [round(x, 5) for x in self.losses],
            "validations": self.validations,
        }

    def _epoch(self, engine) -> None:
        if self._epoch_losses:
            self.losses.append(float(np.mean(self._epoch_losses)))
            self._epoch_losses = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.summary(), indent=2) + "\n")


def initialize_weights(network: torch.nn.Module, checkpoint: str | None) -> torch.nn.Module:
    """Start training from ``checkpoint`` (a plain state dict, e.g. a previous ``models/model.pt``) when given;
    ``None``/``""`` keeps the random initialisation."""
    if checkpoint in (None, "", "none"):
        return network
    from msxai.networks import load_weights

    device = next(network.parameters()).device
    return load_weights(network, checkpoint, device).train()


def lesion_prior_init(network: torch.nn.Module, prior: float = 0.01) -> torch.nn.Module:
    """Prior-probability initialisation of the output layers (Lin et al., focal loss, 2017): every convolution that
    outputs the 2 class logits (DynUNet: the output block and the deep-supervision heads) keeps its weights and
    gets the bias ``[0, log(prior / (1 - prior))]`` so that training starts from
    ``softmax[1] ~= prior`` everywhere instead of 0.5. Dice-type losses (nDSC, blob) then see few false positives
    from the first iteration and learn the lesions instead of spending the first hundreds of iterations on the
    background. ``prior <= 0`` leaves the network unchanged."""
    if prior is None or prior <= 0:
        return network
    if not 0 < prior < 1:
        raise InputError(f"lesion prior must be in (0, 1), got {prior}")
    logit = float(np.log(prior / (1.0 - prior)))
    heads = [m for m in network.modules()
             if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)) and m.out_channels == 2 and m.bias is not None]
    if not heads:
        raise ValueError("no 2-channel output convolution with a bias found for the lesion prior initialisation")
    with torch.no_grad():
        for m in heads:
            m.bias.copy_(torch.tensor([0.0, logit], dtype=m.bias.dtype))
    return network


def average_checkpoints(paths) -> dict[str, torch.Tensor]:
    """Uniform average of the weights of several checkpoints of one network (stochastic weight averaging of
    snapshots, Izmailov et al. 2018): floating-point tensors are averaged in float64 and cast back; integer
    buffers (e.g. counters) are taken from the last checkpoint. All checkpoints must hold the same keys and shapes.
    Names that alias one tensor in the first checkpoint alias one averaged tensor in the result.
    The networks here have no batch-norm statistics to recompute (instance norm), so the average is usable as is."""
    paths = [str(p) for p in paths]
    if not paths:
        raise InputError("no checkpoints to average")
    states = []
    for p in paths:
        try:
            states.append(torch.load(p, map_location="cpu", weights_only=True))
        except FileNotFoundError:
            raise InputError(f"checkpoint not found: {p}") from None
        except Exception as exc:
            raise InputError(f"cannot read checkpoint {p} as a state dict ({exc})") from exc
        if not isinstance(states[-1], dict):
            raise InputError(f"{p} is not a plain state dict")
    keys = list(states[0])
    for p, sd in zip(paths[1:], states[1:]):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))[:3]
            raise InputError(f"{p} holds other weights than {paths[0]} (e.g. {diff}): not the same network")
        bad = [k for k in keys if sd[k].shape != states[0][k].shape]
        if bad:
            raise InputError(f"{p}: weight {bad[0]} has shape {tuple(sd[bad[0]].shape)}, "
                             f"{paths[0]} {tuple(states[0][bad[0]].shape)}: not the same network")
    out, by_view = {}, {}
    for k in keys:
        ref = states[0][k]
        # weights that are one tensor under several names (DynUNet's deep-supervision heads share the output block)
        # stay one tensor, so the saved file does not store them twice
        view = (ref.untyped_storage().data_ptr(), ref.storage_offset(), tuple(ref.shape), ref.stride(), ref.dtype)
        if view in by_view:
            out[k] = out[by_view[view]]
            continue
        by_view[view] = k
        if ref.is_floating_point():
            out[k] = (torch.stack([sd[k].double() for sd in states]).mean(0)).to(ref.dtype)
        else:
            out[k] = states[-1][k].clone()
    return out
