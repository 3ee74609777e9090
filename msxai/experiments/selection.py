"""Which domains a run explains: the Eq. 3 cost of each domain (in voxel-windows), the CPU-budget caps, the
round-robin pick of at most ``max_lesions_per_class`` TP/FP/FN/TN domains over the cohort, and the targets of
experiments 1, 4, 5 and the randomisation check (:func:`plan_run`)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from msxai.experiments.state import CaseState, ExperimentConfig, ModelResults, RunContext
from msxai.io import voxel_volume_mm3

CLASSES = ("TP", "FP", "FN", "TN")


def interleave_classes(selected: dict, first=()) -> list[tuple[str, str, int]]:
    """``(cls, case, id)`` in the order TP1, FP1, FN1, TN1, TP2, ... (``first`` items at the front), so that a
    run stopped early keeps the classes balanced."""
    out = list(first)
    seen = set(out)
    queues = {c: [(c, cid, int(i)) for cid, i in selected.get(c, [])] for c in CLASSES}
    while any(queues.values()):
        for c in CLASSES:
            while queues[c]:
                item = queues[c].pop(0)
                if item not in seen:
                    out.append(item)
                    seen.add(item)
                    break
    return out


def select_round_robin(per_case: dict[str, list[int]], k: int, seed: int) -> list[tuple[str, int]]:
    """At most ``k`` (case, id) items taken in turn from each case (cases and ids in a seeded random order)."""
    rng = np.random.default_rng(seed)
    cases = [c for c in per_case if per_case[c]]
    order = [cases[i] for i in rng.permutation(len(cases))] if cases else []
    queues = {c: [per_case[c][i] for i in rng.permutation(len(per_case[c]))] for c in order}
    out: list[tuple[str, int]] = []
    while len(out) < k and any(queues.values()):
        for c in order:
            if queues[c] and len(out) < k:
                out.append((c, int(queues[c].pop(0))))
    return out


def label_window_counts(spec, labels: np.ndarray) -> dict[int, int]:
    """Per label id, the number of sliding windows overlapping its bounding box (>= the windows covering it)."""
    grid = spec.grid(labels.shape)
    starts = np.asarray(grid.starts)
    roi = np.asarray(grid.roi)
    pad = np.array([lo for lo, _ in grid.pad])
    out = {}
    for i, sl in enumerate(ndimage.find_objects(np.asarray(labels, np.int32)), start=1):
        if sl is None:
            continue
        lo = np.array([x.start for x in sl]) + pad
        hi = np.array([x.stop for x in sl]) + pad
        out[i] = int(np.all((starts < hi) & (starts + roi > lo), axis=1).sum())
    return out


def window_count_map(spec, shape) -> np.ndarray:
    """Per voxel, the number of sliding windows covering it (float32 ``shape``). The window starts form a product
    grid, so the count is the product of per-axis counts."""
    grid = spec.grid(shape)
    starts = np.asarray(grid.starts)
    out = np.ones(tuple(int(s) for s in shape), np.float32)
    for d in range(3):
        lo = grid.pad[d][0]
        x = np.arange(shape[d]) + lo
        s = np.unique(starts[:, d])
        cnt = ((s[None, :] <= x[:, None]) & (x[:, None] < s[None, :] + grid.roi[d])).sum(1).astype(np.float32)
        sh = [1, 1, 1]
        sh[d] = shape[d]
        out = out * cnt.reshape(sh)
    return out


def domain_costs(spec, labels: np.ndarray, wmap: np.ndarray | None = None) -> dict[int, float]:
    """Eq. 3 cost of each label of an instance map, in voxel-windows: the sum over its voxels of the windows covering
    each voxel (one vector-Jacobian product per voxel, window and noise copy)."""
    wmap = window_count_map(spec, labels.shape) if wmap is None else wmap
    lab = np.asarray(labels, np.int64)
    sums = np.bincount(lab.ravel(), weights=wmap.ravel())
    return {int(i): float(sums[i]) for i in np.unique(lab) if i > 0}


def mask_cost(spec, mask: np.ndarray, wmap: np.ndarray | None = None) -> float:
    wmap = window_count_map(spec, mask.shape) if wmap is None else wmap
    return float(wmap[np.asarray(mask, bool)].sum())


def exp1_pick(tps: list[tuple[str, int, int]], max_voxels: int) -> list[tuple[str, str, int]]:
    """``[("large", case, id), ("small", case, id)]`` among the TPs with at most ``max_voxels`` voxels (the Eq. 3
    map costs one backward pass per lesion voxel and noise copy): the largest and the smallest of them; one entry
    labelled "single" when they coincide, none when no TP is small enough."""
    capped = [t for t in tps if t[2] <= max_voxels]
    if not capped:
        return []
    small = min(capped, key=lambda t: (t[2], t[0], t[1]))
    large = max(capped, key=lambda t: (t[2], t[0], t[1]))
    if (small[0], small[1]) == (large[0], large[1]):
        return [("single", large[0], large[1])]  # only one TP under the cap
    return [("large", large[0], large[1]), ("small", small[0], small[1])]


def domain_of(state: CaseState, cls: str, ident: int) -> np.ndarray:
    """The domain Ω of a selected item: a predicted lesion (TP, FP), a true lesion (FN) or a TN ball."""
    if cls in ("TP", "FP"):
        return state.pred == ident
    if cls == "FN":
        return state.truth == ident
    return state.tn[ident]


def plan_run(model, states: list[CaseState], cfg: ExperimentConfig, res: ModelResults,
             context_picks: list | None = None) -> RunContext:
    """The selection of one run (cost = Eq. 3 voxel-windows of each domain, see :func:`domain_costs`): the domains
    explained in bulk per class, the targets of experiments 1, 4, 5 and the randomisation check; what was capped or
    skipped is noted in ``res.notes``."""
    ctx = RunContext(model, cfg, states, res, context_picks=context_picks)
    per_class = {
        "TP": {s.id: list(s.classes.tp) for s in states},
        "FP": {s.id: list(s.classes.fp) for s in states},
        "FN": {s.id: list(s.classes.fn) for s in states},
        "TN": {s.id: list(range(len(s.tn))) for s in states},
    }
    wmaps = {s.id: window_count_map(model.spec, s.pred.shape) for s in states}
    costs = ctx.costs  # (case, cls, id) -> voxel-windows
    for s in states:
        pc = domain_costs(model.spec, s.pred, wmaps[s.id])
        tc = domain_costs(model.spec, s.truth, wmaps[s.id])
        for i in s.classes.tp:
            costs[(s.id, "TP", i)] = pc[i]
        for i in s.classes.fp:
            costs[(s.id, "FP", i)] = pc[i]
        for i in s.classes.fn:
            costs[(s.id, "FN", i)] = tc[i]
        for i, ball in enumerate(s.tn):
            costs[(s.id, "TN", i)] = mask_cost(model.spec, ball, wmaps[s.id])
    available = {c: sum(len(v) for v in per_class[c].values()) for c in CLASSES}
    if cfg.max_domain_windows > 0:
        skipped = {}
        for cls in ("TP", "FP", "FN"):
            for s in states:
                labels = s.truth if cls == "FN" else s.pred
                wins = label_window_counts(model.spec, labels)
                keep = [i for i in per_class[cls][s.id] if wins.get(i, 0) <= cfg.max_domain_windows]
                skipped[cls] = skipped.get(cls, 0) + len(per_class[cls][s.id]) - len(keep)
                per_class[cls][s.id] = keep
        res.notes.append(f"domains read by more than {cfg.max_domain_windows} sliding windows were not eligible "
                         "for explanation (CPU budget): " + ", ".join(f"{c} {n}" for c, n in skipped.items()))
    if cfg.max_domain_cost > 0:
        skipped = {}
        for cls in CLASSES:
            for s in states:
                keep = [i for i in per_class[cls][s.id] if costs[(s.id, cls, i)] <= cfg.max_domain_cost]
                skipped[cls] = skipped.get(cls, 0) + len(per_class[cls][s.id]) - len(keep)
                per_class[cls][s.id] = keep
        res.notes.append(
            f"CPU budget: only domains costing at most {cfg.max_domain_cost:g} voxel-windows (sum over the domain's "
            "voxels of the sliding windows covering each; Eq. 3 needs one backward pass per voxel, window and noise "
            "copy) were eligible for the bulk maps, i.e. small lesions, or lesions read by few windows; not eligible: "
            + ", ".join(f"{c} {n}" for c, n in skipped.items()))
    selected = {c: select_round_robin(per_class[c], cfg.max_lesions_per_class, cfg.seed + 7 * k)
                if c in cfg.classes else [] for k, c in enumerate(CLASSES)}
    ctx.selected = selected
    if tuple(cfg.classes) != CLASSES:
        res.notes.append("classes explained: " + ", ".join(c for c in CLASSES if c in cfg.classes) + " only")
    if cfg.skip:
        res.notes.append("experiments not run (CPU budget): " + ", ".join(cfg.skip))
    exp1_skip = "exp1" in cfg.skip

    # experiment 1 targets among all TP lesions (the large one within exp1_max_cost / exp1_max_voxels)
    tp_all = []
    for s in states:
        counts = np.bincount(s.pred.ravel())
        wins = label_window_counts(model.spec, s.pred) if cfg.max_domain_windows > 0 else {}
        tp_all += [(s.id, int(lid), int(counts[lid])) for lid in s.classes.tp
                   if (cfg.max_domain_windows <= 0 or wins.get(lid, 0) <= cfg.max_domain_windows)
                   and (cfg.exp1_max_cost <= 0 or costs[(s.id, "TP", lid)] <= cfg.exp1_max_cost)]
    ctx.exp1_targets = [] if exp1_skip else exp1_pick(tp_all, cfg.exp1_max_voxels)
    if not ctx.exp1_targets and not exp1_skip:
        res.notes.append("experiment 1 not run: no TP lesion within the size/cost caps")
    if ctx.exp1_samples == cfg.samples and cfg.aggregation == "max":
        # the Eq. 3 maps of experiment 1's lesions are bulk maps too: the large lesion joins the TP set
        for label, cid, lid in ctx.exp1_targets:
            if label == "large" and (cid, lid) not in selected["TP"]:
                selected["TP"].append((cid, lid))
                res.notes.append(f"the large TP of experiment 1 ({cid} #{lid}) is also in the bulk TP set")
    res.notes.append("lesions available / explained per class: " + ", ".join(
        f"{c} {available[c]}/{len(selected[c])}" for c in CLASSES))
    by_id = ctx.by_id
    tp_sel = [(cid, lid, int((by_id[cid].pred == lid).sum())) for cid, lid in selected["TP"]]
    cheap_tp = sorted(tp_sel, key=lambda t: (costs[(t[0], "TP", t[1])], t[0], t[1]))
    ctx.randomization_targets = ([] if "randomization" in cfg.skip
                                 else [(c, l) for c, l, _ in cheap_tp][: cfg.randomization_lesions])
    # experiments 4 and 5 recompute maps of their TP in other conditions: within the bulk cost cap (not exp. 1's large)
    capped = [t for t in tp_sel if cfg.max_domain_cost <= 0 or costs[(t[0], "TP", t[1])] <= cfg.max_domain_cost]
    near100 = sorted(capped, key=lambda t: abs(t[2] * voxel_volume_mm3(by_id[t[0]].affine) - 100.0))
    ctx.exp4_target = near100[0] if near100 and "exp4" not in cfg.skip else None
    ctx.transplant_targets = [] if "exp5" in cfg.skip else near100[: cfg.transplant_lesions]
    return ctx
