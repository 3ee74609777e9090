"""msxai.device.resolve_device: the one device rule (commands, bundle configs, app requests) and MSXAI_DEVICE.

CUDA is simulated by replacing torch.cuda's queries (is_available, device_count, get_device_name), so both kinds of
machine are checked here whatever this one has."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from msxai.device import ENV_VAR, DeviceError, resolve_device
from msxai.errors import InputError

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "msxai_unet"


def fake_gpus(monkeypatch, names):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(names))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(names))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: names[i])


def test_cpu_only_machine(monkeypatch):
    fake_gpus(monkeypatch, [])
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_device(None) == resolve_device("auto") == resolve_device("") == torch.device("cpu")
    assert resolve_device("cpu") == resolve_device(" CPU ") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    for asked in ("cuda", "cuda:0", "CUDA:1"):
        with pytest.raises(DeviceError, match="no CUDA device is available"):
            resolve_device(asked)
    for bad in ("tpu", "NVIDIA H100 80GB HBM3", 3):
        with pytest.raises(DeviceError, match="device must be"):
            resolve_device(bad)
    assert issubclass(DeviceError, InputError)  # CLI exit 2, app 4xx


def test_environment_variable(monkeypatch):
    fake_gpus(monkeypatch, ["NVIDIA X"])
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_device(None) == torch.device("cuda")  # auto: CUDA when available
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda")  # an explicit device wins over the variable
    monkeypatch.setenv(ENV_VAR, "auto")
    assert resolve_device(None) == torch.device("cuda")
    monkeypatch.setenv(ENV_VAR, "tpu")
    with pytest.raises(DeviceError, match=f"{ENV_VAR} must be"):
        resolve_device(None)
    fake_gpus(monkeypatch, [])
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(DeviceError, match=f"{ENV_VAR} 'cuda' asks for CUDA but no CUDA device"):
        resolve_device(None)
    assert resolve_device("cpu") == torch.device("cpu")


def test_monai_label_gpu_names(monkeypatch):
    """What MONAI Label's device_list() shows clients: the name with one GPU, '<name>:<i>' with several."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    fake_gpus(monkeypatch, ["NVIDIA H100 80GB HBM3"])
    assert resolve_device("NVIDIA H100 80GB HBM3") == torch.device("cuda")
    with pytest.raises(DeviceError, match="cuda:0 \\(NVIDIA H100"):
        resolve_device("cuda:1")
    fake_gpus(monkeypatch, ["NVIDIA A", "NVIDIA A"])
    assert resolve_device("NVIDIA A:1") == resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("NVIDIA A:0") == torch.device("cuda:0")
    for bad in ("NVIDIA B", "NVIDIA A:2", "cuda:2", "gpu"):
        with pytest.raises(DeviceError):
            resolve_device(bad)


def test_bundle_configs_use_the_resolver(monkeypatch):
    """The bundles' ``device`` (when no caller overrides it) is resolve_device(): MSXAI_DEVICE, else auto."""
    from msxai.bundle import _parser

    for env, gpus, want in (("cpu", ["NVIDIA X"], "cpu"), (None, ["NVIDIA X"], "cuda"), (None, [], "cpu")):
        fake_gpus(monkeypatch, gpus)
        if env is None:
            monkeypatch.delenv(ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(ENV_VAR, env)
        for config in ("inference.json", "train.json"):
            assert _parser(BUNDLE, (config,), None).get_parsed_content("device") == torch.device(want), (env, config)
    fake_gpus(monkeypatch, [])
    with pytest.raises(DeviceError, match="no CUDA"):
        _parser(BUNDLE, ("inference.json",), "cuda")


def test_cli_refuses_cuda_without_cuda(monkeypatch, capsys, tmp_path):
    from msxai.cli import main

    fake_gpus(monkeypatch, [])
    code = main(["explain", "--flair", "f.nii.gz", "--t1", "t.nii.gz", "--out", str(tmp_path), "--device", "cuda"])
    assert code == 2
    assert "no CUDA device is available" in capsys.readouterr().err
