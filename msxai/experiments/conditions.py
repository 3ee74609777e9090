"""The experiments that explain TP lesions again under other conditions: experiment 1 (mean, Eq. 2, vs max, Eq. 3,
aggregation on a large and the smallest TP), experiment 4 (sanity domains: a single voxel at a TP's centre of mass, a
healthy white-matter ball), experiment 5 (the lesion transplanted to healthy white matter and to the background) and
the model-randomisation check (the same maps from a re-initialised network). Each reuses the TP's bulk map when it
was computed with the same settings."""

from __future__ import annotations

import itertools
import time

import numpy as np
from scipy import ndimage

from msxai import SEQUENCE_KEYS
from msxai.experiments import geometry as geo
from msxai.experiments.state import CaseState, ExperimentConfig, RunContext, progress
from msxai.experiments.stats import spearman
from msxai.io import voxel_volume_mm3
from msxai.lesions import TN_SPHERE_MM3, distance_mm, lesion_instances


def _crop_box(domain: np.ndarray, margin: int) -> tuple[slice, ...]:
    idx = np.argwhere(domain)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, domain.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _centre_slice(domain: np.ndarray, sl: tuple[slice, ...]) -> int:
    """Axial (last axis) index, within the crop, of the slice holding most of the domain."""
    counts = domain[sl].sum(axis=(0, 1))
    return int(np.argmax(counts))


def crop_record(name: str, image: np.ndarray, maps: np.ndarray, domain: np.ndarray, margin: int) -> dict:
    """A small axial view (FLAIR, saliency maps, domain outline) through the lesion for the figures."""
    sl = _crop_box(domain, margin)
    z = _centre_slice(domain, sl)
    return {
        "name": name,
        "flair": np.asarray(image[0][sl][..., z], np.float32),
        "maps": np.asarray(maps[(slice(None), *sl)][..., z], np.float32),
        "domain": np.asarray(domain[sl][..., z], bool),
    }


def detected(prob: np.ndarray, region: np.ndarray, domain: np.ndarray, model, affine) -> bool:
    """A lesion component (prob > t, 18-connected, >= min volume) computed within ``region`` overlaps ``domain``."""
    p = np.where(region, prob, 0.0)
    inst = lesion_instances(p, model.threshold, model.min_volume_mm3, affine)
    return bool(np.any(inst[domain] > 0))


# --------------------------------------------------------------------------------------------------- exp 1
def run_exp1(ctx: RunContext) -> None:
    """Experiment 1: mean vs max aggregation on the large and the smallest TP (``ctx.exp1_targets``)."""
    model, cfg, res = ctx.model, ctx.cfg, ctx.res
    by_id, n1 = ctx.by_id, ctx.exp1_samples
    t_start = time.time()
    for label, cid, lid in progress(ctx.exp1_targets, cfg, desc=f"{model.name}: exp1 mean vs max (N={n1})",
                                    unit="lesion"):
        st = by_id[cid]
        dom = st.pred == lid
        for agg in ("max", "mean"):
            m = ctx.bulk_map(cid, lid, n1, agg)
            if m is None:
                m = next(iter(model.explain(st.image, {"d": dom}, n1, agg, cfg.seed, cfg.sigma_fraction)))[1]
            res.exp1_crops.append({**crop_record(f"{cid}|TP:{lid}", st.image, m, dom, cfg.crop_margin),
                                   "aggregation": agg, "label": label})
            row = {"model": model.name, "lesion": label, "case": cid, "lesion_id": int(lid),
                   "voxels": int(dom.sum()), "volume_mm3": float(dom.sum() * voxel_volume_mm3(st.affine)),
                   "cost_voxel_windows": ctx.costs[(cid, "TP", lid)], "aggregation": agg, "samples": n1}
            for c, key in enumerate(SEQUENCE_KEYS):
                row[f"{key}_min"] = float(m[c].min())
                row[f"{key}_max"] = float(m[c].max())
                row[f"{key}_min_in"] = float(m[c][dom].min())
                row[f"{key}_max_in"] = float(m[c][dom].max())
            res.exp1.append(row)
    res.timings["exp1_s"] = time.time() - t_start


# --------------------------------------------------------------------------------------------------- exp 4
def run_exp4(ctx: RunContext) -> None:
    """Experiment 4: sanity domains around the TP explained in bulk that is nearest to 100 mm^3."""
    t_start = time.time()
    if ctx.exp4_target is not None:
        cid, lid = ctx.exp4_target[0], ctx.exp4_target[1]
        ctx.res.exp4 = exp4_sanity(ctx.model, ctx.by_id[cid], lid, ctx.cfg,
                                   tp_map=ctx.bulk_map(cid, lid, ctx.cfg.samples, ctx.cfg.aggregation))
    ctx.res.timings["exp4_s"] = time.time() - t_start


