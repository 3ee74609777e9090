"""The torch device everything runs on: one rule for the commands, the bundles' configs and the app's requests.

* ``None``, ``""`` or ``"auto"``: the environment variable ``MSXAI_DEVICE`` when it is set (``scripts/test.sh``
  exports ``MSXAI_DEVICE=cpu``), else CUDA when available, else the CPU;
* ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (or a ``torch.device``): that device;
* a GPU name as MONAI Label's ``device_list()`` shows it to clients (``"NVIDIA H100 80GB HBM3"``, or ``"<name>:N"``
  with several GPUs): that GPU.

A CUDA device that this machine does not have (no CUDA at all, or ``cuda:N`` beyond the count) and any other name are
refused with :class:`DeviceError` naming what was asked for and what exists; nothing falls back to the CPU silently.
"""

from __future__ import annotations

import os
import re

from msxai.errors import InputError

ENV_VAR = "MSXAI_DEVICE"
_CUDA_RE = re.compile(r"cuda(:\d+)?")


class DeviceError(InputError):
    """A device this machine does not have, or a name that is not a device."""


def _available() -> str:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not n:
        return "this machine has the CPU only"
    names = ", ".join(f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(n))
    return f"this machine has cpu and {names}"


def resolve_device(value=None):
    """``value`` (see the module docstring) -> ``torch.device``; :class:`DeviceError` for a device that is not here."""
    import torch

    origin = "device"
    if isinstance(value, torch.device):
        value = str(value)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env.lower() != "auto":
            value, origin = env, ENV_VAR
        else:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(value, str):
        raise DeviceError(f"{origin} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
    v = value.strip()
    low = v.lower()
    if low == "cpu":
        return torch.device("cpu")
    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    if _CUDA_RE.fullmatch(low):
        if not cuda:
            raise DeviceError(f"{origin} {value!r} asks for CUDA but no CUDA device is available "
                              f"({_available()}); use 'cpu' or 'auto'")
        if ":" in low and int(low.split(":")[1]) >= count:
            raise DeviceError(f"{origin} {value!r}: {_available()}")
        return torch.device(low)
    # a GPU name from MONAI Label's device_list(): "<name>" (one GPU) or "<name>:<index>"
    for i in range(count):
        name = torch.cuda.get_device_name(i)
        if v in (name, f"{name}:{i}"):
            return torch.device("cuda" if count == 1 else f"cuda:{i}")
    raise DeviceError(f"{origin} must be 'auto', 'cpu', 'cuda', 'cuda:N' or a GPU name of this machine, "
                      f"got {value!r} ({_available()})")
