"""Training losses of the msxai bundles: normalized Dice loss + blob loss (the paper's training objective).

- Normalized Dice (nDSC, Raina et al., ISBI 2023) rescales the false positives by ``k = (1 - r) |G| / (r (N - |G|))``
  so that the score does not depend on the lesion load of the patch (reference load ``r = 0.001``); its soft
  version on the lesion probability is ``(2 TP + s) / (2 TP + k FP + FN + s)`` with ``TP = sum(p g)``,
  ``FP = sum(p (1 - g))``, ``FN = sum((1 - p) g)`` and a smoothing term ``s``. Where the patch has no lesion,
  ``k = 1``.
- Blob loss (Kofler et al., 2022): for every ground-truth lesion component ``c`` (18-connected), the soft Dice loss
  computed on the patch with all OTHER lesion components masked out (removed from both prediction and label),
  averaged over components (and over the batch samples that hold a lesion).
- :class:`LesionLoss` = ``alpha * normalized Dice loss + beta * blob loss`` on ``softmax(logits)[:, 1]``, and sums
  DynUNet's deep-supervision heads (``[B, heads, 2, X, Y, Z]``) with weights ``0.5 ** i`` normalised to 1.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import nn

NDSC_REFERENCE_LOAD = 0.001
CONNECTIVITY_18 = ndimage.generate_binary_structure(3, 2)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (keeps autograd)."""
    return t.as_tensor() if hasattr(t, "as_tensor") else t


def lesion_probability(logits: torch.Tensor) -> torch.Tensor:
    """``softmax(logits)[:, 1]``: ``[B, 2, ...] -> [B, ...]``."""
    return torch.softmax(_plain(logits), dim=1)[:, 1]


def _as_target(label: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    label = _plain(label)
    if label.ndim == like.ndim + 1:  # [B, 1, ...]
        label = label[:, 0]
    if label.shape != like.shape:
        raise ValueError(f"label shape {tuple(label.shape)} does not match prediction {tuple(like.shape)}")
    return (label > 0.5).to(like.dtype)


def ndsc_factor(target: torch.Tensor, r: float = NDSC_REFERENCE_LOAD) -> torch.Tensor:
    """Per-sample nDSC false-positive scale ``k`` (``[B]``), 1 where the sample has no lesion voxel."""
    flat = target.reshape(target.shape[0], -1)
    n = flat.shape[1]
    g = flat.sum(1)
    k = (1.0 - r) * g / (r * (n - g).clamp_min(1.0))
    return torch.where(g > 0, k, torch.ones_like(k)).detach()


def soft_ndsc(prob: torch.Tensor, target: torch.Tensor, r: float = NDSC_REFERENCE_LOAD, smooth: float = 1.0):
    """Soft normalized Dice per sample: ``prob``/``target`` ``[B, ...]`` -> ``[B]``."""
    p = prob.reshape(prob.shape[0], -1)
    g = target.reshape(target.shape[0], -1)
    tp = (p * g).sum(1)
    fp = (p * (1 - g)).sum(1)
    fn = ((1 - p) * g).sum(1)
    k = ndsc_factor(target, r)
    return (2 * tp + smooth) / (2 * tp + k * fp + fn + smooth)


def normalized_dice_loss(prob: torch.Tensor, target: torch.Tensor, r: float = NDSC_REFERENCE_LOAD, smooth: float = 1.0):
    """``1 - soft nDSC``, averaged over the batch."""
    return (1.0 - soft_ndsc(prob, target, r, smooth)).mean()


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum(p g) + s) / (sum(p) + sum(g) + s)`` over all voxels of one volume (scalar)."""
    return 1.0 - (2 * (prob * target).sum() + smooth) / (prob.sum() + target.sum() + smooth)


def lesion_components(target: torch.Tensor) -> torch.Tensor:
    """18-connected components of a binary ``[B, ...]`` target: int64 ``[B, ...]`` (0 = background, 1..n)."""
    arr = target.detach().cpu().numpy() > 0.5
    out = np.zeros(arr.shape, dtype=np.int64)
    for b in range(arr.shape[0]):
        out[b], _ = ndimage.label(arr[b], structure=CONNECTIVITY_18)
    return torch.from_numpy(out).to(target.device)


def blob_loss(prob: torch.Tensor, target: torch.Tensor, components: torch.Tensor | None = None, smooth: float = 1.0):
    """Blob loss with a soft Dice criterion: per lesion component ``c`` (others masked out), averaged.

    Vectorised: with ``S_c = sum(p on c)`` and ``S_0 = sum(p on background)``, component ``c`` sees
    ``TP = S_c``, ``sum(p) = S_0 + S_c`` and ``sum(g) = |c|``. Samples without lesions contribute nothing; a batch
    without any lesion gives 0 (still attached to the graph).
    """
    if components is None:
        components = lesion_components(target)
    losses = []
    for b in range(prob.shape[0]):
        ids = components[b].reshape(-1)
        n = int(ids.max().item()) if ids.numel() else 0
        if n == 0:
            continue
        p = prob[b].reshape(-1)
        sums = torch.zeros(n + 1, dtype=p.dtype, device=p.device).scatter_add(0, ids, p)
        sizes = torch.bincount(ids, minlength=n + 1).to(p.dtype)
        s0, sc, gc = sums[0], sums[1:], sizes[1:]
        dice = (2 * sc + smooth) / (s0 + sc + gc + smooth)
        losses.append((1.0 - dice).mean())
    if not losses:
        return prob.sum() * 0.0
    return torch.stack(losses).mean()


class LesionLoss(nn.Module):
    """``alpha * normalized Dice loss + beta * blob loss`` on 2-class logits; handles deep-supervision heads.

    ``forward(output, label)``: ``output`` is ``[B, 2, X, Y, Z]`` logits, or DynUNet's training output
    ``[B, heads, 2, X, Y, Z]`` (or a list of logits); ``label`` is ``[B, 1, X, Y, Z]`` or ``[B, X, Y, Z]`` in {0, 1}.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, r: float = NDSC_REFERENCE_LOAD, smooth: float = 1.0,
                 deep_supervision_decay: float = 0.5):
        super().__init__()
        self.alpha, self.beta, self.r, self.smooth = float(alpha), float(beta), float(r), float(smooth)
        self.decay = float(deep_supervision_decay)

    def single(self, logits: torch.Tensor, target: torch.Tensor, components: torch.Tensor | None) -> torch.Tensor:
        prob = lesion_probability(logits)
        loss = self.alpha * normalized_dice_loss(prob, target, self.r, self.smooth)
        if self.beta:
            loss = loss + self.beta * blob_loss(prob, target, components, self.smooth)
        return loss

    def forward(self, output, label: torch.Tensor) -> torch.Tensor:
        if isinstance(output, (list, tuple)):
            heads = [_plain(o) for o in output]
        else:
            output = _plain(output)
            heads = list(output.unbind(1)) if output.ndim == 6 else [output]
        target = _as_target(label, heads[0][:, 0])
        components = lesion_components(target) if self.beta else None
        weights = [self.decay**i for i in range(len(heads))]
        total = sum(weights)
        return sum(w / total * self.single(h, target, components) for w, h in zip(weights, heads))
