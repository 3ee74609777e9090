"""Bounded model work: one model thread with two queues, explain jobs with a cost estimate, progress and cancel.

* :class:`ModelWorker` runs every model computation on one thread (all model memory allocated there, one run's
  worth). Short work (segmentations) goes first; an explanation is long work that calls :meth:`ModelWorker.checkpoint`
  after every chunk (one lesion x one noise batch, :func:`msxai.saliency.engine.write_explanation`), where the short
  work that arrived meanwhile runs. So a segmentation of another study waits for at most one chunk, never a whole
  explanation.
* :class:`JobRegistry` gives every explain request a :class:`Job`: before any saliency is computed its cost is
  estimated (:mod:`msxai.saliency.cost`, calibrated once per model and device on the serving device); above the
  budget (``--conf explain_budget_s``, ``explain_budget_gb``) the request is refused with a 4xx that names the
  estimate and how to narrow it. A running job reports its chunks done and can be cancelled (``DELETE
  /msxai/jobs/{id}``, its user or an admin); SIGTERM cancels every job (the server then exits as uvicorn does).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, HTTPException
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User

from msxai.saliency import cost as costs

from lib.validation import JobCancelledError, TooExpensiveError

logger = logging.getLogger(__name__)

DEFAULT_BUDGET_S = 600.0
_current = threading.local()


def current_job() -> "Job | None":
    return getattr(_current, "job", None)


class ModelWorker:
    """One model thread; short items first; long items (explanations) yield to short ones at their checkpoints."""

    def __init__(self, name: str = "msxai-model"):
        self._cv = threading.Condition()
        self._short: deque = deque()
        self._long: deque = deque()
        self.order: deque = deque(maxlen=200)  # (kind, label) of finished items, for the log and the tests
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def on_worker(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, fn, args=(), kwargs=None, job: "Job | None" = None) -> Future:
        fut: Future = Future()
        with self._cv:
            (self._long if job is not None else self._short).append((fut, fn, args, kwargs or {}, job))
            self._cv.notify()
        return fut

    def run(self, fn, *args, **kwargs):
        """Run ``fn`` on the model thread and wait (as long work when the calling thread is bound to a job)."""
        if self.on_worker():
            return fn(*args, **kwargs)
        return self.submit(fn, args, kwargs, current_job()).result()

    def checkpoint(self) -> int:
        """Called by long work on the model thread between chunks: run the short work that is waiting (returns how
        many items ran)."""
        n = 0
        while True:
            with self._cv:
                if not self._short:
                    return n
                item = self._short.popleft()
            self._execute(item)
            n += 1

    def pending(self) -> tuple[int, int]:
        with self._cv:
            return len(self._short), len(self._long)

    def _loop(self):
        while True:
            with self._cv:
                while not self._short and not self._long:
                    self._cv.wait()
                item = self._short.popleft() if self._short else self._long.popleft()
            self._execute(item)

    def _execute(self, item):
        fut, fn, args, kwargs, job = item
        if not fut.set_running_or_notify_cancel():
            return
        try:
            if job is not None:
                job.check_cancel()
                job.state = "running"
                job.started = time.time()
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # re-raised in the waiting request thread
            fut.set_exception(exc)
        finally:
            self.order.append(("explain" if job is not None else "model", getattr(job, "id", None)))


@dataclass
class Job:
    id: str
    user: str
    task: str
    image: str
    params: dict
    registry: "JobRegistry"
    state: str = "queued"  # queued, running, done, failed, refused, cancelled
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    chunks_total: int | None = None
    chunks_done: int = 0
    estimate: dict | None = None
    message: str = ""
    cancelled_by: str | None = None
    yielded: list = field(default_factory=list)  # [chunks done, model runs that went first] at each checkpoint
    _cancel: threading.Event = field(default_factory=threading.Event)
    _shutdown: bool = False

    def to_json(self) -> dict:
        return {"id": self.id, "user": self.user, "task": self.task, "image": self.image, "params": self.params,
                "state": self.state, "created": self.created, "started": self.started, "finished": self.finished,
                "chunks_total": self.chunks_total, "chunks_done": self.chunks_done, "estimate": self.estimate,
                "elapsed_s": round((self.finished or time.time()) - self.started, 1) if self.started else None,
                "message": self.message, "cancelled_by": self.cancelled_by, "yielded": list(self.yielded)}

    # ------------------------------------------------------------------------------------ on the worker
    def bound(self):
        job = self

        class _Bind:
            def __enter__(self):
                _current.job = job

            def __exit__(self, *exc):
                _current.job = None

        return _Bind()

    def check_cancel(self):
        if self._cancel.is_set():
            raise JobCancelledError(
                "explanation cancelled: the server is shutting down" if self._shutdown
                else f"explanation cancelled by {self.cancelled_by or 'a user'} after {self.chunks_done} of "
                     f"{self.chunks_total or '?'} chunks", shutdown=self._shutdown)

    def checkpoint(self, info=None):
        """After every chunk: count it, stop here if cancelled, let waiting model runs (segmentations) go first."""
        self.chunks_done += 1
        self.check_cancel()
        n = self.registry.worker.checkpoint()
        if n:
            self.yielded.append([self.chunks_done, n])
        self.check_cancel()

    def admit(self, bundle, prepared, domains, params, device):
        """Estimate the explanation's cost; refuse it above the budget (nothing is computed then)."""
        self.registry.admit(self, bundle, prepared, domains, params, device)

    def cancel(self, by: str | None, shutdown: bool = False):
        self.cancelled_by = by
        self._shutdown = self._shutdown or shutdown
        self._cancel.set()


