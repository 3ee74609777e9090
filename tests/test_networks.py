"""The three networks: shapes, DynUNet deep supervision in train vs eval, no in-place ops, double backward,
Grad-CAM++ layer names, weight loading errors."""

import pytest
import torch

from msxai.errors import InputError
from msxai.networks import GRADCAM_LAYERS, build_network, count_parameters, load_weights, plain_logits

torch.set_num_threads(1)
NAMES = ["unet", "dynunet", "swinunetr"]
# Smallest useful inputs: the U-Nets down-sample 16x; SwinUNETR needs sizes divisible by 32 and >= 64 (its 32x
# bottleneck must hold more than one voxel for instance norm).
SIZES = {"unet": 32, "dynunet": 32, "swinunetr": 64}
SIZE = 32


@pytest.fixture(scope="module")
def nets():
    out = {}
    for n in NAMES:
        torch.manual_seed(0)
        out[n] = build_network(n)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_eval_forward_gives_two_class_logits(nets, name):
    net = nets[name].eval()
    n = SIZES[name]
    x = torch.randn(1, 2, n, n, n)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (1, 2, n, n, n)
    assert torch.all(torch.isfinite(y))


def test_dynunet_deep_supervision_only_in_training(nets):
    net = nets["dynunet"]
    x = torch.randn(1, 2, SIZE, SIZE, SIZE)
    net.train()
    y = net(x)
    assert y.shape == (1, 3, 2, SIZE, SIZE, SIZE)  # full-resolution logits + 2 upsampled deep-supervision heads
    assert plain_logits(y).shape == (1, 2, SIZE, SIZE, SIZE)
    net.eval()
    with torch.no_grad():
        plain = net(x)
        net.train()
        heads = net(x)
        net.eval()
    assert plain.shape == (1, 2, SIZE, SIZE, SIZE)
    # instance norm keeps no running statistics, so the full-resolution training head is the eval-mode function
    assert torch.allclose(heads[:, 0], plain, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_no_inplace_modules(nets, name):
    flagged = [n for n, m in nets[name].named_modules() if getattr(m, "inplace", False) is True]
    assert flagged == []


@pytest.mark.parametrize("name", NAMES)
def test_double_backward_through_network_and_gradcam_layer(nets, name):
    """d(lesion logit)/d(input) and d/d(activation of the Grad-CAM++ layer) can be differentiated again."""
    net = nets[name].eval()
    layer = dict(net.named_modules())[GRADCAM_LAYERS[name][0]]
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("act", o))
    try:
        n = SIZES[name]
        x = torch.randn(1, 2, n, n, n, requires_grad=True)
        y = net(x)[:, 1].sum()
        gx, ga = torch.autograd.grad(y, [x, store["act"]], create_graph=True)
        second = (gx**2).sum() + (ga**2).sum()
        second.backward()
    finally:
        handle.remove()
    assert torch.all(torch.isfinite(x.grad)) and x.grad.abs().sum() > 0
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.all(torch.isfinite(g)) for g in grads)
    net.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", NAMES)
def test_gradcam_layers_exist_and_are_feature_maps(nets, name):
    net = nets[name].eval()
    modules = dict(net.named_modules())
    shapes = {}
    hooks = [modules[path].register_forward_hook(lambda m, i, o, p=path: shapes.__setitem__(p, o.shape))
             for path in GRADCAM_LAYERS[name]]
    n = SIZES[name]
    with torch.no_grad():
        net(torch.randn(1, 2, n, n, n))
    for h in hooks:
        h.remove()
    for path in GRADCAM_LAYERS[name]:
        assert len(shapes[path]) == 5 and shapes[path][1] > 2, (path, shapes[path])
    # the default target is a decoder block at full or half resolution
    assert shapes[GRADCAM_LAYERS[name][0]][2] >= n // 2


@pytest.mark.parametrize("name", NAMES)
def test_model_size_budget(nets, name):
    assert count_parameters(nets[name]) * 4 <= 25 * 1024 * 1024


def test_unknown_network_and_bad_weights(tmp_path, nets):
    with pytest.raises(InputError, match="unknown network"):
        build_network("resnet")
    with pytest.raises(InputError, match="not found"):
        load_weights(build_network("unet"), tmp_path / "missing.pt")
    torch.save(nets["dynunet"].state_dict(), tmp_path / "dyn.pt")
    with pytest.raises(InputError, match="do not fit"):
        load_weights(build_network("unet"), tmp_path / "dyn.pt")
    net = load_weights(build_network("dynunet"), tmp_path / "dyn.pt")
    assert not net.training
    for a, b in zip(net.state_dict().values(), nets["dynunet"].state_dict().values()):
        assert torch.equal(a, b)
