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
from msxai.io import file_sha256

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
        if not isinstance(d, dict) or d.get("kind") != "msxai-error-flag":
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
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
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


# ---------------------------------------------------------------------------------------------- at explain time
# The fitted model ships with the bundle it was fitted for; ``msxai explain`` and the MONAI Label explain task score
# a lesion only when the maps were made like the training maps (same weights, method, aggregation, N, sigma).
BUNDLE_MODEL_FILE = "models/error_flag.json"
# what the model's ``info`` must record, and what explain compares (key -> description for messages)
REQUIRED_INFO = ("weights_sha256", "method", "aggregation", "samples", "sigma_fraction")


def bundle_weights_sha256(bundle_dir) -> str | None:
    """sha256 of the bundle's ``models/model.pt`` (:func:`msxai.io.file_sha256`), None when there is none."""
    f = Path(bundle_dir) / "models" / "model.pt"
    return file_sha256(f) if f.is_file() else None


@dataclass
class LoadedFlag:
    """The error-flag model found for a bundle: ``model`` (None when absent or unreadable), where it was looked
    for, and ``reason`` (why there is no model)."""

    model: ErrorFlagModel | None
    path: Path | None
    reason: str | None = None

    def describe(self) -> dict:
        """The provenance block written next to the scores (JSON-ready)."""
        out = {"model_file": None if self.path is None else str(self.path), "loaded": self.model is not None,
               "reason": self.reason}
        if self.model is not None:
            i = self.model.info
            out.update(threshold=self.model.threshold, fitted_for={k: i.get(k) for k in (
                "model", "weights_sha256", "method", "aggregation", "samples", "sigma_fraction")},
                training_cohort=i.get("cohort"), n_train=i.get("n_train"), n_fp=i.get("n_fp"),
                cv_auc=i.get("auc_oof"), cv_auc_ci=i.get("auc_oof_ci"), fitted_at=i.get("fitted_at"),
                restrictions=i.get("restrictions"))
        return out


def validation_problem(model: ErrorFlagModel) -> str | None:
    """Why a fitted flag is not shown as a score (None = validated): its cross-validated AUC interval
    (``info.auc_oof_ci``, out-of-fold scores, cluster bootstrap by patient) must lie above 0.5 - an interval that
    reaches 0.5 (or none recorded) is no evidence that the flag tells false from true positives better than
    chance."""
    i = model.info
    ci = i.get("auc_oof_ci")
    try:
        lo, hi = (float(x) for x in ci)
    except (TypeError, ValueError):
        return ("not validated: the error-flag model records no cross-validated AUC interval (refit it with "
                "msxai experiments); no score is shown")
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo <= 0.5:
        auc = i.get("auc_oof")
        auc_text = f"{float(auc):.2f} " if isinstance(auc, (int, float)) and np.isfinite(auc) else ""
        n = f" on {i.get('n_train')} lesions ({i.get('n_fp')} false positives)" if i.get("n_train") else ""
        return (f"not validated: cross-validated AUC {auc_text}[{lo:.2f}, {hi:.2f}]{n} reaches 0.5, i.e. no "
                "evidence that the flag tells false from true positives better than chance; no score is shown")
    return None


def load_bundle_flag(bundle_dir=None, path=None) -> LoadedFlag:
    """The error-flag model of a bundle.

    ``path`` given (``--error-flag FILE``): it must exist and be valid, else ``InputError`` naming the file.
    ``path`` None: ``<bundle>/models/error_flag.json`` if present; absent -> no model (reason says so); present
    but unreadable -> no model, the reason names the file and the problem (explanations still run).
    A model that is not validated (:func:`validation_problem`) is loaded as no model, with that reason: the CLI and
    the app then say "not validated" and why instead of showing a score."""
    if path is not None:
        model = ErrorFlagModel.load(path)
        missing = [k for k in REQUIRED_INFO if k not in model.info]
        if missing:
            raise InputError(f"error-flag model {path}: its info does not record {missing} (refit it with "
                             "msxai experiments)")
        problem = validation_problem(model)
        return LoadedFlag(None, Path(path), problem) if problem else LoadedFlag(model, Path(path))
    if bundle_dir is None:
        return LoadedFlag(None, None, "no bundle folder: no fitted error-flag model")
    f = Path(bundle_dir) / BUNDLE_MODEL_FILE
    if not f.is_file():
        return LoadedFlag(None, f, f"bundle {Path(bundle_dir).name} ships no fitted error flag ({BUNDLE_MODEL_FILE})")
    try:
        model = ErrorFlagModel.load(f)
    except InputError as exc:
        return LoadedFlag(None, f, f"error-flag model unreadable: {exc}")
    missing = [k for k in REQUIRED_INFO if k not in model.info]
    if missing:
        return LoadedFlag(None, f, f"error-flag model {f} does not record {missing}; refit it")
    problem = validation_problem(model)
    return LoadedFlag(None, f, problem) if problem else LoadedFlag(model, f)


