"""Experiments 2, 3 and the saliency-based error flag from the pooled outputs of cohort runs (no network).

A cohort run with ``--explain domains`` (instance SmoothGrad of every TP, FP and FN lesion and of the TN balls)
leaves, per case, the lesion maps, the truth instances, the TN balls and the saliency maps on disk. This module
reads them back (one or several run folders, e.g. one per machine) and fills the experiment results of
:mod:`msxai.experiments` with the experiments package's own functions (those ``msxai experiments`` runs, from
:mod:`msxai.experiments.bulk`): :func:`saliency_features` and :func:`exp2_lesion` per domain, :func:`exp2_table`,
:func:`exp3_tables` and :func:`error_flag_results` (cross-validated and fitted error flag);
:func:`msxai.experiments.report.write_report` writes the usual report. Experiments 1
(Eq. 2 vs Eq. 3), 4 (sanity domains), 5 (transplants), 6 (context dilation) and the model randomisation check
compute new maps or forward passes: they still need the network (``msxai experiments --bundle B --cohort C``), and
the report says so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from msxai.errors import InputError


def _done_cases(dirs) -> list[tuple[Path, dict]]:
    from msxai.batch.case import read_marker

    found: dict[str, tuple[Path, dict]] = {}
    for d in dirs:
        d = Path(d)
        if not (d / "cases").is_dir():
            raise InputError(f"{d}: not a cohort run folder (no cases/; make one with msxai batch --out {d})")
        for folder in sorted(p for p in (d / "cases").iterdir() if p.is_dir() and not p.name.startswith(".")):
            m = read_marker(folder)
            if not m or m.get("status") != "done":
                continue
            if m["case"] in found:
                raise InputError(f"case {m['case']} is in two cohort runs ({found[m['case']][0]} and {folder}): "
                                 "pool runs of different cases")
            found[m["case"]] = (folder, m)
    if not found:
        raise InputError(f"no finished case in {', '.join(str(d) for d in dirs)}")
    return [found[k] for k in sorted(found)]


def _load(path: Path, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    from msxai.io import load_volume

    v = load_volume(path, path.name, dtype=dtype)
    return v.array, v.affine


def cohort_config(identity: dict, base=None):
    """The :class:`ExperimentConfig` that describes the maps of a cohort run (N, aggregation, sigma, seed, TN)."""
    from dataclasses import replace

    from msxai.experiments.state import ExperimentConfig

    st = identity["settings"]
    cfg = base or ExperimentConfig()
    return replace(cfg, samples=int(st["samples"]), aggregation=st["aggregation"],
                   sigma_fraction=float(st["sigma_fraction"]), seed=int(st["seed"]), n_tn=int(st.get("n_tn", 0)),
                   tn_mm3=float(st.get("tn_mm3", cfg.tn_mm3)),
                   classes=tuple(st.get("classes", cfg.classes)), skip=("exp1", "exp4", "exp5", "exp6",
                                                                         "randomization"), progress=False)


def experiments_from_cohort(dirs, config=None):
    """``ModelResults`` of experiments 2, 3 and the error flag from cohort run folders ``dirs`` (their finished
    cases, pooled); ``config``: an :class:`ExperimentConfig` for the analysis (``min_abs``, ``min_abs_relative``,
    ``ring_mm``, ``n_boot``, ``seed`` of the bootstrap); the map settings come from the runs' done-markers."""
    from msxai import SEQUENCE_KEYS
    from msxai.experiments.bulk import error_flag_results, exp2_lesion, exp2_table, exp3_tables
    from msxai.experiments.features import saliency_features
    from msxai.experiments.state import ModelResults
    from msxai.lesions import classify_lesions, lesion_ids
    from msxai.metrics import dice, lesion_metrics

    t0 = time.time()
    dirs = [Path(d) for d in (dirs if isinstance(dirs, (list, tuple)) else [dirs])]
    done = _done_cases(dirs)
    idents = {m["identity_sha256"]: m for _, m in done}
    if len(idents) > 1:
        raise InputError("the cohort runs used different weights or settings (" + ", ".join(
            f"{m['case']}: {m['identity']['weights_sha256'][:12]} {m['identity']['settings']}" for m in
            idents.values()) + "): pool only runs made alike")
    marker = done[0][1]
    ident = marker["identity"]
    st = ident["settings"]
    if st.get("explain") == "none" or st.get("method") != "smoothgrad":
        raise InputError("experiments 2, 3 and the error flag read instance SmoothGrad maps: the cohort run must "
                         f"use --explain domains (or lesions) with smoothgrad (it used {st})")
    base = config
    cfg = cohort_config(ident, base)
    model_name = marker.get("bundle", "bundle")
    source = (f"cohort run{'s' if len(dirs) > 1 else ''} {', '.join(str(d) for d in dirs)} (weights sha256 "
              f"{str(ident['weights_sha256'])[:16]})")
    res = ModelResults(model_name, source, cfg.as_dict())
    exp2_vals = {k: {"inside": [], "ring": []} for k in SEQUENCE_KEYS}
    exp2_counts = {k: {"inside": [0, 0], "ring": [0, 0]} for k in SEQUENCE_KEYS}
    case_book, states = [], []
    for folder, m in done:
        cid = m["case"]
        truth_path = folder / "truth_lesions.nii.gz"
        if not truth_path.is_file():
            res.notes.append(f"{cid}: no truth, not in the experiments")
            continue
        pred, affine = _load(folder / "lesions.nii.gz", np.int32)
        truth, _ = _load(truth_path, np.int32)
        prob, _ = _load(folder / "probability.nii.gz")
        tn = _load(folder / "tn_spheres.nii.gz", np.int32)[0] if (folder / "tn_spheres.nii.gz").is_file() else None
        classes = classify_lesions(pred, truth)
        seg = lesion_metrics(pred, truth)
        seg.update(model=model_name, case=cid, dice=dice(pred > 0, truth > 0),
                   n_tn_spheres=int(tn.max()) if tn is not None else 0)
        res.segmentation.append(seg)
        case_book.append({"case": cid, "pairs": classes.pairs, "pred_ids": lesion_ids(pred),
                          "truth_ids": lesion_ids(truth), "fp_ids": list(classes.fp)})
        states.append(SimpleNamespace(id=cid, spec=SimpleNamespace(source=str(folder.parent.parent.name))))
        rows = json.loads((folder / "domains.json").read_text()) if (folder / "domains.json").is_file() else []
        for r in rows:
            cls, ident_ = r["cls"], int(r["lesion_id"])
            dom = {"TP": pred, "FP": pred, "FN": truth, "TN": tn}.get(cls)
            if dom is None:
                continue
            dom = dom == ident_
            maps = np.stack([_load(folder / "saliency" / f"{r['domain']}_smoothgrad_{k}.nii.gz")[0]
                             for k in SEQUENCE_KEYS])
            feats = saliency_features(maps, dom, prob, affine, cfg.ring_mm)
            row = {"model": model_name, "case": cid, "cls": cls, "lesion_id": ident_, "voxels": int(dom.sum()),
                   "volume_mm3": feats["volume_mm3"], "cost_voxel_windows": float("nan"),
                   "mean_prob": feats["mean_prob"], "max_prob": feats["max_prob"]}
            for key in SEQUENCE_KEYS:
                for k in ("peak_max", "peak_min", "ring_mean"):
                    row[f"{key}_{k}"] = feats[f"{key}_{k}"]
            row["flair_share"] = feats.get("flair_share", float("nan"))
            row["features"] = feats
            res.lesions.append(row)
            if cls == "TP":
                res.exp2_lesions.append(exp2_lesion(model_name, cid, ident_, maps, dom, affine, feats, cfg,
                                                    exp2_vals, exp2_counts))
    if not res.segmentation:
        raise InputError("no finished case with truth: experiments 2, 3 and the error flag compare TP/FP/FN/TN")
    per_class = {c: sum(1 for r in res.lesions if r["cls"] == c) for c in ("TP", "FP", "FN", "TN")}
    cfg.max_lesions_per_class = max(per_class.values()) if per_class else 0
    res.config = cfg.as_dict()
    res.notes.append(f"from the pooled outputs of {len(done)} finished case(s) of {len(dirs)} cohort run(s) "
                     f"({', '.join(str(d) for d in dirs)}): every explained domain of every case, no selection; "
                     "domains explained per class: " + ", ".join(f"{c} {n}" for c, n in per_class.items()))
    res.notes.append("experiments 1, 4, 5, 6 and the model randomisation check compute new maps or forward passes "
                     "and were not run here: they need the network (msxai experiments --bundle B --cohort C)")
    res.exp2_values = {k: {r: (np.concatenate(v) if v else np.zeros(0)) for r, v in d.items()}
                       for k, d in exp2_vals.items()}
    res.exp2_counts, res.exp2_groups = exp2_counts, exp2_vals
    res.exp2 = exp2_table(exp2_vals, exp2_counts, res.exp2_lesions, cfg)
    res.exp3, res.exp3_tests = exp3_tables(res.lesions, cfg)
    model_ns = SimpleNamespace(name=model_name, info={"bundle_dir": marker.get("bundle_path"),
                                                      "weights_sha256": ident["weights_sha256"]})
    error_flag_results(res, model_ns, cfg, case_book, states)
    res.timings["total_s"] = time.time() - t0
    return res


def report_from_cohort(dirs, out_dir, config=None, settings: dict | None = None, title: str | None = None):
    """Write the experiments report (CSV, PNG, ``report.html``) of :func:`experiments_from_cohort`."""
    from msxai.experiments.report import write_report

    res = experiments_from_cohort(dirs, config)
    path = write_report([res], Path(out_dir), title or "msxai: experiments 2, 3 and the error flag from a cohort run",
                        settings=settings)
    return path, [res]
