"""The saliency-based error flag: a logistic regression that scores how likely a predicted lesion is a false
positive from the features of its instance saliency maps (:func:`msxai.experiments.features.saliency_features`).

Use from other code (e.g. ``msxai explain`` or the MONAI Label explain task)::

    from msxai.experiments.error_flag import ErrorFlagModel, error_score_from_maps
    model = ErrorFlagModel.load("docs/experiments/error_flag_msxai_unet.json")
    score = error_score_from_maps(model, maps, domain, prob, affine)   # P(FP) in [0, 1]
    # or, with a features dict already computed: model.error_score(features)

The model stores its feature names, standardisation and coefficients in plain JSON (no pickle).
Evaluation (:func:`cross_validate`): out-of-fold scores with ``GroupKFold`` by patient, AUC with a cluster
(patient) bootstrap CI, and the lesion-wise F1 of the cohort before/after dropping the flagged lesions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msxai.errors import InputError
from msxai.experiments.features import saliency_features
from msxai.experiments.stats import CI, bootstrap_auc, cluster_resamples, roc_auc

# Features used by default: saliency only (plus size); BASELINE_FEATURES is the no-saliency comparison.
SALIENCY_FEATURES = (
    "flair_peak_max", "flair_peak_min", "flair_mean_in", "flair_mass_pos", "flair_mass_neg", "flair_ring_mean",
    "flair_ring_min", "flair_ring_max", "flair_ring_pos_frac", "flair_abs_in_ring_ratio", "flair_in_std",
    "flair_in_skew", "flair_in_entropy", "flair_in_pos_frac",
    "mprage_peak_max", "mprage_peak_min", "mprage_mean_in", "mprage_ring_mean", "mprage_ring_pos_frac",
    "mprage_in_std", "flair_share", "log_volume_mm3",
)
BASELINE_FEATURES = ("log_volume_mm3", "mean_prob", "max_prob")


@dataclass
class ErrorFlagModel:
    """Standardised logistic regression ``P(FP | features)``."""

    feature_names: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    threshold: float = 0.5
    info: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ fit / score
    @classmethod
    def fit(cls, features: list[dict], is_fp, feature_names=SALIENCY_FEATURES, C: float = 1.0,
            threshold: float = 0.5, info: dict | None = None) -> "ErrorFlagModel":
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(is_fp).astype(int)
        if y.size == 0 or y.min() == y.max():
            raise InputError("error flag: need both TP and FP lesions to fit the model")
        names = [n for n in feature_names if all(n in f for f in features)]
        if not names:
            raise InputError("error flag: none of the feature names is present in every lesion's features")
        X = feature_matrix(features, names)
        mu = X.mean(0)
        sd = X.std(0)
        sd[sd == 0] = 1.0
        clf = LogisticRegression(C=C, max_iter=2000, class_weight="balanced")
        clf.fit((X - mu) / sd, y)
        return cls(list(names), mu.tolist(), sd.tolist(), clf.coef_[0].tolist(), float(clf.intercept_[0]),
                   float(threshold), dict(info or {}, n_train=int(y.size), n_fp=int(y.sum())))

    def decision(self, X: np.ndarray) -> np.ndarray:
        z = (np.asarray(X, float) - np.asarray(self.mean)) / np.asarray(self.scale)
        return z @ np.asarray(self.coef) + self.intercept

    def scores(self, features: list[dict]) -> np.ndarray:
        """P(FP) for each features dict."""
        return 1.0 / (1.0 + np.exp(-self.decision(feature_matrix(features, self.feature_names))))

    def error_score(self, features: dict) -> float:
        """P(FP) in [0, 1] of one lesion from its features (a dict holding at least ``feature_names``)."""
        missing = [n for n in self.feature_names if n not in features]
        if missing:
            raise InputError(f"error flag: the lesion features lack {missing}")
        return float(self.scores([features])[0])

    def flag(self, features: dict) -> bool:
        return self.error_score(features) > self.threshold

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {"kind": "msxai-error-flag", "version": 1, "feature_names": self.feature_names, "mean": self.mean,
                "scale": self.scale, "coef": self.coef, "intercept": self.intercept, "threshold": self.threshold,
                "info": self.info}

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def from_dict(cls, d: dict) -> "ErrorFlagModel":
        if d.get("kind") != "msxai-error-flag":
            raise InputError("not an msxai error-flag model (missing kind: msxai-error-flag)")
        n = len(d["feature_names"])
        if not (len(d["mean"]) == len(d["scale"]) == len(d["coef"]) == n):
            raise InputError("error-flag model: feature_names, mean, scale and coef have different lengths")
        return cls(list(d["feature_names"]), list(map(float, d["mean"])), list(map(float, d["scale"])),
                   list(map(float, d["coef"])), float(d["intercept"]), float(d.get("threshold", 0.5)),
                   dict(d.get("info", {})))

    @classmethod
    def load(cls, path) -> "ErrorFlagModel":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"error-flag model not found: {path}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{path}: not a valid error-flag model ({exc})") from exc


def feature_matrix(features: list[dict], names) -> np.ndarray:
    return np.array([[float(f[n]) for n in names] for f in features], dtype=np.float64).reshape(len(features), len(names))


def error_score_from_maps(model: ErrorFlagModel, maps, domain, prob=None, affine=None) -> float:
    """P(FP) of one lesion straight from its instance saliency maps ``[C, X, Y, Z]``, Ω and probability."""
    return model.error_score(saliency_features(maps, domain, prob, affine))


# ---------------------------------------------------------------------------------------------- evaluation
def out_of_fold_scores(features: list[dict], is_fp, groups, feature_names=SALIENCY_FEATURES,
                       n_splits: int = 5) -> tuple[np.ndarray, int]:
    """Out-of-fold P(FP) with ``GroupKFold`` by ``groups`` (patients); returns ``(scores, n_folds)``.

    A training fold holding one class only predicts its class frequency (the model cannot be fit)."""
    from sklearn.model_selection import GroupKFold

    y = np.asarray(is_fp).astype(int)
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise InputError("error flag: cross-validation by patient needs lesions from at least 2 patients")
    k = min(int(n_splits), n_groups)
    scores = np.full(len(y), np.nan)
    for train, test in GroupKFold(n_splits=k).split(np.zeros(len(y)), y, groups):
        ytr = y[train]
        if ytr.min() == ytr.max():
            scores[test] = float(ytr.mean())
            continue
        m = ErrorFlagModel.fit([features[i] for i in train], ytr, feature_names)
        scores[test] = m.scores([features[i] for i in test])
    return scores, k


def f1_from_counts(tp: int, n_pred: int, detected: int, n_truth: int) -> float:
    """Lesion-wise F1 with msxai.metrics' conventions (empty prediction -> precision 1, no truth -> TPR 1)."""
    p = tp / n_pred if n_pred else 1.0
    r = detected / n_truth if n_truth else 1.0
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def case_counts(classes_pairs, pred_ids, truth_ids, fp_ids, dropped: set[int]) -> dict:
    """Lesion counts of one case after dropping the predicted lesions ``dropped``.

    ``classes_pairs``: overlapping (pred id, truth id) pairs; ``pred_ids``/``truth_ids``: all ids; ``fp_ids``: the
    predicted lesions without overlap."""
    kept = [i for i in pred_ids if i not in dropped]
    kept_set = set(kept)
    tp = sum(1 for i in kept if i not in set(fp_ids))
    detected = len({t for p, t in classes_pairs if p in kept_set})
    return {"tp": tp, "n_pred": len(kept), "detected": detected, "n_truth": len(truth_ids)}


