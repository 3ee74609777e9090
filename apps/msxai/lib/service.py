"""The app's study service: bundles by model name (loaded once per device), the segmentation cache
(:mod:`lib.seg_cache`), and the segmentation/explain requests (parameters in, label map file + JSON out), run on one
model worker thread. The rules of the data it serves (naming rule, T1 pairing, artefact layout) are
:mod:`msxai.studies`; the saliency and its files are :func:`msxai.saliency.engine.write_explanation`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from msxai.device import resolve_device
from msxai.errors import InputError
from msxai.io import publish_dir, to_jsonable
from msxai.studies import (
    ARTIFACTS_DIRNAME,
    StudyPair,
    UnknownImageError,
    artifact_dir,
    study_pair,
    validate_image_id,
)

from lib.params import MAX_SAMPLES_DEFAULT, _first, _result_dtype, parse_explain_params
from lib.seg_cache import SegmentationCache, file_fingerprint, weights_fingerprint

URL_PREFIX = "/msxai"  # the app's own routes (lib.routes)
ARTIFACTS_URL = f"{URL_PREFIX}/artifacts"  # GET {ARTIFACTS_URL}/{image_id}/{path}: a file of artifact_dir


class BundleLoadError(RuntimeError):
    """A bundle that cannot be served (missing weights, broken config): raised at app start-up."""


def _root_message(exc: BaseException) -> str:
    """The message of the innermost InputError in an exception chain (MONAI's ConfigParser wraps the bundle's own
    'model weights not found: ...' in a generic 'Failed to evaluate ConfigExpression'), else ``str(exc)``."""
    seen, e, best = set(), exc, None
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, InputError):
            best = e
        e = e.__cause__ or e.__context__
    return str(best) if best is not None else f"{type(exc).__name__}: {exc}"


def _read_label_on_grid(path: str | Path, shape, affine, what: str = "uploaded label") -> np.ndarray:
    from msxai.errors import GeometryError
    from msxai.io import AFFINE_ATOL
    from msxai.labelmaps import read_labelmap

    arr, aff = read_labelmap(path)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if tuple(arr.shape) != tuple(shape):
        raise GeometryError(
            f"{what} has shape {tuple(arr.shape)} but the image has {tuple(shape)}; draw it on the study's FLAIR"
        )
    if not np.allclose(aff, affine, atol=max(AFFINE_ATOL, 1e-2)):
        raise GeometryError(f"{what} is not on the image's grid (its orientation/origin/spacing differ)")
    return arr


def _read_domain_label(path: str | Path, shape, affine, value: int | None) -> np.ndarray:
    from msxai.labelmaps import domain_from_label

    return domain_from_label(_read_label_on_grid(path, shape, affine), shape, value)


class StudyService:
    """What the MONAI Label app serves (its tasks and routes call it; it imports nothing of MONAI Label): bundles by model name (loaded once per device),
    the segmentation cache, and the segmentation/explain requests (parameters in, label map file + JSON out).

    Model runs (segmentation, explanation) go through one dedicated worker thread (:meth:`run`): one at a time per
    server process, in arrival order, always on the same thread. Waiting requests hold only their parameters, and
    all model memory is allocated by that one thread, so the allocator keeps a single arena's worth of freed memory
    (with a run on whichever request thread, glibc's per-thread arenas would each keep one run's peak)."""

    def __init__(self, studies: str | Path, bundle_paths: Mapping[str, str | Path], max_samples: int = MAX_SAMPLES_DEFAULT,
                 loader=None, runner=None):
        if not bundle_paths:
            raise BundleLoadError("no model selected: pass --conf models all (or a subset such as unet,dynunet)")
        self.studies = Path(studies)
        self.bundle_paths = {k: Path(v) for k, v in bundle_paths.items()}
        self.max_samples = int(max_samples)
        self.cache = SegmentationCache(self.studies)
        self._loader = loader
        self._bundles: dict[tuple[str, str], Any] = {}
        self._bundle_lock = threading.Lock()
        self.runner = runner  # an object with .run(fn, *args, **kwargs) on the model thread (the app's scheduler)
        if runner is None:
            from concurrent.futures import ThreadPoolExecutor

            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="msxai-model")
        for model in self.bundle_paths:  # fail at start-up, not at the first request
            self.bundle(model, "cpu")

    def relocate(self, root: str | Path) -> None:
        """Keep artefacts and the segmentation cache under ``root`` (a DICOMweb datastore's local cache folder)."""
        self.studies = Path(root)
        self.cache = SegmentationCache(self.studies)

    def run(self, fn, *args, **kwargs):
        """Run ``fn`` on the model worker thread and wait for it (exceptions are re-raised here)."""
        if self.runner is not None:
            return self.runner.run(fn, *args, **kwargs)
        if threading.current_thread().name.startswith("msxai-model"):
            return fn(*args, **kwargs)
        return self._worker.submit(fn, *args, **kwargs).result()

    @property
    def models(self) -> list[str]:
        return list(self.bundle_paths)

    def bundle(self, model: str, device: str = "cpu"):
        if model not in self.bundle_paths:
            raise InputError(f"model must be one of {self.models}, got {model!r}")
        key = (model, device)
        with self._bundle_lock:
            if key not in self._bundles:
                path = self.bundle_paths[model]
                loader = self._loader
                if loader is None:
                    from msxai.bundle import load_bundle as loader
                if not path.is_dir():
                    raise BundleLoadError(f"bundle '{model}': folder {path} not found")
                try:
                    self._bundles[key] = loader(path, device=device)
                except Exception as exc:
                    raise BundleLoadError(
                        f"bundle '{model}' ({path}) cannot be loaded on {device}: {_root_message(exc)}"
                    ) from exc
            return self._bundles[key]

    # ----------------------------------------------------------------------------------------------- helpers
    def study(self, request: Mapping[str, Any]) -> StudyPair:
        image = request.get("image")
        image_id = request.get("image_id")
        if not isinstance(image, str) or not image:
            raise UnknownImageError(f"image {image_id!r} not found in the datastore")
        t1 = request.get("msxai_t1")  # set by the app for DICOMweb studies (T1 series of the same study)
        if t1:
            if not image_id or not Path(image).is_file() or not Path(t1).is_file():
                raise UnknownImageError(f"image {image_id!r}: FLAIR or T1 file not found")
            return StudyPair(validate_image_id(image_id), Path(image), Path(t1))
        return study_pair(image, validate_image_id(image_id) if image_id else None)

    def _fingerprint(self, pair: StudyPair, bundle) -> str:
        return file_fingerprint([pair.flair, pair.t1]) + "-" + weights_fingerprint(getattr(bundle, "path", ""))

    def segmentation(self, model: str, pair: StudyPair, device: str, prepared=None) -> dict:
        """The (cached) segmentation of a study by a model: labels, prob, affine, table, from_cache."""
        bundle = self.bundle(model, device)

        def compute():
            prep = prepared if prepared is not None else bundle.prepare(pair.flair, pair.t1)
            res = bundle.segment(prep)
            return {"labels": res.labels, "prob": res.prob, "affine": res.affine, "table": res.table,
                    "prob_network": res.prob_network, "network_affine": res.network_affine}

        return self.cache.get(pair.image_id, model, self._fingerprint(pair, bundle), compute)

    # ------------------------------------------------------------------------------------------ segmentation
    def segment_request(self, model: str, request: Mapping[str, Any], out_path: str | Path) -> dict:
        from msxai.labelmaps import instance_label_names, write_labelmap

        pair = self.study(request)
        device = str(resolve_device(_first(request.get("device"))))
        entry = self.run(self.segmentation, model, pair, device)
        labels, table = entry["labels"], entry["table"]
        mode = str(_first(request.get("label_mode", "auto")) or "auto").lower()
        if mode not in ("auto", "instances", "binary"):
            raise InputError(f"label_mode must be auto, instances or binary, got {mode!r}")
        note = None
        if mode == "auto":
            # the OHIF v3 plugin always sends restore_label_idx=false and maps values through the static labels
            # of /info ({"lesion": 1}); every other client gets the instance ids
            rli = request.get("restore_label_idx")
            mode = "binary" if rli is False or (isinstance(rli, str) and rli.lower() == "false") else "instances"
        dtype = _result_dtype(request.get("result_dtype"))
        n = int(labels.max()) if labels.size else 0
        if mode == "instances" and dtype is not None and n > np.iinfo(dtype).max:
            mode, note = "binary", f"{n} lesions do not fit in {np.dtype(dtype).name}: binary mask sent"
        if mode == "instances":
            out, names = labels, instance_label_names(labels, table)
        else:
            out, names = (labels > 0).astype(np.uint8), {"lesion": 1}
        write_labelmap(out_path, out, entry["affine"], dtype=dtype)
        bundle = self.bundle(model, device)
        result = {
            "model": model,
            "bundle": getattr(bundle, "name", model),
            "image": pair.image_id,
            "t1": pair.t1.name,
            "device": device,
            "label_mode": mode,
            "label_names": names,
            "n_lesions": len(table),
            "lesions": table,
            "threshold": getattr(bundle, "threshold", None),
            "min_volume_mm3": getattr(bundle, "min_volume_mm3", None),
            "cache": entry["from_cache"],
            "artifacts": f"{ARTIFACTS_DIRNAME}/{pair.image_id}/seg_{model}",
        }
        if note:
            result["note"] = note
        return result

    # -------------------------------------------------------------------------------------------- explanation
    def explain_request(self, method: str, request: Mapping[str, Any], out_path: str | Path, admit=None,
                        checkpoint=None) -> dict:
        """``admit(bundle=, prepared=, domains=, params=, device=)`` is called on the model thread once the domains are
        known, before any saliency is computed (it may refuse by raising); ``checkpoint(info)`` after every chunk of
        the computation (see :func:`msxai.saliency.engine.write_explanation`, which writes the maps)."""
        from msxai.labelmaps import domain_from_points
        from msxai.lesions import lesion_domain
        from msxai.saliency.engine import domains_to_network, native_grid, write_explanation

        pair = self.study(request)
        device = str(resolve_device(_first(request.get("device"))))
        p = parse_explain_params(method, request, self.models, self.max_samples, default_layer="")
        bundle = self.bundle(p.model, device)
        if method == "gradcampp" and not p.layer:
            p.layer = getattr(bundle, "gradcam_layer", None)
            if not p.layer:
                raise InputError(f"layer: bundle {p.model} names no Grad-CAM++ layer; pass one")
        label_file = request.get("label")

        # the exact float maps beside the study (written by the one explain-and-write path, with the CLI's layout)
        tmp_dir = None
        owner = threading.get_ident()  # the request's thread (compute runs on the model thread): one folder per request
        display_map = f"smoothgrad_{p.sequence.lower()}" if method == "smoothgrad" else "gradcampp"

        def compute():
            nonlocal tmp_dir
            prepared = bundle.prepare(pair.flair, pair.t1)
            # domains are given, and maps returned, on the FLAIR's native grid (what the client shows); the saliency
            # is computed on the network grid, where the domains are carried with nearest neighbours
            shape, affine = grid = native_grid(prepared)
            seg = None
            domains: dict[str, np.ndarray] = {}
            not_predicted: dict[str, str] = {}  # lesions that are not this bundle's own (no error score)
            if label_file:
                domains["client_label"] = _read_domain_label(label_file, shape, affine, p.label_value)
                source = "uploaded label"
            elif p.foreground is not None:
                if p.domain_mode == "grow" and not getattr(prepared, "on_native_grid", True):
                    from msxai.io import load_sequence

                    native_flair = load_sequence(pair.flair, "FLAIR").array
                else:
                    native_flair = (prepared.raw if getattr(prepared, "raw", None) is not None else prepared.image)[0]
                domains["client_points"] = domain_from_points(
                    p.foreground, shape, affine, p.radius_mm, p.domain_mode, flair=native_flair,
                )
                source = f"foreground points ({p.domain_mode}, {p.radius_mm} mm)"
            else:
                if p.lesion is None:
                    raise InputError("nothing to explain: give lesion (id, list or 'all'), upload a label, or send "
                                     "foreground points")
                seg = self.segmentation(p.model, pair, device, prepared=prepared)
                saved = request.get("lesions_label")
                if saved:  # lesions of a label saved in the datastore (e.g. the clinician's corrected 'final')
                    from msxai.lesions import instances_from_mask, lesion_ids

                    arr = _read_label_on_grid(saved, shape, affine, "saved label")
                    labels = instances_from_mask(arr, affine=affine)
                    ids_all = lesion_ids(labels)
                    origin = f"the saved '{p.lesions_from}' label"
                else:
                    labels = seg["labels"]
                    ids_all = [int(r["id"]) for r in seg["table"]]
                    origin = f"segmentation_{p.model}"
                ids = ids_all if p.lesion == "all" else p.lesion
                if not ids:
                    from msxai.errors import EmptyDomainError

                    raise EmptyDomainError(
                        f"{origin} has no lesion in {pair.image_id}: nothing for lesion='all'; to ask why a "
                        "spot was missed, upload a label or send foreground points"
                    )
                for i in ids:
                    domains[f"lesion_{i}"] = lesion_domain(labels, i)
                    if saved:
                        not_predicted[f"lesion_{i}"] = f"a lesion of {origin}, not the model's own: no error score"
                source = f"lesion{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))} of {origin}"
            if seg is None:
                seg = self.segmentation(p.model, pair, device, prepared=prepared)
            net_domains = domains_to_network(prepared, domains, grid)
            if admit is not None:
                admit(bundle=bundle, prepared=prepared, domains=net_domains, params=p, device=device)
            key = p.run_key(_domain_key(domains))
            run_dir = artifact_dir(self.studies, pair.image_id) / "explain" / key
            tmp_dir = run_dir.with_name(f".{key}.{os.getpid()}.{owner}.tmp")
            written = write_explanation(
                bundle, prepared, net_domains, tmp_dir, method=p.method, aggregation=p.aggregation,
                n_samples=p.samples, sigma_fraction=p.sigma, layer=p.layer, seed=p.seed,
                prob=seg.get("prob_network", seg["prob"]), error_flag="auto", not_predicted=not_predicted,
                keep_maps=(display_map,), checkpoint=checkpoint)
            return shape, affine, domains, source, written, key, run_dir, display_map, tmp_dir

        try:
            return self._publish_explanation(method, p, request, pair, device, out_path, *self.run(compute))
        except BaseException:
            if tmp_dir is not None:  # a refused, cancelled or failed run leaves nothing behind
                shutil.rmtree(tmp_dir, ignore_errors=True)
            raise

    def _publish_explanation(self, method, p, request, pair, device, out_path, shape, affine, domains, source,
                             written, key, run_dir, display_map, tmp_dir) -> dict:
        """The display label map of an explanation, the app's additions beside its maps (domain masks, label map,
        result JSON with the files' URLs), then the run folder published at once."""
        from msxai.io import save_volume
        from msxai.labelmaps import combine_signed_max, saliency_bins, write_labelmap

        summaries = written["summaries"]

        # one display map: the chosen sequence (SmoothGrad) or the CAM, largest magnitude over the domains
        display = combine_signed_max([m[display_map] for m in written["maps"].values()])
        union = np.zeros(shape, dtype=bool)
        for dm in domains.values():
            union |= dm
        domain_name = _domain_display_name(domains)
        prefix = p.sequence if method == "smoothgrad" else "CAM"
        lab, names, edges = saliency_bins(display, union, p.fractions, prefix=prefix, domain_name=domain_name)
        write_labelmap(out_path, lab, affine, dtype=_result_dtype(request.get("result_dtype")))

        # the app's additions beside the maps: the domain masks, the label map, the result JSON
        files = [Path(f).name for n in written["files"] for f in written["files"][n]]
        files += [Path(written["json"]).name, Path(written["csv"]).name]
        for name in written["files"]:
            save_volume(tmp_dir / f"{name}_domain.nii.gz", domains[name].astype(np.uint8), affine, dtype=np.uint8)
            files.append(f"{name}_domain.nii.gz")
        write_labelmap(tmp_dir / "labelmap.nii.gz", lab, affine)
        files.append("labelmap.nii.gz")
        result = {
            "method": method,
            "model": p.model,
            "image": pair.image_id,
            "device": device,
            "domain_source": source,
            "domains": {k: int(v.sum()) for k, v in domains.items()},
            "label_names": names,
            "labelmap_sequence": p.sequence if method == "smoothgrad" else "Grad-CAM++",
            "bins": edges,
            "summary": summaries,
            "error_flag": written["settings"]["error_flag"],
            "params": {
                "samples": p.samples, "sigma": p.sigma, "aggregation": p.aggregation, "layer": p.layer,
                "seed": p.seed, "strong": p.fractions[0], "medium": p.fractions[1],
            },
            "artifacts_dir": f"{ARTIFACTS_DIRNAME}/{pair.image_id}/explain/{key}",
            "files": [f"explain/{key}/{f}" for f in files],
            "urls": [f"{ARTIFACTS_URL}/{pair.image_id}/explain/{key}/{f}" for f in files],
        }
        if p.ignored:
            result["ignored_params"] = p.ignored
        if p.deprecated:
            result["deprecated"] = p.deprecated
        (tmp_dir / "summary.json").write_text(json.dumps(to_jsonable(result), indent=1))
        result["files"].append(f"explain/{key}/summary.json")
        result["urls"].append(f"{ARTIFACTS_URL}/{pair.image_id}/explain/{key}/summary.json")
        publish_dir(tmp_dir, run_dir)
        return result


def _domain_key(domains: Mapping[str, np.ndarray]) -> str:
    names = list(domains)
    if len(names) == 1:
        return names[0].replace("_", "")
    if all(n.startswith("lesion_") for n in names):
        ids = [n.split("_", 1)[1] for n in names]
        s = "lesions" + "-".join(ids)
        return s if len(s) <= 40 else f"lesions{len(ids)}-" + hashlib.sha1(s.encode()).hexdigest()[:8]
    return "domains" + hashlib.sha1("|".join(names).encode()).hexdigest()[:8]


def _domain_display_name(domains: Mapping[str, np.ndarray]) -> str:
    names = list(domains)
    if len(names) == 1:
        return names[0].replace("_", " ")
    if all(n.startswith("lesion_") for n in names):
        return f"{len(names)} lesions"
    return "domains"


