"""The per-lesion saliency table as a DICOM Structured Report (TID 1500 Measurement Report).

Layout (PS3.16 TID 1500)::

    CONTAINER Imaging Measurement Report (126000, DCM)            template 1500
      HAS CONCEPT MOD  Language of Content Item and Descendants = English (United States)
      HAS OBS CONTEXT  Observer Type = Device; Device Observer UID; Device Observer Name = msxai
      HAS CONCEPT MOD  Procedure reported = MR of head
      CONTAINS CONTAINER Image Library (111028) > CONTAINER Image Library Group (126200) > IMAGE (the FLAIR slices
                         holding the groups' points)
      CONTAINS CONTAINER Imaging Measurements (126010)
        CONTAINS CONTAINER Measurement Group (125007)             one per lesion (explained domain)
          CONTAINS TEXT     Tracking Identifier (112039)          "lesion 3" (3d) / OHIF's arrow tag (ohif)
          CONTAINS UIDREF   Tracking Unique Identifier (112040)
          CONTAINS CODE     Finding (121071)                      Lesion (3d) / "lesion 3", private code (ohif)
          CONTAINS IMAGE    Referenced Segment (121191)           the lesion's segment of the lesion SEG (when known)
          CONTAINS UIDREF   Source series for segmentation (121232)
          CONTAINS SCOORD3D / SCOORD  the group's point: POINT in patient coordinates (3d) or on the FLAIR slice
                            holding it (ohif, SELECTED FROM that IMAGE)
          CONTAINS NUM      one per measurement (volume, mean probability, saliency masses, peaks, ring masses, ...);
                            with ohif the first is INFERRED FROM the point

``coordinates="3d"`` writes a Comprehensive 3D SR (the point as SCOORD3D); ``"ohif"`` (what the app stores) a
Comprehensive SR that OHIF 3.10, as served by monailabel 0.8.5, shows. Read from its bundled JavaScript and checked
in headless Chromium: its 3D SR path parses SCOORD3D groups but draws them only in volume viewports (an error in the
basic viewer's stack viewport), its tracked measurement panel leaves them out (no referenced series), and a 3D SR
opened in a viewport shows no image; its SR viewport draws a 2D SR's points on their images with the first five
numbers beside them; it takes, per group, the *first* UIDREF as the tracking UID and needs a SCOORD/SCOORD3D item;
and "tracking" the SR (hydration) turns a group into a row of the measurement panel only if the tracking identifier
names one of its tools (``Cornerstone3DTools@^0.1.0:ArrowAnnotate``: a point), whose point it reads from the SCOORD
the first NUM is inferred from; the row's label is the Finding's meaning (its free-text code ``CORNERSTONEFREETEXT``
is longer than the 16 characters of a code value, so the name is coded in msxai's scheme instead).
Quantities without a standard code use msxai's private coding scheme
(:data:`msxai.dicom.MSXAI_SCHEME`, declared in the object).
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from msxai.dicom import (
    LESION_TYPE,
    MSXAI_SCHEME,
    _code,
    _ds,
    copy_study_attributes,
    declare_private_scheme,
    new_instance,
    set_equipment,
    stable_uid,
)
from msxai.errors import InputError

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
COORDINATES = ("3d", "ohif")
# what OHIF 3.10 (cornerstone adapters) hydrates as a point measurement and how it names it
OHIF_ARROW_TRACKING_ID = "Cornerstone3DTools@^0.1.0:ArrowAnnotate"
UNITLESS = ("1", "UCUM", "no units")
MM3 = ("mm3", "UCUM", "cubic millimeter")

REPORT = ("126000", "DCM", "Imaging Measurement Report")
LANGUAGE = ("121049", "DCM", "Language of Content Item and Descendants")
ENGLISH_US = ("en-US", "RFC5646", "English (United States)")
OBSERVER_TYPE = ("121005", "DCM", "Observer Type")
DEVICE = ("121007", "DCM", "Device")
DEVICE_UID = ("121012", "DCM", "Device Observer UID")
DEVICE_NAME = ("121013", "DCM", "Device Observer Name")
PROCEDURE_REPORTED = ("121058", "DCM", "Procedure reported")
MR_HEAD = ("241601008", "SCT", "MR of head")
IMAGE_LIBRARY = ("111028", "DCM", "Image Library")
IMAGE_LIBRARY_GROUP = ("126200", "DCM", "Image Library Group")
IMAGING_MEASUREMENTS = ("126010", "DCM", "Imaging Measurements")
MEASUREMENT_GROUP = ("125007", "DCM", "Measurement Group")
TRACKING_ID = ("112039", "DCM", "Tracking Identifier")
TRACKING_UID = ("112040", "DCM", "Tracking Unique Identifier")
FINDING = ("121071", "DCM", "Finding")
REFERENCED_SEGMENT = ("121191", "DCM", "Referenced Segment")
SOURCE_SERIES = ("121232", "DCM", "Source series for segmentation")
VOLUME = ("118565006", "SCT", "Volume")


@dataclass
class SegmentReference:
    """A segment of a stored DICOM SEG."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    segment_number: int


