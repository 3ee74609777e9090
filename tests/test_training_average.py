"""Checkpoint weight averaging (`msxai average`, msxai.training.average_checkpoints) against a plain loop."""

from __future__ import annotations

import pytest
import torch

from msxai.errors import InputError
from msxai.networks import build_network
from msxai.training import average_checkpoints


def _snapshots(tmp_path, n=3):
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        net = build_network("unet", channels=(4, 8, 16), strides=(2, 2))
        p = tmp_path / f"model_epoch={i + 1}.pt"
        torch.save(net.state_dict(), p)
        paths.append(p)
    return paths


def test_average_equals_elementwise_mean(tmp_path):
    paths = _snapshots(tmp_path)
    avg = average_checkpoints(paths)
    states = [torch.load(p, weights_only=True) for p in paths]
    assert list(avg) == list(states[0])
    for k, v in avg.items():
        if v.is_floating_point():
            expected = sum(s[k] for s in states) / len(states)  # the obvious loop
            torch.testing.assert_close(v, expected, rtol=1e-6, atol=1e-7)
            assert v.dtype == states[0][k].dtype
        else:
            assert torch.equal(v, states[-1][k])
    # one checkpoint averages to itself; the result loads into the network
    one = average_checkpoints(paths[:1])
    assert all(torch.equal(one[k], states[0][k]) for k in one)
    net = build_network("unet", channels=(4, 8, 16), strides=(2, 2))
    net.load_state_dict(avg)


def test_average_keeps_shared_weights_shared(tmp_path):
    """DynUNet's deep-supervision heads share the output block's weights: the average must store them once
    (equal values under both names, one storage), as the snapshots do."""
    torch.manual_seed(0)
    net = build_network("dynunet")
    sd = net.state_dict()
    shared = {}
    for k, v in sd.items():
        shared.setdefault(v.untyped_storage().data_ptr(), []).append(k)
    groups = [ks for ks in shared.values() if len(ks) > 1]
    assert groups, "the DynUNet state dict was expected to alias some weights"
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        p = tmp_path / f"s{i}.pt"
        torch.save(build_network("dynunet").state_dict(), p)
        paths.append(p)
    avg = average_checkpoints(paths)
    states = [torch.load(p, weights_only=True) for p in paths]
    for ks in groups:
        assert len({avg[k].untyped_storage().data_ptr() for k in ks}) == 1
    for k, v in avg.items():  # values still the element-wise mean, key by key
        if v.is_floating_point():
            torch.testing.assert_close(v, (states[0][k] + states[1][k]) / 2, rtol=1e-6, atol=1e-7)
    torch.save(avg, tmp_path / "avg.pt")
    assert (tmp_path / "avg.pt").stat().st_size < 1.05 * paths[0].stat().st_size


def test_average_command_and_errors(tmp_path):
    from msxai.cli import main

    paths = _snapshots(tmp_path, 2)
    out = tmp_path / "avg" / "model.pt"
    assert main(["average", *map(str, paths), "--out", str(out)]) == 0
    saved = torch.load(out, weights_only=True)
    ref = average_checkpoints(paths)
    assert all(torch.equal(saved[k], ref[k]) for k in ref)
    with pytest.raises(InputError, match="not found"):
        average_checkpoints([paths[0], tmp_path / "missing.pt"])
    torch.manual_seed(0)
    other = tmp_path / "other.pt"
    torch.save(build_network("unet", channels=(4, 8, 16, 32), strides=(2, 2, 2)).state_dict(), other)
    with pytest.raises(InputError, match="not the same network"):
        average_checkpoints([paths[0], other])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["average", str(paths[0]), str(tmp_path / "junk.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(InputError, match="no checkpoints"):
        average_checkpoints([])
