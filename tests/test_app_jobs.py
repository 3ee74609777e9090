"""The app's model thread and explain jobs without a server (apps/msxai/lib/jobs.py): short work (a segmentation)
that arrives while an explanation runs goes at the next checkpoint, i.e. after at most one chunk (asserted by the
order in which the work ran, not by a timer); cancelled jobs stop at their next chunk or never start; a shutdown
refuses new jobs. The same over HTTP against the real server: tests/test_app_security.py."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "apps" / "msxai"
if str(APP) not in sys.path:
    sys.path.insert(0, str(APP))


@pytest.fixture()
def registry():
    from lib.jobs import JobRegistry, ModelWorker

    return JobRegistry(ModelWorker(name="msxai-model-test"), budget_s=1e9)


def _explanation(job, order, chunks, hold_at=None, arrived=None, go=None):
    """Long work: ``chunks`` chunks, each followed by the job's checkpoint; during chunk ``hold_at`` it signals
    ``arrived`` and waits for ``go`` (the test submits other work meanwhile)."""
    def work():
        for i in range(chunks):
            order.append(f"chunk{i}")
            if i == hold_at:
                arrived.set()
                assert go.wait(60)
            job.checkpoint()
        return "explained"
    return work


def test_segmentation_waits_at_most_one_chunk(registry):
    order: list[str] = []
    job = registry.create("ann", "explain_smoothgrad", "img", {})
    arrived, go = threading.Event(), threading.Event()
    out = {}

    def request():  # the explain request's thread
        with job.bound():
            out["explain"] = registry.worker.run(_explanation(job, order, 5, hold_at=1, arrived=arrived, go=go))

    t = threading.Thread(target=request)
    t.start()
    assert arrived.wait(60)
    # two segmentations of other studies arrive while chunk 1 runs
    segs = [registry.worker.submit(lambda i=i: order.append(f"segmentation{i}") or i) for i in range(2)]
    go.set()
    assert [f.result(60) for f in segs] == [0, 1]
    t.join(60)
    assert out["explain"] == "explained"
    assert order == ["chunk0", "chunk1", "segmentation0", "segmentation1", "chunk2", "chunk3", "chunk4"]
    assert job.yielded == [[2, 2]] and job.chunks_done == 5
    # twin: without checkpoints (one long item), the same segmentation waits for the whole explanation
    order2: list[str] = []
    arrived2, go2 = threading.Event(), threading.Event()

    def plain():
        for i in range(3):
            order2.append(f"chunk{i}")
            if i == 1:
                arrived2.set()
                go2.wait(60)
        return "x"

    f = registry.worker.submit(plain)
    assert arrived2.wait(60)
    s = registry.worker.submit(lambda: order2.append("segmentation"))
    go2.set()
    f.result(60), s.result(60)
    assert order2 == ["chunk0", "chunk1", "chunk2", "segmentation"]


def test_cancel_stops_at_the_next_chunk_and_queued_jobs_never_start(registry):
    from lib.validation import JobCancelledError, status_for

    order: list[str] = []
    running = registry.create("ann", "explain_smoothgrad", "a", {})
    queued = registry.create("ann", "explain_gradcampp", "b", {})
    arrived, go = threading.Event(), threading.Event()
    errors = {}

    def request(job, work):
        with job.bound():
            try:
                registry.worker.run(work)
            except JobCancelledError as exc:
                errors[job.id] = exc

    t1 = threading.Thread(target=request, args=(running, _explanation(running, order, 6, 1, arrived, go)))
    t1.start()
    assert arrived.wait(60)
    t2 = threading.Thread(target=request, args=(queued, lambda: order.append("queued ran")))
    t2.start()
    while registry.worker.pending()[1] == 0:  # the second explanation is queued behind the first
        threading.Event().wait(0.01)
    running.cancel("admin1")
    queued.cancel("ann")
    go.set()
    t1.join(60)
    t2.join(60)
    assert order == ["chunk0", "chunk1"]  # stopped at the checkpoint after the chunk that was running
    assert "cancelled by admin1 after 2 of" in str(errors[running.id]) and status_for(errors[running.id]) == 409
    assert queued.id in errors and "queued ran" not in order
    # the model thread keeps serving
    assert registry.worker.run(lambda: 42) == 42
    # shutdown: running work is cancelled with 503, new explanations are refused
    registry.shutdown()
    with pytest.raises(JobCancelledError) as err:
        registry.create("ann", "explain_smoothgrad", "c", {})
    assert status_for(err.value) == 503 and err.value.shutdown
