"""What one model's experiment run shares: its settings (:class:`ExperimentConfig`), the segmented cases
(:class:`CaseState`), the run context the experiments read and write (:class:`RunContext`) and the results
(:class:`ModelResults`, what :mod:`msxai.experiments.report` turns into tables and figures).

Every experiment is a module-level function ``run_<experiment>(ctx: RunContext) -> None`` that reads the model, the
settings, the cases and the selection from ``ctx`` and writes its rows into ``ctx.res``; it can run alone on a context
built by :func:`msxai.experiments.selection.plan_run`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from msxai.experiments.cohort import CaseSpec
from msxai.experiments.error_flag import ErrorFlagModel
from msxai.bundle import Bundle


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


# Pickled results (``msxai experiments --results-dir``) written before this module existed name the class
# ``msxai.experiments.runner.ModelResults``; the runner imports it from here, so they still load.
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


@dataclass
class RunContext:
    """One model's run, shared by its experiments: what they read (model, settings, segmented cases, the Eq. 3
    cost of each domain, the selection and the targets of each experiment) and where they write (``res``).

    Built by :func:`msxai.experiments.selection.plan_run`; the bulk maps
    (:func:`msxai.experiments.bulk.run_bulk`) fill ``keep_full`` with the whole maps that experiments 1, 4, 5 and
    the randomisation check reuse (an experiment run without them computes its maps itself)."""

    model: Bundle
    cfg: ExperimentConfig
    states: list[CaseState]
    res: ModelResults
    costs: dict = field(default_factory=dict)  # (case, cls, id) -> Eq. 3 cost in voxel-windows
    selected: dict = field(default_factory=dict)  # cls -> [(case, id)] explained in bulk
    exp1_targets: list = field(default_factory=list)  # [(label, case, id)]: experiment 1's large/small TP
    exp4_target: tuple | None = None  # (case, id, voxels): the TP of experiment 4
    transplant_targets: list = field(default_factory=list)  # [(case, id, voxels)]: experiment 5's TPs
    randomization_targets: list = field(default_factory=list)  # [(case, id)]: the randomisation check's TPs
    context_picks: list | None = None  # experiment 6's true lesions picked for another model (None: pick here)
    keep_full: dict = field(default_factory=dict)  # "case|TP:id" -> bulk map [C, X, Y, Z]

    @property
    def by_id(self) -> dict[str, CaseState]:
        return {s.id: s for s in self.states}

    @property
    def exp1_samples(self) -> int:
        """N of experiment 1 (``exp1_samples``, default: the bulk maps' N)."""
        return self.cfg.exp1_samples or self.cfg.samples

    def bulk_map(self, cid: str, lid: int, n: int, agg: str) -> np.ndarray | None:
        """The bulk map of a TP when it was computed with these settings (N, aggregation), else None."""
        if n == self.cfg.samples and agg == self.cfg.aggregation:
            return self.keep_full.get(f"{cid}|TP:{lid}")
        return None


def progress(iterable, cfg: ExperimentConfig, **kw):
    """A progress bar over ``iterable`` (none with ``cfg.progress`` off)."""
    return tqdm(iterable, disable=not cfg.progress, dynamic_ncols=True, **kw)
