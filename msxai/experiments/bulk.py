"""The bulk maps and what is read from them: every selected TP/FP/FN/TN domain explained with instance SmoothGrad
(:func:`run_bulk`), experiment 2 (FLAIR vs MPRAGE values inside TP lesions and in the ring around them), experiment 3
(peak saliency per class, pairwise Mann-Whitney U) and experiment 7 (the saliency-based error flag, cross-validated
by patient: :func:`run_error_flag`)."""

from __future__ import annotations

import time

import numpy as np

from msxai import SEQUENCE_KEYS, SEQUENCES
from msxai.experiments.error_flag import SALIENCY_FEATURES, ErrorFlagModel, cross_validate
from msxai.experiments.features import region_values, saliency_features
from msxai.experiments.selection import CLASSES, domain_of, interleave_classes
from msxai.experiments.state import ExperimentConfig, RunContext, progress
from msxai.experiments.stats import median_ci, pairwise_mwu
from msxai.lesions import lesion_ids


def run_bulk(ctx: RunContext) -> None:
    """Explain every selected domain (experiment 1's large TP first, then TP, FP, FN, TN in turn, so that a run
    stopped at ``bulk_budget_s`` keeps the classes balanced): one row per domain in ``res.lesions``, the values of
    experiment 2 per TP, the tables of experiments 2 and 3, and the whole maps the later experiments reuse."""
    model, cfg, res = ctx.model, ctx.cfg, ctx.res
    by_id = ctx.by_id
    t1 = time.time()
    want_full = {f"{c}|TP:{l}" for c, l in ctx.randomization_targets}
    if ctx.exp1_samples == cfg.samples and cfg.aggregation == "max":
        want_full |= {f"{c}|TP:{l}" for _, c, l in ctx.exp1_targets}
    want_full |= {f"{c}|TP:{l}" for c, l, _ in ctx.transplant_targets}
    if ctx.exp4_target is not None:
        want_full.add(f"{ctx.exp4_target[0]}|TP:{ctx.exp4_target[1]}")
    exp2_vals = {k: {"inside": [], "ring": []} for k in SEQUENCE_KEYS}
    exp2_counts = {k: {"inside": [0, 0], "ring": [0, 0]} for k in SEQUENCE_KEYS}
    n_domains = sum(len(v) for v in ctx.selected.values())
    bar = progress(range(n_domains), cfg, desc=f"{model.name}: explain ({cfg.aggregation}, N={cfg.samples})",
                   unit="domain")
    order = interleave_classes(ctx.selected,
                               first=[("TP", c, l) for lab, c, l in ctx.exp1_targets if lab == "large"])
    stopped = 0
    for k_item, (cls_, cid_, ident_) in enumerate(order):
        if cfg.bulk_budget_s > 0 and time.time() - t1 > cfg.bulk_budget_s:
            stopped = len(order) - k_item
            break
        state = by_id[cid_]
        domains = {f"{cls_}:{ident_}": domain_of(state, cls_, ident_)}
        for name, maps in model.explain(state.image, domains, cfg.samples, cfg.aggregation, cfg.seed,
                                        cfg.sigma_fraction):
            bar.update(1)
            cls, ident = name.split(":")
            dom = domains[name]
            feats = saliency_features(maps, dom, state.prob, state.affine, cfg.ring_mm)
            row = {"model": model.name, "case": state.id, "cls": cls, "lesion_id": int(ident),
                   "voxels": int(dom.sum()), "volume_mm3": feats["volume_mm3"],
                   "cost_voxel_windows": ctx.costs.get((state.id, cls, int(ident)), float("nan")),
                   "mean_prob": feats["mean_prob"], "max_prob": feats["max_prob"]}
            for key in SEQUENCE_KEYS:
                row[f"{key}_peak_max"] = feats[f"{key}_peak_max"]
                row[f"{key}_peak_min"] = feats[f"{key}_peak_min"]
                row[f"{key}_ring_mean"] = feats[f"{key}_ring_mean"]
            row["flair_share"] = feats.get("flair_share", float("nan"))
            row["features"] = feats
            res.lesions.append(row)
            if cls == "TP":
                res.exp2_lesions.append(exp2_lesion(model.name, state.id, int(ident), maps, dom, state.affine, feats,
                                                    cfg, exp2_vals, exp2_counts))
            key_full = f"{state.id}|{name}"
            if key_full in want_full:
                ctx.keep_full[key_full] = maps
    bar.close()
    if stopped:
        res.notes.append(f"bulk maps stopped at the time budget ({cfg.bulk_budget_s / 60:.0f} min): {stopped} of "
                         f"{len(order)} selected domains not explained (taken in turn TP, FP, FN, TN, so the classes "
                         "stay balanced)")
    explained_tp = {(r["case"], r["lesion_id"]) for r in res.lesions if r["cls"] == "TP"}
    ctx.randomization_targets = [t for t in ctx.randomization_targets if (t[0], t[1]) in explained_tp]
    res.timings["explain_s"] = time.time() - t1
    res.exp2_values = {k: {r: (np.concatenate(v) if v else np.zeros(0)) for r, v in d.items()}
                       for k, d in exp2_vals.items()}
    res.exp2_counts = exp2_counts
    res.exp2_groups = exp2_vals
    res.exp2 = exp2_table(exp2_vals, exp2_counts, res.exp2_lesions, cfg)
    res.exp3, res.exp3_tests = exp3_tables(res.lesions, cfg)


