"""Statistics of the experiments: bootstrap confidence intervals, the two-sided Mann-Whitney U test, AUC.

Everything is vectorised; the tests compare each function with a slow, obviously correct twin (a Python loop over
bootstrap resamples, ``scipy.stats.mannwhitneyu``, a brute-force pair count for U and the AUC).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats as sps

EXACT_MAX_N = 8  # scipy's "auto" rule: exact distribution when both samples are this small and there are no ties


@dataclass
class CI:
    """A point estimate with a percentile bootstrap interval (``nan`` when there are no values)."""

    estimate: float
    lo: float
    hi: float
    n: int

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}estimate": self.estimate, f"{prefix}ci_lo": self.lo, f"{prefix}ci_hi": self.hi,
                f"{prefix}n": self.n}

    def text(self, fmt: str = ".3g") -> str:
        if self.n == 0 or not np.isfinite(self.estimate):
            return "n/a"
        return f"{self.estimate:{fmt}} [{self.lo:{fmt}}, {self.hi:{fmt}}]"


def bootstrap_indices(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """``[n_boot, n]`` resampling indices (with replacement) from ``numpy.random.default_rng(seed)``; row ``b`` is
    what ``rng.integers(0, n, size=n)`` returns at the b-th call."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(int(n_boot), int(n)))


def bootstrap_ci(values, statistic: Callable = np.median, n_boot: int = 2000, ci: float = 0.95,
                 seed: int = 0) -> CI:
    """Percentile bootstrap CI of ``statistic`` (a function with an ``axis`` argument, e.g. ``np.median``)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return CI(float("nan"), float("nan"), float("nan"), 0)
    est = float(statistic(x))
    idx = bootstrap_indices(x.size, n_boot, seed)
    boots = statistic(x[idx], axis=1)
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return CI(est, float(lo), float(hi), int(x.size))


def median_ci(values, n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> CI:
    """Median with its 95 % percentile bootstrap interval."""
    return bootstrap_ci(values, np.median, n_boot, ci, seed)


def _u_counts(m: int, n: int) -> np.ndarray:
    """Number of arrangements of m x's and n y's giving each U = 0..m n (no ties): the exact null distribution."""
    # c[i][j][u] = c[i-1][j][u-j] + c[i][j-1][u]; rolled over i with a 2-D table for j
    table = [np.zeros(1, dtype=np.float64) for _ in range(n + 1)]
    for j in range(n + 1):
        table[j] = np.ones(1)  # i = 0: U = 0 in one way
    for i in range(1, m + 1):
        new = [np.ones(1)]  # j = 0: U = 0 in one way
        for j in range(1, n + 1):
            size = i * j + 1
            c = np.zeros(size)
            a = table[j]  # (i-1, j): add j to u
            c[j : j + a.size] += a
            b = new[j - 1]  # (i, j-1)
            c[: b.size] += b
            new.append(c)
        table = new
    return table[n]


@dataclass
class MWU:
    u: float  # U statistic of the first sample (number of pairs x > y, ties counted 1/2)
    p: float  # two-sided p-value
    method: str  # "exact" or "asymptotic"
    n1: int
    n2: int

    @property
    def auc(self) -> float:
        """``U / (n1 n2)``: the probability that a value of the first sample exceeds one of the second."""
        return self.u / (self.n1 * self.n2) if self.n1 and self.n2 else float("nan")


def mann_whitney_u(x, y, method: str = "auto") -> MWU:
    """Two-sided Mann-Whitney U test, as ``scipy.stats.mannwhitneyu(x, y, alternative="two-sided")``.

    ``method="auto"``: exact null distribution when both samples have at most 8 values and there are no ties,
    otherwise the normal approximation with tie correction and continuity correction. Empty samples give ``nan``.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    n1, n2 = x.size, y.size
    if n1 == 0 or n2 == 0:
        return MWU(float("nan"), float("nan"), "none", n1, n2)
    both = np.concatenate([x, y])
    ranks = sps.rankdata(both)
    u1 = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2.0)
    u2 = n1 * n2 - u1
    _, tie_counts = np.unique(both, return_counts=True)
    has_ties = bool(np.any(tie_counts > 1))
    if method == "auto":
        method = "exact" if (max(n1, n2) <= EXACT_MAX_N and not has_ties) else "asymptotic"
    u = max(u1, u2)
    if method == "exact":
        counts = _u_counts(min(n1, n2), max(n1, n2))
        total = counts.sum()
        sf = counts[int(round(u)) :].sum() / total  # P(U >= u)
        p = min(1.0, 2.0 * sf)
    elif method == "asymptotic":
        n = n1 + n2
        tie_term = float((tie_counts.astype(np.float64) ** 3 - tie_counts).sum())
        var = n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1)))
        if var <= 0:
            p = 1.0
        else:
            z = (u - n1 * n2 / 2.0 - 0.5) / math.sqrt(var)
            p = min(1.0, float(2.0 * sps.norm.sf(z)))
    else:
        raise ValueError(f"method must be auto, exact or asymptotic, got {method!r}")
    return MWU(u1, float(p), method, n1, n2)


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive), ties counted 1/2; ``nan`` when
    one class is missing. Equal to ``U / (n_pos n_neg)`` of the Mann-Whitney test."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    lab = np.asarray(labels).astype(bool).ravel()
    pos, neg = s[lab], s[~lab]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    ranks = sps.rankdata(np.concatenate([pos, neg]))
    return float((ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size))


