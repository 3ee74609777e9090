"""One case of a cohort run: segment, (optionally) explain, write atomically, mark done.

Folder of a finished case, ``<out>/cases/<id>/`` (written as ``<out>/cases/.<id>~tmp~<host>~<pid>/`` and renamed
when complete; a previous result is replaced only then):

- ``probability.nii.gz``, ``mask.nii.gz``, ``lesions.nii.gz``, ``lesions.json``, ``lesions.csv``: ``msxai segment``'s
  outputs (:func:`msxai.inference.write_result`);
- with the truth: ``truth_lesions.nii.gz`` (the true lesion instances compared with) and ``metrics.json``;
- with explanations: ``saliency/`` as ``msxai explain`` writes it (:func:`msxai.saliency.engine.write_explanation`:
  ``lesion_<K>_smoothgrad_flair.nii.gz``, ``..._mprage.nii.gz``, ``saliency.json``, ``saliency.csv``; FN lesions as
  ``fn_<J>_...`` (``J`` = id in ``truth_lesions.nii.gz``), TN balls as ``tn_<I>_...`` (``I`` = value in
  ``tn_spheres.nii.gz``)), and ``domains.json`` (one row per explained domain, see :func:`domain_rows`);
- ``done.json``, the done-marker (written last; schema in docs/cohort.md and :func:`CaseRunner.marker`).

A case that fails leaves no case folder change and writes ``<out>/failures/<id>.json`` (error, kind ``input`` /
``oom`` / ``nan`` / ``error``, traceback tail); the next run tries it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import socket
import time
import traceback
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from msxai.errors import InputError
from msxai.io import file_sha256, json_default, publish_dir

SCHEMA = "msxai.batch.case/1"
EXPLAIN_MODES = ("none", "lesions", "domains")
CLASSES = ("TP", "FP", "FN", "TN")
PERFORMANCE_FIELDS = ("max_batch", "noise_batch")  # change speed and memory, not what is computed


class NonFiniteOutputError(RuntimeError):
    """The network produced NaN or infinite values."""


@dataclass
class BatchSettings:
    """What a cohort run computes. Every field but the performance knobs (``max_batch``, ``noise_batch``) is part of
    the run's identity: a case done with other values is redone."""

    explain: str = "none"  # none | lesions (every predicted lesion) | domains (TP/FP/FN/TN, needs the truth)
    method: str = "smoothgrad"
    aggregation: str = "max"  # Eq. 3 (paper) | mean = Eq. 2
    samples: int = 50
    sigma_fraction: float = 0.05
    seed: int = 0
    layer: str | None = None  # Grad-CAM++ layer (default: the bundle's)
    classes: tuple = CLASSES  # domain classes explained with explain="domains"
    n_tn: int = 10  # TN balls per case (paper: 10)
    tn_mm3: float = 93.0
    error_flag: str = "auto"  # auto | none | FILE (scores of predicted lesions, as msxai explain gives them)
    max_batch: int | None = None
    noise_batch: int | None = None

    def validate(self) -> "BatchSettings":
        from msxai.saliency.engine import METHODS
        from msxai.saliency.smoothgrad import AGGREGATIONS

        if self.explain not in EXPLAIN_MODES:
            raise InputError(f"explain must be one of {EXPLAIN_MODES}, got {self.explain!r}")
        if self.method not in METHODS:
            raise InputError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.aggregation not in AGGREGATIONS:
            raise InputError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if int(self.samples) < 1:
            raise InputError(f"samples must be >= 1, got {self.samples}")
        if not float(self.sigma_fraction) > 0:
            raise InputError(f"sigma must be > 0, got {self.sigma_fraction}")
        self.classes = tuple(str(c).upper() for c in self.classes)
        bad = [c for c in self.classes if c not in CLASSES]
        if bad or not self.classes:
            raise InputError(f"classes: a subset of {','.join(CLASSES)}, got {self.classes}")
        if int(self.n_tn) < 0:
            raise InputError(f"n_tn must be >= 0, got {self.n_tn}")
        return self

    def identity(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in PERFORMANCE_FIELDS}
        d["classes"] = list(self.classes)
        if self.explain == "none":  # explanation settings do not matter for a segmentation-only run
            d = {"explain": "none"}
        return d


