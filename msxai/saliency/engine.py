"""The saliency engine: (model, image, domains, options) -> per-domain maps and summaries.

One entry point, :func:`explain`, shared by ``msxai explain`` and the MONAI Label app. ``model`` is a loaded bundle
(``msxai.bundle.Bundle``: ``network``, ``inferer``, ``threshold``, ``gradcam_layer``) or any PyTorch segmentation
network (then ``spec`` is required). Results are yielded one domain at a time.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from msxai import SEQUENCE_KEYS, THRESHOLD
from msxai.device import resolve_device
from msxai.errors import EmptyDomainError, GeometryError, InputError
from msxai.saliency.gradcampp import GradCAMPlusPlus
from msxai.saliency.sliding import SlidingWindowSpec, check_image
from msxai.saliency.smoothgrad import (
    AGGREGATIONS,
    LESION_CHANNEL,
    as_domain,
    instance_smoothgrad_many,
    lesion_probability,
    network_device,
    predict_logits,
)
from msxai.saliency.summary import lesion_summary, summary_rows

METHODS = ("smoothgrad", "gradcampp")
_SAFE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


@dataclass
class Explanation:
    """Saliency of one domain: ``maps`` name -> [X, Y, Z] float32 (``smoothgrad_flair``, ``smoothgrad_mprage`` or
    ``gradcampp``) on the network grid, the domain mask and the :func:`lesion_summary` of the maps."""

    name: str
    method: str
    maps: dict[str, np.ndarray]
    domain: np.ndarray
    summary: dict = field(default_factory=dict)


@dataclass
class ModelParts:
    network: torch.nn.Module
    spec: SlidingWindowSpec
    layer: str | None
    threshold: float


def model_parts(model, spec: SlidingWindowSpec | None = None, layer: str | None = None,
                threshold: float | None = None) -> ModelParts:
    """Network, sliding-window spec, Grad-CAM++ layer and threshold of a bundle or a bare network."""
    if isinstance(model, torch.nn.Module):
        network = model
        if spec is None:
            raise ValueError("a bare network needs a SlidingWindowSpec (spec=...)")
    else:
        network = getattr(model, "network", None)
        if not isinstance(network, torch.nn.Module):
            raise ValueError(f"{type(model).__name__} has no torch network (expected a bundle or an nn.Module)")
        if spec is None:
            spec = SlidingWindowSpec.from_inferer(model.inferer)
        layer = layer or getattr(model, "gradcam_layer", None)
        if threshold is None:
            threshold = getattr(model, "threshold", None)
    return ModelParts(network, spec, layer, THRESHOLD if threshold is None else float(threshold))


def lesion_domains(labels: np.ndarray, ids: str | int | Sequence[int] = "all") -> dict[str, np.ndarray]:
    """``{"lesion_<k>": mask}`` for the requested ids of an instance label map (``ids`` as
    :func:`msxai.lesions.parse_lesion_ids` takes them; ``"all"``: every lesion).

    Unknown ids raise ``UnknownLesionError`` naming the valid ones; a map without lesions raises
    ``EmptyDomainError``."""
    from msxai.lesions import as_label_map, lesion_domain, lesion_ids, parse_lesion_ids

    labels = as_label_map(labels)
    chosen = parse_lesion_ids(ids)
    if chosen == "all":
        chosen = lesion_ids(labels)
        if not chosen:
            raise EmptyDomainError("the lesion map holds no lesion: nothing to explain")
    return {f"lesion_{k}": lesion_domain(labels, k) for k in chosen}


def map_names(method: str, n_channels: int) -> list[str]:
    if method == "gradcampp":
        return ["gradcampp"]
    seq = SEQUENCE_KEYS if n_channels == len(SEQUENCE_KEYS) else [f"channel{c}" for c in range(n_channels)]
    return [f"smoothgrad_{s}" for s in seq]


def explain(
    model,
    image,
    domains: Mapping[str, np.ndarray],
    method: str = "smoothgrad",
    spec: SlidingWindowSpec | None = None,
    aggregation: str = "max",
    n_samples: int = 50,
    sigma_fraction: float = 0.05,
    sigma: float | None = None,
    seed: int = 0,
    layer: str | None = None,
    threshold: float | None = None,
    device=None,
    prob: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    ring_mm: Sequence[float] = (0, 2, 4, 6),
    channel: int = LESION_CHANNEL,
    **performance,
) -> Iterator[Explanation]:
    """Explain every domain of ``domains`` (name -> bool mask on the image grid) with ``method``; yields one
    :class:`Explanation` per domain as soon as it is done (SmoothGrad processes domains in groups that share
    windows, so the order may differ from ``domains``; nothing is held back, memory does not grow with the count).

    ``image``: the network input [C, X, Y, Z] (z-scored FLAIR, MPRAGE). ``prob``: the lesion softmax used in the
    summaries (computed from the clean image when None). ``performance``: ``noise_batch``, ``max_batch``,
    ``backend``, ``autocast_dtype``, ``max_group_windows``, ``checkpoint`` (SmoothGrad only).
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if aggregation not in AGGREGATIONS:
        raise InputError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    parts = model_parts(model, spec, layer, threshold)
    img = check_image(image).float()
    if device is not None:
        dev = resolve_device(device)
        parts.network.to(dev)
    else:
        dev = network_device(parts.network)
    checked = {str(n): as_domain(m, img.shape[1:], str(n)) for n, m in domains.items()}
    if not checked:
        raise EmptyDomainError("no domain to explain")
    names = map_names(method, img.shape[0])

    if method == "gradcampp":
        if not parts.layer:
            raise InputError("Grad-CAM++ needs a layer (--layer NAME; the bundle names none)")
        cam = GradCAMPlusPlus(parts.network, img, parts.spec, parts.layer, device=dev, channel=channel,
                              autocast_dtype=performance.get("autocast_dtype"))
        p = cam.probability if prob is None else prob
        for name, dom in checked.items():
            maps = {"gradcampp": cam.instance_map(dom, name)}
            yield Explanation(name, method, maps, dom, lesion_summary(maps, dom, p, affine, ring_mm))
        return

    p = prob
    if p is None:
        p = lesion_probability(predict_logits(parts.network, img, parts.spec, dev), channel)
    for name, arr in instance_smoothgrad_many(parts.network, img, checked, parts.spec, n_samples=n_samples,
                                              sigma_fraction=sigma_fraction, sigma=sigma, aggregation=aggregation,
                                              seed=seed, device=dev, channel=channel, **performance):
        maps = {k: v for k, v in zip(names, arr)}
        yield Explanation(name, method, maps, checked[name], lesion_summary(maps, checked[name], p, affine, ring_mm))


