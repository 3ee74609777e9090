"""The cohort loop of one process: claim a case, run it, report progress; rank 0 merges the summary at the end."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from msxai.errors import InputError


def _fmt_s(seconds) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progress_line(ctx, rec: dict, prog: dict) -> str:
    """``[rank 1/3] case07 done in 12.3 s (5 lesions, 7 explained) | cohort 7/40 | ETA 6m10s``."""
    what = rec["status"]
    if what == "done":
        what = f"done in {rec['seconds']:.1f} s ({rec.get('lesions', 0)} lesions, {rec.get('explained', 0)} explained)"
    elif what == "skipped":
        what = "already done (skipped)"
    else:
        what = f"FAILED ({rec.get('error', '')[:200]})"
    return (f"[rank {ctx.rank}/{ctx.world_size} {ctx.device}] {rec['case']} {what} | cohort {prog['done']}/"
            f"{prog['total']} | ETA {_fmt_s(prog['eta_s'])}")


def write_rank_state(out: Path, ctx, state: str, current: str | None, done: int) -> None:
    """``OUT/ranks/rank<r>.json``: ``state`` (``ready``, ``working``, ``finished``), the case in hand, the cases
    this process has taken, pid, host, device."""
    from msxai.batch.case import write_json_atomic

    write_json_atomic(out / "ranks" / f"rank{ctx.rank}.json",
                      {"rank": ctx.rank, "world_size": ctx.world_size, "state": state, "current_case": current,
                       "cases_taken": done, "pid": os.getpid(), "host": socket.gethostname(),
                       "device": str(ctx.device), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def check_cases(cases, settings) -> None:
    """Refuse a run that cannot do what it is asked before any model is loaded."""
    if not cases:
        raise InputError("no cases to run")
    if settings.explain == "domains":
        missing = [c.id for c in cases if not c.truth]
        if missing:
            raise InputError(f"explain 'domains' (TP/FP/FN/TN) needs the truth of every case; none for "
                             f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")


def run_batch(bundle, cases, out_dir, settings, ctx=None, progress: bool = True, checkpoint=None,
              merge: bool = True) -> dict | None:
    """Run every case of ``cases`` (:class:`msxai.batch.cases.Case`) with ``bundle`` into ``out_dir``.

    ``ctx``: the process's :class:`msxai.batch.dist.DistContext` (default: :func:`init_distributed` on the
    bundle's device). Returns this process's records and, on rank 0 (``merge``), the merged cohort summary."""
    from tqdm import tqdm

    from msxai.batch.case import CaseRunner
    from msxai.batch.dist import WorkQueue, init_distributed
    from msxai.batch.summary import summarize

    settings = settings.validate()
    cases = list(cases)
    check_cases(cases, settings)
    own_ctx = ctx is None
    if ctx is None:
        ctx = init_distributed(bundle.device)
    out = Path(out_dir)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    runner = CaseRunner(bundle, settings, out, ctx.rank, ctx.world_size, checkpoint)
    queue = WorkQueue(ctx, len(cases))
    write_rank_state(out, ctx, "ready", None, 0)
    queue.start()
    bar = tqdm(total=len(cases), desc=f"rank {ctx.rank}/{ctx.world_size}", unit="case", position=ctx.local_rank,
               disable=not progress, leave=True, dynamic_ncols=True)
    records = []
    t_start = time.perf_counter()
    try:
        while (i := queue.claim()) is not None:
            write_rank_state(out, ctx, "working", cases[i].id, len(records))
            rec = runner.run(cases[i])
            rec["index"] = i
            records.append(rec)
            prog = queue.case_done(rec["seconds"], rec["status"] != "skipped")
            bar.n = prog["done"]
            bar.set_postfix_str(f"mine {len(records)}, ETA {_fmt_s(prog['eta_s'])}", refresh=True)
            tqdm.write(progress_line(ctx, rec, prog))
    finally:
        bar.close()
    queue.finish()
    write_rank_state(out, ctx, "finished", None, len(records))
    result = {"rank": ctx.rank, "world_size": ctx.world_size, "records": records,
              "seconds": time.perf_counter() - t_start}
    if ctx.rank == 0 and merge:
        queue.wait_finished()
        result["summary"] = summarize(out, cases, runner.identity, wall_s=time.perf_counter() - t_start,
                                      world_size=ctx.world_size, computed=queue.progress()["computed"])
        s = result["summary"]
        print(f"cohort: {s['counts']['done']} done, {s['counts']['failed']} failed, {s['counts']['missing']} "
              f"missing of {s['n_cases']} | {s['wall_s']:.0f} s wall, {s['world_size']} process(es) | "
              f"{out / 'cohort.json'}", flush=True)
    if own_ctx:
        ctx.close()
    return result