def incompatibility(model: ErrorFlagModel, method: str, aggregation: str | None, n_samples: int | None,
                    sigma_fraction: float | None, sigma_abs: float | None = None,
                    weights_sha256: str | None = None, on_network_grid: bool = True) -> str | None:
    """Why maps made with these settings cannot be scored by ``model`` (None = compatible).

    The features are read from the maps, so they depend on the method, the aggregation (Eq. 2 values shrink with
    the lesion size, Eq. 3 values do not), N (averaging more noise copies lowers the peaks), sigma and, of course,
    the weights that produced both the lesion and its map."""
    i = model.info
    if method != i.get("method", "smoothgrad"):
        return f"the error flag reads instance SmoothGrad maps; {method} maps are not scored"
    if sigma_abs is not None:
        return "maps made with an absolute noise sigma; the error flag was fitted with sigma as a fraction " \
               f"{i.get('sigma_fraction')} of the FLAIR range"
    if aggregation != i.get("aggregation"):
        eq = {"max": "Eq. 3 (max)", "mean": "Eq. 2 (mean)"}
        return (f"the error flag was fitted on {eq.get(i.get('aggregation'), i.get('aggregation'))} maps, these are "
                f"{eq.get(aggregation, aggregation)}: rerun with aggregation {i.get('aggregation')} for a score")
    if n_samples is None or int(n_samples) != int(i.get("samples")):
        return (f"the error flag was fitted on maps with N = {i.get('samples')} noise samples, these have N = "
                f"{n_samples}: rerun with samples {i.get('samples')} for a score")
    if sigma_fraction is None or abs(float(sigma_fraction) - float(i.get("sigma_fraction"))) > 1e-9:
        return (f"the error flag was fitted with sigma = {i.get('sigma_fraction')} x FLAIR range, these maps use "
                f"{sigma_fraction}")
    if weights_sha256 is not None and weights_sha256 != i.get("weights_sha256"):
        return (f"the error flag was fitted for weights sha256 {str(i.get('weights_sha256'))[:12]}, the bundle now "
                f"has {weights_sha256[:12]} (retrained): refit it with msxai experiments")
    if not on_network_grid:
        return "the bundle resampled the input: the maps on the input grid are interpolated, not the network's"
    return None


@dataclass
class ExplanationFlag:
    """The one error-flag annotation of an explanation (``msxai explain``, the app's explain tasks, cohort runs: all
    through :func:`msxai.saliency.engine.write_explanation`): the bundle's fitted flag (or ``--error-flag FILE``),
    checked once against the settings the maps were made with (:func:`incompatibility`, the bundle's weights
    included); :meth:`score` gives each explained domain its ``error_score`` (P false positive), ``error_flag`` and
    ``error_flag_reason`` (why there is no score), from its instance SmoothGrad maps on the network grid."""

    flag: LoadedFlag
    settings_reason: str | None
    threshold: float = 0.3

    @classmethod
    def for_maps(cls, bundle_dir, method: str, aggregation: str | None, n_samples: int | None,
                 sigma_fraction: float | None, sigma_abs: float | None = None, threshold: float = 0.3,
                 error_flag_path=None) -> "ExplanationFlag":
        flag = load_bundle_flag(bundle_dir, error_flag_path)
        reason = None
        if flag.model is not None:
            reason = incompatibility(flag.model, method, aggregation, n_samples, sigma_fraction, sigma_abs,
                                     bundle_weights_sha256(bundle_dir) if bundle_dir else None)
        return cls(flag, reason, float(threshold))

    def score(self, maps, domain, affine, mean_probability: float | None = None,
              not_predicted: str | None = None) -> dict:
        """``maps``: the domain's instance SmoothGrad ``[2, X, Y, Z]``; ``mean_probability``: the bundle's mean
        lesion softmax in it (a domain not above the threshold is not one of its lesions); ``not_predicted``: why
        the domain is not a lesion the bundle predicted (a drawn domain, a lesion of a saved label)."""
        if self.flag.model is None:
            reason = self.flag.reason
        else:
            reason = self.settings_reason or not_predicted
            if reason is None and mean_probability is not None and mean_probability <= self.threshold:
                reason = (f"mean softmax in the domain {mean_probability:.3f} <= threshold {self.threshold}: not a "
                          "lesion this bundle predicts")
        if reason is not None:
            return {"error_score": None, "error_flag": None, "error_flag_reason": reason}
        s = error_score_from_maps(self.flag.model, maps, domain, None, affine)
        return {"error_score": s, "error_flag": bool(s > self.flag.model.threshold), "error_flag_reason": None}

    def describe(self) -> dict:
        """The provenance block written next to the scores (``settings.error_flag``)."""
        return dict(self.flag.describe(), reason=self.flag.reason or self.settings_reason)