def bootstrap_auc(scores, labels, groups=None, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> CI:
    """AUC with a percentile bootstrap CI; with ``groups`` (e.g. patient ids) whole groups are resampled (cluster
    bootstrap). Resamples holding one class only are skipped."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    lab = np.asarray(labels).astype(bool).ravel()
    est = roc_auc(s, lab)
    if not np.isfinite(est):
        return CI(float("nan"), float("nan"), float("nan"), int(s.size))
    boots = []
    for members in cluster_resamples(len(s), groups, n_boot, seed):
        a = roc_auc(s[members], lab[members])
        if np.isfinite(a):
            boots.append(a)
    if not boots:
        return CI(est, float("nan"), float("nan"), int(s.size))
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return CI(est, float(lo), float(hi), int(s.size))


def cluster_resamples(n: int, groups=None, n_boot: int = 1000, seed: int = 0):
    """Yield ``n_boot`` index arrays resampling items (``groups=None``) or whole groups with replacement."""
    rng = np.random.default_rng(seed)
    if groups is None:
        for _ in range(int(n_boot)):
            yield rng.integers(0, n, size=n)
        return
    groups = np.asarray(groups)
    uniq = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in uniq]
    for _ in range(int(n_boot)):
        pick = rng.integers(0, len(uniq), size=len(uniq))
        yield np.concatenate([members[i] for i in pick])


def cluster_bootstrap_ci(groups: list, statistic: Callable = np.median, n_boot: int = 2000, ci: float = 0.95,
                         seed: int = 0) -> CI:
    """Percentile bootstrap CI of ``statistic`` of the pooled values when whole groups (e.g. the voxels of one
    lesion) are resampled with replacement: values of one lesion are not independent, so resampling voxels would
    give too narrow an interval. Empty groups count as groups; ``statistic`` gets a 1-D array. With one value per
    group this is the ordinary bootstrap of :func:`bootstrap_ci` (same resamples for the same seed)."""
    arrays = [np.asarray(g, dtype=np.float64).ravel() for g in groups]
    arrays = [a[np.isfinite(a)] for a in arrays]
    pooled = np.concatenate(arrays) if arrays else np.zeros(0)
    if pooled.size == 0:
        return CI(float("nan"), float("nan"), float("nan"), 0)
    est = float(statistic(pooled))
    boots = []
    for idx in bootstrap_indices(len(arrays), n_boot, seed):
        sample = np.concatenate([arrays[i] for i in idx])
        if sample.size:
            boots.append(float(statistic(sample)))
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha]) if boots else (float("nan"), float("nan"))
    return CI(est, float(lo), float(hi), int(pooled.size))


def spearman(a, b) -> float:
    """Spearman rank correlation of two equally long arrays (``nan`` when one is constant)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(sps.spearmanr(a, b).statistic)


def pairwise_mwu(groups: dict[str, np.ndarray]) -> list[dict]:
    """Two-sided Mann-Whitney U for every pair of groups: rows ``{a, b, n_a, n_b, U, p, method, auc}``."""
    names = list(groups)
    rows = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            r = mann_whitney_u(groups[names[i]], groups[names[j]])
            rows.append({"a": names[i], "b": names[j], "n_a": r.n1, "n_b": r.n2, "U": r.u, "p": r.p,
                         "method": r.method, "auc": r.auc})
    return rows
