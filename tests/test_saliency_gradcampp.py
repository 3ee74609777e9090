"""Grad-CAM++ (class and instance level) against a slow twin built on MONAI's own sliding-window inference, and the
closed-form α against autograd higher derivatives."""

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer

from msxai.errors import EmptyDomainError, InputError
from msxai.saliency.gradcampp import GradCAMPlusPlus, gradcampp, gradcampp_alpha
from msxai.saliency.sliding import SlidingWindowSpec

from saliency_helpers import TinySegNet, random_image

torch.set_num_threads(1)


class StridedNet(torch.nn.Module):
    """A layer at half resolution (so the CAM is upsampled) followed by a decoder."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.enc = torch.nn.Conv3d(2, 4, 3, padding=1)
        self.down = torch.nn.Conv3d(4, 3, 2, stride=2)
        self.up = torch.nn.ConvTranspose3d(3, 4, 2, stride=2)
        self.head = torch.nn.Conv3d(8, 2, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)

    def forward(self, x):
        e = torch.relu(self.enc(x))
        d = torch.relu(self.down(e))
        return self.head(torch.cat([e, torch.relu(self.up(d))], 1))


def slow_gradcampp(network, image, inferer, layer_name, region=None, threshold=0.3):
    """Reference: y' through MONAI's inferer with hooks collecting every window's activations, autograd for g,
    the α formula written out, and the window CAMs blended by running MONAI's inferer on a CAM 'predictor'."""
    network.eval()
    class_level = region is None
    layer = dict(network.named_modules())[layer_name]
    acts = []
    h = layer.register_forward_hook(lambda m, i, o: acts.append(o))
    x = torch.as_tensor(image)[None].clone().requires_grad_(True)
    y = inferer(x, network)[0]
    h.remove()
    if region is None:
        region = torch.softmax(y.detach(), 0)[1].numpy() > threshold
    target = y[1][torch.as_tensor(region)].sum()
    grads = torch.autograd.grad(target, acts)
    sum_a = sum(a[0].detach().sum(dim=(1, 2, 3)) for a in acts)
    alphas = []
    for g in grads:
        g = g[0].double()
        s = sum_a.double()[:, None, None, None]
        with np.errstate(all="ignore"):
            al = g**2 / (2 * g**2 + s * g**3)
        alphas.append(torch.nan_to_num(torch.where(g == 0, torch.zeros_like(al), al), nan=0.0, posinf=0.0))
    cams = []
    weights = sum((al * torch.relu(g[0].double())).sum(dim=(1, 2, 3)) for al, g in zip(alphas, grads))
    for a, al, g in zip(acts, alphas, grads):
        a = a[0].detach().double()
        if class_level:
            cam = torch.relu((weights[:, None, None, None] * a).sum(0))
        else:
            cam = torch.relu((al * torch.relu(g[0].double()) * a).sum(0))
        cams.append(cam.float())
    it = iter(cams)
    roi = inferer.roi_size

    def predictor(xw):
        cam = next(it)
        return torch.nn.functional.interpolate(cam[None, None], size=tuple(xw.shape[2:]), mode="trilinear",
                                               align_corners=False)

    blend = SlidingWindowInferer(roi, sw_batch_size=1, overlap=inferer.overlap, mode=inferer.mode,
                                 sigma_scale=inferer.sigma_scale, padding_mode=inferer.padding_mode, cval=inferer.cval)
    with torch.no_grad():
        return blend(torch.as_tensor(image)[None], predictor)[0, 0].numpy()



@pytest.mark.parametrize(
    "shape,roi,overlap,mode,layer",
    [
        ((14, 12, 10), (8, 8, 8), 0.5, "gaussian", "down"),
        ((10, 9, 6), (8, 8, 8), 0.25, "constant", "enc"),
        ((6, 6, 6), (8, 8, 8), 0.25, "gaussian", "down"),  # smaller than the ROI: padded
    ],
)
def test_gradcampp_matches_slow_twin(shape, roi, overlap, mode, layer):
    net = StridedNet(1)
    img = random_image(shape, seed=3)
    inf = SlidingWindowInferer(roi, overlap=overlap, mode=mode)
    spec = SlidingWindowSpec.from_inferer(inf)
    cam = GradCAMPlusPlus(net, img, spec, layer)
    prob = cam.probability
    t = float(np.quantile(prob, 0.7))  # a class region of ~30% of the image
    ref = slow_gradcampp(net, img, inf, layer, threshold=t)
    got = cam.class_map(threshold=t)
    assert got.shape == shape
    assert ref.max() > 0
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6 * ref.max())
    dom = np.zeros(shape, bool)
    dom[2:5, 3:5, 1:4] = True
    ref_i = slow_gradcampp(net, img, inf, layer, region=dom)
    got_i = cam.instance_map(dom)
    assert ref_i.max() > 0
    np.testing.assert_allclose(got_i, ref_i, rtol=1e-4, atol=1e-6 * ref_i.max())
    # the functional wrapper is the same computation
    np.testing.assert_allclose(gradcampp(net, img, spec, layer, domain=dom), got_i, rtol=1e-6, atol=1e-9)


