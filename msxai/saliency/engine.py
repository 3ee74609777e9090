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


def explain_maps(model, prepared, domains: Mapping[str, np.ndarray], method: str = "smoothgrad",
                 aggregation: str = "max", n_samples: int = 50, sigma_fraction: float = 0.05,
                 layer: str | None = None, seed: int = 0, prob: np.ndarray | None = None,
                 checkpoint=None) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """:func:`explain` for every domain of a prepared study (``prepared.image`` / ``prepared.affine``, domains on
    the network grid), maps stacked per domain: returns ``({name: [2, X, Y, Z] (SmoothGrad: FLAIR, MPRAGE) or
    [X, Y, Z] (Grad-CAM++)}, {name: summary})`` in the order of ``domains``. The model's network is already on its
    device.

    ``checkpoint(info)`` is called after every chunk: with it, SmoothGrad explains one domain per engine call, so a
    chunk is one domain x one noise batch (each domain's map is the same as in a shared call: same noise copies);
    Grad-CAM++ after each domain (its first chunk includes the full-image pass)."""
    kwargs: dict = {"method": method, "seed": seed, "prob": prob, "affine": prepared.affine}
    if method == "smoothgrad":
        kwargs.update(aggregation=aggregation, n_samples=n_samples, sigma_fraction=sigma_fraction)
    else:
        kwargs.update(layer=layer)
    calls = [dict(domains)]
    if checkpoint is not None and method == "smoothgrad":
        kwargs["checkpoint"] = checkpoint
        calls = [{n: d} for n, d in domains.items()]
    maps: dict[str, np.ndarray] = {}
    summaries: dict[str, dict] = {}
    for e in (e for call in calls for e in explain(model, prepared.image, call, **kwargs)):
        if method == "smoothgrad":
            maps[e.name] = np.stack([e.maps[f"smoothgrad_{k}"] for k in SEQUENCE_KEYS]).astype(np.float32)
        else:
            maps[e.name] = np.asarray(e.maps["gradcampp"], dtype=np.float32)
            if checkpoint is not None:
                checkpoint({"domains": [e.name]})
        summaries[e.name] = e.summary
    order = [n for n in domains if n in maps]
    return {n: maps[n] for n in order}, {n: summaries[n] for n in order}


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


def _to_network(prep, mask: np.ndarray, flair, name: str) -> np.ndarray:
    if hasattr(prep, "to_network"):
        return prep.to_network(mask, name)
    from msxai.transforms import carry_to_network

    return carry_to_network(mask, flair.affine, prep.affine, prep.shape, name)


def _to_native(prep, arr: np.ndarray, flair) -> np.ndarray:
    if hasattr(prep, "to_native") and getattr(prep, "native_affine", None) is not None:
        return prep.to_native(arr)
    from msxai.io import Volume
    from msxai.preprocess import resample_onto

    return resample_onto(Volume(arr, prep.affine), flair.affine, flair.array.shape, order=1).array


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
    method: str = "smoothgrad",
    aggregation: str = "max",
    n_samples: int = 50,
    sigma_fraction: float = 0.05,
    sigma: float | None = None,
    layer: str | None = None,
    seed: int = 0,
    progress: bool = True,
    domains: Mapping[str, np.ndarray] | None = None,
    **performance,
) -> dict:
    """``msxai explain``: prepare FLAIR/T1 with the bundle, explain the chosen lesions of ``lesions_path`` (or the
    region of ``domain_path``), write per-domain float32 NIfTI maps on the FLAIR grid
    (``lesion_<K>_smoothgrad_flair.nii.gz``, ``..._smoothgrad_mprage.nii.gz`` or ``lesion_<K>_gradcampp.nii.gz``;
    ``domain_...`` for a region) and ``saliency.json`` / ``saliency.csv``. Returns ``{"files", "summaries",
    "settings"}``.

    ``domains``: named bool masks on the FLAIR grid explained in the same call (``{"fn_3": mask, ...}``; the cohort
    run's FN lesions and TN balls), added to the lesions of ``lesions_path``; a name becomes its files' prefix."""
    import time

    from tqdm import tqdm

    from msxai.io import Volume, load_volume, save_volume

    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if domain_path is None and lesions_path is None and not domains:
        raise InputError("nothing to explain: give --lesions LESIONS.nii.gz (with --lesion-id K|all) or --domain MASK")
    if domain_path is not None and domains:
        raise InputError("give a --domain MASK or named domains, not both")
    t0 = time.perf_counter()
    flair = load_volume(flair_path, "FLAIR")
    prep = model.prepare(flair_path, t1_path)
    if domain_path is not None:
        mask = _load_mask_on_grid(domain_path, "domain", flair, as_labels=False) > 0
        if not mask.any():
            raise EmptyDomainError(f"domain {domain_path}: the mask is empty (no voxel > 0)")
        domains = {"domain": mask}
    else:
        extra = {}
        for name, m in (domains or {}).items():
            if not _SAFE_NAME.match(str(name)) or str(name).startswith("lesion_"):
                raise InputError(f"domain name {name!r}: use letters, digits and '_' (not 'lesion_<K>', reserved for "
                                 "the lesions of the label map)")
            extra[str(name)] = as_domain(m, flair.array.shape, str(name))
        domains = lesion_domains(_load_mask_on_grid(lesions_path, "lesions", flair, as_labels=True),
                                 lesion_ids) if lesions_path is not None else {}
        domains.update(extra)
    native = getattr(prep, "native_affine", None)
    if native is not None and not _same_grid(prep.native_shape, native, flair.array.shape, flair.affine):
        raise GeometryError("the bundle's pre-processing did not keep the FLAIR's native grid")
    on_input_grid = _same_grid(prep.shape, prep.affine, flair.array.shape, flair.affine)
    if not on_input_grid:  # the network grid is another: carry the domains to it (nearest)
        domains = {name: _to_network(prep, m, flair, name) for name, m in domains.items()}
    parts = model_parts(model, layer=layer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[str]] = {}
    summaries: dict[str, dict] = {}
    bar = tqdm(total=len(domains), desc=f"{method} ({aggregation})" if method == "smoothgrad" else method,
               unit="lesion" if domain_path is None else "domain", disable=not progress)
    try:
        for e in explain(model, prep.image, domains, method=method, aggregation=aggregation, n_samples=n_samples,
                         sigma_fraction=sigma_fraction, sigma=sigma, seed=seed, layer=layer, affine=prep.affine,
                         **performance):
            written = []
            for map_name, arr in e.maps.items():
                if not on_input_grid:  # back to the FLAIR's native grid, as the probability
                    arr = _to_native(prep, arr, flair)
                path = out / f"{e.name}_{map_name}.nii.gz"
                save_volume(path, arr.astype(np.float32), flair.affine, dtype=np.float32)
                written.append(str(path))
            files[e.name] = written
            summaries[e.name] = {"lesion_id": int(e.name.split("_")[1]) if e.name.startswith("lesion_") else None,
                                 **e.summary}
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
    pj, pc = write_summaries({n: summaries[n] for n in order}, out, settings)
    return {"files": {n: files[n] for n in order}, "summaries": {n: summaries[n] for n in order},
            "settings": settings, "json": str(pj), "csv": str(pc)}
