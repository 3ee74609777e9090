"""Run the experiments of Spagnolo et al. (Sci Rep 2026) on a cohort, per model, and collect their tables.

``run_model(model, cases, config)`` returns a :class:`ModelResults` (plain lists of dict rows plus small arrays for
the figures); :func:`msxai.experiments.report.write_report` turns the results of one or more models into CSV files,
PNG figures and one HTML page. The steps, per model:

0. segment every case (the bundle's sliding-window inference), instances, TP/FP/FN against the truth, 10 TN spheres
   per case (:func:`msxai.lesions.sample_tn_spheres`);
1. pick at most ``max_lesions_per_class`` TP, FP, FN and TN domains over the cohort (round robin over cases, seeded)
   and explain them with instance SmoothGrad (FN with their ground-truth domain);
2. exp. 1: mean (Eq. 2) vs max (Eq. 3) aggregation on the largest and smallest explained TP;
3. exp. 2: FLAIR vs MPRAGE values inside TP lesions and in the ring around them (``|g| < min_abs`` discarded);
4. exp. 3: peak max/min FLAIR saliency per class, pairwise Mann-Whitney U;
5. exp. 4: sanity domains (healthy white matter ball, single voxel at a TP's centre of mass);
6. exp. 5: lesion transplants (healthy WM, background, background with a 3 mm margin);
7. exp. 6: context dilation (forward passes only);
8. model randomisation (Spearman between maps of the trained and a re-initialised network);
9. exp. 7: the saliency-based error flag (cross-validated by patient).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from msxai import SEQUENCE_KEYS, SEQUENCES
from msxai.errors import EmptyDomainError, InputError
from msxai.experiments import geometry as geo
from msxai.experiments.cohort import CaseSpec
from msxai.experiments.error_flag import ErrorFlagModel, SALIENCY_FEATURES, cross_validate
from msxai.experiments.features import region_values, saliency_features
from msxai.experiments.model import ExperimentModel
from msxai.experiments.stats import median_ci, pairwise_mwu, spearman
from msxai.io import load_volume, voxel_volume_mm3
from msxai.lesions import (
    DISTANCE_TOL_MM,
    TN_SPHERE_MM3,
    classify_lesions,
    distance_mm,
    instances_from_mask,
    lesion_ids,
    lesion_instances,
    sample_tn_spheres,
)
from msxai.metrics import dice, lesion_metrics

CLASSES = ("TP", "FP", "FN", "TN")


@dataclass
class ExperimentConfig:
    samples: int = 8  # SmoothGrad noise copies N (paper: 50)
    max_lesions_per_class: int = 6
    seed: int = 0
    aggregation: str = "max"  # of the bulk maps (experiments 2, 3, 5, 7): "max" = Eq. 3 (paper), "mean" = Eq. 2
    sigma_fraction: float = 0.05
    n_tn: int = 10  # TN spheres sampled per case (paper: 10)
    min_abs: float = 0.1  # |g| below this is discarded in experiment 2 (paper: 0.1)
    min_abs_relative: float | None = None  # if set, the cut is this fraction of the lesion's peak |g| (both maps)
    ring_mm: float = 3.0
    exp1_max_voxels: int = 100000  # the "large" lesion of experiment 1 is the largest explained TP up to this size
    exp1_samples: int | None = None  # N for experiment 1 (default: samples)
    transplant_lesions: int = 1
    transplant_margin_mm: float = 3.0
    context_lesions: int = 2
    context_range: tuple[float, float] = (90.0, 120.0)
    context_max_mm: float = 35.0
    context_step_mm: float = 1.0
    context_radii_mm: tuple = ()  # explicit radii (mm) instead of 0..context_max_mm in context_step_mm steps
    randomization_lesions: int = 2
    max_domain_windows: int = 0  # > 0: TP/FP/FN domains read by more sliding windows are not explained (CPU budget)
    max_domain_cost: float = 0.0  # > 0: domains whose Eq. 3 cost (sum over voxels of covering windows) exceeds it
    # are not explained in bulk (CPU budget; see domain_costs)
    exp1_max_cost: float = 0.0  # > 0: the "large" lesion of experiment 1 is the largest TP within this cost
    bulk_budget_s: float = 0.0  # > 0: the bulk maps stop starting new domains after this many seconds
    tn_mm3: float = 93.0  # volume of the TN balls and of the healthy-WM ball (paper: 93 mm^3)
    classes: tuple = ("TP", "FP", "FN", "TN")  # domain classes explained in bulk
    skip: tuple = ()  # experiments not run: any of exp1, exp4, exp5, exp6, randomization (CPU budget)
    n_boot: int = 2000
    crop_margin: int = 10  # voxels kept around a lesion for the figures
    progress: bool = True

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


@dataclass
class CaseState:
    spec: CaseSpec
    image: np.ndarray
    affine: np.ndarray
    brain: np.ndarray
    prob: np.ndarray
    pred: np.ndarray
    truth: np.ndarray
    tn: list
    classes: object
    metrics: dict

    @property
    def id(self) -> str:
        return self.spec.id


@dataclass
class ModelResults:
    model: str
    source: str
    config: dict
    segmentation: list[dict] = field(default_factory=list)
    lesions: list[dict] = field(default_factory=list)  # one row per explained domain (TP/FP/FN/TN)
    exp1: list[dict] = field(default_factory=list)
    exp1_crops: list[dict] = field(default_factory=list)
    exp2_values: dict = field(default_factory=dict)  # seq -> region -> 1-D array (after discarding |g| < min_abs)
    exp2_groups: dict = field(default_factory=dict)  # seq -> region -> list of per-lesion arrays (same values)
    exp2_counts: dict = field(default_factory=dict)  # seq -> region -> (n_total, n_kept)
    exp2_lesions: list[dict] = field(default_factory=list)
    exp2: list[dict] = field(default_factory=list)
    exp3: list[dict] = field(default_factory=list)
    exp3_tests: list[dict] = field(default_factory=list)
    exp4: list[dict] = field(default_factory=list)
    exp5: list[dict] = field(default_factory=list)
    exp5_crops: list[dict] = field(default_factory=list)
    exp6: list[dict] = field(default_factory=list)
    exp6_note: str = ""
    exp6_picks: list = field(default_factory=list)
    kind: str = "full"  # "full" = every experiment, "context" = experiment 6 only (forward passes)
    run_settings: dict = field(default_factory=dict)  # the command line / settings of the run that computed these
    randomization: list[dict] = field(default_factory=list)
    error_flag: dict = field(default_factory=dict)
    error_flag_rows: list[dict] = field(default_factory=list)
    error_flag_model: ErrorFlagModel | None = None
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- helpers
def _bar(iterable, cfg: ExperimentConfig, **kw):
    return tqdm(iterable, disable=not cfg.progress, dynamic_ncols=True, **kw)


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


def _guarded(res: "ModelResults", name: str, fn) -> None:
    """Run one experiment; a failure is reported (in the results and on stderr) instead of losing the others."""
    import sys
    import traceback

    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - one experiment failing must not lose hours of the others
        traceback.print_exc()
        res.failures.append(f"{name}: {type(exc).__name__}: {exc}")
        print(f"warning: experiment {name} failed: {exc}", file=sys.stderr)


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


def _detected(prob: np.ndarray, region: np.ndarray, domain: np.ndarray, model: ExperimentModel, affine) -> bool:
    """A lesion component (prob > t, 18-connected, >= min volume) computed within ``region`` overlaps ``domain``."""
    p = np.where(region, prob, 0.0)
    inst = lesion_instances(p, model.threshold, model.min_volume_mm3, affine)
    return bool(np.any(inst[domain] > 0))


# --------------------------------------------------------------------------------------------------- step 0
def segment_cases(model: ExperimentModel, cases: list[CaseSpec], cfg: ExperimentConfig) -> list[CaseState]:
    states = []
    for i, case in enumerate(_bar(cases, cfg, desc=f"{model.name}: segment", unit="case")):
        prep = model.prepare(case.flair, case.t1)
        truth_vol = load_volume(case.truth, "truth")
        if truth_vol.array.shape != prep.image.shape[1:]:
            raise InputError(f"{case.id}: truth shape {truth_vol.array.shape} differs from the image grid "
                             f"{prep.image.shape[1:]}")
        truth = instances_from_mask(truth_vol.array, prep.affine).astype(np.int32)
        brain = prep.brain_mask
        if case.brain_mask:
            brain = load_volume(case.brain_mask, "brain mask").array > 0
        prob = model.probability(prep.image)
        pred = model.lesions(prob, prep.affine)
        classes = classify_lesions(pred, truth)
        tn = sample_tn_as_many(brain, truth > 0, pred > 0, prep.affine, cfg.n_tn, cfg.seed + i, case.id, cfg.tn_mm3)
        m = lesion_metrics(pred, truth)
        m.update(model=model.name, case=case.id, dice=dice(pred > 0, truth > 0), n_tn_spheres=len(tn))
        states.append(CaseState(case, prep.image, prep.affine, np.asarray(brain, bool), prob.astype(np.float32),
                                pred, truth, tn, classes, m))
    return states


def sample_tn_as_many(brain, truth, pred, affine, n: int, seed: int, name: str = "",
                      volume_mm3: float = TN_SPHERE_MM3) -> list:
    """``n`` TN spheres (:func:`msxai.lesions.sample_tn_spheres`), or as many as fit (fewer, with a warning)."""
    for k in range(n, 0, -1):
        try:
            out = sample_tn_spheres(brain, truth, pred, affine, n=k, volume_mm3=volume_mm3, seed=seed)
        except EmptyDomainError as exc:
            if "no TN sphere" in str(exc):
                print(f"warning: {name}: {exc}")
                return []
            continue
        if k < n:
            print(f"warning: {name}: only {k} of {n} TN spheres fit inside the brain away from the lesions")
        return out
    return []


def _domains_of(state: CaseState, cls: str, ident: int) -> np.ndarray:
    if cls in ("TP", "FP"):
        return state.pred == ident
    if cls == "FN":
        return state.truth == ident
    return state.tn[ident]


# --------------------------------------------------------------------------------------------------- main
def run_model(model: ExperimentModel, cases: list[CaseSpec], cfg: ExperimentConfig | None = None,
              context_picks: list | None = None) -> ModelResults:
    """Run every experiment for one model on ``cases``; ``context_picks``: the lesions of experiment 6 picked for
    another model (:func:`pick_context_truth`), so that every architecture is measured on the same lesions."""
    cfg = cfg or ExperimentConfig()
    if not cases:
        raise InputError("no cases to run the experiments on")
    res = ModelResults(model.name, model.source, cfg.as_dict())
    t0 = time.time()
    states = segment_cases(model, cases, cfg)
    by_id = {s.id: s for s in states}
    res.segmentation = [s.metrics for s in states]
    res.timings["segment_s"] = time.time() - t0

    # ---- selection (cost = Eq. 3 voxel-windows of each domain; see domain_costs)
    per_class = {
        "TP": {s.id: list(s.classes.tp) for s in states},
        "FP": {s.id: list(s.classes.fp) for s in states},
        "FN": {s.id: list(s.classes.fn) for s in states},
        "TN": {s.id: list(range(len(s.tn))) for s in states},
    }
    wmaps = {s.id: window_count_map(model.spec, s.pred.shape) for s in states}
    costs = {}  # (case, cls, id) -> voxel-windows
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
    if tuple(cfg.classes) != CLASSES:
        res.notes.append("classes explained: " + ", ".join(c for c in CLASSES if c in cfg.classes) + " only")
    if cfg.skip:
        res.notes.append("experiments not run (CPU budget): " + ", ".join(cfg.skip))
    if "exp1" in cfg.skip:
        exp1_skip = True
    else:
        exp1_skip = False

    # experiment 1 targets among all TP lesions (the large one within exp1_max_cost / exp1_max_voxels)
    tp_all = []
    for s in states:
        counts = np.bincount(s.pred.ravel())
        wins = label_window_counts(model.spec, s.pred) if cfg.max_domain_windows > 0 else {}
        tp_all += [(s.id, int(lid), int(counts[lid])) for lid in s.classes.tp
                   if (cfg.max_domain_windows <= 0 or wins.get(lid, 0) <= cfg.max_domain_windows)
                   and (cfg.exp1_max_cost <= 0 or costs[(s.id, "TP", lid)] <= cfg.exp1_max_cost)]
    exp1_targets = [] if exp1_skip else exp1_pick(tp_all, cfg.exp1_max_voxels)
    if not exp1_targets and not exp1_skip:
        res.notes.append(f"experiment 1 not run: no TP lesion within the size/cost caps")
    n1 = cfg.exp1_samples or cfg.samples
    if n1 == cfg.samples and cfg.aggregation == "max":
        # the Eq. 3 maps of experiment 1's lesions are bulk maps too: the large lesion joins the TP set
        for label, cid, lid in exp1_targets:
            if label == "large" and (cid, lid) not in selected["TP"]:
                selected["TP"].append((cid, lid))
                res.notes.append(f"the large TP of experiment 1 ({cid} #{lid}) is also in the bulk TP set")
    res.notes.append("lesions available / explained per class: " + ", ".join(
        f"{c} {available[c]}/{len(selected[c])}" for c in CLASSES))
    tp_sel = [(cid, lid, int((by_id[cid].pred == lid).sum())) for cid, lid in selected["TP"]]
    cheap_tp = sorted(tp_sel, key=lambda t: (costs[(t[0], "TP", t[1])], t[0], t[1]))
    rand_targets = [] if "randomization" in cfg.skip else [(c, l) for c, l, _ in cheap_tp][: cfg.randomization_lesions]
    # experiments 4 and 5 recompute maps of their TP in other conditions: within the bulk cost cap (not exp. 1's large)
    capped = [t for t in tp_sel if cfg.max_domain_cost <= 0 or costs[(t[0], "TP", t[1])] <= cfg.max_domain_cost]
    near100 = sorted(capped, key=lambda t: abs(t[2] * voxel_volume_mm3(by_id[t[0]].affine) - 100.0))
    exp4_target = near100[0] if near100 and "exp4" not in cfg.skip else None
    tr_targets = [] if "exp5" in cfg.skip else near100[: cfg.transplant_lesions]

    # ---- bulk explanation (per case, all of its selected domains in one engine call)
    t1 = time.time()
    keep_full: dict[str, np.ndarray] = {}  # whole maps reused by experiments 1, 4, 5 and the randomisation check
    want_full = {f"{c}|TP:{l}" for c, l in rand_targets}
    want_full |= {f"{c}|TP:{l}" for _, c, l in exp1_targets} if n1 == cfg.samples and cfg.aggregation == "max" else set()
    want_full |= {f"{c}|TP:{l}" for c, l, _ in tr_targets}
    if exp4_target is not None:
        want_full.add(f"{exp4_target[0]}|TP:{exp4_target[1]}")
    exp2_vals = {k: {"inside": [], "ring": []} for k in SEQUENCE_KEYS}
    exp2_counts = {k: {"inside": [0, 0], "ring": [0, 0]} for k in SEQUENCE_KEYS}
    n_domains = sum(len(v) for v in selected.values())
    bar = _bar(range(n_domains), cfg, desc=f"{model.name}: explain ({cfg.aggregation}, N={cfg.samples})",
               unit="domain")
    order = interleave_classes(selected, first=[("TP", c, l) for lab, c, l in exp1_targets if lab == "large"])
    stopped = 0
    for k_item, (cls_, cid_, ident_) in enumerate(order):
        if cfg.bulk_budget_s > 0 and time.time() - t1 > cfg.bulk_budget_s:
            stopped = len(order) - k_item
            break
        state = by_id[cid_]
        domains = {f"{cls_}:{ident_}": _domains_of(state, cls_, ident_)}
        for name, maps in model.explain(state.image, domains, cfg.samples, cfg.aggregation, cfg.seed,
                                        cfg.sigma_fraction):
            bar.update(1)
            cls, ident = name.split(":")
            dom = domains[name]
            feats = saliency_features(maps, dom, state.prob, state.affine, cfg.ring_mm)
            row = {"model": model.name, "case": state.id, "cls": cls, "lesion_id": int(ident),
                   "voxels": int(dom.sum()), "volume_mm3": feats["volume_mm3"],
                   "cost_voxel_windows": costs.get((state.id, cls, int(ident)), float("nan")),
                   "mean_prob": feats["mean_prob"], "max_prob": feats["max_prob"]}
            for key in SEQUENCE_KEYS:
                row[f"{key}_peak_max"] = feats[f"{key}_peak_max"]
                row[f"{key}_peak_min"] = feats[f"{key}_peak_min"]
                row[f"{key}_ring_mean"] = feats[f"{key}_ring_mean"]
            row["flair_share"] = feats.get("flair_share", float("nan"))
            row["features"] = feats
            res.lesions.append(row)
            key_full = f"{state.id}|{name}"
            if cls == "TP":
                vals = region_values(maps, dom, state.affine, cfg.ring_mm)
                cut = exp2_cut(vals, cfg)
                lesion_row = {"model": model.name, "case": state.id, "lesion_id": int(ident),
                              "volume_mm3": feats["volume_mm3"], "cut": cut}
                for key in SEQUENCE_KEYS:
                    for region in ("inside", "ring"):
                        v = vals[key][region]
                        kept = v[np.abs(v) >= cut]
                        exp2_counts[key][region][0] += int(v.size)
                        exp2_counts[key][region][1] += int(kept.size)
                        exp2_vals[key][region].append(kept)
                        lesion_row[f"{key}_{region}_n_kept"] = int(kept.size)
                        lesion_row[f"{key}_{region}_median"] = float(np.median(v)) if v.size else float("nan")
                        lesion_row[f"{key}_{region}_pos_frac"] = float((v > 0).mean()) if v.size else float("nan")
                        lesion_row[f"{key}_{region}_abs_sum"] = float(np.abs(v).sum())
                res.exp2_lesions.append(lesion_row)
            if key_full in want_full:
                keep_full[key_full] = maps
    bar.close()
    if stopped:
        res.notes.append(f"bulk maps stopped at the time budget ({cfg.bulk_budget_s / 60:.0f} min): {stopped} of "
                         f"{len(order)} selected domains not explained (taken in turn TP, FP, FN, TN, so the classes "
                         "stay balanced)")
    explained_tp = {(r["case"], r["lesion_id"]) for r in res.lesions if r["cls"] == "TP"}
    rand_targets = [t for t in rand_targets if (t[0], t[1]) in explained_tp]
    res.timings["explain_s"] = time.time() - t1
    res.exp2_values = {k: {r: (np.concatenate(v) if v else np.zeros(0)) for r, v in d.items()}
                       for k, d in exp2_vals.items()}
    res.exp2_counts = exp2_counts
    res.exp2_groups = exp2_vals
    res.exp2 = exp2_table(exp2_vals, exp2_counts, res.exp2_lesions, cfg)
    res.exp3, res.exp3_tests = exp3_tables(res.lesions, cfg)

    def bulk_map(cid, lid, n, agg):
        """The bulk Eq. 3 map of a TP when it was computed with these settings, else None."""
        if n == cfg.samples and agg == cfg.aggregation:
            return keep_full.get(f"{cid}|TP:{lid}")
        return None

    # ---- experiment 1: mean vs max on a large and the smallest TP
    def _exp1():
        t_start = time.time()
        for label, cid, lid in _bar(exp1_targets, cfg, desc=f"{model.name}: exp1 mean vs max (N={n1})",
                                    unit="lesion"):
            st = by_id[cid]
            dom = st.pred == lid
            for agg in ("max", "mean"):
                m = bulk_map(cid, lid, n1, agg)
                if m is None:
                    m = next(iter(model.explain(st.image, {"d": dom}, n1, agg, cfg.seed, cfg.sigma_fraction)))[1]
                res.exp1_crops.append({**crop_record(f"{cid}|TP:{lid}", st.image, m, dom, cfg.crop_margin),
                                       "aggregation": agg, "label": label})
                row = {"model": model.name, "lesion": label, "case": cid, "lesion_id": int(lid),
                       "voxels": int(dom.sum()), "volume_mm3": float(dom.sum() * voxel_volume_mm3(st.affine)),
                       "cost_voxel_windows": costs[(cid, "TP", lid)], "aggregation": agg, "samples": n1}
                for c, key in enumerate(SEQUENCE_KEYS):
                    row[f"{key}_min"] = float(m[c].min())
                    row[f"{key}_max"] = float(m[c].max())
                    row[f"{key}_min_in"] = float(m[c][dom].min())
                    row[f"{key}_max_in"] = float(m[c][dom].max())
                res.exp1.append(row)
        res.timings["exp1_s"] = time.time() - t_start

    _guarded(res, "exp1", _exp1)

    # ---- experiment 4: sanity domains around the TP explained in bulk that is nearest to 100 mm^3
    def _exp4():
        t_start = time.time()
        if exp4_target is not None:
            cid, lid = exp4_target[0], exp4_target[1]
            res.exp4 = exp4_sanity(model, by_id[cid], lid, cfg, tp_map=bulk_map(cid, lid, cfg.samples,
                                                                                  cfg.aggregation))
        res.timings["exp4_s"] = time.time() - t_start

    _guarded(res, "exp4", _exp4)

    # ---- experiment 5: transplant
    def _exp5():
        t_start = time.time()
        for cid, lid, _ in _bar(tr_targets, cfg, desc=f"{model.name}: exp5 transplant", unit="lesion"):
            rows, crops = exp5_transplant(model, by_id[cid], lid, cfg,
                                          original_map=bulk_map(cid, lid, cfg.samples, cfg.aggregation))
            res.exp5 += rows
            res.exp5_crops += crops
        res.timings["exp5_s"] = time.time() - t_start

    _guarded(res, "exp5", _exp5)

    # ---- experiment 6: context dilation
    def _exp6():
        t_start = time.time()
        if "exp6" not in cfg.skip and (cfg.context_lesions > 0 or context_picks is not None):
            res.exp6, res.exp6_note, res.exp6_picks = exp6_context(model, states, cfg, context_picks)
        else:
            res.exp6_note = "not run for this model (context_lesions = 0)"
        res.timings["exp6_s"] = time.time() - t_start

    _guarded(res, "exp6", _exp6)

    # ---- model randomisation
    def _randomization():
        t_start = time.time()
        if rand_targets:
            rnd = model.randomized(cfg.seed + 1)
            for cid, lid in _bar(rand_targets, cfg, desc=f"{model.name}: randomised network", unit="lesion"):
                st = by_id[cid]
                dom = st.pred == lid
                sl = _crop_box(dom, cfg.crop_margin)
                trained = keep_full[f"{cid}|TP:{lid}"][(slice(None), *sl)]
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

    _guarded(res, "randomization", _randomization)

    # ---- experiment 7: error flag
    def _error_flag():
        t_start = time.time()
        records = [{"case": r["case"], "lesion_id": r["lesion_id"], "cls": r["cls"], "features": r["features"]}
                   for r in res.lesions if r["cls"] in ("TP", "FP")]
        case_book = [{"case": s.id, "pairs": s.classes.pairs, "pred_ids": lesion_ids(s.pred),
                      "truth_ids": lesion_ids(s.truth), "fp_ids": list(s.classes.fp)} for s in states]
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
        res.timings["error_flag_s"] = time.time() - t_start

    _guarded(res, "error_flag", _error_flag)

    res.timings["total_s"] = time.time() - t0
    return res


def error_flag_info(model: ExperimentModel, cfg: ExperimentConfig, states: list, ev: dict, notes: list) -> dict:
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


# --------------------------------------------------------------------------------------------------- tables
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


# --------------------------------------------------------------------------------------------------- exp 4
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


def exp4_sanity(model: ExperimentModel, st: CaseState, lid: int, cfg: ExperimentConfig,
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
        import itertools

        computed = itertools.chain([(f"TP lesion {lid}", tp_map)], computed)
    rows = []
    for name, maps in _bar(computed, cfg, desc=f"{model.name}: exp4 sanity", total=len(domains), unit="domain"):
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


def exp5_transplant(model: ExperimentModel, state: CaseState, lesion_id: int, cfg: ExperimentConfig,
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
               "detected": _detected(prob, region, omega, model, state.affine),
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


# --------------------------------------------------------------------------------------------------- exp 6
def _n_windows(spec, shape, mask: np.ndarray, margin: int = 3) -> int:
    """Number of sliding windows that overlap the bounding box of ``mask`` grown by ``margin`` voxels (cost proxy)."""
    sl = ndimage.find_objects(mask.astype(np.int8))[0]
    box = np.zeros(shape, bool)
    box[tuple(slice(max(s.start - margin, 0), s.stop + margin) for s in sl)] = True
    return len(spec.grid(shape).windows_covering(box))


def predicted_component(pred_labels: np.ndarray, truth_domain: np.ndarray) -> np.ndarray | None:
    """The predicted lesion (instance of ``pred_labels``) that overlaps ``truth_domain`` most; None if none does."""
    ids, counts = np.unique(pred_labels[truth_domain], return_counts=True)
    keep = ids > 0
    if not keep.any():
        return None
    return pred_labels == ids[keep][np.argmax(counts[keep])]


def own_prediction_near(model: ExperimentModel, image: np.ndarray, affine, truth_domain: np.ndarray,
                        margin_mm: float = 10.0) -> tuple[np.ndarray | None, float]:
    """This model's predicted lesion overlapping a true lesion, from the windows covering the lesion and
    ``margin_mm`` around it (forward passes only): ``(Ω or None, mean softmax in the true lesion)``."""
    region = geo.dilate_mm(truth_domain, affine, margin_mm)
    prob = model.probability(image, region)
    prob = np.where(region, prob, 0.0)
    return predicted_component(model.lesions(prob, affine), truth_domain), float(prob[truth_domain].mean())


def pick_context_truth(cases: list[CaseSpec], lo: float, hi: float, k: int, spec=None,
                       truths: dict | None = None) -> tuple[list, str]:
    """True lesions with volume in [lo, hi] mm^3 as ``(case id, true lesion id, volume)``, the ones read by the
    fewest sliding windows first (when ``spec`` is given), then by closeness to the middle of the range; the range
    is widened by 50 % steps when none qualifies. Depends on the truth only, so separate runs (one per architecture)
    pick the same lesions; each architecture then uses its own predicted lesion overlapping each
    (:func:`own_prediction_near`; an architecture that misses it has no curve for it)."""
    from msxai.io import load_volume as _load

    cands, labels = [], {}
    for c in cases:
        if truths is not None and c.id in truths:
            truth, affine = truths[c.id]
        else:
            vol = _load(c.truth, "truth")
            truth, affine = instances_from_mask(vol.array, vol.affine), vol.affine
        labels[c.id] = truth
        vox = voxel_volume_mm3(affine)
        counts = np.bincount(np.asarray(truth, np.int64).ravel())
        cands += [(c.id, int(i), float(counts[i] * vox)) for i in range(1, len(counts)) if counts[i]]

    def cost(c):
        return 0 if spec is None else _n_windows(spec, labels[c[0]].shape, labels[c[0]] == c[1])

    if not cands:
        return [], "no true lesion in the cohort"
    a, b = lo, hi
    for _ in range(12):
        pick = [c for c in cands if a <= c[2] <= b]
        if pick:
            note = (f"true lesions of {lo:g}-{hi:g} mm^3" if (a, b) == (lo, hi) else
                    f"no true lesion of {lo:g}-{hi:g} mm^3; range widened to {a:.0f}-{b:.0f} mm^3")
            pick.sort(key=lambda c: (cost(c), abs(c[2] - (lo + hi) / 2), c[0], c[1]))
            return pick[:k], note
        a, b = a / 1.5, b * 1.5
    pick = sorted(cands, key=lambda c: abs(c[2] - (lo + hi) / 2))[:k]
    return pick, f"no true lesion near {lo:g}-{hi:g} mm^3; used the true lesions closest in volume"


def context_radii(cfg: ExperimentConfig) -> list[float]:
    """The context radii of experiment 6: ``context_radii_mm`` when given, else 0..max in steps."""
    if cfg.context_radii_mm:
        return sorted({float(r) for r in cfg.context_radii_mm})
    return geo.radii(cfg.context_max_mm, cfg.context_step_mm)


def context_curve(model: ExperimentModel, image: np.ndarray, brain: np.ndarray, dom: np.ndarray, affine,
                  cfg: ExperimentConfig, bar=None) -> list[dict]:
    """Mean softmax in Ω and detection with the full image and with context restored up to each radius."""
    dist = distance_mm(dom, affine)
    bg = geo.background_value(image, brain)
    region = dist <= 3.0 + DISTANCE_TOL_MM
    full = model.probability(image, region)
    rows = []
    base = {"full_context_mean_prob": float(full[dom].mean()),
            "full_context_detected": _detected(full, region, dom, model, affine)}
    for r in context_radii(cfg):
        prob = model.probability(geo.context_image(image, dist, r, bg), region)
        rows.append({"radius_mm": r, "mean_prob": float(prob[dom].mean()),
                     "detected": _detected(prob, region, dom, model, affine), **base})
        if bar is not None:
            bar.update(1)
    return rows


def exp6_context(model: ExperimentModel, states: list[CaseState], cfg: ExperimentConfig,
                 picks: list | None = None) -> tuple[list[dict], str, list]:
    """Context dilation: Ω = this model's predicted lesion overlapping each picked true lesion
    (:func:`pick_context_truth`; the same true lesions for every architecture)."""
    note = ""
    if picks is None:
        picks, note = pick_context_truth([s.spec for s in states], *cfg.context_range, cfg.context_lesions,
                                         model.spec, {s.id: (s.truth, s.affine) for s in states})
    by_id = {s.id: s for s in states}
    rows = []
    steps = context_radii(cfg)
    bar = _bar(range(len(picks) * len(steps)), cfg, desc=f"{model.name}: exp6 context", unit="step")
    missed = []
    for cid, tid, _ in picks:
        st = by_id[cid]
        dom = predicted_component(st.pred, st.truth == tid)
        if dom is None:
            missed.append(f"{cid} true lesion #{tid}")
            bar.update(len(steps))
            continue
        rows += _context_rows(model, st.image, st.brain, dom, st.affine, cid, tid, cfg, bar)
    bar.close()
    if missed:
        note = (note + "; " if note else "") + "not detected by this model (no TP, no curve): " + ", ".join(missed)
    return rows, note, picks


def _context_rows(model, image, brain, dom, affine, cid, tid, cfg, bar) -> list[dict]:
    vol = float(dom.sum() * voxel_volume_mm3(affine))
    return [{"model": model.name, "case": cid, "lesion_id": int(tid), "volume_mm3": vol, **r}
            for r in context_curve(model, image, brain, dom, affine, cfg, bar)]


def run_context_only(model: ExperimentModel, cases: list[CaseSpec], picks: list, note: str,
                     cfg: ExperimentConfig) -> ModelResults:
    """Experiment 6 alone (forward passes only) for another architecture, on the true lesions picked for the first
    model; Ω = this architecture's own predicted lesion overlapping each (found from the windows around it)."""
    res = ModelResults(model.name, model.source, cfg.as_dict(), kind="context")
    t0 = time.time()
    specs = {c.id: c for c in cases}
    steps = context_radii(cfg)
    bar = _bar(range(len(picks) * len(steps)), cfg, desc=f"{model.name}: exp6 context", unit="step")
    missed = []
    for cid, tid, _ in picks:
        case = specs[cid]
        prep = model.prepare(case.flair, case.t1)
        truth = instances_from_mask(load_volume(case.truth, "truth").array, prep.affine)
        brain = load_volume(case.brain_mask).array > 0 if case.brain_mask else prep.brain_mask
        dom, p_truth = own_prediction_near(model, prep.image, prep.affine, truth == tid)
        if dom is None:
            missed.append(f"{cid} true lesion #{tid} (mean softmax {p_truth:.2f})")
            bar.update(len(steps))
            continue
        res.exp6 += _context_rows(model, prep.image, brain, dom, prep.affine, cid, tid, cfg, bar)
    bar.close()
    res.exp6_note = note + ("; not detected by this model (no TP, no curve): " + ", ".join(missed) if missed else "")
    res.timings["exp6_s"] = res.timings["total_s"] = time.time() - t0
    return res
