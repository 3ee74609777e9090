"""The engine works unchanged on tiny instances of the three bundle network families (MONAI UNet, DynUNet,
SwinUNETR), matching the naive reference; Grad-CAM++ runs at their decoder layers."""

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import DynUNet, SwinUNETR, UNet

from msxai.saliency.gradcampp import gradcampp
from msxai.saliency.sliding import SlidingWindowSpec
from msxai.saliency.smoothgrad import instance_smoothgrad

from saliency_helpers import naive_instance_smoothgrad, random_image

torch.set_num_threads(1)


def _unet():
    torch.manual_seed(0)
    return UNet(3, 2, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1), (16, 16, 16), (20, 16, 12), \
        "model.1.submodule.2", ("batched", "vmap", "loop")


def _dynunet():
    torch.manual_seed(0)
    net = DynUNet(3, 2, 2, kernel_size=(3, 3, 3), strides=(1, 2, 2), upsample_kernel_size=(2, 2), filters=(4, 8, 16),
                  res_block=True)
    return net, (16, 16, 16), (20, 16, 12), "upsamples.1", ("batched", "vmap", "loop")


def _swinunetr():
    # BatchNorm (eval mode, running statistics): a 32^3 window has a 1^3 bottleneck, where InstanceNorm refuses to run
    torch.manual_seed(0)
    net = SwinUNETR(in_channels=2, out_channels=2, feature_size=12, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24),
                    window_size=4, norm_name="batch")
    with torch.no_grad():  # non-trivial running statistics
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net, (32, 32, 32), (40, 32, 32), "decoder1", ("batched",)


@pytest.mark.parametrize("factory", [_unet, _dynunet, _swinunetr], ids=["unet", "dynunet", "swinunetr"])
def test_network_family(factory):
    net, roi, shape, layer, backends = factory()
    img = random_image(shape, seed=1)
    inf = SlidingWindowInferer(roi, overlap=0.25, mode="gaussian")
    spec = SlidingWindowSpec.from_inferer(inf)
    dom = np.zeros(shape, bool)
    dom[15:17, 8, 6] = True  # straddles the two windows along x
    net.eval()
    ref = naive_instance_smoothgrad(net, img, dom, inf, n_samples=1, seed=0)
    assert np.abs(ref).max() > 0
    net.train()  # the engine switches to eval mode itself (BatchNorm/Dropout) and restores the flag
    for backend in backends:
        got = instance_smoothgrad(net, img, dom, spec, n_samples=1, seed=0, backend=backend)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert net.training
    cam = gradcampp(net, img, spec, layer, domain=dom)
    assert cam.shape == shape and np.all(cam >= 0) and np.isfinite(cam).all()
