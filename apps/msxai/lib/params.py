"""Explain request parameters as clients send them (MONAI Label, the Slicer module, the OHIF plugin): lists of
choices whose first entry is the selection, strings for numbers, the task key ``model`` of MONAI Label's request
dict; every refusal names the parameter and its valid range.

The bundle to explain is the parameter ``network`` (``unet``, ``dynunet``, ``swinunetr``). Its former name ``model``
collided with MONAI Label's task key ``model`` (the app's infer route moved it to ``explain_model``); both old
names are still accepted in the 0.1 releases, with a note in the result's ``deprecated`` list and a log warning."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from msxai import SEQUENCES
from msxai.errors import InputError
from msxai.lesions import parse_lesion_ids

logger = logging.getLogger(__name__)
DEPRECATED_MODEL_PARAM = "parameter 'model' is now 'network'; the old name is accepted until 0.2.0"

MAX_SAMPLES_DEFAULT = 200
EXPLAIN_DEFAULTS = {
    "smoothgrad": {"lesion": "all", "samples": 50, "sigma": 0.05, "aggregation": "max", "seed": 0},
    "gradcampp": {"lesion": "all", "layer": ""},
}
EXPLAIN_METHODS = tuple(EXPLAIN_DEFAULTS)


def _first(v):
    """Client configs send lists of choices; the first entry is the selection (as the Slicer module does)."""
    return v[0] if isinstance(v, (list, tuple)) and v and not isinstance(v[0], (list, tuple)) else v


def _as_int(value, name: str, lo: int, hi: int) -> int:
    value = _first(value)
    if isinstance(value, bool):
        raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}") from None
    if not np.isfinite(f) or f != int(f) or not (lo <= f <= hi):
        raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(f)


def _as_float(value, name: str, lo: float, hi: float, lo_open: bool = False) -> float:
    value = _first(value)
    if isinstance(value, bool):
        raise InputError(f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(f) or f > hi or f < lo or (lo_open and f == lo):
        raise InputError(f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")
    return f


@dataclass
class ExplainParams:
    method: str
    model: str
    lesion: list[int] | str | None
    samples: int
    sigma: float
    aggregation: str
    layer: str | None
    seed: int
    sequence: str
    fractions: tuple[float, float]
    foreground: list | None
    domain_mode: str
    radius_mm: float
    label_value: int | None
    ignored: list[str]
    lesions_from: str = "model"
    deprecated: list[str] = field(default_factory=list)  # notes on deprecated parameter names the request used

    def run_key(self, domain_key: str) -> str:
        """A stable folder name for this request's artefacts (same request -> same folder)."""
        h = hashlib.sha1(
            json.dumps([self.samples, self.sigma, self.aggregation, self.layer, self.fractions, self.domain_mode,
                        self.radius_mm, self.foreground, self.label_value, self.lesions_from], default=str).encode()
        ).hexdigest()[:8]
        return f"{self.method}_{self.model}_{domain_key}_seed{self.seed}_{h}"