def versions() -> dict:
    import monai
    import torch

    import msxai

    return {"msxai": msxai.__version__, "torch": torch.__version__, "monai": monai.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}


def sha_of(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _chain_identity(chain) -> list[str]:
    """The pre-processing steps by class and their geometric targets (orientation, spacing), for the run identity."""
    out = []
    for t in getattr(chain, "transforms", ()) or ():
        name = type(t).__name__
        if name == "Orientationd":
            name += f"({''.join(getattr(t.ornt_transform, 'axcodes', '') or '')})"
        elif name == "Spacingd":
            name += f"({[float(x) for x in t.spacing_transform.pixdim]})"
        out.append(name)
    return out


def run_identity(bundle, settings: BatchSettings, checkpoint=None) -> dict:
    """Everything a case's results depend on: the bundle's weights (sha256), its inference settings (threshold,
    minimum volume, sliding window, pre-processing) and the run's :class:`BatchSettings` (not the bundle's name or
    folder: the same weights and settings give the same results wherever they are loaded from)."""
    from msxai.experiments.error_flag import BUNDLE_MODEL_FILE
    from msxai.saliency.sliding import SlidingWindowSpec

    ckpt = Path(checkpoint) if checkpoint else Path(bundle.path) / "models" / "model.pt"
    spec = SlidingWindowSpec.from_inferer(bundle.inferer)
    ident = {
        "schema": SCHEMA,
        "weights_sha256": file_sha256(ckpt) if ckpt.is_file() else None,
        "inference": {"threshold": float(bundle.threshold), "min_volume_mm3": float(bundle.min_volume_mm3),
                      "register": str(getattr(bundle, "register", "auto")), "n4": bool(getattr(bundle, "n4", False)),
                      "normalization": str(getattr(bundle, "normalization", "zscore_brain")),
                      "tta_flips": [list(a) for a in getattr(bundle, "tta_flips", ())],
                      "preprocessing": _chain_identity(getattr(bundle, "preprocessing", None)),
                      "sliding_window": {k: (list(v) if isinstance(v, tuple) else v)
                                         for k, v in asdict(spec).items() if k != "sw_batch_size"}},
        "settings": settings.identity(),
    }
    st = ident["settings"]
    if settings.explain != "none":  # what the method does not read is not part of what it computes
        if settings.method == "gradcampp":
            st.update(layer=settings.layer or bundle.gradcam_layer, aggregation=None, samples=None,
                      sigma_fraction=None, error_flag=None)
        else:
            st["layer"] = None
    if settings.explain != "none" and settings.method == "smoothgrad" and settings.error_flag != "none":
        f = Path(settings.error_flag) if settings.error_flag != "auto" else Path(bundle.path) / BUNDLE_MODEL_FILE
        ident["error_flag_sha256"] = file_sha256(f) if f.is_file() else None
    return ident


def input_fingerprints(case) -> dict:
    """sha256 and size of each input file of a case (missing files are named)."""
    out = {}
    for key in ("flair", "t1", "truth", "brain_mask"):
        p = getattr(case, key)
        if p is None:
            continue
        if not Path(p).is_file():
            raise InputError(f"{case.id}: {key} file not found: {p}")
        out[key] = {"path": str(p), "bytes": Path(p).stat().st_size, "sha256": file_sha256(p)}
    return out


def write_json_atomic(path: Path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=json_default))
    os.replace(tmp, path)
    return path


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / "done.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def error_kind(exc: BaseException) -> str:
    import torch

    if isinstance(exc, NonFiniteOutputError):
        return "nan"
    if isinstance(exc, MemoryError) or isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())) \
            or "out of memory" in str(exc).lower():
        return "oom"
    if isinstance(exc, InputError):
        return "input"
    return "error"