# --------------------------------------------------------------------------------------------------- exp 2
def exp2_lesion(model_name: str, case_id: str, lesion_id: int, maps, dom, affine, feats: dict,
                cfg: ExperimentConfig, values: dict, counts: dict) -> dict:
    """Experiment 2 for one explained TP: its values inside Ω and in the ring, those with ``|g| >= cut`` appended to
    ``values`` (seq -> region -> list) and counted in ``counts``; returns the lesion's row."""
    vals = region_values(maps, dom, affine, cfg.ring_mm)
    cut = exp2_cut(vals, cfg)
    row = {"model": model_name, "case": case_id, "lesion_id": int(lesion_id), "volume_mm3": feats["volume_mm3"],
           "cut": cut}
    for key in SEQUENCE_KEYS:
        for region in ("inside", "ring"):
            v = vals[key][region]
            kept = v[np.abs(v) >= cut]
            counts[key][region][0] += int(v.size)
            counts[key][region][1] += int(kept.size)
            values[key][region].append(kept)
            row[f"{key}_{region}_n_kept"] = int(kept.size)
            row[f"{key}_{region}_median"] = float(np.median(v)) if v.size else float("nan")
            row[f"{key}_{region}_pos_frac"] = float((v > 0).mean()) if v.size else float("nan")
            row[f"{key}_{region}_abs_sum"] = float(np.abs(v).sum())
    return row


def exp2_cut(vals: dict, cfg: ExperimentConfig) -> float:
    """The |g| below which values are discarded in experiment 2: ``min_abs`` (absolute, the paper's 0.1), or
    ``min_abs_relative`` x the largest |g| of the lesion over both maps, inside and in the ring."""
    if cfg.min_abs_relative is None:
        return float(cfg.min_abs)
    peak = max((float(np.abs(v).max()) for d in vals.values() for v in d.values() if v.size), default=0.0)
    return float(cfg.min_abs_relative) * peak


def exp2_table(groups: dict, counts: dict, lesion_rows: list[dict], cfg: ExperimentConfig) -> list[dict]:
    """Per sequence and region: the fraction of kept values that are positive, medians of the positive, negative
    and all kept values, with 95 % CIs from a bootstrap over lesions (``groups``: per-lesion arrays of kept values),
    and the per-lesion sign pattern."""
    from msxai.experiments.stats import cluster_bootstrap_ci

    rows = []
    for key in SEQUENCE_KEYS:
        for region in ("inside", "ring"):
            g = groups[key][region]
            frac = cluster_bootstrap_ci([(a > 0).astype(float) for a in g], np.mean, cfg.n_boot, seed=cfg.seed)
            med_pos = cluster_bootstrap_ci([a[a > 0] for a in g], np.median, cfg.n_boot, seed=cfg.seed)
            med_neg = cluster_bootstrap_ci([a[a < 0] for a in g], np.median, cfg.n_boot, seed=cfg.seed)
            med_all = cluster_bootstrap_ci(g, np.median, cfg.n_boot, seed=cfg.seed)
            per_lesion = [r[f"{key}_{region}_median"] for r in lesion_rows]
            per_lesion = [x for x in per_lesion if np.isfinite(x)]
            rows.append({
                "sequence": SEQUENCES[SEQUENCE_KEYS.index(key)], "region": region,
                "n_values": counts[key][region][0], "n_kept": counts[key][region][1],
                "frac_positive": frac.estimate, "frac_positive_lo": frac.lo, "frac_positive_hi": frac.hi,
                "median_positive": med_pos.estimate, "median_positive_lo": med_pos.lo, "median_positive_hi": med_pos.hi,
                "median_negative": med_neg.estimate, "median_negative_lo": med_neg.lo, "median_negative_hi": med_neg.hi,
                "median_all": med_all.estimate, "median_all_lo": med_all.lo, "median_all_hi": med_all.hi,
                "n_lesions": len(per_lesion),
                "lesions_with_positive_median": int(sum(1 for x in per_lesion if x > 0)),
                "sum_abs": float(sum(r[f"{key}_{region}_abs_sum"] for r in lesion_rows)),
            })
    return rows


