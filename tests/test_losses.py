"""Normalized Dice (nDSC) loss and blob loss: fast paths vs plain loop twins, gradient sanity, deep supervision."""

import numpy as np
import pytest
import torch

from msxai.losses import (
    LesionLoss,
    blob_loss,
    lesion_components,
    lesion_probability,
    ndsc_factor,
    normalized_dice_loss,
    soft_dice_loss,
    soft_ndsc,
)

torch.set_num_threads(1)


def hand_built_components(shape=(14, 14, 14)):
    """Instance map with known 18-connected components.

    1: a 2x2x2 cube; 2: two cubes touching along an EDGE (18-connected -> one lesion); 3: a single voxel touching
    component 1's cube only at a CORNER (26- but not 18-connected -> its own lesion); 4: a bar.
    """
    comp = np.zeros(shape, np.int64)
    comp[2:4, 2:4, 2:4] = 1
    comp[4, 4, 4] = 3  # corner contact with (3, 3, 3)
    comp[8:10, 2:4, 2:4] = 2
    comp[10:12, 4:6, 2:4] = 2  # touches (9, 3, *) along the z edge -> same component under 18-connectivity
    comp[2:12, 10, 10] = 4
    return comp


def loop_blob_twin(prob: np.ndarray, comp: np.ndarray, smooth: float = 1.0) -> float:
    """Kofler's blob loss written out: per component, mask out the OTHER components, soft Dice loss, average."""
    per_sample = []
    for b in range(prob.shape[0]):
        ids = [i for i in np.unique(comp[b]) if i != 0]
        if not ids:
            continue
        losses = []
        for c in ids:
            keep = (comp[b] == 0) | (comp[b] == c)
            p = prob[b][keep].astype(np.float64)
            g = (comp[b][keep] == c).astype(np.float64)
            losses.append(1.0 - (2 * (p * g).sum() + smooth) / (p.sum() + g.sum() + smooth))
        per_sample.append(np.mean(losses))
    return float(np.mean(per_sample)) if per_sample else 0.0


def test_components_use_18_connectivity():
    comp = hand_built_components()
    found = lesion_components(torch.from_numpy(comp > 0)[None].float())[0].numpy()
    assert found.max() == 4
    # same partition as the hand-built ids (up to renumbering)
    pairs = {(int(a), int(b)) for a, b in zip(comp[comp > 0], found[comp > 0])}
    assert len(pairs) == 4 and len({a for a, _ in pairs}) == 4 and len({b for _, b in pairs}) == 4


def test_blob_loss_matches_loop_twin():
    rng = np.random.default_rng(0)
    comp = np.stack([hand_built_components(), np.zeros((14, 14, 14), np.int64), hand_built_components()])
    comp[2][comp[2] == 4] = 0  # third sample: three lesions
    prob = rng.uniform(0, 1, comp.shape).astype(np.float32)
    target = torch.from_numpy((comp > 0).astype(np.float32))
    fast = blob_loss(torch.from_numpy(prob), target).item()
    twin = loop_blob_twin(prob, comp)
    assert fast == pytest.approx(twin, rel=1e-5, abs=1e-6)
    # the hand-built ids passed explicitly give the same value
    assert blob_loss(torch.from_numpy(prob), target, torch.from_numpy(comp)).item() == pytest.approx(twin, rel=1e-5)


def test_blob_loss_is_not_the_global_dice():
    """A prediction that finds the big lesion but misses the small ones: the global Dice loss is low (volume is
    dominated by the big lesion) while blob loss weighs each lesion equally and stays high."""
    comp = np.zeros((1, 20, 20, 20), np.int64)
    comp[0, 2:12, 2:12, 2:12] = 1  # 1000 voxels
    comp[0, 15:17, 15:17, 15:17] = 2
    comp[0, 16:18, 2:4, 16:18] = 3
    prob = (comp == 1).astype(np.float32)
    target = torch.from_numpy((comp > 0).astype(np.float32))
    p = torch.from_numpy(prob)
    glob = soft_dice_loss(p[0], target[0]).item()
    blob = blob_loss(p, target).item()
    assert glob < 0.01
    assert blob == pytest.approx(loop_blob_twin(prob, comp), rel=1e-6)
    assert blob == pytest.approx(2 / 3 * (1 - 1 / 9), rel=1e-6)  # two of three 8-voxel lesions missed (smooth 1)


