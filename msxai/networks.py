"""The three segmentation networks of the msxai bundles, sized for training on a few CPU cores.

Every network takes ``[B, 2, X, Y, Z]`` (channel 0 = FLAIR, 1 = MPRAGE/T1, z-scored, 1 mm) and returns 2-class
logits ``[B, 2, X, Y, Z]`` (channel 1 = lesion) in eval mode. The DynUNet returns its deep-supervision heads stacked
on axis 1 (``[B, 1 + deep_supr_num, 2, X, Y, Z]``) in train mode only; :class:`msxai.losses.LesionLoss` handles that.

In-place activations are switched off in every network (:func:`disable_inplace`) so that gradients of the logits
with respect to intermediate activations can be differentiated again (``autograd.grad(..., create_graph=True)``), as
Grad-CAM++ and second-order saliency checks need.

``GRADCAM_LAYERS`` names, per network, ``named_modules()`` paths of good Grad-CAM++ target layers; the first entry
is the default (the last full-resolution decoder block before the output convolution).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from msxai.errors import InputError

IN_CHANNELS = 2
OUT_CHANNELS = 2

# Defaults: small enough to train on 2 CPU cores in ~20-25 min and keep models/model.pt well under 25 MB.
UNET_DEFAULTS = dict(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm="instance", dropout=0.0)
DYNUNET_DEFAULTS = dict(
    kernel_size=(3, 3, 3, 3, 3),
    strides=(1, 2, 2, 2, 2),
    filters=(12, 24, 48, 96, 192),
    deep_supervision=True,
    deep_supr_num=2,
    res_block=True,
)
# window_size 4 (instead of 7): 3x faster on CPU and divides the 32^3 / 48^3 token grids of 64^3 / 96^3 inputs.
SWINUNETR_DEFAULTS = dict(
    feature_size=12, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=4, use_checkpoint=False
)

# Grad-CAM++ target layers (``named_modules()`` paths); first = default.
GRADCAM_LAYERS = {
    # monai UNet nests (down, SkipConnection(...), up); model.2 is the last up block (full resolution, 2x16 -> 2
    # channels = logits, not a Grad-CAM target); model.1.submodule.2 is the up block before it (16 channels at half
    # resolution); model.1 is the skip connection (encoder + decoder features, 32 channels, half resolution).
    "unet": ["model.1.submodule.2", "model.1", "model.1.submodule.1.submodule.2"],
    # DynUNet: upsamples[-1] = last decoder block at full resolution (12 filters), then output_block.
    "dynunet": ["upsamples.3", "upsamples.2", "bottleneck"],
    # SwinUNETR: decoder1 = last decoder block at full resolution (feature_size channels) before `out`.
    "swinunetr": ["decoder1", "decoder2", "encoder10"],
}


def disable_inplace(module: nn.Module) -> nn.Module:
    """Switch every ``inplace`` activation/dropout of ``module`` off (returns the module)."""
    for m in module.modules():
        if hasattr(m, "inplace") and isinstance(getattr(m, "inplace"), bool):
            m.inplace = False
    return module


def unet(**kw) -> nn.Module:
    """monai 3-D residual UNet, 2 in / 2 out, instance norm, PReLU."""
    from monai.networks.nets import UNet

    args = {**UNET_DEFAULTS, **kw}
    args["channels"] = tuple(args["channels"])
    args["strides"] = tuple(args["strides"])
    return disable_inplace(UNet(spatial_dims=3, in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS, **args))


def dynunet(**kw) -> nn.Module:
    """nnU-Net-style monai DynUNet: residual blocks, instance norm, leaky ReLU (not in place), deep supervision
    (training only: in eval mode it returns plain logits)."""
    from monai.networks.nets import DynUNet

    args = {**DYNUNET_DEFAULTS, **kw}
    strides = [tuple([s] * 3) if isinstance(s, int) else tuple(s) for s in args.pop("strides")]
    kernels = [tuple([k] * 3) if isinstance(k, int) else tuple(k) for k in args.pop("kernel_size")]
    if len(strides) != len(kernels):
        raise ValueError("dynunet: strides and kernel_size must have the same length")
    net = DynUNet(
        spatial_dims=3,
        in_channels=IN_CHANNELS,
        out_channels=OUT_CHANNELS,
        kernel_size=kernels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=list(args.pop("filters")),
        norm_name=("instance", {"affine": True}),
        act_name=("leakyrelu", {"inplace": False, "negative_slope": 0.01}),
        **args,
    )
    return disable_inplace(net)


def swinunetr(**kw) -> nn.Module:
    """monai SwinUNETR (1.6 API: no ``img_size``; input sizes must be divisible by 32 and at least 64, since the
    32x-down-sampled bottleneck needs more than one voxel for instance norm)."""
    from monai.networks.nets import SwinUNETR

    args = {**SWINUNETR_DEFAULTS, **kw}
    args["depths"] = tuple(args["depths"])
    args["num_heads"] = tuple(args["num_heads"])
    return disable_inplace(SwinUNETR(in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS, spatial_dims=3, **args))


NETWORKS: dict[str, Callable[..., nn.Module]] = {"unet": unet, "dynunet": dynunet, "swinunetr": swinunetr}


def build_network(name: str, **kw) -> nn.Module:
    """Build one of ``unet``, ``dynunet``, ``swinunetr`` with the msxai defaults (keyword arguments override them)."""
    key = str(name).lower()
    if key not in NETWORKS:
        raise InputError(f"unknown network {name!r}; choose one of {sorted(NETWORKS)}")
    return NETWORKS[key](**kw)


def plain_logits(output: torch.Tensor | list | tuple) -> torch.Tensor:
    """The full-resolution logits of a network output (drops DynUNet deep-supervision heads if present)."""
    if isinstance(output, (list, tuple)):
        return output[0]
    if output.ndim == 6:  # DynUNet training mode: [B, heads, C, X, Y, Z]
        return output[:, 0]
    return output


def load_weights(network: nn.Module, checkpoint: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a plain tensor state dict (``weights_only=True``) into ``network``, move it to ``device``, eval mode.

    Raises ``InputError`` naming the file when it is missing or does not fit the network.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise InputError(f"model weights not found: {checkpoint} (train the bundle or restore models/model.pt)")
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "network" in state and isinstance(state["network"], dict):
        state = state["network"]
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(f"model weights {checkpoint} do not fit the network: {str(exc).splitlines()[0]}") from exc
    return network.to(device).eval()


def count_parameters(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())
