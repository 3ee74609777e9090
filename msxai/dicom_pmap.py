"""Saliency maps as DICOM Parametric Maps (float values over the FLAIR series, for OHIF and 3D Slicer).

One Parametric Map (one series) per map and sign: the positive part ``max(M, 0)`` and the negative part
``max(-M, 0)`` of a saliency map ``M`` are written separately, each scaled to ``[0, 1]`` by its own peak, with the
Real World Value Mapping holding the true values (``true = slope * stored``; slope = the positive peak, or minus the
negative peak). Why: OHIF 3.10's Parametric Map viewport (``@ohif/extension-cornerstone-dicom-pmap``) ignores the
palette and the real-world value mapping: it multiplies the stored values by 100 and shows them with a fixed
``rainbow_2`` colour map over a 0..100 window whose opacity is 0 at 0, so a signed map or one with values far from
[0, 1] would be invisible or saturated. Stored values are float32 (``FloatPixelData``).

Frames lie on the source (FLAIR) instances: same rows, columns, orientation and pixel spacing, one frame per source
slice, each referencing its FLAIR instance by UID and position (as :func:`msxai.dicom.write_seg` does); a top-level
``ReferencedSeriesSequence`` names the FLAIR series (OHIF's PM loader needs it to find the volume it overlays).

Frames can be limited along the slice axis to the part's extent plus ``margin`` slices (a 1 mm map of
182 x 218 x 182 is 29 MB when every slice is written); ``margin=None`` writes every slice of the series. OHIF 3.10's
Parametric Map loader needs two fixes to load maps (a byte offset given in elements, a buffer as long as the map
instead of the volume): the app serves them with OHIF (``apps/msxai/lib/ohif_fixes.py``). Even so its PM viewport
draws nothing of a map whose frames cover only part of the series (measured in headless Chromium: 0 % of the
explained lesion's pixels coloured; the same map with every frame: 98 %, nothing farther than 15 mm), so the app
writes every frame (:func:`msxai.dicom_saliency.explain_dicom`'s default).
"""

from __future__ import annotations

import datetime as _dt
from typing import Sequence

import numpy as np

from msxai.dicom import (
    MSXAI_SCHEME,
    _code,
    content_hash,
    copy_study_attributes,
    dataset_affine,
    declare_private_scheme,
    new_instance,
    referenced_series_sequence,
    set_equipment,
    shared_plane_groups,
    source_frame_group,
    source_voxel_indices,
    stable_uid,
)
from msxai.errors import InputError

PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
UNITLESS = ("1", "UCUM", "no units")
QUANTITY = ("246205007", "SCT", "Quantity")
# the quantities msxai writes (no standard code: the private scheme of msxai.dicom)
SALIENCY_QUANTITY = {
    "smoothgrad": ("SMOOTHGRAD", MSXAI_SCHEME, "Instance SmoothGrad saliency"),
    "gradcampp": ("GRADCAMPP", MSXAI_SCHEME, "Instance Grad-CAM++ activation"),
}


def frame_range(volume: np.ndarray, grids: Sequence[tuple], margin: int | None) -> range:
    """Indices (into the sorted source slices) of the frames to write: the slices where ``volume`` is non-zero,
    widened by ``margin`` slices on each side (``None``: every slice). Empty when the volume is zero on every source
    slice."""
    if margin is not None and margin < 0:
        raise InputError(f"margin must be >= 0 (or None: every slice), got {margin}")
    hit = [z for z, (I, J, K) in enumerate(grids) if np.any(volume[I, J, K])]
    if not hit:
        return range(0)
    if margin is None:
        return range(len(grids))
    return range(max(0, hit[0] - margin), min(len(grids), hit[-1] + margin + 1))