def test_closed_form_alpha_matches_autograd_higher_derivatives():
    """Target linear in the activations: S = exp(y') has ∂ⁿS/∂Aⁿ = S gⁿ; check α and the instance CAM against
    diagonal 2nd/3rd derivatives computed by autograd, in float64."""
    torch.manual_seed(0)
    enc = torch.nn.Conv3d(2, 2, 3, padding=1).double()
    head = torch.nn.Conv3d(2, 2, 1).double()
    x = torch.randn(1, 2, 4, 4, 3, dtype=torch.float64) * 0.3
    a = enc(x).detach().requires_grad_(True)
    dom = torch.zeros(4, 4, 3, dtype=torch.bool)
    dom[1:3, 1:3, 1] = True
    y_target = head(a)[0, 1][dom].sum()
    S = torch.exp(y_target)
    (d1,) = torch.autograd.grad(S, a, create_graph=True)
    flat1 = d1.reshape(-1)
    d2 = torch.zeros_like(flat1)
    d3 = torch.zeros_like(flat1)
    for i in range(flat1.numel()):
        (g2,) = torch.autograd.grad(flat1[i], a, create_graph=True)
        d2[i] = g2.reshape(-1)[i]
        (g3,) = torch.autograd.grad(g2.reshape(-1)[i], a, retain_graph=True)
        d3[i] = g3.reshape(-1)[i]
    d2, d3 = d2.reshape(a.shape)[0], d3.reshape(a.shape)[0]
    A = a.detach()[0]
    sum_a = A.sum(dim=(1, 2, 3))
    nonzero = d2 != 0  # g = 0 (outside the receptive field of Ω): α is defined as 0
    assert nonzero.any() and (~nonzero).any()
    alpha_general = torch.where(nonzero, d2 / (2 * d2 + sum_a[:, None, None, None] * d3), torch.zeros_like(d2))
    g = d1.detach()[0] / S.detach()
    alpha_closed = gradcampp_alpha(g, sum_a)
    np.testing.assert_allclose(alpha_closed.numpy(), alpha_general.detach().numpy(), rtol=1e-9)
    # class-level weight: Σ α ReLU(∂S/∂A) = S Σ α ReLU(g)
    w_general = (alpha_general * torch.relu(d1.detach()[0])).sum(dim=(1, 2, 3)) / S.detach()
    w_closed = (alpha_closed * torch.relu(g)).sum(dim=(1, 2, 3))
    np.testing.assert_allclose(w_closed.numpy(), w_general.detach().numpy(), rtol=1e-9)

    # the module gives the same instance map on this network (one window = the image)
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.head = enc, head

        def forward(self, t):
            return self.head(self.enc(t))

    spec = SlidingWindowSpec(roi_size=(4, 4, 3))
    got = gradcampp(Net(), x[0], spec, "enc", domain=dom.numpy())
    hand = torch.relu((alpha_general * torch.relu(d1.detach()[0]) / S.detach() * A).sum(0))
    np.testing.assert_allclose(got, hand.detach().numpy(), rtol=1e-6, atol=1e-12)  # maps are returned as float32
    assert hand.max() > 0


def test_gradcampp_errors():
    net = TinySegNet(0)
    img = random_image((8, 8, 8))
    spec = SlidingWindowSpec(roi_size=(8, 8, 8))
    with pytest.raises(InputError, match="not a module"):
        gradcampp(net, img, spec, "no.such.layer")
    with pytest.raises(EmptyDomainError):
        gradcampp(net, img, spec, "mid", domain=np.zeros((8, 8, 8), bool))
    with pytest.raises(InputError, match="shape"):
        gradcampp(net, img, spec, "mid", domain=np.ones((8, 8, 7), bool))