_registries: "weakref.WeakSet[JobRegistry]" = weakref.WeakSet()
_signals_installed = False


class JobRegistry:
    def __init__(self, worker: ModelWorker, budget_s: float = DEFAULT_BUDGET_S, budget_bytes: float | None = None,
                 max_samples: int = 200):
        self.worker = worker
        self.budget_s = float(budget_s)
        if budget_bytes is None:
            try:
                budget_bytes = 0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            except (ValueError, OSError, AttributeError):
                budget_bytes = 4 * 2**30
        self.budget_bytes = float(budget_bytes)
        self.max_samples = int(max_samples)
        self._jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._units: dict[tuple, dict] = {}
        self.accepting = True
        _registries.add(self)

    @classmethod
    def from_conf(cls, conf, worker: ModelWorker, max_samples: int) -> "JobRegistry":
        conf = conf or {}
        try:
            budget_s = float(conf.get("explain_budget_s", DEFAULT_BUDGET_S))
            gb = conf.get("explain_budget_gb")
            budget_bytes = float(gb) * 2**30 if gb not in (None, "") else None
        except ValueError:
            raise ValueError("--conf explain_budget_s / explain_budget_gb must be numbers") from None
        if budget_s <= 0 or (budget_bytes is not None and budget_bytes <= 0):
            raise ValueError("--conf explain_budget_s / explain_budget_gb must be > 0")
        return cls(worker, budget_s, budget_bytes, max_samples)

    # -------------------------------------------------------------------------------------------- jobs
    def create(self, user: str, task: str, image: str, params: dict) -> Job:
        if not self.accepting:
            raise JobCancelledError("the server is shutting down: no new explanation is started", shutdown=True)
        with self._lock:
            job = Job(f"j{next(self._ids)}", user, task, image, params, self)
            self._jobs[job.id] = job
            done = [j for j in self._jobs.values() if j.finished]
            for old in done[: max(0, len(done) - 100)]:  # keep the last 100 finished jobs
                self._jobs.pop(old.id, None)
        return job

    def get(self, job_id) -> Job | None:
        return self._jobs.get(job_id) if isinstance(job_id, str) else None

    def list(self) -> list[Job]:
        return list(self._jobs.values())

    def finish(self, job: Job, state: str, message: str = ""):
        job.state, job.message, job.finished = state, message[:2000], time.time()
        logger.info(f"msxai: job {job.id} ({job.task} {job.image} by {job.user}) {state}"
                    + (f" after {job.chunks_done}/{job.chunks_total} chunks" if job.chunks_total else "")
                    + (f": {message[:300]}" if message and state != "done" else ""))

    def shutdown(self, reason: str = "shutdown"):
        """Stop accepting explanations and cancel every queued or running one (SIGTERM)."""
        self.accepting = False
        for job in self.list():
            if not job.finished:
                job.cancel(reason, shutdown=True)

    # ---------------------------------------------------------------------------------------- admission
    def units(self, bundle, prepared, device: str) -> costs.UnitCosts:
        """Unit costs of a bundle on a device (window passes measured once, on the model thread; noise draw and map
        write once per image shape)."""
        from msxai.saliency.sliding import SlidingWindowSpec

        name = str(getattr(bundle, "path", id(bundle)))
        wkey = (name, device)
        if wkey not in self._units:
            spec = SlidingWindowSpec.from_inferer(bundle.inferer)
            self._units[wkey] = costs.measure_window_costs(bundle.network, spec, prepared.image, device)
            logger.info(f"msxai: explain cost units of {name} on {device} measured in "
                        f"{self._units[wkey]['measured_s']:.1f} s: {self._units[wkey]}")
        shape = tuple(int(s) for s in prepared.image.shape[1:])
        if shape not in self._units:
            self._units[shape] = costs.measure_io_costs(shape)
        return costs.unit_costs(self._units[wkey], self._units[shape])

    def admit(self, job: Job, bundle, prepared, domains, params, device):
        from msxai.saliency.sliding import SlidingWindowSpec

        shape = tuple(int(s) for s in prepared.image.shape[1:])
        grid = SlidingWindowSpec.from_inferer(bundle.inferer).grid(shape)
        works = costs.works_of(grid, domains)
        units = self.units(bundle, prepared, device)
        nvox = costs.image_voxels(shape)
        if params.method == "smoothgrad":
            est = costs.estimate_smoothgrad(works, units, params.samples, params.aggregation, nvox,
                                            int(prepared.image.shape[0]))
        else:
            est = costs.estimate_gradcampp(works, units, grid.num_windows, nvox)
        job.estimate = dict(est.as_dict(), units=units.as_dict(), budget_s=self.budget_s,
                            budget_bytes=int(self.budget_bytes))
        job.chunks_total = est.chunks
        over_time = est.seconds > self.budget_s
        over_mem = est.map_bytes > self.budget_bytes
        if not (over_time or over_mem):
            logger.info(f"msxai: job {job.id} admitted: {len(works)} domain(s), {est.voxels} voxels, estimate "
                        f"{costs.fmt_seconds(est.seconds)} in {est.chunks} chunks (budget "
                        f"{costs.fmt_seconds(self.budget_s)})")
            return
        what = (f"{job.task} of {len(works)} domain(s) ({est.voxels} voxels) on {device}"
                + (f" with samples={params.samples}, aggregation={params.aggregation} "
                   f"(Eq. {3 if params.aggregation == 'max' else 2})" if params.method == "smoothgrad" else ""))
        if over_time:
            msg = (f"{what} is estimated at {costs.fmt_seconds(est.seconds)}, above this server's budget of "
                   f"{costs.fmt_seconds(self.budget_s)} (--conf explain_budget_s).")
        else:
            msg = (f"{what} would keep {est.map_bytes / 2**30:.1f} GB of saliency maps, above this server's budget "
                   f"of {self.budget_bytes / 2**30:.1f} GB (--conf explain_budget_gb).")
        if params.method == "smoothgrad":
            budget = self.budget_s if over_time else est.seconds * self.budget_bytes / max(1, est.map_bytes)
            advice = costs.narrowing_advice(works, units, params.samples, params.aggregation, budget,
                                            self.max_samples)
        else:
            advice = ["fewer lesions (lesion=<id> or a list)"]
        if advice:
            msg += " To narrow it: " + "; ".join(advice) + "."
        job.message = msg
        raise TooExpensiveError(msg)