def parse_explain_params(method: str, params: Mapping[str, Any], models: Sequence[str],
                         max_samples: int = MAX_SAMPLES_DEFAULT, default_layer: str | None = None) -> ExplainParams:
    """Validate an explain request's parameters; every refusal names the parameter and its valid range."""
    if method not in EXPLAIN_METHODS:
        raise InputError(f"method must be one of {EXPLAIN_METHODS}, got {method!r}")
    d = dict(EXPLAIN_DEFAULTS[method])
    d.update({k: v for k, v in params.items() if v is not None})
    # the bundle: "network"; the deprecated "model" reaches here as "explain_model" (moved there by the app's infer
    # route, as MONAI Label's request dict holds the task name under "model") or as "model" (direct callers)
    old = _first(d.get("explain_model")) or _first(d.get("model"))
    if isinstance(old, str) and old.startswith("explain_"):  # MONAI Label's task key, not a client's parameter
        old = None
    deprecated = []
    if old not in (None, ""):
        deprecated.append(DEPRECATED_MODEL_PARAM)
        logger.warning(f"explain request: {DEPRECATED_MODEL_PARAM} (got model={old!r})")
    model = _first(d.get("network")) or old or (models[0] if models else None)
    if model not in models:
        raise InputError(f"network must be one of {list(models)}, got {model!r}")
    ignored = []
    if method == "smoothgrad":
        samples = _as_int(d.get("samples"), "samples", 1, int(max_samples))
        sigma = _as_float(d.get("sigma"), "sigma (noise, fraction of the FLAIR intensity range)", 0.0, 1.0)
        aggregation = str(_first(d.get("aggregation"))).lower()
        if aggregation not in ("max", "mean"):
            raise InputError(f"aggregation must be 'max' (Eq. 3) or 'mean' (Eq. 2), got {aggregation!r}")
        layer = None
        if params.get("layer"):
            ignored.append("layer")
    else:
        samples, sigma, aggregation = 0, 0.0, "none"
        for k in ("samples", "sigma", "aggregation"):
            if params.get(k) not in (None, ""):
                ignored.append(k)
        layer = _first(d.get("layer")) or default_layer
        if layer is None or not isinstance(layer, str):
            raise InputError("layer must name a module of the network (e.g. the bundle's Grad-CAM++ layer)")
    seed = _as_int(d.get("seed", 0), "seed", 0, 2**32 - 1)
    if method == "gradcampp" and params.get("seed") not in (None, ""):
        ignored.append("seed")
    sequence = str(_first(d.get("sequence", "FLAIR"))).upper()
    if sequence == "T1":
        sequence = "MPRAGE"
    if sequence not in SEQUENCES:
        raise InputError(f"sequence must be FLAIR or MPRAGE (T1), got {d.get('sequence')!r}")
    strong = _as_float(d.get("strong", 0.5), "strong (bin fraction)", 0.0, 1.0, lo_open=True)
    medium = _as_float(d.get("medium", 0.2), "medium (bin fraction)", 0.0, 1.0, lo_open=True)
    if medium >= strong:
        raise InputError(f"medium ({medium}) must be below strong ({strong})")
    fg = d.get("foreground")
    foreground = fg if fg not in (None, "", []) else None
    if isinstance(foreground, str):
        try:
            foreground = json.loads(foreground)
        except ValueError:
            raise InputError(f"foreground must be a list of [i, j, k] voxel coordinates, got {fg!r}") from None
    domain_mode = str(_first(d.get("domain_mode", "ball"))).lower()
    if domain_mode not in ("ball", "grow"):
        raise InputError(f"domain_mode must be 'ball' or 'grow', got {domain_mode!r}")
    radius_mm = _as_float(d.get("radius_mm", 3.0), "radius_mm", 0.0, 50.0, lo_open=True)
    lv = d.get("label_value")
    label_value = _as_int(lv, "label_value", 1, 2**31 - 1) if lv not in (None, "") else None
    lesion = d.get("lesion")
    lesion = parse_lesion_ids(lesion) if lesion not in (None, "", []) else None
    lesions_from = str(_first(d.get("lesions_from", "model")) or "model")
    if lesions_from != "model" and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", lesions_from):
        raise InputError(f"lesions_from must be 'model' or a datastore label tag (e.g. 'final'), got {lesions_from!r}")
    return ExplainParams(method, model, lesion, samples, sigma, aggregation, layer, seed, sequence,
                         (strong, medium), foreground, domain_mode, radius_mm, label_value, ignored, lesions_from,
                         deprecated)


def _result_dtype(value):
    value = _first(value)
    if value in (None, ""):
        return None
    try:
        dt = np.dtype(str(value))
    except TypeError:
        raise InputError(f"result_dtype {value!r} is not a numpy dtype") from None
    if dt.kind not in "ui":
        raise InputError(f"result_dtype must be an integer type for a label map, got {value!r}")
    return dt.type


