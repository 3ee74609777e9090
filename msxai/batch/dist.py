"""Processes of a cohort run: torch.distributed set-up and the work queue in its key-value store.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment) each process joins the default
process group (nccl when it drives a GPU, gloo on the CPU; one process per GPU, ``cuda:<LOCAL_RANK>``) and uses the
group's store; without torchrun the run is one process with an in-memory ``HashStore``: the same code path.

Work assignment (:class:`WorkQueue`): a case index is claimed with ``store.add(next, 1)``, an atomic increment on
the store's server, so every index goes to exactly one process, in order, when that process is free (a heavy case
holds up only its own process). No collective operation is used after the start: a process with nothing left to
claim reports itself finished (``store.add(finished, 1)``) and leaves; rank 0 merges the summary once every
process has reported. Nothing waits on a collective with a timeout while another process works on a long case,
and a world larger than the cohort finishes (the hang of a DistributedSampler that pads or splits statically,
MONAI issue 5357, cannot happen).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from msxai.errors import InputError


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group
    store: object
    prefix: str
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def choose_device(device, local_rank: int, distributed: bool) -> torch.device:
    """The device of this process: :func:`msxai.device.resolve_device` (``auto``: ``$MSXAI_DEVICE``, else CUDA when
    available, else the CPU; CUDA that is not there is refused), then a bare ``cuda`` under torchrun means this
    process's GPU, ``cuda:<LOCAL_RANK>``. ``cpu`` and explicit ``cuda:K`` are kept."""
    from msxai.device import resolve_device

    dev = resolve_device(None if device is None else str(device))
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank if distributed else 0)
        if dev.index >= torch.cuda.device_count():
            raise InputError(f"{dev}: this machine has {torch.cuda.device_count()} GPU(s); start at most that many "
                             "processes per node (torchrun --nproc_per_node)")
    return dev


def init_distributed(device="auto") -> DistContext:
    """Join torchrun's process group (or use the one already initialised, e.g. by a bundle's
    ``multi_gpu_inference.json``), or set up a single process."""
    import torch.distributed as dist

    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"msxai_batch/{restart}/"
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
        dev = choose_device(device, local, True)
        return DistContext(rank, world, local, dev, dist.get_backend(), _default_store(), prefix)
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        dev = choose_device(device, local, True)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        return DistContext(rank, world, local, dev, backend, _default_store(), prefix, owns_group=True)
    return DistContext(0, 1, 0, choose_device(device, 0, False), None, dist.HashStore(), prefix)


def _default_store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


class WorkQueue:
    """Atomic claims of case indices ``0..n-1`` and progress counters in a torch.distributed store."""

    def __init__(self, ctx: DistContext, n: int, poll_s: float = 0.2):
        self.ctx, self.n, self.poll_s = ctx, int(n), poll_s
        self.store = ctx.store
        self.p = ctx.prefix

    def _add(self, key: str, amount: int) -> int:
        return int(self.store.add(self.p + key, int(amount)))

    def start(self) -> None:
        """Wait until every process has loaded its model, so that claims start together."""
        self._add("ready", 1)
        while self._add("ready", 0) < self.ctx.world_size:
            time.sleep(self.poll_s)

    def claim(self) -> int | None:
        """The next unclaimed case index, or None when all are taken."""
        i = self._add("next", 1) - 1
        return i if i < self.n else None

    def case_done(self, seconds: float, computed: bool) -> dict:
        """Count one finished case (``computed``: not skipped as already done) and return the cohort's progress."""
        done = self._add("done", 1)
        if computed:
            self._add("computed", 1)
            self._add("computed_ms", int(round(1000 * seconds)))
        return self.progress(done)

    def progress(self, done: int | None = None) -> dict:
        done = self._add("done", 0) if done is None else done
        computed = self._add("computed", 0)
        ms = self._add("computed_ms", 0)
        per_case = ms / 1000.0 / computed if computed else None
        remaining = max(self.n - done, 0)
        eta = None if per_case is None else remaining * per_case / max(self.ctx.world_size, 1)
        return {"done": done, "total": self.n, "computed": computed, "seconds_per_case": per_case, "eta_s": eta}

    def finish(self) -> None:
        self._add("finished", 1)

    def wait_finished(self) -> None:
        """Rank 0: wait (without a timeout: a case may take hours) until every process has finished."""
        while self._add("finished", 0) < self.ctx.world_size:
            time.sleep(self.poll_s)