# ------------------------------------------------------------------------------------------------ signals
def install_signal_handlers() -> bool:
    """SIGTERM/SIGINT cancel every explanation (at its next chunk), then do what the server's own handler does
    (uvicorn: a graceful shutdown, which waits for the requests, now answered 503). Main thread only."""
    global _signals_installed
    if _signals_installed or threading.current_thread() is not threading.main_thread():
        return _signals_installed
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum, frame, previous=previous):
            n = 0
            for reg in list(_registries):
                n += sum(1 for j in reg.list() if not j.finished)
                reg.shutdown()
            logger.warning(f"msxai: signal {signum}: {n} explanation(s) cancelled")
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(sig, handler)
    _signals_installed = True
    return True


# --------------------------------------------------------------------------------------------------- routes
def build_jobs_router(app) -> APIRouter:
    admin = settings.MONAI_LABEL_AUTH_ROLE_ADMIN
    router = APIRouter(prefix="/msxai/jobs", tags=["msxai"])

    def visible(job: Job, user: User) -> bool:
        return job.user == user.username or admin in user.roles

    @router.get("", summary="Explain jobs (yours; an admin sees all): state, estimate, chunks done")
    def msxai_jobs(user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        jobs = [j.to_json() for j in app.jobs.list() if visible(j, user)]
        short, long = app.jobs.worker.pending()
        return {"jobs": jobs, "queued_model_runs": short, "queued_explanations": long,
                "budget_s": app.jobs.budget_s}

    @router.get("/{job_id}", summary="One explain job")
    def msxai_job(job_id: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        job = app.jobs.get(job_id)
        if job is None or not visible(job, user):
            raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
        return job.to_json()

    @router.delete("/{job_id}", summary="Cancel an explain job (at its next chunk)")
    def msxai_job_cancel(job_id: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        job = app.jobs.get(job_id)
        if job is None or not visible(job, user):
            raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
        if job.finished:
            raise HTTPException(status_code=409, detail=f"job {job_id} is already {job.state}")
        job.cancel(user.username)
        logger.info(f"msxai: job {job_id} cancelled by {user.username}")
        return job.to_json()

    return router
