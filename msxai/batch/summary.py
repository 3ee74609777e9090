"""Merge the per-case results of a cohort run into one summary.

Written into the run's folder (each file atomically):

- ``cases.json`` / ``cases.csv``: one row per case of the run, in the run's order: ``case``, ``status`` (``done``,
  ``failed``, ``stale`` = done with other settings/weights/inputs, ``missing``), lesion counts, the metrics when the
  truth was given (Dice, nDSC, lesion-wise TPR/FDR/FNR/F1, ...), seconds (total, segmentation, explanation),
  ``device``, ``rank``, ``host``, and for failures ``error_kind`` and ``error``;
- ``domains.json`` / ``domains.csv``: the rows of every done case's ``domains.json`` (one per explained domain with
  its class and saliency summary; :func:`msxai.batch.case.domain_rows`);
- ``cohort.json``: counts per status, the run's identity (bundle, weights sha256, settings), mean metrics over the
  done cases with truth, seconds, cases per hour, and the cases each process did.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

CASE_COLUMNS = ("case", "status", "n_lesions", "n_tp", "n_fp", "n_fn", "n_tn", "n_explained", "dice", "ndsc",
                "TPR", "FDR", "FNR", "precision", "F1", "n_pred", "n_truth", "detected", "seconds",
                "seconds_segment", "seconds_explain", "device", "rank", "host", "finished_utc", "error_kind", "error")
RUN_COLUMNS = ("seconds", "seconds_segment", "seconds_explain", "device", "rank", "host", "finished_utc")


def _write_csv(path: Path, rows: list[dict], columns=None) -> None:
    import os

    cols = list(columns or [])
    for r in rows:
        cols += [k for k in r if k not in cols]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    os.replace(tmp, path)


def case_row(case_id: str, out: Path, identity_sha256: str | None) -> tuple[dict, list[dict]]:
    """The summary row of one case and its domain rows (empty unless done)."""
    from msxai.batch.case import read_marker

    folder = out / "cases" / case_id
    marker = read_marker(folder)
    fail = None
    fp = out / "failures" / f"{case_id}.json"
    if fp.is_file():
        try:
            fail = json.loads(fp.read_text())
        except (OSError, json.JSONDecodeError):
            fail = {"kind": "error", "error": f"unreadable failure record {fp}"}
    row = {"case": case_id}
    if marker and marker.get("status") == "done" and (identity_sha256 is None
                                                      or marker.get("identity_sha256") == identity_sha256):
        c, sec, m = marker.get("counts", {}), marker.get("seconds", {}), marker.get("metrics") or {}
        row.update(status="done", n_lesions=c.get("lesions"), n_tp=c.get("tp"), n_fp=c.get("fp"), n_fn=c.get("fn"),
                   n_tn=c.get("tn"), n_explained=c.get("explained"), seconds=sec.get("total"),
                   seconds_segment=sec.get("segment"), seconds_explain=sec.get("explain"),
                   device=marker.get("device"), rank=marker.get("rank"), host=marker.get("host"),
                   finished_utc=marker.get("finished_utc"))
        for k in ("dice", "ndsc", "TPR", "FDR", "FNR", "precision", "F1", "n_pred", "n_truth", "detected"):
            if k in m:
                row[k] = m[k]
        domains = []
        dp = folder / "domains.json"
        if dp.is_file():
            domains = json.loads(dp.read_text())
        return row, domains
    if fail is not None:
        row.update(status="failed", error_kind=fail.get("kind"), error=fail.get("error"),
                   seconds=fail.get("seconds"), device=fail.get("device"), rank=fail.get("rank"),
                   host=fail.get("host"), finished_utc=fail.get("finished_utc"))
    elif marker:
        row.update(status="stale", error="done with other settings, weights or inputs: rerun to redo it")
    else:
        row.update(status="missing")
    return row, []


def summarize(out_dir, cases=None, identity: dict | None = None, wall_s: float | None = None,
              world_size: int | None = None, computed: int | None = None) -> dict:
    """Merge the case folders of ``out_dir`` into ``cases.*``, ``domains.*`` and ``cohort.json``; ``cases``: the run's
    case list (default: every case folder and failure record found), ``identity``: the run's
    (:func:`msxai.batch.case.run_identity`; default: done cases count whatever their settings); ``wall_s``,
    ``world_size``, ``computed``: the run's wall time, process count and number of cases computed (not skipped),
    for the cases per hour."""
    from msxai.batch.case import sha_of, write_json_atomic
    from msxai.metrics import aggregate

    out = Path(out_dir)
    if cases is None:
        ids = sorted({p.name for p in (out / "cases").glob("*") if p.is_dir() and not p.name.startswith(".")}
                     | {p.stem for p in (out / "failures").glob("*.json")})
    else:
        ids = [c.id if hasattr(c, "id") else str(c) for c in cases]
    ident_sha = sha_of(identity) if identity is not None else None
    rows, domains = [], []
    for cid in ids:
        r, d = case_row(cid, out, ident_sha)
        rows.append(r)
        domains += d
    counts = {k: sum(1 for r in rows if r["status"] == k) for k in ("done", "failed", "stale", "missing")}
    done = [r for r in rows if r["status"] == "done"]
    with_truth = [{k: r[k] for k in ("dice", "ndsc", "TPR", "FDR", "FNR", "F1") if k in r} for r in done if "dice" in r]
    computed_s = sum(float(r.get("seconds") or 0.0) for r in done)
    per_rank: dict[str, list[str]] = {}
    for r in done:
        per_rank.setdefault(f"{r.get('host')}:rank{r.get('rank')}", []).append(r["case"])
    summary = {
        "schema": "msxai.batch.cohort/1",
        "n_cases": len(rows), "counts": counts,
        "identity": identity, "identity_sha256": ident_sha,
        "metrics_mean": aggregate(with_truth)["mean"] if with_truth else None,
        "n_lesions": sum(int(r.get("n_lesions") or 0) for r in done),
        "n_domains_explained": len(domains),
        "seconds_in_cases": round(computed_s, 3),
        "wall_s": None if wall_s is None else round(float(wall_s), 3),
        "world_size": world_size,
        "cases_computed": computed,
        "cases_per_hour": (round(3600.0 * computed / wall_s, 2) if wall_s and computed else None),
        "cases_by_process": per_rank,
        "failed": {r["case"]: f"{r.get('error_kind')}: {r.get('error')}" for r in rows if r["status"] == "failed"},
    }
    write_json_atomic(out / "cases.json", rows)
    _write_csv(out / "cases.csv", rows, CASE_COLUMNS)
    write_json_atomic(out / "domains.json", domains)
    _write_csv(out / "domains.csv", domains, ("case", "domain", "cls", "lesion_id"))
    write_json_atomic(out / "cohort.json", summary)
    return summary