def healthy_wm_ball(state: CaseState, avoid_mm: float = 3.0, quantile: float = 0.9,
                    volume_mm3: float = TN_SPHERE_MM3) -> np.ndarray | None:
    """A ball of ``volume_mm3`` (paper: 93 mm^3) in healthy white matter: inside the brain, at least ``avoid_mm`` from any true or predicted
    lesion, where the local mean T1 (WM is brightest on MPRAGE) is in the top decile of the admissible positions;
    the one nearest to the brain's centre of mass."""
    from msxai.io import voxel_spacing
    from msxai.lesions import ball_structure, tn_sphere_radius_mm

    ball = ball_structure(tn_sphere_radius_mm(volume_mm3), voxel_spacing(state.affine))
    lesions = (state.truth > 0) | (state.pred > 0)
    far = distance_mm(lesions, state.affine) > avoid_mm if lesions.any() else np.ones_like(state.brain)
    allowed = state.brain & far
    patch = np.zeros(state.brain.shape, bool)
    h = np.array(ball.shape) // 2
    c = np.array(state.brain.shape) // 2
    patch[tuple(slice(int(a - b), int(a - b + s)) for a, b, s in zip(c, h, ball.shape))] = ball
    score = ndimage.uniform_filter(state.image[1].astype(np.float32), size=ball.shape)
    off = geo.find_target(patch, allowed, score=score, quantile=quantile,
                          prefer_near=np.argwhere(state.brain).mean(0))
    if off is None:
        return None
    return geo.shift_mask(patch, off)


def exp4_sanity(model, st: CaseState, lid: int, cfg: ExperimentConfig,
                tp_map: np.ndarray | None = None) -> list[dict]:
    """Map ranges of a TP lesion, a single voxel at its centre of mass and a healthy-WM ball (``tp_map``: the TP's
    map when already computed with the same settings)."""
    cid = st.id
    dom = st.pred == lid
    centre = geo.centre_of_mass_voxel(dom)
    single = np.zeros(dom.shape, bool)
    single[centre] = True
    domains = {f"TP lesion {lid}": dom, "single voxel at the TP's centre of mass": single}
    wm = healthy_wm_ball(st, volume_mm3=cfg.tn_mm3)
    if wm is not None:
        domains[f"healthy-WM ball ({cfg.tn_mm3:g} mm^3)"] = wm
    todo = {k: v for k, v in domains.items() if not (tp_map is not None and k.startswith("TP lesion"))}
    computed = model.explain(st.image, todo, cfg.samples, cfg.aggregation, cfg.seed, cfg.sigma_fraction)
    if tp_map is not None:
        computed = itertools.chain([(f"TP lesion {lid}", tp_map)], computed)
    rows = []
    for name, maps in progress(computed, cfg, desc=f"{model.name}: exp4 sanity", total=len(domains), unit="domain"):
        d = domains[name]
        row = {"model": model.name, "case": cid, "domain": name, "voxels": int(d.sum()),
               "mean_prob": float(st.prob[d].mean())}
        for c, key in enumerate(SEQUENCE_KEYS):
            row[f"{key}_min"], row[f"{key}_max"] = float(maps[c].min()), float(maps[c].max())
        rows.append(row)
    rows.sort(key=lambda r: not r["domain"].startswith("TP lesion"))
    tp_row = rows[0]
    for r in rows:
        for key in SEQUENCE_KEYS:
            span_tp = tp_row[f"{key}_max"] - tp_row[f"{key}_min"]
            r[f"{key}_range_vs_tp"] = (r[f"{key}_max"] - r[f"{key}_min"]) / span_tp if span_tp > 0 else float("nan")
    return rows


# --------------------------------------------------------------------------------------------------- exp 5
def run_exp5(ctx: RunContext) -> None:
    """Experiment 5: the TPs of ``ctx.transplant_targets`` transplanted to healthy WM and to the background."""
    t_start = time.time()
    for cid, lid, _ in progress(ctx.transplant_targets, ctx.cfg, desc=f"{ctx.model.name}: exp5 transplant",
                                unit="lesion"):
        rows, crops = exp5_transplant(ctx.model, ctx.by_id[cid], lid, ctx.cfg,
                                      original_map=ctx.bulk_map(cid, lid, ctx.cfg.samples, ctx.cfg.aggregation))
        ctx.res.exp5 += rows
        ctx.res.exp5_crops += crops
    ctx.res.timings["exp5_s"] = time.time() - t_start


