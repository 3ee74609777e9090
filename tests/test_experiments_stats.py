"""Statistics of the experiments against slow, obviously correct twins (scipy, loops, brute-force counts)."""

import itertools

import numpy as np
import pytest
from scipy import stats as sps

from msxai.experiments import stats as S


def brute_u(x, y):
    """Number of pairs with x > y, ties counted 1/2."""
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in x for b in y)


def test_mann_whitney_matches_scipy_exact_and_asymptotic():
    rng = np.random.default_rng(0)
    for _ in range(150):
        n1, n2 = rng.integers(1, 9, 2)
        x, y = rng.normal(size=n1), rng.normal(size=n2) + rng.normal()
        r = S.mann_whitney_u(x, y)
        s = sps.mannwhitneyu(x, y, alternative="two-sided")
        assert r.method == "exact"
        assert r.u == pytest.approx(s.statistic) and r.u == pytest.approx(brute_u(x, y))
        assert r.p == pytest.approx(s.pvalue, rel=1e-9, abs=1e-12)
    for _ in range(150):  # ties and larger samples: normal approximation with tie and continuity corrections
        n1, n2 = rng.integers(2, 40, 2)
        x, y = rng.integers(0, 5, n1).astype(float), rng.integers(0, 6, n2).astype(float)
        r = S.mann_whitney_u(x, y)
        s = sps.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic")
        assert r.u == pytest.approx(brute_u(x, y))
        assert r.p == pytest.approx(s.pvalue, rel=1e-9, abs=1e-12)
    # explicit methods
    x, y = rng.normal(size=12), rng.normal(size=15)
    for method in ("exact", "asymptotic"):
        assert S.mann_whitney_u(x, y, method).p == pytest.approx(
            sps.mannwhitneyu(x, y, alternative="two-sided", method=method).pvalue, rel=1e-9)


def test_exact_null_distribution_is_the_brute_force_enumeration():
    for m, n in ((1, 1), (2, 3), (3, 3), (4, 2), (3, 5)):
        counts = S._u_counts(m, n)
        brute = np.zeros(m * n + 1)
        for xs in itertools.combinations(range(m + n), m):  # ranks of the x sample
            u = sum(xs) - m * (m - 1) / 2
            brute[int(u)] += 1
        np.testing.assert_array_equal(counts, brute)


def test_mann_whitney_empty_and_separated():
    assert np.isnan(S.mann_whitney_u([], [1, 2]).p)
    r = S.mann_whitney_u([10, 11, 12, 13, 14], [1, 2, 3, 4, 5])
    assert r.u == 25 and r.auc == 1.0 and r.p == pytest.approx(2 / 252)


def test_bootstrap_ci_matches_a_loop():
    rng = np.random.default_rng(1)
    x = rng.exponential(size=37)
    ci = S.bootstrap_ci(x, np.median, n_boot=500, seed=5)
    loop_rng = np.random.default_rng(5)
    meds = [np.median(x[loop_rng.integers(0, x.size, size=x.size)]) for _ in range(500)]
    assert ci.estimate == np.median(x)
    assert ci.lo == pytest.approx(np.quantile(meds, 0.025)) and ci.hi == pytest.approx(np.quantile(meds, 0.975))
    assert ci.lo <= ci.estimate <= ci.hi and ci.n == 37
    empty = S.median_ci([np.nan])
    assert empty.n == 0 and np.isnan(empty.estimate) and empty.text() == "n/a"


def test_auc_matches_pair_count_and_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    s = np.round(rng.normal(size=60), 1)  # ties
    y = rng.integers(0, 2, 60)
    pos, neg = s[y == 1], s[y == 0]
    assert S.roc_auc(s, y) == pytest.approx(brute_u(pos, neg) / (pos.size * neg.size))
    assert S.roc_auc(s, y) == pytest.approx(roc_auc_score(y, s))
    assert np.isnan(S.roc_auc([1, 2], [1, 1]))
    ci = S.bootstrap_auc(s, y, groups=np.arange(60) // 6, n_boot=200, seed=0)
    assert ci.lo <= ci.estimate <= ci.hi


def test_cluster_resamples_take_whole_groups():
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    for idx in S.cluster_resamples(6, groups, n_boot=20, seed=3):
        picked = groups[idx]
        for g in "abc":  # a group appears a multiple of its size
            assert (picked == g).sum() % (groups == g).sum() == 0


def test_pairwise_mwu_covers_every_pair():
    rows = S.pairwise_mwu({"TP": [1, 2, 3], "FP": [4, 5], "FN": [], "TN": [0.5]})
    assert [(r["a"], r["b"]) for r in rows] == [("TP", "FP"), ("TP", "FN"), ("TP", "TN"), ("FP", "FN"),
                                                ("FP", "TN"), ("FN", "TN")]
    assert np.isnan(rows[1]["p"]) and rows[0]["U"] == 0


def test_spearman():
    a = np.arange(10.0)
    assert S.spearman(a, a**3) == pytest.approx(1.0)
    assert S.spearman(a, -a) == pytest.approx(-1.0)
    assert np.isnan(S.spearman(a, np.ones(10)))


def test_cluster_bootstrap_reduces_to_the_plain_bootstrap_and_resamples_groups():
    rng = np.random.default_rng(9)
    x = rng.normal(size=25)
    a = S.cluster_bootstrap_ci([[v] for v in x], np.median, n_boot=300, seed=4)
    b = S.bootstrap_ci(x, np.median, n_boot=300, seed=4)
    assert (a.estimate, a.lo, a.hi) == pytest.approx((b.estimate, b.lo, b.hi))
    groups = [rng.normal(m, 0.01, size=rng.integers(1, 30)) for m in (0.0, 1.0, 2.0, 3.0)]
    c = S.cluster_bootstrap_ci(groups, np.mean, n_boot=300, seed=1)
    # loop twin: resample lesions with the same indices, pool, take the statistic
    idx = S.bootstrap_indices(4, 300, 1)
    boots = [np.mean(np.concatenate([groups[i] for i in row])) for row in idx]
    assert c.lo == pytest.approx(np.quantile(boots, 0.025)) and c.hi == pytest.approx(np.quantile(boots, 0.975))
    assert c.estimate == pytest.approx(np.mean(np.concatenate(groups))) and c.n == sum(g.size for g in groups)
    # the interval reflects the spread between lesions, not the tiny spread within them
    assert c.hi - c.lo > 0.5
    assert S.cluster_bootstrap_ci([[], []]).n == 0