def tn_seed(seed: int, case_id: str) -> int:
    """The TN-ball seed of a case: from the run's seed and the case id only (not from its rank or position)."""
    return (int(seed) + zlib.crc32(case_id.encode())) % (2**31)


def domain_rows(case_id: str, summaries: dict, kinds: dict) -> list[dict]:
    """One flat row per explained domain: ``case``, ``domain`` (file prefix), ``cls`` (TP/FP/FN/TN, or ``lesion``
    without truth), ``lesion_id`` (id in ``lesions.nii.gz``, ``truth_lesions.nii.gz`` for FN, ``tn_spheres.nii.gz``
    for TN), ``voxels``, ``volume_mm3``, ``mean_probability``, per map ``<map>_peak_max_in_domain``,
    ``_peak_min_in_domain``, ``_positive_mass_in_domain``, ``_negative_mass_in_domain``, ``_peak_max``, ``_peak_min``,
    and the error score columns when computed."""
    rows = []
    for name, s in summaries.items():
        cls, ident = kinds[name]
        row = {"case": case_id, "domain": name, "cls": cls, "lesion_id": int(ident), "voxels": s["domain_voxels"],
               "volume_mm3": s["domain_volume_mm3"], "mean_probability": s.get("mean_probability")}
        for m, v in s["maps"].items():
            for k in ("peak_max_in_domain", "peak_min_in_domain", "positive_mass_in_domain",
                      "negative_mass_in_domain", "peak_max", "peak_min"):
                row[f"{m}_{k}"] = v[k]
        for k in ("error_score", "error_flag", "error_flag_reason"):
            if k in s:
                row[k] = s[k]
        rows.append(row)
    return rows


