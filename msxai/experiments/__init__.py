"""Reproduction of the experiments of Spagnolo et al. (Sci Rep 2026) and the saliency-based error flag.

- :mod:`msxai.experiments.stats`      bootstrap CIs, two-sided Mann-Whitney U, AUC, Spearman
- :mod:`msxai.experiments.geometry`   rings/distances in mm, lesion transplants, context-restoration images
- :mod:`msxai.experiments.features`   per-lesion numbers read from instance saliency maps
- :mod:`msxai.experiments.error_flag` ``ErrorFlagModel`` (fit / save / load JSON, ``error_score(features)``)
- :mod:`msxai.experiments.state`      ``ExperimentConfig``, ``CaseState``, ``RunContext`` (what one run's experiments
                                      share), ``ModelResults``
- :mod:`msxai.experiments.selection`  Eq. 3 costs, CPU-budget caps, the round-robin pick of domains (``plan_run``)
- :mod:`msxai.experiments.bulk`       the bulk maps, experiments 2 and 3, the error flag (experiment 7)
- :mod:`msxai.experiments.conditions` experiments 1, 4, 5 and the model-randomisation check
- :mod:`msxai.experiments.context`    experiment 6 (context dilation), alone for context-only models
- :mod:`msxai.experiments.runner`     ``run_model`` (all experiments for one model on a list of cases)
- :mod:`msxai.experiments.report`     CSVs, PNGs and the self-contained ``report.html``
- :func:`run_experiments`             the whole pipeline behind ``msxai experiments``
"""

from __future__ import annotations

from pathlib import Path


def run_experiments(models, cases, out_dir, config=None, settings: dict | None = None, title: str | None = None,
                    context_only=(), included=(), results_dir=None):
    """Run every experiment for each model in ``models`` (:class:`msxai.bundle.Bundle`) on ``cases`` (``CaseSpec`` list) and
    write the report into ``out_dir``; returns ``(report_path, results)``.

    Models in ``context_only`` (bundles) run experiment 6 alone (forward passes only) on the lesions
    picked for the first full model; every other full model uses those lesions too. ``included``: results of earlier
    runs (:func:`load_results`) added to the report; when a model of this run has the same name, its experiment 6
    rows replace the included ones. ``results_dir``: where to pickle each model's results (``results_<model>.pkl``)
    for a later ``included``. With context-only models alone, the true lesions are picked from the truth
    (:func:`msxai.experiments.context.pick_context_truth`), as a full run picks them."""
    from msxai.errors import InputError
    from msxai.experiments.context import pick_context_truth, run_context_only
    from msxai.experiments.report import write_report
    from msxai.experiments.runner import run_model
    from msxai.experiments.state import ExperimentConfig

    config = config or ExperimentConfig()
    light = {id(m) for m in context_only}
    full = [m for m in models if id(m) not in light]
    if not models and not included:
        raise InputError("no model to run and no results to include")
    results = {}
    first = None
    if not full and models:  # context dilation only: the true lesions are picked from the truth (as a full run does)
        from types import SimpleNamespace

        picks, note = pick_context_truth(cases, *config.context_range, config.context_lesions,
                                         models[0].spec if models else None)
        first = SimpleNamespace(exp6_picks=picks, exp6_note=note)
    run_settings = {k: v for k, v in (settings or {}).items() if k in ("command", "generated", "torch threads",
                                                                         "arguments", "cohort")}
    for m in full:
        results[id(m)] = run_model(m, cases, config, None if first is None else first.exp6_picks)
        results[id(m)].run_settings = run_settings
        if results_dir is not None:  # saved as soon as each model is done (a later model may not finish)
            save_results([results[id(m)]], results_dir)
        if first is None:
            first = results[id(m)]
    for m in models:
        if id(m) in light:
            results[id(m)] = run_context_only(m, cases, first.exp6_picks, first.exp6_note, config)
            results[id(m)].run_settings = run_settings
            if results_dir is not None:
                save_results([results[id(m)]], results_dir)
    results = [results[id(m)] for m in models]
    if results_dir is not None:
        save_results(results, results_dir)
    results = merge_results(results[:1] + list(included) + results[1:])
    path = write_report(results, Path(out_dir), title or "msxai: instance-level saliency experiments",
                        settings=settings)
    return path, results


MERGED_FIELDS = {"exp1": ("exp1", "exp1_crops"), "exp4": ("exp4",), "exp5": ("exp5", "exp5_crops"),
                 "randomization": ("randomization",), "exp6": ("exp6",)}


def merge_results(results: list) -> list:
    """Results of one model from several runs become one: a context-only result (experiment 6) moves its rows into
    the model's full results; a second full result of the same model (e.g. experiments 4, 5 and the randomisation
    check run in parallel with the bulk maps) fills the experiments the first one did not run."""
    import json as _json

    kept = []
    for r in results:
        base = next((f for f in kept if f.model == r.model and f.kind == "full"), None)
        if r.kind == "full" and base is not None:
            taken = []
            for name, fields in MERGED_FIELDS.items():
                if not getattr(base, fields[0]) and getattr(r, fields[0]):
                    for f in fields:
                        setattr(base, f, getattr(r, f))
                    taken.append(name)
                    base.timings[f"{name}_s (other run)"] = r.timings.get(f"{name}_s", 0.0)
            if "exp6" in taken:
                base.exp6_note = r.exp6_note
            rs = getattr(r, "run_settings", None) or {}
            args = {k: v for k, v in rs.get("arguments", {}).items() if v not in (None, False, [], "")}
            base.notes.append(f"{', '.join(taken) or 'nothing'} from another run of this model"
                              + (f" ({rs.get('generated', '')}; arguments {_json.dumps(args, default=str)})" if rs else "")
                              + (f"; its notes: {'; '.join(r.notes)}" if r.notes else ""))
            continue
        kept.append(r)
    out = []
    for r in kept:
        full = next((f for f in kept if f.model == r.model and f.kind == "full"), None)
        if r.kind == "context" and full is not None:
            full.exp6, full.exp6_note = r.exp6, r.exp6_note
            full.timings["exp6_s"] = r.timings.get("exp6_s", 0.0)
            full.notes.append("experiment 6 from a context-only run on the same true lesions")
            continue
        out.append(r)
    return out


def save_results(results, directory) -> list[Path]:
    """Pickle each model's results (``results_<model>.pkl``) for a later report (``--include-results``)."""
    import pickle

    from msxai.experiments.report import slug

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for r in results:
        p = d / f"results_{slug(r.model)}.pkl"
        with p.open("wb") as fh:
            pickle.dump(r, fh)
        out.append(p)
    return out


def load_results(path):
    """Results pickled by :func:`save_results` (only load files you wrote yourself: pickle runs code)."""
    import pickle

    from msxai.errors import InputError
    from msxai.experiments.state import ModelResults

    p = Path(path)
    if not p.is_file():
        raise InputError(f"results file not found: {p}")
    with p.open("rb") as fh:
        r = pickle.load(fh)
    if not isinstance(r, ModelResults):
        raise InputError(f"{p}: not msxai experiment results")
    return r
