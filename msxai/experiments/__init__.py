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


def run_experiments(models, cases, out_dir, config=None, settings: dict | None = None, title: str | None = None):
    """Run every experiment for each model in ``models`` (``ExperimentModel``) on ``cases`` (``CaseSpec`` list) and
    write the report into ``out_dir``; returns ``(report_path, results)``."""
    from msxai.experiments.report import write_report
    from msxai.experiments.runner import ExperimentConfig, run_model

    config = config or ExperimentConfig()
    results = [run_model(m, cases, config) for m in models]
    path = write_report(results, Path(out_dir), title or "msxai: instance-level saliency experiments",
                        settings=settings)
    return path, results