def write_parametric_map(stored: np.ndarray, affine: np.ndarray, source: Sequence, *, slope: float,
                         intercept: float = 0.0, series_description: str, lut_label: str, lut_explanation: str,
                         quantity: tuple, units: tuple = UNITLESS, series_number: int = 400, margin: int | None = 2,
                         content_label: str = "MSXAI", series_uid: str | None = None,
                         sop_uid: str | None = None):
    """A float32 Parametric Map of ``stored`` ``[X, Y, Z]`` (RAS ``affine``, on the grid of the single-frame
    ``source`` series) with the real-world value mapping ``true = slope * stored + intercept`` (first and last
    mapped values: the stored range). Frames as :func:`frame_range`; :class:`InputError` when ``stored`` is zero on
    every source slice, has NaN/inf, or the mapping is degenerate."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq

    stored = np.asarray(stored, dtype=np.float32)
    if stored.ndim != 3:
        raise InputError(f"parametric map must be 3D, got shape {stored.shape}")
    if not np.all(np.isfinite(stored)):
        raise InputError("parametric map has NaN/inf values")
    if not (np.isfinite(slope) and slope != 0 and np.isfinite(intercept)):
        raise InputError(f"real-world value mapping needs a finite non-zero slope, got {slope}, {intercept}")
    if not source:
        raise InputError("no source images for the parametric map")
    _, source = dataset_affine(list(source))
    grids = [source_voxel_indices(ds, affine, stored.shape) for ds in source]
    keep = frame_range(stored, grids, margin)
    if not len(keep):
        raise InputError("the parametric map is zero on every source slice: nothing to write")
    ref = source[0]
    series_uid = series_uid or stable_uid("pm-series", ref.SeriesInstanceUID, series_description, slope, intercept,
                                          margin, content_hash(stored))
    sop_uid = sop_uid or stable_uid("pm-sop", series_uid)
    now = _dt.datetime.now()

    ds = new_instance(PARAMETRIC_MAP_STORAGE, sop_uid)
    copy_study_attributes(ds, ref)
    declare_private_scheme(ds)
    # not the source's MR: image lists and the T1 pairing (msxai.studies) look at MR series
    ds.Modality = "OT"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series_uid, int(series_number), 1
    ds.SeriesDescription = series_description[:64]
    ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    set_equipment(ds)
    ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
    ds.ContentQualification = "RESEARCH"
    ds.ContentLabel = content_label.upper()[:16]
    ds.ContentDescription = lut_explanation[:64]
    ds.ContentCreatorName = "msxai^"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(ref.Rows), int(ref.Columns)
    ds.BitsAllocated = 32
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.AcquisitionContextSequence = Seq([])

    dim_uid = stable_uid("pm-dim", series_uid)
    org, dim = Dataset(), Dataset()
    org.DimensionOrganizationUID = dim.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = Seq([org])
    ds.DimensionOrganizationType = "3D"
    dim.DimensionIndexPointer, dim.FunctionalGroupPointer = 0x00200032, 0x00209113
    dim.DimensionDescriptionLabel = "ImagePositionPatient"
    ds.DimensionIndexSequence = Seq([dim])

    shared = shared_plane_groups(ref)
    rwv = Dataset()
    rwv.LUTExplanation = lut_explanation[:64]
    rwv.LUTLabel = lut_label[:16]
    lo, hi = float(stored.min()), float(stored.max())
    rwv.DoubleFloatRealWorldValueFirstValueMapped = lo
    rwv.DoubleFloatRealWorldValueLastValueMapped = hi if hi > lo else lo + 1.0
    rwv.RealWorldValueIntercept, rwv.RealWorldValueSlope = float(intercept), float(slope)
    rwv.MeasurementUnitsCodeSequence = Seq([_code(units)])
    qd = Dataset()
    qd.ValueType = "CODE"
    qd.ConceptNameCodeSequence = Seq([_code(QUANTITY)])
    qd.ConceptCodeSequence = Seq([_code(quantity)])
    rwv.QuantityDefinitionSequence = Seq([qd])
    shared.RealWorldValueMappingSequence = Seq([rwv])
    fa = Dataset()
    fa.AnatomicRegionSequence = Seq([_code(("12738006", "SCT", "Brain"))])
    fa.FrameLaterality = "B"
    shared.FrameAnatomySequence = Seq([fa])
    ft = Dataset()
    ft.FrameType = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
    shared.ParametricMapFrameTypeSequence = Seq([ft])
    pvt = Dataset()
    pvt.RescaleIntercept, pvt.RescaleSlope, pvt.RescaleType = "0", "1", "US"
    shared.PixelValueTransformationSequence = Seq([pvt])
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = f"{(lo + hi) / 2:.6g}", f"{max(hi - lo, 1e-6):.6g}"
    voi.VOILUTFunction = "LINEAR_EXACT"  # the stored range exactly (a width below 1 needs it)
    shared.FrameVOILUTSequence = Seq([voi])
    ds.SharedFunctionalGroupsSequence = Seq([shared])

    out, per_frame = [], []
    for n, z in enumerate(keep, start=1):
        I, J, K = grids[z]
        out.append(stored[I, J, K])
        per_frame.append(source_frame_group(source[z], ("110001", "DCM", "Image Processing"), [n]))
    ds.PerFrameFunctionalGroupsSequence = Seq(per_frame)
    ds.NumberOfFrames = len(out)
    ds.FloatPixelData = np.ascontiguousarray(np.stack(out), dtype="<f4").tobytes()
    ds.ReferencedSeriesSequence = referenced_series_sequence(source)
    return ds


def saliency_parametric_maps(saliency: np.ndarray, affine: np.ndarray, source: Sequence, *, name: str, map_name: str,
                             method: str, series_number: int = 400, margin: int | None = 2,
                             layer: str | None = None) -> list:
    """The positive and the negative part of a saliency map ``[X, Y, Z]`` as Parametric Maps (see the module
    docstring): ``[(part, dataset)]`` with ``part`` in ``"positive"``/``"negative"``, leaving out a part that is
    zero everywhere. ``name``: the domain (e.g. ``lesion 3``); ``map_name``: the map (``FLAIR``, ``MPRAGE``, ``CAM``);
    ``layer``: Grad-CAM++'s layer, named in the series description (``msxai CAM++ CAM+ lesion 3 [model.2.0]``): maps
    of one lesion at two layers are two different series."""
    m = np.asarray(saliency, dtype=np.float64)
    if not np.all(np.isfinite(m)):
        raise InputError(f"saliency map {name} {map_name} has NaN/inf values")
    if method not in SALIENCY_QUANTITY:
        raise InputError(f"method must be one of {sorted(SALIENCY_QUANTITY)}, got {method!r}")
    short = {"smoothgrad": "SG", "gradcampp": "CAM++"}[method]
    at = f" [{layer}]" if layer else ""
    out = []
    for part, sign in (("positive", 1.0), ("negative", -1.0)):
        values = np.maximum(sign * m, 0.0)
        peak = float(values.max())
        if peak <= 0:
            continue
        stored = (values / peak).astype(np.float32)
        tag = f"{map_name}{'+' if sign > 0 else '-'}"
        ds = write_parametric_map(
            stored, affine, source, slope=sign * peak, series_description=f"msxai {short} {tag} {name}{at}",
            lut_label=f"{map_name[:6]}_{part[:3].upper()}", quantity=SALIENCY_QUANTITY[method],
            lut_explanation=f"{short}{at} {map_name} {part} part of {name}, peak {peak:.4g}",
            series_number=series_number + len(out), margin=margin)
        out.append((part, ds))
    return out


def read_parametric_map(pm, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The real-world values (``slope * stored + intercept``, the shared Real World Value Mapping) of a float
    Parametric Map on the grid ``(affine, shape)`` (RAS), placed frame by frame by :func:`source_voxel_indices`;
    NaN where no frame lies. Frames must lie on the grid (:class:`GeometryError` otherwise)."""
    from types import SimpleNamespace

    if "FloatPixelData" not in pm:
        raise InputError("not a float Parametric Map (no FloatPixelData)")
    n, rows, cols = int(pm.NumberOfFrames), int(pm.Rows), int(pm.Columns)
    stored = np.frombuffer(pm.FloatPixelData, dtype="<f4").reshape(n, rows, cols)
    shared = pm.SharedFunctionalGroupsSequence[0]
    rwv = shared.RealWorldValueMappingSequence[0]
    slope, intercept = float(rwv.RealWorldValueSlope), float(rwv.RealWorldValueIntercept)
    out = np.full(tuple(int(s) for s in shape), np.nan)
    for f, fg in enumerate(pm.PerFrameFunctionalGroupsSequence):
        frame = SimpleNamespace(
            ImageOrientationPatient=shared.PlaneOrientationSequence[0].ImageOrientationPatient,
            PixelSpacing=shared.PixelMeasuresSequence[0].PixelSpacing, Rows=rows, Columns=cols,
            ImagePositionPatient=fg.PlanePositionSequence[0].ImagePositionPatient, SOPInstanceUID=f"frame {f + 1}")
        I, J, K = source_voxel_indices(frame, affine, out.shape)
        out[I, J, K] = stored[f] * slope + intercept
    return out