class CaseRunner:
    """Runs cases with one loaded bundle and one :class:`BatchSettings` into ``out_dir``."""

    def __init__(self, bundle, settings: BatchSettings, out_dir, rank: int = 0, world_size: int = 1,
                 checkpoint=None):
        self.bundle = bundle
        self.settings = settings.validate()
        self.out = Path(out_dir)
        self.rank, self.world_size = int(rank), int(world_size)
        self.identity = run_identity(bundle, self.settings, checkpoint)
        self.identity_sha256 = sha_of(self.identity)
        self.versions = versions()
        self.host = socket.gethostname()

    def case_dir(self, case) -> Path:
        return self.out / "cases" / case.id

    def failure_path(self, case) -> Path:
        return self.out / "failures" / f"{case.id}.json"

    def is_done(self, case, inputs: dict) -> bool:
        m = read_marker(self.case_dir(case))
        if not m or m.get("status") != "done" or m.get("identity_sha256") != self.identity_sha256:
            return False
        have = {k: v.get("sha256") for k, v in (m.get("inputs") or {}).items()}
        return have == {k: v["sha256"] for k, v in inputs.items()}

    def run(self, case) -> dict:
        """Process one case; never raises for a case's own failure (returns ``status`` done / skipped / failed)."""
        t0 = time.perf_counter()
        started = _utc()
        tmp = self.out / "cases" / f".{case.id}~tmp~{self.host}~{os.getpid()}"
        try:
            inputs = input_fingerprints(case)
            if self.is_done(case, inputs):
                return {"case": case.id, "status": "skipped", "seconds": time.perf_counter() - t0}
            for stale in (self.out / "cases").glob(f".{case.id}~*"):  # left by a killed worker (this case is ours)
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
            marker = self._compute(case, inputs, tmp, t0, started)
            write_json_atomic(tmp / "done.json", marker)
            publish_dir(tmp, self.case_dir(case))
            self.failure_path(case).unlink(missing_ok=True)
            return {"case": case.id, "status": "done", "seconds": marker["seconds"]["total"],
                    "lesions": marker["counts"]["lesions"], "explained": marker["counts"]["explained"]}
        except Exception as exc:  # a failing case is recorded and the cohort goes on
            shutil.rmtree(tmp, ignore_errors=True)
            kind = error_kind(exc)
            if kind == "oom":
                _free_device_memory()
            rec = {"schema": SCHEMA, "case": case.id, "status": "failed", "kind": kind,
                   "error_type": type(exc).__name__, "error": str(exc),
                   "traceback": traceback.format_exc().splitlines()[-12:],
                   "identity_sha256": self.identity_sha256, "device": str(self.bundle.device), "rank": self.rank,
                   "world_size": self.world_size, "host": self.host, "pid": os.getpid(), "started_utc": started,
                   "finished_utc": _utc(), "seconds": round(time.perf_counter() - t0, 3)}
            write_json_atomic(self.failure_path(case), rec)
            return {"case": case.id, "status": "failed", "seconds": rec["seconds"], "error": f"{kind}: {exc}"}

    # ------------------------------------------------------------------------------------------------ the work
    def _compute(self, case, inputs: dict, tmp: Path, t0: float, started: str) -> dict:
        from msxai.inference import write_result
        from msxai.io import check_finite

        b, s = self.bundle, self.settings
        prep = b.prepare(case.flair, case.t1)  # refuses NaN/inf inputs (InputError)
        try:  # the inputs are finite: a NaN from here on is the network's
            result = b.segment(prep)
            check_finite(result.prob, "lesion probability")
        except InputError as exc:
            if "NaN" not in str(exc) and "infinite" not in str(exc):
                raise
            raise NonFiniteOutputError(f"the network output is not finite: {exc}") from None
        write_result(result, tmp)
        t_seg = time.perf_counter() - t0
        counts = {"lesions": len(result.table), "explained": 0}
        metrics, classes, truth = None, None, None
        if case.truth:
            metrics, classes, truth = self._truth(case, result, tmp)
            counts.update(tp=len(classes.tp), fp=len(classes.fp), fn=len(classes.fn))
        explain_info = None
        if s.explain != "none":
            explain_info = self._explain(case, prep, result, classes, truth, tmp, counts)
        seconds = time.perf_counter() - t0
        return {
            "schema": SCHEMA, "case": case.id, "status": "done", "bundle": b.name, "bundle_path": str(b.path),
            "identity": self.identity, "identity_sha256": self.identity_sha256,
            "inputs": inputs, "versions": self.versions,
            "seconds": {"total": round(seconds, 3), "segment": round(t_seg, 3),
                        "explain": round(seconds - t_seg, 3) if explain_info else 0.0},
            "device": str(b.device), "rank": self.rank, "world_size": self.world_size, "host": self.host,
            "pid": os.getpid(), "started_utc": started, "finished_utc": _utc(),
            "counts": counts, "metrics": metrics, "explain": explain_info,
            "files": sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()),
        }

    def _truth(self, case, result, tmp: Path):
        from msxai.io import AFFINE_ATOL, load_volume, save_volume
        from msxai.lesions import classify_lesions, instances_from_mask
        from msxai.metrics import evaluate_case

        vol = load_volume(case.truth, "truth")
        if vol.array.shape != result.labels.shape or not np.allclose(vol.affine, result.affine, atol=AFFINE_ATOL):
            raise InputError(f"{case.id}: the truth {Path(case.truth).name} is not on the image grid (shape "
                             f"{vol.array.shape} vs {result.labels.shape})")
        truth = instances_from_mask(vol.array, result.affine, self.bundle.min_volume_mm3).astype(np.int32)
        save_volume(tmp / "truth_lesions.nii.gz", truth, result.affine, dtype=np.int32)
        metrics = evaluate_case(result.labels, vol.array, result.affine, self.bundle.threshold,
                                self.bundle.min_volume_mm3)
        write_json_atomic(tmp / "metrics.json", metrics)
        return metrics, classify_lesions(result.labels, truth), truth

    def _explain(self, case, prep, result, classes, truth, tmp: Path, counts: dict) -> dict:
        from msxai.io import save_volume
        from msxai.lesions import lesion_ids
        from msxai.saliency.engine import explain_to_files

        s = self.settings
        kinds: dict[str, tuple[str, int]] = {}
        extra: dict[str, np.ndarray] = {}
        if s.explain == "lesions":
            ids = lesion_ids(result.labels)
            for k in ids:
                kinds[f"lesion_{k}"] = (("TP" if k in classes.tp else "FP") if classes else "lesion", k)
        else:
            if classes is None:
                raise InputError(f"{case.id}: explain 'domains' (TP/FP/FN/TN) needs the truth; this case has none")
            ids = sorted((classes.tp if "TP" in s.classes else []) + (classes.fp if "FP" in s.classes else []))
            for k in ids:
                kinds[f"lesion_{k}"] = ("TP" if k in classes.tp else "FP", k)
            if "FN" in s.classes:
                for j in classes.fn:
                    kinds[f"fn_{j}"] = ("FN", j)
                    extra[f"fn_{j}"] = truth == j
            if "TN" in s.classes and s.n_tn > 0:
                balls = self._tn_balls(case, prep, result, truth)
                tn_map = np.zeros(result.labels.shape, np.int16)
                for i, ball in enumerate(balls, start=1):
                    tn_map[ball] = i
                    kinds[f"tn_{i}"] = ("TN", i)
                    extra[f"tn_{i}"] = ball
                save_volume(tmp / "tn_spheres.nii.gz", tn_map, result.affine, dtype=np.int16)
                counts["tn"] = len(balls)
        info = {"domains": len(kinds), "error_flag": None}
        if not kinds:
            return info
        lesions_path = tmp / "lesions.nii.gz" if ids else None
        scored = s.error_flag != "none" and s.method == "smoothgrad" and lesions_path is not None
        out = explain_to_files(
            self.bundle, case.flair, case.t1, tmp / "saliency", lesions_path=lesions_path, lesion_ids=list(ids),
            domains=extra, method=s.method, aggregation=s.aggregation, n_samples=s.samples,
            sigma_fraction=s.sigma_fraction, layer=s.layer, seed=s.seed, progress=False,
            prob=result.prob if result.prob_network is None else result.prob_network,  # the grid the maps are made on
            error_flag=s.error_flag if scored else None,  # auto (the bundle's flag) or a FILE
            max_batch=s.max_batch, noise_batch=s.noise_batch)
        for name, summ in out["summaries"].items():
            for m, v in summ["maps"].items():
                if not all(np.isfinite([v["peak_max"], v["peak_min"]])):
                    raise NonFiniteOutputError(f"{case.id}: the {m} map of {name} holds NaN or infinite values")
        if scored:
            info["error_flag"] = out["settings"].get("error_flag")
        rows = domain_rows(case.id, out["summaries"], kinds)
        write_json_atomic(tmp / "domains.json", rows)
        counts["explained"] = len(rows)
        info["settings"] = {k: v for k, v in out["settings"].items() if k not in ("seconds", "error_flag")}
        return info

    def _tn_balls(self, case, prep, result, truth) -> list:
        from msxai.experiments.runner import sample_tn_as_many
        from msxai.io import load_volume

        if case.brain_mask:
            brain = load_volume(case.brain_mask, "brain mask").array > 0
        else:  # the chain's brain mask, brought back to the FLAIR's grid
            brain = prep.to_native(np.asarray(prep.brain_mask, np.float32), nearest=True) > 0.5
        return sample_tn_as_many(np.asarray(brain, bool), truth > 0, result.labels > 0, result.affine,
                                 int(self.settings.n_tn), tn_seed(self.settings.seed, case.id), case.id,
                                 float(self.settings.tn_mm3))


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
