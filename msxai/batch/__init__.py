"""Cohort-scale segmentation and instance explanation: many scans, many processes, GPUs and machines.

``msxai batch`` and the bundles' ``configs/batch_inference.json`` run :func:`msxai.batch.run.run_batch`: every case
of a cohort (a folder, a ``dataset.json`` or a MONAI datalist; :mod:`msxai.batch.cases`) is segmented with the
bundle and, optionally, its lesions (or, with the truth, its TP/FP/FN/TN lesion domains) are explained with the
one explain-and-write function (:func:`msxai.saliency.engine.write_explanation`, from the case's files through
:func:`msxai.saliency.engine.explain_to_files`).

- one process, or one per GPU under ``torchrun`` (gloo on CPU, nccl on GPU; :mod:`msxai.batch.dist`);
- work is claimed one case at a time through torch.distributed's key-value store (an atomic counter), so a heavy
  case never holds back the others and more ranks than cases simply finish;
- each case is written into a temporary folder, then renamed to ``<out>/cases/<id>/`` with a done-marker
  ``done.json`` (:mod:`msxai.batch.case`); a rerun skips cases whose marker matches the settings, weights and
  inputs, redoes the others, and a failing case is recorded in ``<out>/failures/<id>.json`` without stopping the
  cohort;
- at the end the per-case markers are merged into ``cases.csv/json``, ``domains.csv/json`` and ``cohort.json``
  (:mod:`msxai.batch.summary`); experiments 2, 3 and the error flag can be computed from these pooled outputs
  (:func:`msxai.batch.experiments.experiments_from_cohort`, ``msxai experiments --from-cohort DIR``).

See docs/cohort.md.
"""

from msxai.batch.cases import Case, load_cases
from msxai.batch.case import BatchSettings

__all__ = ["BatchSettings", "Case", "load_cases"]