@dataclass
class Measurement:
    concept: tuple  # (code value <= 16 characters, scheme, meaning <= 64 characters)
    value: float
    units: tuple = UNITLESS


@dataclass
class MeasurementGroup:
    tracking_id: str  # e.g. "lesion 3"
    tracking_uid: str
    point_lps: Sequence[float]  # the SCOORD3D POINT (patient coordinates, mm)
    measurements: list = field(default_factory=list)  # [Measurement]
    segment: SegmentReference | None = None
    image: object | None = None  # the source instance (dataset) holding the point: listed in the image library
    point_concept: tuple = ("111010", "DCM", "Center")  # what the point is


# ------------------------------------------------------------------------------------------------ content items
def _item(relationship: str | None, value_type: str, concept: tuple | None):
    """A content item; the root has no relationship, an image library entry no concept name."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq

    d = Dataset()
    if relationship:
        d.RelationshipType = relationship
    d.ValueType = value_type
    if concept:
        d.ConceptNameCodeSequence = Seq([_code(concept)])
    return d


def _container(relationship: str | None, concept: tuple, children: list, template: str | None = None):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq

    d = _item(relationship, "CONTAINER", concept)
    d.ContinuityOfContent = "SEPARATE"
    if template:
        t = Dataset()
        t.MappingResource, t.TemplateIdentifier = "DCMR", template
        d.ContentTemplateSequence = Seq([t])
    d.ContentSequence = Seq(children)
    return d


def _text(relationship, concept, text: str):
    d = _item(relationship, "TEXT", concept)
    d.TextValue = str(text)
    return d


def _uidref(relationship, concept, uid: str):
    d = _item(relationship, "UIDREF", concept)
    d.UID = str(uid)
    return d


def _codeval(relationship, concept, value: tuple):
    from pydicom.sequence import Sequence as Seq

    d = _item(relationship, "CODE", concept)
    d.ConceptCodeSequence = Seq([_code(value)])
    return d


def _num(m: Measurement):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq

    if len(m.concept[0]) > 16:
        raise InputError(f"code value {m.concept[0]!r} is longer than 16 characters")
    d = _item("CONTAINS", "NUM", m.concept)
    mv = Dataset()
    mv.MeasurementUnitsCodeSequence = Seq([_code(m.units)])
    mv.NumericValue = _ds(float(m.value))
    mv.FloatingPointValue = float(m.value)
    d.MeasuredValueSequence = Seq([mv])
    return d


def _image(relationship, concept, sop_class: str, sop_uid: str, segment: int | None = None):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq

    d = _item(relationship, "IMAGE", concept)
    r = Dataset()
    r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = sop_class, sop_uid
    if segment is not None:
        r.ReferencedSegmentNumber = int(segment)
    d.ReferencedSOPSequence = Seq([r])
    return d


def _named_finding(name: str) -> tuple:
    """A finding coded by the lesion's name (private scheme): what OHIF's measurement panel shows as the row's
    label (OHIF's own free-text code, ``CORNERSTONEFREETEXT``, is longer than a code value may be)."""
    code = re.sub(r"[^A-Z0-9]", "", name.upper())[:16] or "DOMAIN"
    return (code, MSXAI_SCHEME, name[:64])


def _check_point(point_lps) -> np.ndarray:
    p = np.asarray(point_lps, dtype=np.float64)
    if p.shape != (3,) or not np.all(np.isfinite(p)):
        raise InputError(f"a measurement group's point must be 3 finite coordinates, got {point_lps!r}")
    return p


def _point(point_lps, frame_of_reference_uid: str, concept: tuple):
    d = _item("CONTAINS", "SCOORD3D", concept)
    d.GraphicType = "POINT"
    d.GraphicData = [float(x) for x in _check_point(point_lps)]
    d.ReferencedFrameOfReferenceUID = frame_of_reference_uid
    return d


def image_point(point_lps, image) -> list[float]:
    """SCOORD image coordinates ``[column, row]`` (the centre of the top-left pixel is ``(0.5, 0.5)``) of the
    patient point ``point_lps`` projected on the single-frame instance ``image``."""
    p = _check_point(point_lps)
    iop = np.asarray([float(x) for x in image.ImageOrientationPatient])
    ipp = np.asarray([float(x) for x in image.ImagePositionPatient])
    dr, dc = (float(x) for x in image.PixelSpacing)
    return [float(np.dot(p - ipp, iop[:3]) / dc + 0.5), float(np.dot(p - ipp, iop[3:]) / dr + 0.5)]


def _image_point(relationship: str, point_lps, image, concept: tuple):
    d = _item(relationship, "SCOORD", concept)
    d.GraphicType = "POINT"
    d.GraphicData = image_point(point_lps, image)
    from pydicom.sequence import Sequence as Seq

    d.ContentSequence = Seq([_image("SELECTED FROM", None, str(image.SOPClassUID), str(image.SOPInstanceUID))])
    return d


# ---------------------------------------------------------------------------------------------------- the report
def write_measurement_report(groups: Sequence[MeasurementGroup], source: Sequence, *, series_description: str,
                             series_number: int = 500, coordinates: str = "3d", series_uid: str | None = None,
                             sop_uid: str | None = None):
    """A TID 1500 report with one measurement group per item of ``groups``, in the study and frame of reference of
    the single-frame ``source`` series (the FLAIR); see the module docstring. ``coordinates="3d"``: a
    Comprehensive 3D SR whose groups hold their point as SCOORD3D; ``"ohif"``: what OHIF 3.10 shows (module
    docstring), a Comprehensive SR whose points are SCOORD on the group's ``image``."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq

    if not groups:
        raise InputError("no measurement group: nothing to report")
    if not source:
        raise InputError("no source images for the report")
    ref = source[0]
    uids = [g.tracking_uid for g in groups]
    if len(set(uids)) != len(uids):
        raise InputError("tracking UIDs of the measurement groups must be unique")
    if coordinates not in COORDINATES:
        raise InputError(f"coordinates must be one of {COORDINATES}, got {coordinates!r}")
    if coordinates == "ohif" and any(g.image is None for g in groups):
        raise InputError("coordinates='ohif' places every point on an image: give each group its image")
    series_uid = series_uid or stable_uid("sr-series", ref.SeriesInstanceUID, series_description, *uids,
                                          coordinates, *[(m.concept[0], m.value) for g in groups for m in g.measurements])
    sop_uid = sop_uid or stable_uid("sr-sop", series_uid)
    now = _dt.datetime.now()
    for_uid = str(ref.FrameOfReferenceUID)

    ds = new_instance(COMPREHENSIVE_3D_SR if coordinates == "3d" else COMPREHENSIVE_SR, sop_uid)
    copy_study_attributes(ds, ref)
    del ds.PositionReferenceIndicator  # no frame of reference module in an SR
    del ds.FrameOfReferenceUID
    declare_private_scheme(ds)
    ds.Modality = "SR"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series_uid, int(series_number), 1
    ds.SeriesDescription = series_description[:64]
    ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.ReferencedPerformedProcedureStepSequence = Seq([])
    set_equipment(ds)
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = Seq([])

    # the root container and its content
    observer = [_codeval("HAS OBS CONTEXT", OBSERVER_TYPE, DEVICE),
                _uidref("HAS OBS CONTEXT", DEVICE_UID, stable_uid("device", "msxai")),
                _text("HAS OBS CONTEXT", DEVICE_NAME, "msxai")]
    library, seen = [], set()
    for g in groups:
        if g.image is not None and str(g.image.SOPInstanceUID) not in seen:
            seen.add(str(g.image.SOPInstanceUID))
            library.append(_image("CONTAINS", None, str(g.image.SOPClassUID), str(g.image.SOPInstanceUID)))
    measurement_groups = []
    for g in groups:
        ohif = coordinates == "ohif"
        items = [_text("CONTAINS", TRACKING_ID, OHIF_ARROW_TRACKING_ID if ohif else g.tracking_id[:64]),
                 _uidref("CONTAINS", TRACKING_UID, g.tracking_uid),  # first UIDREF: OHIF's tracking UID
                 _codeval("CONTAINS", FINDING, _named_finding(g.tracking_id) if ohif else LESION_TYPE)]
        if g.segment is not None:
            s = g.segment
            items.append(_image("CONTAINS", REFERENCED_SEGMENT, s.sop_class_uid, s.sop_instance_uid,
                                s.segment_number))
            items.append(_uidref("CONTAINS", SOURCE_SERIES, str(ref.SeriesInstanceUID)))
        nums = [_num(m) for m in g.measurements if m.value is not None and np.isfinite(m.value)]
        if ohif:
            items.append(_image_point("CONTAINS", g.point_lps, g.image, g.point_concept))
            if nums:  # OHIF hydrates an arrow from the SCOORD its first NUM is inferred from
                nums[0].ContentSequence = Seq([_image_point("INFERRED FROM", g.point_lps, g.image, g.point_concept)])
        else:
            items.append(_point(g.point_lps, for_uid, g.point_concept))
        items.extend(nums)
        measurement_groups.append(_container("CONTAINS", MEASUREMENT_GROUP, items))
    content = [_codeval("HAS CONCEPT MOD", LANGUAGE, ENGLISH_US), *observer,
               _codeval("HAS CONCEPT MOD", PROCEDURE_REPORTED, MR_HEAD)]
    if library:
        content.append(_container("CONTAINS", IMAGE_LIBRARY,
                                  [_container("CONTAINS", IMAGE_LIBRARY_GROUP, library)]))
    content.append(_container("CONTAINS", IMAGING_MEASUREMENTS, measurement_groups))
    root = _container(None, REPORT, content, template="1500")
    for kw in ("ValueType", "ConceptNameCodeSequence", "ContinuityOfContent", "ContentTemplateSequence",
               "ContentSequence"):
        setattr(ds, kw, getattr(root, kw))

    # evidence: every object the content references, by study and series
    by_series: dict[str, list] = {}
    for g in groups:
        if g.image is not None:
            by_series.setdefault(str(ref.SeriesInstanceUID), []).append(
                (str(g.image.SOPClassUID), str(g.image.SOPInstanceUID)))
        if g.segment is not None:
            by_series.setdefault(g.segment.series_instance_uid, []).append(
                (g.segment.sop_class_uid, g.segment.sop_instance_uid))
    if by_series:
        study = Dataset()
        study.StudyInstanceUID = ref.StudyInstanceUID
        series_items = []
        for suid, refs in by_series.items():
            s = Dataset()
            s.SeriesInstanceUID = suid
            sops = []
            for cls, uid in dict.fromkeys(refs):
                r = Dataset()
                r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = cls, uid
                sops.append(r)
            s.ReferencedSOPSequence = Seq(sops)
            series_items.append(s)
        study.ReferencedSeriesSequence = Seq(series_items)
        ds.CurrentRequestedProcedureEvidenceSequence = Seq([study])
    return ds