def f1_gain(cases: list[dict], dropped: dict[str, set[int]], n_boot: int = 1000, seed: int = 0) -> dict:
    """Cohort lesion F1 (counts summed over cases) before and after dropping the flagged lesions, with cluster
    bootstrap CIs over cases for the gain. ``cases``: dicts with ``case``, ``pairs``, ``pred_ids``, ``truth_ids``,
    ``fp_ids``."""
    before = [case_counts(c["pairs"], c["pred_ids"], c["truth_ids"], c["fp_ids"], set()) for c in cases]
    after = [case_counts(c["pairs"], c["pred_ids"], c["truth_ids"], c["fp_ids"], dropped.get(c["case"], set()))
             for c in cases]

    def f1(rows, idx):
        s = {k: sum(rows[i][k] for i in idx) for k in ("tp", "n_pred", "detected", "n_truth")}
        return f1_from_counts(s["tp"], s["n_pred"], s["detected"], s["n_truth"])

    all_idx = np.arange(len(cases))
    f_before, f_after = f1(before, all_idx), f1(after, all_idx)
    gains = [f1(after, idx) - f1(before, idx) for idx in cluster_resamples(len(cases), None, n_boot, seed)]
    lo, hi = (np.quantile(gains, [0.025, 0.975]) if gains else (np.nan, np.nan))
    n_dropped = sum(len(v) for v in dropped.values())
    return {"f1_before": f_before, "f1_after": f_after, "gain": CI(f_after - f_before, float(lo), float(hi), len(cases)),
            "n_dropped": n_dropped}


