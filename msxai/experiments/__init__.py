"""Reproduction of the experiments of Spagnolo et al. (Sci Rep 2026) and the saliency-based error flag.

- :mod:`msxai.experiments.stats`      bootstrap CIs, two-sided Mann-Whitney U, AUC, Spearman
- :mod:`msxai.experiments.geometry`   rings/distances in mm, lesion transplants, context-restoration images
- :mod:`msxai.experiments.features`   per-lesion numbers read from instance saliency maps
- :mod:`msxai.experiments.error_flag` ``ErrorFlagModel`` (fit / save / load JSON, ``error_score(features)``)
- :mod:`msxai.experiments.model`      ``ExperimentModel`` (a bundle's network + exact sliding window)
- :mod:`msxai.experiments.runner`     ``run_model`` (all experiments for one model on a list of cases)
- :mod:`msxai.experiments.report`     CSVs, PNGs and the self-contained ``report.html``
- :func:`run_experiments`             the whole pipeline behind ``msxai experiments``
"""

from __future__ import annotations

from pathlib import Path


def run_experiments(models, cases, out_dir, config=None, settings: dict | None = None, title: str | None = None,
                    context_only=()):
    """Run every experiment for each model in ``models`` (``ExperimentModel``) on ``cases`` (``CaseSpec`` list) and
    write the report into ``out_dir``; returns ``(report_path, results)``.

    Models in ``context_only`` (ExperimentModel objects) run experiment 6 alone (forward passes only) on the lesions
    picked for the first full model; at least one model must run in full."""
    from msxai.errors import InputError
    from msxai.experiments.report import write_report
    from msxai.experiments.runner import ExperimentConfig, run_context_only, run_model

    config = config or ExperimentConfig()
    light = {id(m) for m in context_only}
    full = [m for m in models if id(m) not in light]
    if not full:
        raise InputError("at least one bundle must run the saliency experiments (not only the context dilation)")
    results = {}
    for m in full:
        results[id(m)] = run_model(m, cases, config)
    first = results[id(full[0])]
    for m in models:
        if id(m) in light:
            results[id(m)] = run_context_only(m, cases, first.exp6_picks, first.exp6_note, config)
    results = [results[id(m)] for m in models]
    path = write_report(results, Path(out_dir), title or "msxai: instance-level saliency experiments",
                        settings=settings)
    return path, results
