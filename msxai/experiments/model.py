"""The segmentation model the experiments run: a network, the exact sliding-window function of its bundle, the
threshold and the minimum lesion volume, plus the preprocessing that turns FLAIR/T1 files into its input.

``ExperimentModel.from_bundle(path)`` wraps ``msxai.bundle.load_bundle``; tests build one directly from a small
network. Probabilities restricted to a region are computed from the windows that cover the region only (exact:
the blended output at a voxel depends only on the windows covering it, see :mod:`msxai.saliency.sliding`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from msxai import MIN_LESION_MM3, THRESHOLD
from msxai.errors import InputError
from msxai.lesions import lesion_instances
from msxai.saliency.sliding import SlidingWindowSpec, sliding_window_logits
from msxai.saliency.smoothgrad import explaining, instance_smoothgrad_many, network_device


@dataclass
class Prepared:
    """Network input of one case: ``image [2, X, Y, Z]`` (z-scored FLAIR, T1), its affine and brain mask."""

    image: np.ndarray
    affine: np.ndarray
    brain_mask: np.ndarray


def default_prepare(flair_path, t1_path) -> Prepared:
    from msxai.preprocess import prepare_image

    p = prepare_image(flair_path, t1_path)
    return Prepared(np.asarray(p.image, np.float32), np.asarray(p.affine), np.asarray(p.brain_mask, bool))


@dataclass
class ExperimentModel:
    name: str
    network: torch.nn.Module
    spec: SlidingWindowSpec
    threshold: float = THRESHOLD
    min_volume_mm3: float = MIN_LESION_MM3
    prepare_fn: Callable = default_prepare
    source: str = ""  # where the weights came from (for the report)
    info: dict = field(default_factory=dict)

    @classmethod
    def from_bundle(cls, path: str | Path, device: str = "cpu") -> "ExperimentModel":
        """Load a MONAI bundle with :func:`msxai.bundle.load_bundle` (network, inferer, threshold, preparation)."""
        try:
            from msxai.bundle import load_bundle
        except ImportError as exc:  # pragma: no cover - depends on the bundle module being present
            raise InputError(f"cannot load bundles: msxai.bundle is not available ({exc})") from exc
        path = Path(path)
        if not path.exists():
            raise InputError(f"bundle not found: {path}")
        b = load_bundle(str(path), device=device)
        spec = SlidingWindowSpec.from_inferer(b.inferer)

        def prepare(flair, t1, _b=b):
            p = _b.prepare(flair, t1)
            mask = getattr(p, "brain_mask", None)
            img = np.asarray(p.image, np.float32)
            if mask is None:
                mask = np.any(img != img[:, 0:1, 0:1, 0:1], axis=0)
            return Prepared(img, np.asarray(p.affine), np.asarray(mask, bool))

        weights = ""
        info = {"bundle_dir": str(path)}
        for cand in ("models/model.pt", "models/model.ts"):
            f = path / cand
            if f.exists():
                import datetime as _dt

                from msxai.io import file_sha256

                full = file_sha256(f)
                digest = full[:12]
                stamp = _dt.datetime.fromtimestamp(f.stat().st_mtime, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
                weights = f"{cand} sha256 {digest}, modified {stamp}"
                info = {"weights_sha256": full, "weights_modified": stamp, "bundle_dir": str(path)}
                break
        return cls(
            name=str(getattr(b, "name", path.name)),
            network=b.network.eval(),
            spec=spec,
            threshold=float(getattr(b, "threshold", THRESHOLD)),
            min_volume_mm3=float(getattr(b, "min_volume_mm3", MIN_LESION_MM3)),
            prepare_fn=prepare,
            source=f"{path} ({weights or 'weights file not found'})",
            info=info,
        )

    # --------------------------------------------------------------------------------------------- inference
    def prepare(self, flair_path, t1_path) -> Prepared:
        return self.prepare_fn(flair_path, t1_path)

    @torch.no_grad()
    def probability(self, image: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
        """Lesion probability ``softmax(logits)[1]`` of the sliding-window inference ``[X, Y, Z]``.

        With ``region`` (bool mask) only the windows covering it are evaluated; values are exact inside the region
        and 0 outside the windows' union (do not read them there).
        """
        img = torch.as_tensor(np.asarray(image, np.float32))
        grid = self.spec.grid(img.shape[1:])
        windows = None
        if region is not None:
            windows = grid.windows_covering(np.asarray(region, bool))
            if not windows:
                raise InputError("probability: the region is empty")
        device = network_device(self.network)
        with explaining(self.network):
            logits = sliding_window_logits(self.network, img[None].to(device), self.spec, windows=windows, grid=grid)
        prob = torch.softmax(logits[0].float(), dim=0)[1].cpu().numpy()
        if region is not None:
            covered = np.zeros(prob.shape, bool)
            pm = np.zeros(grid.padded_shape, bool)
            for w in windows:
                pm[grid.window_slices(w)] = True
            covered = grid.crop_output(torch.as_tensor(pm)).numpy()
            prob = np.where(covered, prob, 0.0).astype(np.float32)
        return prob

    def lesions(self, prob: np.ndarray, affine) -> np.ndarray:
        return lesion_instances(prob, self.threshold, self.min_volume_mm3, affine)

    def explain(self, image: np.ndarray, domains: dict, n_samples: int, aggregation: str = "max", seed: int = 0,
                sigma_fraction: float = 0.05):
        """Instance SmoothGrad maps ``[C, X, Y, Z]`` of several domains: yields ``(name, map)``."""
        yield from instance_smoothgrad_many(self.network, image, domains, self.spec, n_samples=n_samples,
                                            sigma_fraction=sigma_fraction, aggregation=aggregation, seed=seed)

    def randomized(self, seed: int = 0) -> "ExperimentModel":
        """The same architecture with re-initialised weights (model-randomisation sanity check, Adebayo et al. 2018).

        Every submodule with ``reset_parameters`` is re-initialised with its own default initialiser (seeded with
        ``torch.manual_seed(seed)``); parameters that this leaves unchanged (e.g. a Swin transformer's relative
        position tables, created without such a method) have their elements randomly permuted, so no trained weight
        keeps its place. Constant parameters (e.g. norm weights still at 1) stay constant."""
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
