"""Shared helpers for the saliency tests: tiny random 3-D segmentation networks and the naive reference
(one ``torch.autograd.grad`` per output voxel over MONAI's full sliding-window inference, like the authors' code)."""

from __future__ import annotations

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer

from msxai.saliency.smoothgrad import noise_samples, noise_sigma

torch.set_num_threads(1)


class TinySegNet(torch.nn.Module):
    """Conv -> InstanceNorm -> LeakyReLU -> Conv -> ReLU -> Conv: 2 input channels, 2-class logits."""

    def __init__(self, seed=0, width=4, norm=True):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.enc = torch.nn.Conv3d(2, width, 3, padding=1)
        self.norm = torch.nn.InstanceNorm3d(width, affine=True) if norm else torch.nn.Identity()
        self.act = torch.nn.LeakyReLU(0.1)
        self.mid = torch.nn.Conv3d(width, width, 3, padding=1)
        self.act2 = torch.nn.ReLU()
        self.head = torch.nn.Conv3d(width, 2, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return self.head(self.act2(self.mid(self.act(self.norm(self.enc(x))))))


def random_image(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2, *shape), generator=g, dtype=dtype)


def naive_instance_smoothgrad(network, image, domain, inferer: SlidingWindowInferer, n_samples, sigma_fraction=0.05,
                              sigma=None, aggregation="max", seed=0):
    """Reference: full-image sliding-window inference per noise copy, one autograd.grad per output voxel of Ω."""
    network.eval()
    img = torch.as_tensor(image)
    sig = noise_sigma(img, sigma_fraction, sigma)
    voxels = np.argwhere(np.asarray(domain, bool))
    total = torch.zeros_like(img)
    for eps in noise_samples(img.shape, n_samples, sig, seed, img.dtype):
        x = (img + eps)[None].clone().requires_grad_(True)
        y = inferer(x, network)[0, 1]
        if aggregation == "mean":
            target = sum(y[tuple(v)] for v in voxels) / len(voxels)
            total += torch.autograd.grad(target, x)[0][0]
            continue
        best = torch.zeros_like(img)
        for v in voxels:
            g = torch.autograd.grad(y[tuple(v)], x, retain_graph=True)[0][0]
            best = torch.where(g.abs() > best.abs(), g, best)
        total += best
    return (total / n_samples).numpy()


def naive_class_smoothgrad(network, image, region, inferer, n_samples, sigma_fraction=0.05, seed=0):
    network.eval()
    img = torch.as_tensor(image)
    sig = noise_sigma(img, sigma_fraction, None)
    m = torch.as_tensor(np.asarray(region, bool))
    total = torch.zeros_like(img)
    for eps in noise_samples(img.shape, n_samples, sig, seed, img.dtype):
        x = (img + eps)[None].clone().requires_grad_(True)
        y = inferer(x, network)[0, 1]
        total += torch.autograd.grad(y[m].sum(), x)[0][0]
    return (total / n_samples).numpy()