# --------------------------------------------------------------------------------------------------- exp 3
def exp3_tables(lesion_rows: list[dict], cfg: ExperimentConfig) -> tuple[list[dict], list[dict]]:
    rows, tests = [], []
    for stat in ("flair_peak_max", "flair_peak_min", "mprage_peak_max", "mprage_peak_min"):
        groups = {c: np.array([r[stat] for r in lesion_rows if r["cls"] == c]) for c in CLASSES}
        for c, v in groups.items():
            ci = median_ci(v, cfg.n_boot, seed=cfg.seed)
            rows.append({"statistic": stat, "cls": c, "n": ci.n, "median": ci.estimate, "ci_lo": ci.lo,
                         "ci_hi": ci.hi})
        for t in pairwise_mwu(groups):
            tests.append({"statistic": stat, **t})
    return rows, tests


# --------------------------------------------------------------------------------------------------- exp 7
def run_error_flag(ctx: RunContext) -> None:
    """Experiment 7 of a run (:func:`error_flag_results` on its explained lesions and segmented cases)."""
    t_start = time.time()
    case_book = [{"case": s.id, "pairs": s.classes.pairs, "pred_ids": lesion_ids(s.pred),
                  "truth_ids": lesion_ids(s.truth), "fp_ids": list(s.classes.fp)} for s in ctx.states]
    error_flag_results(ctx.res, ctx.model, ctx.cfg, case_book, ctx.states)
    ctx.res.timings["error_flag_s"] = time.time() - t_start


def error_flag_results(res, model, cfg: ExperimentConfig, case_book: list[dict], states: list) -> None:
    """Experiment 7: the error flag cross-validated by patient on the TP/FP rows of ``res.lesions`` (out-of-fold
    scores, AUC with a cluster bootstrap CI; ``res.error_flag``, ``res.error_flag_rows``), then fitted on all of them
    (``res.error_flag_model``). ``case_book``: per case its TP/FP/FN bookkeeping (for the lesion-wise F1);
    ``model``: ``name`` and ``info`` (weights) of the segmentation model; ``states``: ``id`` and ``spec.source``."""
    records = [{"case": r["case"], "lesion_id": r["lesion_id"], "cls": r["cls"], "features": r["features"]}
               for r in res.lesions if r["cls"] in ("TP", "FP")]
    ev = cross_validate(records, case_book, n_boot=cfg.n_boot // 2, seed=cfg.seed)
    res.error_flag = ev
    if ev.get("status") == "ok":
        for r, s, b in zip(records, ev["scores"], ev["baseline_scores"]):
            res.error_flag_rows.append({"model": model.name, "case": r["case"], "lesion_id": r["lesion_id"],
                                        "cls": r["cls"], "error_score_oof": s, "baseline_score_oof": b,
                                        "flagged": bool(s > 0.5)})
        y = [r["cls"] == "FP" for r in records]
        res.error_flag_model = ErrorFlagModel.fit(
            [r["features"] for r in records], y, SALIENCY_FEATURES,
            info=error_flag_info(model, cfg, states, ev, res.notes))


def error_flag_info(model, cfg: ExperimentConfig, states: list, ev: dict, notes: list) -> dict:
    """What the fitted error-flag model records about how it was made: the maps' settings that explain compares
    (:func:`msxai.experiments.error_flag.incompatibility`), the weights, the training cohort, the cross-validated
    AUC with its CI and the restrictions of the lesion selection."""
    import datetime as _dt

    auc = ev["auc"]
    return {
        "model": model.name, "bundle": model.info.get("bundle_dir"), "weights_sha256": model.info.get("weights_sha256"),
        "weights_modified": model.info.get("weights_modified"),
        "method": "smoothgrad", "aggregation": cfg.aggregation, "samples": int(cfg.samples),
        "sigma_fraction": float(cfg.sigma_fraction), "seed": int(cfg.seed), "ring_mm": float(cfg.ring_mm),
        "cohort": sorted({s.spec.source for s in states}), "cases": [s.id for s in states],
        "auc_oof": auc.estimate, "auc_oof_ci": [auc.lo, auc.hi], "n_folds": ev.get("n_folds"),
        "cv": "GroupKFold by patient, out-of-fold scores; 95% cluster (patient) bootstrap CI",
        "f1_before": ev["f1"]["f1_before"], "f1_after": ev["f1"]["f1_after"],
        "restrictions": list(notes),
        "fitted_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