def transplant_conditions(state: CaseState, domain: np.ndarray, margin_mm: float = 3.0) -> dict:
    """The transplant conditions of one lesion: ``{name: (image, moved Ω) or None}``.

    * ``healthy WM``: the lesion voxels (Ω only) moved to a place in the brain at least 3 mm from any lesion where
      the local mean T1 is in the top quartile (white matter), nearest to the lesion's own position;
    * ``background``: Ω moved outside the head (at least 5 mm from the brain mask), nearest to the lesion;
    * ``background + {margin} mm``: Ω with every voxel within ``margin_mm`` of it moved there.
    """
    out = {}
    lesions = (state.truth > 0) | (state.pred > 0)
    far = distance_mm(lesions, state.affine) > 3.0
    score = ndimage.uniform_filter(state.image[1].astype(np.float32), size=5)
    off = geo.find_target(domain, state.brain & far, score=score, quantile=0.75)
    out["healthy WM"] = None if off is None else geo.transplant(state.image, domain, off)
    outside = distance_mm(state.brain, state.affine) > 5.0
    patch = geo.dilate_mm(domain, state.affine, margin_mm)
    for name, p in (("background", domain), (f"background + {margin_mm:g} mm", patch)):
        off = geo.find_target(p, outside)
        if off is None:
            out[name] = None
            continue
        img, _ = geo.transplant(state.image, p, off)
        out[name] = (img, geo.shift_mask(domain, off))
    return out


def exp5_transplant(model, state: CaseState, lesion_id: int, cfg: ExperimentConfig,
                    original_map: np.ndarray | None = None):
    dom = state.pred == lesion_id
    rows, crops = [], []
    base = {"model": model.name, "case": state.id, "lesion_id": int(lesion_id), "voxels": int(dom.sum())}
    conds = {"original": (state.image, dom), **transplant_conditions(state, dom, cfg.transplant_margin_mm)}
    for name, item in conds.items():
        if item is None:
            rows.append({**base, "condition": name, "status": "no place found"})
            continue
        img, omega = item
        region = geo.dilate_mm(omega, state.affine, 5.0)
        prob = state.prob if name == "original" else model.probability(img, region)
        if name == "original" and original_map is not None:
            maps = original_map
        else:
            maps = next(iter(model.explain(img, {"d": omega}, cfg.samples, cfg.aggregation, cfg.seed,
                                           cfg.sigma_fraction)))[1]
        near = geo.dilate_mm(omega, state.affine, 3.0)
        row = {**base, "condition": name, "status": "ok", "mean_prob": float(prob[omega].mean()),
               "detected": detected(prob, region, omega, model, state.affine),
               "centre_vox": str(tuple(int(v) for v in np.argwhere(omega).mean(0).round()))}
        for c, key in enumerate(SEQUENCE_KEYS):
            row[f"{key}_peak_max"] = float(maps[c][omega].max())
            row[f"{key}_peak_min"] = float(maps[c][omega].min())
            tot = float(np.abs(maps[c]).sum())
            row[f"{key}_abs_share_within_3mm"] = float(np.abs(maps[c][near]).sum() / tot) if tot > 0 else float("nan")
        rows.append(row)
        crops.append({**crop_record(f"{name}", img, maps, omega, cfg.crop_margin), "condition": name,
                      "mean_prob": row["mean_prob"], "detected": row["detected"]})
    return rows, crops


# --------------------------------------------------------------------------------------------- randomisation
def run_randomization(ctx: RunContext) -> None:
    """Model randomisation: Spearman correlation, within 5 mm of each TP of ``ctx.randomization_targets``, between
    its bulk map and the map of the same network with re-initialised weights."""
    model, cfg, res = ctx.model, ctx.cfg, ctx.res
    t_start = time.time()
    if ctx.randomization_targets:
        rnd = model.randomized(cfg.seed + 1)
        for cid, lid in progress(ctx.randomization_targets, cfg, desc=f"{model.name}: randomised network",
                                 unit="lesion"):
            st = ctx.by_id[cid]
            dom = st.pred == lid
            sl = _crop_box(dom, cfg.crop_margin)
            trained = ctx.keep_full.get(f"{cid}|TP:{lid}")
            if trained is None:  # run alone, without the bulk maps
                trained = next(iter(model.explain(st.image, {"d": dom}, cfg.samples, cfg.aggregation, cfg.seed,
                                                  cfg.sigma_fraction)))[1]
            trained = trained[(slice(None), *sl)]
            rmap = next(iter(rnd.explain(st.image, {"d": dom}, cfg.samples, cfg.aggregation, cfg.seed,
                                         cfg.sigma_fraction)))[1][(slice(None), *sl)]
            near = geo.dilate_mm(dom, st.affine, 5.0)[sl]
            row = {"model": model.name, "case": cid, "lesion_id": int(lid), "voxels_compared": int(near.sum())}
            for c, key in enumerate(SEQUENCE_KEYS):
                row[f"{key}_spearman"] = spearman(trained[c][near], rmap[c][near])
                row[f"{key}_trained_range"] = float(trained[c][near].max() - trained[c][near].min())
                row[f"{key}_random_range"] = float(rmap[c][near].max() - rmap[c][near].min())
            res.randomization.append(row)
    res.timings["randomization_s"] = time.time() - t_start
