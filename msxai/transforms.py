"""The bundles' pre- and post-processing as MONAI dictionary transforms.

Every bundle's ``configs/inference.json`` lists its chain (``preprocessing`` and ``postprocessing``) and its
``configs/train.json`` starts its training transforms with the same ``preprocessing`` list; ``msxai segment``,
``python -m monai.bundle run``, the MONAI Label tasks and the DICOMweb path all run it through
:class:`msxai.bundle.Bundle`. Keys: ``flair``, ``t1`` (a NIfTI file or a DICOM series folder each),
``image`` (the network input), ``pred`` (logits), ``prob`` (lesion probability), ``labels`` (lesion instances).

Pre-processing (``docs/inputs.md``)::

    LoadSequenced(flair, t1)     one loader for NIfTI files and DICOM series folders -> MetaTensor [1, X, Y, Z]
    Orientationd(flair)          the orientation the network was trained in (LAS)
    Spacingd(flair)              the training spacing (1 mm) over the FLAIR's field of view: the network grid
    AlignT1d                     the T1 resampled onto the network grid in world coordinates; rigidly registered to
                                 the FLAIR only when a measurement says they are not aligned
    BrainMaskd                   skull present or absent (measured); the brain mask; stripped outside it
    NormalizeIntensityd          per-sequence normalisation over the brain mask (msxai.normalization; z-score)
    ConcatItemsd(image)          [2, X, Y, Z] = (FLAIR, T1)

Post-processing (after the bundle's sliding-window inferer wrote ``pred``)::

    Activationsd(softmax)        class probabilities
    LesionProbabilityd           prob = softmax channel 1
    Invertd(prob <- flair)       back to the FLAIR's native grid and orientation (undoes Spacingd and Orientationd)
    LesionInstancesd             threshold 0.3, 18-connected lesions >= 5 mm^3 in native mm^3
    WriteSegmentationd           probability/mask/lesions NIfTI + lesions.json/.csv + preprocessing.json

A canonical input (1 mm, LAS, T1 on the FLAIR grid, skull-stripped) passes the geometric steps unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from msxai import MIN_LESION_MM3, THRESHOLD
from msxai.errors import GeometryError, InputError
from msxai.io import Volume, fov_coverage

INFO_KEY = "msxai_info"
NAMES = {"flair": "FLAIR", "t1": "T1"}
MIN_FOV_COVERAGE = 0.5
MAX_NETWORK_GRID_MM = 512.0


def as_volume(x) -> Volume:
    """A channel-first ``MetaTensor`` ``[1, X, Y, Z]`` (or a :class:`Volume`) as a :class:`Volume`."""
    if isinstance(x, Volume):
        return x
    if isinstance(x, MetaTensor):
        arr = x.detach().cpu().numpy()
        return Volume(arr[0] if arr.ndim == 4 else arr, np.asarray(x.affine, dtype=np.float64))
    raise InputError(f"expected an image with its affine, got {type(x).__name__}")


def as_metatensor(array: np.ndarray, affine: np.ndarray, meta: Mapping | None = None) -> MetaTensor:
    """``[X, Y, Z]`` (or ``[C, X, Y, Z]``) + affine -> channel-first float32 ``MetaTensor`` in RAS space."""
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 3:
        a = a[None]
    m = dict(meta or {})
    m.setdefault("space", "RAS")
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(a)), affine=torch.as_tensor(affine, dtype=torch.float64),
                      meta=m)


def with_values(x: MetaTensor, array: np.ndarray) -> MetaTensor:
    """A new channel-first ``MetaTensor`` holding ``array`` (``[X, Y, Z]`` or ``[C, X, Y, Z]``) with ``x``'s meta data
    and applied operations (what ``Invertd`` undoes later)."""
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 3:
        a = a[None]
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(a)), meta=dict(x.meta),
                      applied_operations=list(x.applied_operations))


def _info(d: dict) -> dict:
    info = d.get(INFO_KEY)
    if not isinstance(info, dict):
        info = {}
        d[INFO_KEY] = info
    return info


def grid_info(affine, shape) -> dict:
    import nibabel as nib

    a = np.asarray(affine, dtype=np.float64)
    return {"shape": [int(s) for s in shape], "spacing_mm": [round(float(s), 4) for s in np.sqrt((a[:3, :3] ** 2).sum(0))],
            "orientation": "".join(nib.aff2axcodes(a)), "affine": np.round(a, 6).tolist()}


# ------------------------------------------------------------------------------------------------ pre-processing
class LoadSequenced(MapTransform):
    """Load each key's sequence (:func:`msxai.io.load_sequence`: a NIfTI file or a DICOM series folder; 2-D/4-D
    images, a missing or degenerate orientation, NaN and empty volumes are refused) as a channel-first float32
    ``MetaTensor`` with its RAS affine. Values that already are images (``MetaTensor``/:class:`Volume`) are kept."""

    def __init__(self, keys: KeysCollection, names: Mapping[str, str] | None = None, allow_empty: bool = False,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.names = dict(NAMES if names is None else names)
        self.allow_empty = bool(allow_empty)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        from msxai.io import load_sequence

        d = dict(data)
        info = _info(d)
        for key in self.key_iterator(d):
            name = self.names.get(key, str(key))
            value = d[key]
            if isinstance(value, MetaTensor):
                continue
            if isinstance(value, Volume):
                vol, source = value, "array"
            else:
                if value is None or str(value).strip() == "":
                    flag = {"flair": "--flair", "t1": "--t1"}.get(key, f"--{key}")
                    raise InputError(f"no {name} image given: pass {flag} PATH (a NIfTI file or a DICOM series folder)")
                vol = load_sequence(value, name, allow_empty=self.allow_empty)
                source = "dicom" if Path(str(value)).is_dir() else "nifti"
            d[key] = as_metatensor(vol.array, vol.affine, {"filename_or_obj": str(value) if source != "array" else "",
                                                           "original_affine": vol.affine, "source": source})
            info[key] = {"source": source, **grid_info(vol.affine, vol.array.shape)}
        return d


class AlignT1d(MapTransform):
    """The T1 (``key``, on its own grid) onto the FLAIR's network grid (``ref_key``) in world coordinates, rigidly
    registered when ``register`` is ``"always"`` or (``"auto"``) when :func:`msxai.preprocess.misalignment_mm`
    exceeds ``tolerance_mm``; refuses FLAIR/T1 fields of view that overlap less than ``min_coverage`` (fraction
    of the FLAIR's field of view inside the T1's) and network grids beyond ``MAX_NETWORK_GRID_MM`` per axis. What
    was done goes to ``msxai_info["registration"]``."""

    def __init__(self, key: str = "t1", ref_key: str = "flair", register: str | bool = "auto",
                 tolerance_mm: float = 2.0, min_coverage: float = MIN_FOV_COVERAGE, seed: int = 0):
        super().__init__([key])
        self.key, self.ref_key = key, ref_key
        self.register, self.tolerance_mm = register, float(tolerance_mm)
        self.min_coverage, self.seed = float(min_coverage), int(seed)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        from msxai.preprocess import align_onto

        d = dict(data)
        ref, moving = d[self.ref_key], d[self.key]
        fixed, mov = as_volume(ref), as_volume(moving)
        extent = np.array(fixed.array.shape) * np.array(fixed.spacing)
        if np.any(extent > MAX_NETWORK_GRID_MM):
            raise GeometryError(f"{NAMES.get(self.ref_key, self.ref_key)}: a field of view of "
                                f"{tuple(np.round(extent).astype(int))} mm; at most {MAX_NETWORK_GRID_MM:.0f} mm per axis")
        coverage = fov_coverage(fixed.affine, fixed.array.shape, mov.affine, mov.array.shape)
        if coverage < self.min_coverage:
            raise GeometryError(
                f"FLAIR and T1 fields of view overlap too little: {100 * coverage:.0f} % of the FLAIR's field of view "
                f"lies inside the T1's (at least {100 * self.min_coverage:.0f} % needed); are they of one patient and "
                "one session?")
        aligned, reg = align_onto(mov, fixed, self.register, self.tolerance_mm, self.seed)
        reg["fov_coverage"] = round(coverage, 4)
        meta = {k: v for k, v in ref.meta.items() if k not in ("filename_or_obj", "original_affine", "affine")}
        meta.update({"filename_or_obj": moving.meta.get("filename_or_obj", ""),
                     "original_affine": moving.meta.get("original_affine")})
        d[self.key] = as_metatensor(aligned.array, fixed.affine, meta)
        _info(d)["registration"] = reg
        return d


RESIDUE = 1e-6  # relative size of a resampling residue (BrainMaskd)


class BrainMaskd(MapTransform):
    """``mask_key`` = the brain (bool ``[X, Y, Z]`` numpy). ``skull="auto"`` decides by measurement
    (:func:`msxai.brainmask.has_skull`); a skull-stripped pair's brain is its non-zero voxels (the training data's
    rule), a head's is :func:`msxai.brainmask.head_brain_mask`, and both sequences are then set to 0 outside it.
    ``skull="absent"``/``"present"`` forces the choice. Writes ``msxai_info["skull"]``."""

    def __init__(self, keys: KeysCollection = ("flair", "t1"), mask_key: str = "brain_mask", skull: str = "auto"):
        super().__init__(keys)
        if skull not in ("auto", "absent", "present"):
            raise InputError(f"skull must be auto, absent or present, got {skull!r}")
        self.mask_key, self.skull = mask_key, skull

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        from msxai.brainmask import has_skull, head_brain_mask
        from msxai.preprocess import foreground_mask

        d = dict(data)
        keys = list(self.key_iterator(d))
        vols = [as_volume(d[k]) for k in keys]
        stack = np.stack([v.array for v in vols])
        present, fg_cm3 = has_skull(stack, vols[0].affine)
        if self.skull != "auto":
            present = self.skull == "present"
        info = {"present": bool(present), "decided_by": "measurement" if self.skull == "auto" else "configuration",
                "foreground_cm3": round(fg_cm3, 1)}
        if not present:
            # non-zero voxels; a resampled grid (Spacingd, an oblique or DICOM-rounded affine) leaves interpolation
            # residue (|v| ~ 1e-10 x the image) beside exact zeros: below RESIDUE x the channel's largest |value|
            # counts as zero, so the same scan from NIfTI and from DICOM gets the same brain
            peak = np.abs(stack).reshape(len(stack), -1).max(1).reshape(-1, 1, 1, 1)
            mask = foreground_mask(np.where(np.abs(stack) > RESIDUE * peak, stack, 0.0))
            info["brain_mask"] = "non-zero voxels"
        else:
            flair = vols[keys.index("flair")] if "flair" in keys else vols[0]
            t1 = vols[keys.index("t1")] if "t1" in keys else vols[-1]
            mask, how = head_brain_mask(flair, t1)
            info.update(brain_mask="MNI152 template registered to the T1, fitted to the brain's boundary", **how)
            for k, v in zip(keys, vols):
                d[k] = with_values(d[k], np.where(mask, v.array, 0.0))
        info["brain_cm3"] = round(float(mask.sum()) * float(abs(np.linalg.det(vols[0].affine[:3, :3]))) / 1e3, 1)
        d[self.mask_key] = mask
        _info(d)["skull"] = info
        return d


class NormalizeIntensityd(MapTransform):
    """Normalise each key over ``mask_key`` with :func:`msxai.normalization.normalize` (``method``: the bundle's
    ``normalization``, the one its network was trained with); the values before it are kept in ``raw_key``
    (``[C, X, Y, Z]`` float32 numpy)."""

    def __init__(self, keys: KeysCollection = ("flair", "t1"), mask_key: str = "brain_mask",
                 method: str = "zscore_brain", raw_key: str | None = "raw"):
        from msxai.normalization import check_normalization

        super().__init__(keys)
        self.mask_key, self.method, self.raw_key = mask_key, check_normalization(method), raw_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        from msxai.normalization import normalize

        d = dict(data)
        keys = list(self.key_iterator(d))
        raw = np.stack([as_volume(d[k]).array for k in keys]).astype(np.float32)
        out = normalize(raw, np.asarray(d[self.mask_key], bool), self.method)
        for c, k in enumerate(keys):
            d[k] = with_values(d[k], out[c])
        if self.raw_key:
            d[self.raw_key] = raw
        _info(d)["normalization"] = self.method
        return d


class BiasCorrectd(MapTransform):
    """N4 bias-field correction (:func:`msxai.preprocess.n4_bias_correct`) of each key when ``enabled``."""

    def __init__(self, keys: KeysCollection = ("flair", "t1"), enabled: bool = False):
        super().__init__(keys)
        self.enabled = bool(enabled)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        if not self.enabled:
            return dict(data)
        from msxai.preprocess import n4_bias_correct

        d = dict(data)
        for k in self.key_iterator(d):
            v = as_volume(d[k])
            d[k] = with_values(d[k], n4_bias_correct(v.array, spacing=v.spacing))
        _info(d)["n4"] = True
        return d


class CropToBraind(MapTransform):
    """Training: crop ``keys`` (channel-first) to the bounding box of ``mask_key`` grown by ``margin`` voxels,
    binarise ``label_key`` (``> 0``) and keep only ``keys`` and ``id`` (what the data loader batches)."""

    def __init__(self, keys: KeysCollection = ("image", "label"), mask_key: str = "brain_mask", margin: int = 8,
                 label_key: str = "label"):
        super().__init__(keys)
        self.mask_key, self.margin, self.label_key = mask_key, int(margin), label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        from msxai.training import brain_bbox

        d = dict(data)
        sl = (slice(None),) + brain_bbox(np.asarray(d[self.mask_key], bool), self.margin)
        out = {"id": d.get("id", "")}
        for k in self.key_iterator(d):
            x = d[k]
            a = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
            a = a[sl]
            if k == self.label_key:
                a = a[:1] > 0
            out[k] = np.ascontiguousarray(a, dtype=np.float32)
        return out


# ----------------------------------------------------------------------------------------------- post-processing
class LesionProbabilityd(MapTransform):
    """``output_key`` = channel ``channel`` of the class probabilities in ``keys`` (``[1, X, Y, Z]``, meta kept)."""

    def __init__(self, keys: KeysCollection = "pred", output_key: str = "prob", channel: int = 1):
        super().__init__(keys)
        self.output_key, self.channel = output_key, int(channel)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for k in self.key_iterator(d):
            p = d[k]
            d[self.output_key] = p[self.channel : self.channel + 1].float()
        return d


class LesionInstancesd(MapTransform):
    """Lesions of the probability in ``keys`` on its grid: ``prob > threshold``, 18-connected components of at least
    ``min_volume_mm3`` (measured with that grid's voxel volume). Ids follow the raster order of the grid viewed in
    ``orientation`` (the training orientation), so a scan given in another voxel order gets the same ids. Writes
    ``labels`` (int32 numpy), ``table`` (:func:`msxai.lesions.lesion_table`) and ``affine``; ``prob`` becomes a
    float32 numpy ``[X, Y, Z]``."""

    def __init__(self, keys: KeysCollection = "prob", threshold: float = THRESHOLD,
                 min_volume_mm3: float = MIN_LESION_MM3, orientation: str = "LAS", labels_key: str = "labels",
                 table_key: str = "table", affine_key: str = "affine"):
        super().__init__(keys)
        if not 0.0 <= float(threshold) < 1.0:
            raise InputError(f"threshold must be in [0, 1), got {threshold}")
        if float(min_volume_mm3) < 0:
            raise InputError(f"min_volume_mm3 must be >= 0, got {min_volume_mm3}")
        self.threshold, self.min_volume_mm3 = float(threshold), float(min_volume_mm3)
        self.orientation = orientation
        self.labels_key, self.table_key, self.affine_key = labels_key, table_key, affine_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        from msxai.lesions import lesion_table

        d = dict(data)
        for k in self.key_iterator(d):
            vol = as_volume(d[k])
            prob = np.ascontiguousarray(vol.array, dtype=np.float32)
            labels = oriented_instances(prob, vol.affine, self.threshold, self.min_volume_mm3, self.orientation)
            d[k] = prob
            d[self.labels_key] = labels
            d[self.affine_key] = vol.affine
            d[self.table_key] = lesion_table(labels, vol.affine, prob=prob)
            d["lesion_rule"] = {"threshold": self.threshold, "min_volume_mm3": self.min_volume_mm3}
        return d


def oriented_instances(prob: np.ndarray, affine: np.ndarray, threshold: float = THRESHOLD,
                       min_volume_mm3: float = MIN_LESION_MM3, orientation: str = "LAS") -> np.ndarray:
    """:func:`msxai.lesions.lesion_instances` with ids in the raster order of the grid viewed in ``orientation``
    (a pure flip/permutation of the array: components and volumes are those of the grid itself)."""
    import nibabel as nib

    from msxai.lesions import lesion_instances

    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.axcodes2ornt(tuple(orientation)))
    view = nib.orientations.apply_orientation(prob, ornt)
    labels = lesion_instances(np.ascontiguousarray(view), threshold, min_volume_mm3, affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(tuple(orientation)),
                                           nib.orientations.io_orientation(affine))
    return np.ascontiguousarray(nib.orientations.apply_orientation(labels, back)).astype(np.int32)


class WriteSegmentationd(MapTransform):
    """When the data holds ``output_dir``: ``probability.nii.gz``, ``mask.nii.gz``, ``lesions.nii.gz``,
    ``lesions.json``, ``lesions.csv`` (:func:`msxai.inference.write_result`) and ``preprocessing.json`` (what the
    pre-processing did: grids, registration, skull) in it; their paths go to ``files``."""

    def __init__(self, output_dir_key: str = "output_dir"):
        super().__init__([output_dir_key], allow_missing_keys=True)
        self.output_dir_key = output_dir_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        out = d.get(self.output_dir_key)
        if out in (None, ""):
            return d
        from msxai.inference import segmentation_result, write_result

        files = write_result(segmentation_result(d), out)
        p = Path(out) / "preprocessing.json"
        p.write_text(json.dumps(jsonable(d.get(INFO_KEY, {})), indent=1) + "\n")
        files["preprocessing"] = p
        d["files"] = files
        return d


def describe_preprocessing(info: Mapping) -> list[str]:
    """Lines saying what the pre-processing did (``msxai segment`` prints them; ``preprocessing.json`` has it all)."""
    out = []
    for key in ("flair", "t1"):
        g = info.get(key)
        if g:
            sp = " x ".join(f"{s:g}" for s in g["spacing_mm"])
            out.append(f"{NAMES[key]}: {g['source']}, {g['orientation']}, {tuple(g['shape'])} voxels of {sp} mm")
    reg = info.get("registration")
    if reg:
        how = "resampled onto the network grid in world coordinates" if reg.get("resampled") else "on the FLAIR's grid"
        if reg.get("registered"):
            out.append(f"T1: {how}; misaligned by {reg['misalignment_mm'] if reg['misalignment_mm'] is not None else '?'} "
                       f"mm, rigidly registered (residual {reg['residual_mm']} mm)")
        else:
            m = reg.get("misalignment_mm")
            out.append(f"T1: {how}; " + (f"aligned ({m} mm), not registered" if m is not None else reg.get("note", "")))
    sk = info.get("skull")
    if sk:
        out.append("skull: " + (f"present ({sk['foreground_cm3']:.0f} cm3 non-zero), brain mask {sk['brain_cm3']:.0f} "
                                f"cm3 found" if sk["present"] else f"absent (skull-stripped: {sk['brain_cm3']:.0f} cm3)"))
    return out


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def run_chain(chain, data: Mapping) -> dict:
    """``chain(data)``, with the input error a transform raised (MONAI's ``Compose`` wraps it in a ``RuntimeError``
    naming the transform) raised as it is: the CLI answers it with exit 2, the app with HTTP 4xx."""
    try:
        return chain(data)
    except RuntimeError as exc:
        e, seen = exc, set()
        while e is not None and id(e) not in seen:
            seen.add(id(e))
            if isinstance(e, InputError):
                raise e from None
            e = e.__cause__ or e.__context__
        raise


# -------------------------------------------------------------------------------------------------- grid mappings
def invert_to_native(array: np.ndarray, data: Mapping, preprocessing, ref_key: str = "flair",
                     nearest: bool = False) -> np.ndarray:
    """An array on the network grid (``[X, Y, Z]`` or ``[C, X, Y, Z]``) brought back to the FLAIR's native grid and
    orientation by ``Invertd`` with the FLAIR's recorded geometric transforms (the probability's own path).
    Returns float32 numpy of the same rank."""
    from monai.transforms import Invertd

    a = np.asarray(array, dtype=np.float32)
    squeeze = a.ndim == 3
    x = MetaTensor(torch.from_numpy(np.ascontiguousarray(a[None] if squeeze else a)))
    inv = Invertd(keys="x", transform=preprocessing, orig_keys=ref_key, nearest_interp=bool(nearest))
    out = inv({"x": x, ref_key: data[ref_key]})["x"]
    out = out.detach().cpu().numpy().astype(np.float32)
    return out[0] if squeeze else out


def carry_to_network(mask: np.ndarray, native_affine: np.ndarray, network_affine: np.ndarray,
                     network_shape: Sequence[int], name: str = "domain") -> np.ndarray:
    """A bool mask on the FLAIR's native grid carried to the network grid: nearest-neighbour resampling in world
    coordinates; a domain too small to hold a network voxel centre keeps the network voxels nearest to its own
    voxel centres. Refuses an empty mask or one outside the network grid."""
    from msxai.errors import EmptyDomainError
    from msxai.preprocess import resample_onto

    m = np.asarray(mask, bool)
    if not m.any():
        raise EmptyDomainError(f"{name}: the mask is empty")
    net_affine = np.asarray(network_affine, np.float64)
    if np.allclose(native_affine, net_affine, atol=1e-6) and tuple(m.shape) == tuple(network_shape):
        return m.copy()
    out = resample_onto(Volume(m.astype(np.float32), native_affine), net_affine, tuple(network_shape), order=0).array > 0.5
    if not out.any():
        ijk = np.argwhere(m).astype(np.float64)
        world = ijk @ np.asarray(native_affine)[:3, :3].T + np.asarray(native_affine)[:3, 3]
        inv = np.linalg.inv(net_affine)
        idx = np.rint(world @ inv[:3, :3].T + inv[:3, 3]).astype(int)
        ok = np.all((idx >= 0) & (idx < np.asarray(network_shape)), axis=1)
        out[tuple(idx[ok].T)] = True
    if not out.any():
        raise EmptyDomainError(f"{name}: no voxel of it lies on the network grid")
    return out