# ----------------------------------------------------------------------------------------------- writing
def write_summaries(explanations: Sequence[Explanation] | Mapping[str, dict], out_dir: str | Path,
                    settings: dict | None = None) -> tuple[Path, Path]:
    """``saliency.json`` ({"settings", "domains": {name: summary}}) and ``saliency.csv`` (one row per domain and
    map) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(explanations, Mapping):
        summaries = dict(explanations)
    else:
        summaries = {e.name: e.summary for e in explanations}
    pj, pc = out / "saliency.json", out / "saliency.csv"
    pj.write_text(json.dumps({"settings": settings or {}, "domains": summaries}, indent=2))
    rows = [r for name, s in summaries.items() for r in summary_rows(name, s)]
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(pc, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return pj, pc


# ----------------------------------------------------------------------------------------------- files
def _same_grid(shape_a, affine_a, shape_b, affine_b) -> bool:
    from msxai.io import AFFINE_ATOL

    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=AFFINE_ATOL)


def native_grid(prep, fallback: tuple | None = None) -> tuple[tuple[int, int, int], np.ndarray]:
    """``(shape, affine)`` of the FLAIR's native grid, where explanations are written: the one the bundle's chain
    recorded (``prep.native_shape`` / ``prep.native_affine``), else ``fallback`` (the loaded FLAIR's), else the
    network grid."""
    native = getattr(prep, "native_affine", None)
    if native is not None:
        return tuple(int(n) for n in prep.native_shape), np.asarray(native, dtype=np.float64)
    if fallback is not None:
        return tuple(int(n) for n in fallback[0]), np.asarray(fallback[1], dtype=np.float64)
    return tuple(prep.shape), np.asarray(prep.affine, dtype=np.float64)


def domains_to_network(prep, domains: Mapping[str, np.ndarray], grid: tuple | None = None) -> dict[str, np.ndarray]:
    """Bool masks on the native grid (``grid`` as :func:`native_grid` gives it) carried to the network grid of
    ``prep`` (nearest; the same masks when the grids are one)."""
    shape, affine = grid if grid is not None else native_grid(prep)
    if _same_grid(prep.shape, prep.affine, shape, affine):
        return {str(n): np.asarray(m, bool) for n, m in domains.items()}
    if hasattr(prep, "to_network") and getattr(prep, "native_affine", None) is not None:
        return {str(n): prep.to_network(m, str(n)) for n, m in domains.items()}
    from msxai.transforms import carry_to_network

    return {str(n): carry_to_network(m, affine, prep.affine, prep.shape, str(n)) for n, m in domains.items()}


def _to_native(prep, arr: np.ndarray, grid: tuple) -> np.ndarray:
    shape, affine = grid
    if _same_grid(prep.shape, prep.affine, shape, affine):
        return np.asarray(arr, dtype=np.float32)
    if hasattr(prep, "to_native") and getattr(prep, "native_affine", None) is not None:
        return prep.to_native(arr)
    from msxai.io import Volume
    from msxai.preprocess import resample_onto

    return resample_onto(Volume(arr, prep.affine), affine, shape, order=1).array


def _explanations(model, image, domains: Mapping[str, np.ndarray], checkpoint=None, **kwargs) -> Iterator[Explanation]:
    """:func:`explain` of ``domains``; with ``checkpoint(info)`` (called after every chunk) SmoothGrad explains one
    domain per engine call, so a chunk is one domain x one noise batch (each domain's map is the same as in a shared
    call: same noise copies), Grad-CAM++ calls it after each domain (its first chunk includes the full-image pass)."""
    if checkpoint is None:
        yield from explain(model, image, domains, **kwargs)
    elif kwargs.get("method", "smoothgrad") == "smoothgrad":
        for n, d in domains.items():
            yield from explain(model, image, {n: d}, checkpoint=checkpoint, **kwargs)
    else:
        for e in explain(model, image, domains, **kwargs):
            yield e
            checkpoint({"domains": [e.name]})


def lesion_id(name: str) -> int | None:
    """K of a domain named ``lesion_<K>`` (a lesion of the label map explained), else None (a drawn domain)."""
    head, _, k = str(name).partition("_")
    return int(k) if head == "lesion" and k.isdigit() else None


def write_explanation(
    model,
    prep,
    domains: Mapping[str, np.ndarray],
    out_dir,
    method: str = "smoothgrad",
    aggregation: str = "max",
    n_samples: int = 50,
    sigma_fraction: float = 0.05,
    sigma: float | None = None,
    layer: str | None = None,
    seed: int = 0,
    prob: np.ndarray | None = None,
    error_flag: str | Path | None = None,
    not_predicted: Mapping[str, str] | None = None,
    grid: tuple | None = None,
    keep_maps: Sequence[str] = (),
    checkpoint=None,
    progress: bool = False,
    unit: str = "lesion",
    **performance,
) -> dict:
    """The one explain-and-write path (``msxai explain``, the MONAI Label app's explain tasks, cohort runs).

    Explains ``domains`` (name -> bool mask on the network grid of the prepared study ``prep``) and writes, per
    domain, float32 NIfTI maps on the FLAIR's native grid (:func:`native_grid`; ``grid`` = (shape, affine) when
    ``prep`` records none): ``<name>_smoothgrad_flair.nii.gz`` and ``<name>_smoothgrad_mprage.nii.gz`` (SmoothGrad)
    or ``<name>_gradcampp.nii.gz`` (Grad-CAM++), then ``saliency.json`` / ``saliency.csv`` (:func:`write_summaries`).
    Writing is deterministic (gzip without time stamp): the same request gives the same bytes.

    ``prob``: the lesion softmax on the network grid for the summaries (computed from the clean image when None).
    ``error_flag``: None = no error score; ``"auto"`` = the bundle's fitted flag; a path = that flag: every domain's
    summary gets ``error_score`` / ``error_flag`` / ``error_flag_reason``
    (:class:`msxai.experiments.error_flag.ExplanationFlag`, scored from the maps on the network grid) and the
    settings its provenance; ``not_predicted``: name -> why a ``lesion_<K>`` domain is not the bundle's own lesion
    (other names are drawn domains: never scored). ``keep_maps``: map names (``smoothgrad_flair``, ...) returned
    in memory on the native grid under ``"maps"``. ``checkpoint``: see :func:`_explanations`.

    Returns ``{"files": {name: [paths]}, "summaries", "settings", "json", "csv", "maps"}``, domains in the order
    lesions by id, then the others by name."""
    import time

    from tqdm import tqdm

    from msxai.io import save_volume

    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if not domains:
        raise EmptyDomainError("no domain to explain")
    t0 = time.perf_counter()
    grid = native_grid(prep, grid)
    on_input_grid = _same_grid(prep.shape, prep.affine, *grid)
    parts = model_parts(model, layer=layer)
    flag = None
    if error_flag is not None:
        from msxai.experiments.error_flag import ExplanationFlag

        # the settings as given: incompatibility() refuses other methods and absolute sigmas before reading the rest
        flag = ExplanationFlag.for_maps(getattr(model, "path", None), method, aggregation, n_samples, sigma_fraction,
                                        sigma, parts.threshold, None if error_flag == "auto" else error_flag)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[str]] = {}
    summaries: dict[str, dict] = {}
    kept: dict[str, dict[str, np.ndarray]] = {}
    bar = tqdm(total=len(domains), desc=f"{method} ({aggregation})" if method == "smoothgrad" else method,
               unit=unit, disable=not progress)
    kwargs: dict = {"method": method, "seed": seed, "layer": layer, "affine": prep.affine, "prob": prob}
    if method == "smoothgrad":  # the SmoothGrad options (Grad-CAM++ has none; the app sends aggregation 'none')
        kwargs.update(aggregation=aggregation, n_samples=n_samples, sigma_fraction=sigma_fraction, sigma=sigma)
    try:
        for e in _explanations(model, prep.image, domains, checkpoint, **kwargs, **performance):
            summary = {"lesion_id": lesion_id(e.name), **e.summary}
            if flag is not None:
                drawn = None if summary["lesion_id"] is not None else \
                    "a drawn domain, not a lesion predicted by the bundle: no error score"
                stacked = np.stack(list(e.maps.values())) if method == "smoothgrad" else None  # FLAIR, MPRAGE
                summary.update(flag.score(stacked, e.domain, prep.affine, summary.get("mean_probability"),
                                          drawn or (not_predicted or {}).get(e.name)))
            written = []
            for map_name, arr in e.maps.items():
                native = _to_native(prep, arr, grid).astype(np.float32)
                path = out / f"{e.name}_{map_name}.nii.gz"
                save_volume(path, native, grid[1], dtype=np.float32)
                written.append(str(path))
                if map_name in keep_maps:
                    kept.setdefault(e.name, {})[map_name] = native
            files[e.name] = written
            summaries[e.name] = summary
            bar.update(1)
    finally:
        bar.close()
    order = sorted(summaries, key=lambda n: (summaries[n]["lesion_id"] is None, summaries[n]["lesion_id"] or 0, n))
    settings = {
        "bundle": getattr(model, "name", type(model).__name__),
        "method": method,
        "aggregation": aggregation if method == "smoothgrad" else None,
        "n_samples": int(n_samples) if method == "smoothgrad" else None,
        "sigma_fraction": None if sigma is not None or method != "smoothgrad" else float(sigma_fraction),
        "sigma_abs": None if sigma is None or method != "smoothgrad" else float(sigma),
        "seed": int(seed),
        "layer": parts.layer if method == "gradcampp" else None,
        "threshold": parts.threshold,
        "sliding_window": {"roi_size": list(parts.spec.roi_size), "overlap": list(parts.spec.overlap),
                           "mode": parts.spec.mode, "sigma_scale": list(parts.spec.sigma_scale),
                           "padding_mode": parts.spec.padding_mode, "cval": parts.spec.cval},
        "device": str(network_device(parts.network)),
        "network_grid_is_input_grid": bool(on_input_grid),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if flag is not None:
        settings["error_flag"] = flag.describe()
    pj, pc = write_summaries({n: summaries[n] for n in order}, out, settings)
    return {"files": {n: files[n] for n in order}, "summaries": {n: summaries[n] for n in order},
            "settings": settings, "json": str(pj), "csv": str(pc), "maps": {n: kept[n] for n in order if n in kept}}


def _load_mask_on_grid(path, what: str, ref, as_labels: bool):
    from msxai.io import check_same_grid, load_volume

    vol = load_volume(path, what, dtype=np.float64 if as_labels else np.float32)
    check_same_grid(vol, ref, what, "FLAIR")
    return vol.array


def explain_to_files(
    model,
    flair_path,
    t1_path,
    out_dir,
    lesions_path=None,
    lesion_ids: str | int | Sequence[int] = "all",
    domain_path=None,
    domains: Mapping[str, np.ndarray] | None = None,
    progress: bool = True,
    **options,
) -> dict:
    """``msxai explain`` and cohort runs from files: prepare FLAIR/T1 with the bundle, explain the chosen lesions of
    ``lesions_path`` (or the region of ``domain_path``, written as ``domain_...``) with :func:`write_explanation`
    (``options``: its keywords: method, aggregation, n_samples, sigma_fraction, sigma, layer, seed, prob,
    error_flag, performance knobs). Returns its result.

    ``domains``: named bool masks on the FLAIR grid explained in the same call (``{"fn_3": mask, ...}``; the cohort
    run's FN lesions and TN balls), added to the lesions of ``lesions_path``; a name becomes its files' prefix."""
    from msxai.io import load_volume

    method = options.get("method", "smoothgrad")
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if domain_path is None and lesions_path is None and not domains:
        raise InputError("nothing to explain: give --lesions LESIONS.nii.gz (with --lesion-id K|all) or --domain MASK")
    if domain_path is not None and domains:
        raise InputError("give a --domain MASK or named domains, not both")
    flair = load_volume(flair_path, "FLAIR")
    prep = model.prepare(flair_path, t1_path)
    if domain_path is not None:
        mask = _load_mask_on_grid(domain_path, "domain", flair, as_labels=False) > 0
        if not mask.any():
            raise EmptyDomainError(f"domain {domain_path}: the mask is empty (no voxel > 0)")
        named = {"domain": mask}
    else:
        extra = {}
        for name, m in (domains or {}).items():
            if not _SAFE_NAME.match(str(name)) or str(name).startswith("lesion_"):
                raise InputError(f"domain name {name!r}: use letters, digits and '_' (not 'lesion_<K>', reserved for "
                                 "the lesions of the label map)")
            extra[str(name)] = as_domain(m, flair.array.shape, str(name))
        named = lesion_domains(_load_mask_on_grid(lesions_path, "lesions", flair, as_labels=True),
                               lesion_ids) if lesions_path is not None else {}
        named.update(extra)
    native = getattr(prep, "native_affine", None)
    if native is not None and not _same_grid(prep.native_shape, native, flair.array.shape, flair.affine):
        raise GeometryError("the bundle's pre-processing did not keep the FLAIR's native grid")
    grid = native_grid(prep, (flair.array.shape, flair.affine))
    return write_explanation(model, prep, domains_to_network(prep, named, grid), out_dir, grid=grid,
                             progress=progress, unit="lesion" if domain_path is None else "domain", **options)