def cross_validate(records: list[dict], cases: list[dict], n_splits: int = 5, n_boot: int = 1000,
                   seed: int = 0) -> dict:
    """Evaluate the error flag on explained TP/FP lesions.

    ``records``: one dict per lesion with ``case``, ``lesion_id``, ``cls`` ("TP"/"FP") and ``features``;
    ``cases``: per-case lesion bookkeeping for :func:`f1_gain`. Returns AUC (saliency model and the
    volume/probability baseline) with CIs, the out-of-fold scores and the F1 before/after dropping lesions whose
    out-of-fold score exceeds 0.5.
    """
    recs = [r for r in records if r["cls"] in ("TP", "FP")]
    y = np.array([r["cls"] == "FP" for r in recs], dtype=int)
    groups = np.array([r["case"] for r in recs])
    feats = [r["features"] for r in recs]
    out = {"n_lesions": len(recs), "n_fp": int(y.sum()), "n_tp": int(len(y) - y.sum()),
           "n_patients": int(len(np.unique(groups))) if len(recs) else 0}
    if len(recs) == 0 or y.min() == y.max() or out["n_patients"] < 2:
        out["status"] = ("not evaluated: needs TP and FP lesions from at least 2 patients "
                         f"(have {out['n_tp']} TP, {out['n_fp']} FP from {out['n_patients']} patients)")
        return out
    scores, k = out_of_fold_scores(feats, y, groups, SALIENCY_FEATURES, n_splits)
    base, _ = out_of_fold_scores(feats, y, groups, BASELINE_FEATURES, n_splits)
    out.update(status="ok", n_folds=k, scores=scores.tolist(), baseline_scores=base.tolist())
    out["auc"] = bootstrap_auc(scores, y, groups, n_boot=n_boot, seed=seed)
    out["auc_baseline"] = bootstrap_auc(base, y, groups, n_boot=n_boot, seed=seed)
    dropped: dict[str, set[int]] = {}
    for r, s in zip(recs, scores):
        if s > 0.5:
            dropped.setdefault(r["case"], set()).add(int(r["lesion_id"]))
    out["f1"] = f1_gain(cases, dropped, n_boot=n_boot, seed=seed)
    out["n_flagged_fp"] = int(sum(1 for r, s in zip(recs, scores) if s > 0.5 and r["cls"] == "FP"))
    out["n_flagged_tp"] = int(sum(1 for r, s in zip(recs, scores) if s > 0.5 and r["cls"] == "TP"))
    return out
