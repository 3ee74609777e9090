"""Run the experiments of Spagnolo et al. (Sci Rep 2026) on a cohort, per model, and collect their tables.

``run_model(model, cases, config)`` returns a :class:`~msxai.experiments.state.ModelResults` (plain lists of dict
rows plus small arrays for the figures); :func:`msxai.experiments.report.write_report` turns the results of one or
more models into CSV files, PNG figures and one HTML page. The steps, per model, each a module-level function over
the run's :class:`~msxai.experiments.state.RunContext` (so each can run and be tested alone):

0. :func:`segment_cases`: segment every case (the bundle's sliding-window inference), instances, TP/FP/FN against
   the truth, 10 TN spheres per case (:func:`msxai.lesions.sample_tn_spheres`);
1. :func:`msxai.experiments.selection.plan_run`: pick at most ``max_lesions_per_class`` TP, FP, FN and TN domains
   over the cohort (round robin over cases, seeded) and the targets of the other experiments;
2. :func:`msxai.experiments.bulk.run_bulk`: explain the picked domains with instance SmoothGrad (FN with their
   ground-truth domain); exp. 2: FLAIR vs MPRAGE values inside TP lesions and in the ring around them
   (``|g| < min_abs`` discarded); exp. 3: peak max/min FLAIR saliency per class, pairwise Mann-Whitney U;
3. exp. 1 (:func:`msxai.experiments.conditions.run_exp1`): mean (Eq. 2) vs max (Eq. 3) aggregation on the largest
   and smallest explained TP;
4. exp. 4 (``run_exp4``): sanity domains (healthy white matter ball, single voxel at a TP's centre of mass);
5. exp. 5 (``run_exp5``): lesion transplants (healthy WM, background, background with a 3 mm margin);
6. exp. 6 (:func:`msxai.experiments.context.run_exp6`): context dilation (forward passes only);
7. model randomisation (``run_randomization``: Spearman between maps of the trained and a re-initialised network);
8. exp. 7 (:func:`msxai.experiments.bulk.run_error_flag`): the saliency-based error flag (cross-validated by
   patient).
"""

from __future__ import annotations

import time

import numpy as np

from msxai.errors import EmptyDomainError, InputError
from msxai.experiments.bulk import run_bulk, run_error_flag
from msxai.experiments.cohort import CaseSpec
from msxai.experiments.conditions import run_exp1, run_exp4, run_exp5, run_randomization
from msxai.experiments.context import run_exp6
from msxai.bundle import Bundle
from msxai.experiments.selection import plan_run
from msxai.experiments.state import CaseState, ExperimentConfig, ModelResults, RunContext, progress
from msxai.io import load_volume
from msxai.lesions import TN_SPHERE_MM3, classify_lesions, instances_from_mask, sample_tn_spheres
from msxai.metrics import dice, lesion_metrics

# the experiments after the bulk maps, in the order they run; a failure of one is reported and the others still run
EXPERIMENTS = (("exp1", run_exp1), ("exp4", run_exp4), ("exp5", run_exp5), ("exp6", run_exp6),
               ("randomization", run_randomization), ("error_flag", run_error_flag))


def run_model(model: Bundle, cases: list[CaseSpec], cfg: ExperimentConfig | None = None,
              context_picks: list | None = None) -> ModelResults:
    """Run every experiment for one model on ``cases``; ``context_picks``: the lesions of experiment 6 picked for
    another model (:func:`msxai.experiments.context.pick_context_truth`), so that every architecture is measured on
    the same lesions."""
    cfg = cfg or ExperimentConfig()
    if not cases:
        raise InputError("no cases to run the experiments on")
    res = ModelResults(model.name, model.source, cfg.as_dict())
    t0 = time.time()
    states = segment_cases(model, cases, cfg)
    res.segmentation = [s.metrics for s in states]
    res.timings["segment_s"] = time.time() - t0
    ctx = plan_run(model, states, cfg, res, context_picks)
    run_bulk(ctx)
    for name, experiment in EXPERIMENTS:
        run_guarded(ctx, name, experiment)
    res.timings["total_s"] = time.time() - t0
    return res


def run_guarded(ctx: RunContext, name: str, experiment) -> None:
    """Run one experiment; a failure is reported (in the results and on stderr) instead of losing the others."""
    import sys
    import traceback

    try:
        experiment(ctx)
    except Exception as exc:  # noqa: BLE001 - one experiment failing must not lose hours of the others
        traceback.print_exc()
        ctx.res.failures.append(f"{name}: {type(exc).__name__}: {exc}")
        print(f"warning: experiment {name} failed: {exc}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------- step 0
def segment_cases(model: Bundle, cases: list[CaseSpec], cfg: ExperimentConfig) -> list[CaseState]:
    states = []
    for i, case in enumerate(progress(cases, cfg, desc=f"{model.name}: segment", unit="case")):
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