def test_blob_loss_perfect_and_empty():
    comp = hand_built_components()[None]
    target = torch.from_numpy((comp > 0).astype(np.float32))
    assert blob_loss(target.clone(), target).item() == pytest.approx(0.0, abs=1e-7)
    prob = torch.rand(1, 6, 6, 6, requires_grad=True)
    empty = blob_loss(prob, torch.zeros(1, 6, 6, 6))
    assert empty.item() == 0.0
    empty.backward()
    assert prob.grad is not None and torch.all(prob.grad == 0)


def ndsc_twin(pred: np.ndarray, truth: np.ndarray, r: float = 0.001) -> float:
    """Raina et al.'s nDSC on binary masks, written out (k = (1 - r) |G| / (r (N - |G|)))."""
    tp = float(np.sum(pred * truth))
    fp = float(np.sum(pred * (1 - truth)))
    fn = float(np.sum((1 - pred) * truth))
    k = (1 - r) * truth.sum() / (r * (truth.size - truth.sum())) if truth.sum() > 0 else 1.0
    return 2 * tp / (k * fp + 2 * tp + fn)


def test_soft_ndsc_equals_ndsc_on_binary_masks():
    rng = np.random.default_rng(1)
    truth = np.zeros((16, 16, 16), np.float32)
    truth[3:7, 3:7, 3:7] = 1
    pred = truth.copy()
    pred[5:9, 5:9, 5:9] = 1  # some FP
    pred[3, 3, 3:7] = 0  # some FN
    pred[rng.uniform(size=pred.shape) > 0.995] = 1
    got = soft_ndsc(torch.from_numpy(pred)[None], torch.from_numpy(truth)[None], smooth=0.0).item()
    assert got == pytest.approx(ndsc_twin(pred, truth), rel=1e-5)
    from msxai.metrics import ndsc as metric_ndsc

    assert got == pytest.approx(metric_ndsc(pred > 0, truth > 0), rel=1e-4)


def test_ndsc_factor():
    t = torch.zeros(2, 10, 10, 10)
    t[0, :2, :5, :5] = 1  # 50 voxels of 1000
    k = ndsc_factor(t)
    assert k[0].item() == pytest.approx(0.999 * 50 / (0.001 * 950))
    assert k[1].item() == 1.0


def test_normalized_dice_loss_gradient_sanity():
    truth = torch.zeros(1, 12, 12, 12)
    truth[0, 4:8, 4:8, 4:8] = 1
    p = torch.full_like(truth, 0.5, requires_grad=True)
    loss = normalized_dice_loss(p, truth)
    loss.backward()
    g = p.grad
    assert torch.all(torch.isfinite(g))
    assert torch.all(g[truth > 0] < 0)  # raising p on lesion voxels lowers the loss
    assert torch.all(g[truth == 0] > 0)  # raising p on background raises it
    # lower for better predictions
    perfect = normalized_dice_loss(truth.clone(), truth).item()
    noisy = normalized_dice_loss(0.7 * truth + 0.2, truth).item()
    inverted = normalized_dice_loss(1 - truth, truth).item()
    assert perfect < 1e-6 < noisy < inverted
    # an empty patch: only false positives, gradient pushes them down
    q = torch.full((1, 6, 6, 6), 0.3, requires_grad=True)
    normalized_dice_loss(q, torch.zeros(1, 6, 6, 6)).backward()
    assert torch.all(q.grad > 0) and torch.all(torch.isfinite(q.grad))


def test_lesion_loss_combines_global_and_blob():
    torch.manual_seed(0)
    comp = torch.from_numpy(hand_built_components())[None]
    label = (comp > 0).float()[:, None]
    logits = torch.randn(1, 2, 14, 14, 14, requires_grad=True)
    loss = LesionLoss(alpha=2.0, beta=1.0)(logits, label)
    prob = lesion_probability(logits)
    expected = 2.0 * normalized_dice_loss(prob, label[:, 0]) + blob_loss(prob, label[:, 0])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.all(torch.isfinite(logits.grad)) and logits.grad.abs().sum() > 0


def test_lesion_loss_deep_supervision_weights():
    torch.manual_seed(1)
    comp = torch.from_numpy(hand_built_components())[None]
    label = (comp > 0).float()[:, None]
    heads = torch.randn(1, 3, 2, 14, 14, 14)
    fn = LesionLoss()
    got = fn(heads, label).item()
    singles = [fn(heads[:, i], label).item() for i in range(3)]
    w = np.array([1.0, 0.5, 0.25])
    assert got == pytest.approx(float((w / w.sum()) @ np.array(singles)), rel=1e-6)
    assert fn([heads[:, i] for i in range(3)], label).item() == pytest.approx(got, rel=1e-6)
