"""Experiment 6, context dilation (forward passes only): the mean softmax inside a lesion and whether it is still
detected when only the context within r mm of it is kept (the rest set to the background), for r = 0, 1, ... mm.

The true lesions are picked from the truth (:func:`pick_context_truth`), so every architecture is measured on the
same lesions; Ω is each architecture's own predicted lesion overlapping each (an architecture that misses it has no
curve for it). :func:`run_context_only` runs this experiment alone for another architecture."""

from __future__ import annotations

import time

import numpy as np
from scipy import ndimage

from msxai.experiments import geometry as geo
from msxai.experiments.cohort import CaseSpec
from msxai.experiments.conditions import detected
from msxai.experiments.state import CaseState, ExperimentConfig, ModelResults, RunContext, progress
from msxai.io import load_volume, voxel_volume_mm3
from msxai.lesions import DISTANCE_TOL_MM, distance_mm, instances_from_mask


def run_exp6(ctx: RunContext) -> None:
    """Experiment 6 for a full run: on ``ctx.context_picks`` (picked for another model) or on its own picks."""
    t_start = time.time()
    cfg, res = ctx.cfg, ctx.res
    if "exp6" not in cfg.skip and (cfg.context_lesions > 0 or ctx.context_picks is not None):
        res.exp6, res.exp6_note, res.exp6_picks = exp6_context(ctx.model, ctx.states, cfg, ctx.context_picks)
    else:
        res.exp6_note = "not run for this model (context_lesions = 0)"
    res.timings["exp6_s"] = time.time() - t_start


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


def own_prediction_near(model, image: np.ndarray, affine, truth_domain: np.ndarray,
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
    cands, labels = [], {}
    for c in cases:
        if truths is not None and c.id in truths:
            truth, affine = truths[c.id]
        else:
            vol = load_volume(c.truth, "truth")
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


def context_curve(model, image: np.ndarray, brain: np.ndarray, dom: np.ndarray, affine,
                  cfg: ExperimentConfig, bar=None) -> list[dict]:
    """Mean softmax in Ω and detection with the full image and with context restored up to each radius."""
    dist = distance_mm(dom, affine)
    bg = geo.background_value(image, brain)
    region = dist <= 3.0 + DISTANCE_TOL_MM
    full = model.probability(image, region)
    rows = []
    base = {"full_context_mean_prob": float(full[dom].mean()),
            "full_context_detected": detected(full, region, dom, model, affine)}
    for r in context_radii(cfg):
        prob = model.probability(geo.context_image(image, dist, r, bg), region)
        rows.append({"radius_mm": r, "mean_prob": float(prob[dom].mean()),
                     "detected": detected(prob, region, dom, model, affine), **base})
        if bar is not None:
            bar.update(1)
    return rows


def exp6_context(model, states: list[CaseState], cfg: ExperimentConfig,
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
    bar = progress(range(len(picks) * len(steps)), cfg, desc=f"{model.name}: exp6 context", unit="step")
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


def run_context_only(model, cases: list[CaseSpec], picks: list, note: str,
                     cfg: ExperimentConfig) -> ModelResults:
    """Experiment 6 alone (forward passes only) for another architecture, on the true lesions picked for the first
    model; Ω = this architecture's own predicted lesion overlapping each (found from the windows around it)."""
    res = ModelResults(model.name, model.source, cfg.as_dict(), kind="context")
    t0 = time.time()
    specs = {c.id: c for c in cases}
    steps = context_radii(cfg)
    bar = progress(range(len(picks) * len(steps)), cfg, desc=f"{model.name}: exp6 context", unit="step")
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
