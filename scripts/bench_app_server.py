#!/usr/bin/env python
"""The served app under load: latency of /info and the server's memory while explain requests queue, in one run.

The app is started exactly as tests/test_app_server.py starts it (``tests/app_helpers.py``: ``monailabel
start_server`` on 127.0.0.1 over small synthetic studies, 61x73x61 voxels) with ``--models`` (default: the U-Net
bundle). The explained domain is the largest true lesion of ``synth000`` uploaded as a drawn label (like a client
asking "why was this missed?"), so nothing depends on what the bundle finds. The resident memory of the server
process and its children (psutil) is sampled every 0.1 s. Two phases, in the same run:

* ``alone``: one SmoothGrad (Eq. 2, ``--samples`` noise copies) and one Grad-CAM++ request, one after the other:
  the wall time of each and the server's peak memory for a single run;
* ``queued``: ``--requests`` requests sent at once (SmoothGrad and Grad-CAM++ alternating) while /info is polled
  every 0.5 s: the wall time of the whole queue, /info latency (max, median) and the peak memory.

Reported ratios: queued peak / alone peak (model runs are serialised, queued requests hold only their parameters:
expected ~1), queue time / the alone times summed over the queue (expected ~1: runs one after the other), and the
slowest /info answer / queue time (expected << 1: the event loop answers between model runs at worst). The load
average is printed before and after (the machine may be shared).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_app_server.py
    .venv/bin/python scripts/bench_app_server.py --requests 16 --samples 2 --json runs/bench_app_server.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests", REPO / "apps" / "msxai"):  # as tests/conftest.py: the app's packages last
    if str(p) not in sys.path:
        sys.path.append(str(p))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from app_helpers import Server, write_small_studies  # noqa: E402


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its children, MiB."""
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


class Sampler:
    """Samples :func:`rss_mb` of ``pid`` every ``period`` s in a thread; ``mark()`` starts a new phase."""

    def __init__(self, pid: int, period: float = 0.1):
        self.pid, self.period = pid, period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(rss_mb(self.pid))
            time.sleep(self.period)

    def start(self):
        self._thread.start()
        return self

    def mark(self) -> int:
        return len(self.samples)

    def peak(self, since: int = 0) -> float:
        return max(self.samples[since:], default=0.0)

    def stop(self):
        self._stop.set()
        self._thread.join()


def drawn_domain(studies: Path, out: Path) -> tuple[Path, int]:
    """The largest true lesion of synth000 as an uploaded label."""
    img = nib.load(str(studies / "synth000_lesions.nii.gz"))
    truth = np.asarray(img.dataobj)
    ids, counts = np.unique(truth[truth > 0], return_counts=True)
    mask = truth == ids[np.argmax(counts)]
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), img.affine), str(out))
    return out, int(mask.sum())


def info_latency(url: str) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url + "/info/", timeout=600) as r:
        r.read()
        if r.status != 200:
            raise RuntimeError(f"/info answered {r.status}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="unet", help="the bundles the server loads (its --conf models)")
    ap.add_argument("--network", default="unet", help="the bundle the explain requests use")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--samples", type=int, default=1, help="SmoothGrad noise copies per request (Eq. 2, mean)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    from monailabel.client import MONAILabelClient

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_app_server_") as tmp:
        tmp = Path(tmp)
        studies = write_small_studies(tmp / "studies")
        label, voxels = drawn_domain(studies, tmp / "drawn.nii.gz")
        t0 = time.perf_counter()
        server = Server(studies, tmp / "server.log", models=args.models)
        start_s = time.perf_counter() - t0
        try:
            kinds = [("explain_smoothgrad", {"model": args.network, "samples": args.samples, "aggregation": "mean",
                                             "seed": 11}),
                     ("explain_gradcampp", {"model": args.network})]
            reqs = [kinds[i % 2] for i in range(args.requests)]
            sampler = Sampler(server.proc.pid).start()
            time.sleep(1.0)
            idle = sampler.peak()

            def infer(i: int, kind) -> float:
                d = tmp / f"client{i}"
                d.mkdir(exist_ok=True)
                c = MONAILabelClient(server.url, tmpdir=str(d))
                t = time.perf_counter()
                c.infer(kind[0], "synth000_FLAIR", kind[1], label_in=str(label))
                return time.perf_counter() - t

            # phase 1: one of each kind alone (the first run of each also warms the server up: run it twice)
            for kind in kinds:
                infer(-1, kind)
            m1 = sampler.mark()
            alone = {kind[0]: infer(-1, kind) for kind in kinds}
            single_peak = sampler.peak(m1)

            # phase 2: all at once, /info polled meanwhile
            m2 = sampler.mark()
            errors: list[str] = []
            done: dict[int, float] = {}

            def run(i):
                try:
                    done[i] = infer(i, reqs[i])
                except Exception as exc:  # reported below
                    errors.append(f"request {i}: {exc!r}")

            threads = [threading.Thread(target=run, args=(i,)) for i in range(args.requests)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            latencies = []
            while any(t.is_alive() for t in threads):
                latencies.append(info_latency(server.url))
                time.sleep(0.5)
            for t in threads:
                t.join()
            queue_s = time.perf_counter() - t0
            many_peak = sampler.peak(m2)
            sampler.stop()
        finally:
            server.stop()
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1
    serial_s = sum(alone[k[0]] for k in reqs)
    fig = {
        "models_loaded": args.models, "network": args.network, "requests": args.requests, "samples": args.samples,
        "domain_voxels": voxels, "server_start_s": round(start_s, 1),
        "alone_s": {k: round(v, 2) for k, v in alone.items()},
        "queue_s": round(queue_s, 2), "queue_over_serial": round(queue_s / serial_s, 2),
        "info_polls": len(latencies), "info_max_s": round(max(latencies, default=0.0), 3),
        "info_median_s": round(statistics.median(latencies), 3) if latencies else None,
        "info_max_over_queue": round(max(latencies, default=0.0) / queue_s, 3),
        "rss_idle_mb": round(idle), "rss_alone_peak_mb": round(single_peak), "rss_queued_peak_mb": round(many_peak),
        "rss_queued_over_alone": round(many_peak / single_peak, 3),
        "loadavg_before": round(load_before, 2), "loadavg_after": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    print(f"server ({args.models}) answered /info after {fig['server_start_s']} s; domain {voxels} voxels")
    print("alone: " + ", ".join(f"{k} {v:.1f} s" for k, v in fig["alone_s"].items())
          + f"; server RSS idle {fig['rss_idle_mb']} MB, peak {fig['rss_alone_peak_mb']} MB")
    print(f"{args.requests} at once: {queue_s:.1f} s (the alone times summed: {serial_s:.1f} s, ratio "
          f"{fig['queue_over_serial']}); /info max {fig['info_max_s']} s, median {fig['info_median_s']} s over "
          f"{len(latencies)} polls (max / queue time {fig['info_max_over_queue']}); server RSS peak "
          f"{fig['rss_queued_peak_mb']} MB (queued / alone {fig['rss_queued_over_alone']})")
    print(f"load average {fig['loadavg_before']} before, {fig['loadavg_after']} after, on {fig['cpus']} CPUs")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
