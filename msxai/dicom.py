"""NIfTI <-> DICOM for the PACS path (Orthanc + OHIF): MR image series from a volume, and DICOM SEG from a label map.

Geometry
--------
NIfTI affines map voxel indices ``(i, j, k)`` to RAS millimetres; DICOM patient coordinates are LPS, so
``LPS = diag(-1, -1, 1) @ RAS``. A volume becomes one DICOM slice per ``k``: pixel ``(row r, column c)`` of slice
``k`` is voxel ``(i=c, j=r, k)``, so the frame is ``volume[:, :, k].T`` (after :func:`inplane_standard` has flipped
``i``/``j`` to point towards +LPS, the radiological display), ``ImageOrientationPatient`` is the LPS
direction of the ``i`` axis (along a row) then of the ``j`` axis (down a column), ``PixelSpacing`` is
``[spacing_j, spacing_i]`` (row spacing first) and ``ImagePositionPatient`` is the LPS position of voxel
``(0, 0, k)``. SimpleITK/GDCM (what MONAI Label's DICOMweb datastore uses to read a series back) gives the same
affine.

A SEG is written on the frames of its source series: every source instance is mapped onto the label map's grid
(:func:`source_voxel_indices`), which must hold its every pixel at an integer voxel (the label map must be on the
source series' grid); frames are the binary masks of each segment on each source slice where the segment is present
(empty frames are left out, as dcmqi does). Segments are numbered 1..n in the order given.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from msxai.errors import GeometryError, InputError

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root for generated UIDs
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
GEOMETRY_TOL_VOXEL = 1e-3

# coded concepts of the segments
LESION_CATEGORY = ("49755003", "SCT", "Morphologically abnormal structure")
LESION_TYPE = ("52988006", "SCT", "Lesion")
# saliency bins have no standard code: a private coding scheme ("99" prefix, DICOM PS3.16 8.2)
MSXAI_SCHEME = "99MSXAI"
SALIENCY_CATEGORY = ("SALIENCY", MSXAI_SCHEME, "Saliency (msxai)")


def _new_file_dataset(meta):
    """A dataset as a file: ``pydicom.dcmwrite(fp, ds)`` (what dicomweb-client's STOW-RS uses) writes the dataset's
    own preamble and file meta as they are, and readers need the 128-byte preamble + ``DICM`` (pydicom without
    ``force``) and the meta's group length and version (dcmjs, which OHIF loads SEG with): all are set here."""
    from pydicom.dataset import FileDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)  # adds FileMetaInformationGroupLength/Version to meta
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    return ds


def new_instance(sop_class_uid: str, sop_uid: str):
    """An empty file dataset of ``sop_class_uid`` (explicit VR little endian, preamble and file meta set) with its
    SOP Common attributes; shared by the SEG, Parametric Map (:mod:`msxai.dicom_pmap`) and SR (:mod:`msxai.dicom_sr`)
    writers."""
    from pydicom.dataset import FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class_uid, sop_uid
    meta.TransferSyntaxUID, meta.ImplementationClassUID = EXPLICIT_VR_LITTLE_ENDIAN, UID_ROOT + "1"
    ds = _new_file_dataset(meta)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, sop_uid
    return ds


STUDY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                  "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription",
                  "FrameOfReferenceUID")


def copy_study_attributes(ds, ref) -> None:
    """Patient, study and frame of reference of the source instance ``ref`` (a derived object joins its study)."""
    for kw in STUDY_KEYWORDS:
        setattr(ds, kw, getattr(ref, kw, "") or "")
    ds.PositionReferenceIndicator = ""


def declare_private_scheme(ds) -> None:
    """Coding Scheme Identification of msxai's private coding scheme (SOP Common), for objects that use it."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq

    item = Dataset()
    item.CodingSchemeDesignator = MSXAI_SCHEME
    item.CodingSchemeName = "msxai private codes (saliency quantities and bins)"
    item.CodingSchemeResponsibleOrganization = "msxai"
    ds.CodingSchemeIdentificationSequence = Seq([item])


def stable_uid(*parts: object) -> str:
    """A UID that depends only on ``parts`` (so re-storing the same object overwrites instead of duplicating)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=UID_ROOT, entropy_srcs=[str(p) for p in parts]))


# ----------------------------------------------------------------------------------------------------- geometry
def lps_affine(affine_ras: np.ndarray) -> np.ndarray:
    return RAS_TO_LPS @ np.asarray(affine_ras, dtype=np.float64)


def slice_geometry(affine_ras: np.ndarray) -> dict:
    """IOP, PixelSpacing, slice thickness and the LPS position of each slice origin of a NIfTI affine.

    Refuses affines whose slice axis is not perpendicular to the slice plane (DICOM MR images cannot carry shear)."""
    a = lps_affine(affine_ras)
    ci, cj, ck = a[:3, 0], a[:3, 1], a[:3, 2]
    si, sj, sk = (float(np.linalg.norm(v)) for v in (ci, cj, ck))
    if min(si, sj, sk) <= 0:
        raise GeometryError("affine has a zero-length voxel axis")
    row, col = ci / si, cj / sj
    normal = np.cross(row, col)
    if abs(float(np.dot(row, col))) > 1e-4 or abs(abs(float(np.dot(ck / sk, normal))) - 1) > 1e-4:
        raise GeometryError("affine is sheared (voxel axes not orthogonal): cannot write DICOM MR slices")
    return {"iop": [*row.tolist(), *col.tolist()], "pixel_spacing": [sj, si], "thickness": sk, "lps": a,
            "normal": normal}


def inplane_standard(volume: np.ndarray, affine_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image with its first two voxel axes flipped where needed so that each points towards the positive
    LPS direction it is closest to (axial slices: rows run to the patient's left, columns to posterior, i.e. the
    radiological display of viewers that show slices as stored). Only the storage order changes, not the voxels'
    positions."""
    vol = np.asarray(volume)
    a = np.asarray(affine_ras, dtype=np.float64).copy()
    lps = lps_affine(a)
    for ax in (0, 1):
        d = lps[:3, ax]
        if d[int(np.argmax(np.abs(d)))] < 0:
            vol = np.flip(vol, axis=ax)
            a[:3, 3] = a[:3, 3] + a[:3, ax] * (vol.shape[ax] - 1)
            a[:3, ax] = -a[:3, ax]
            lps = lps_affine(a)
    return np.ascontiguousarray(vol), a


def dataset_affine(datasets: Sequence) -> tuple[np.ndarray, list]:
    """The RAS affine of a single-frame series (sorted along its normal) and the datasets in that order."""
    if not datasets:
        raise InputError("empty DICOM series")
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    ordered = sorted(datasets, key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, float))))
    ps = [float(x) for x in ordered[0].PixelSpacing]
    p0 = np.asarray(ordered[0].ImagePositionPatient, dtype=np.float64)
    if len(ordered) > 1:
        step = (np.asarray(ordered[-1].ImagePositionPatient, float) - p0) / (len(ordered) - 1)
    else:
        step = normal * float(getattr(ordered[0], "SliceThickness", 1.0) or 1.0)
    a = np.eye(4)
    a[:3, 0] = row * ps[1]
    a[:3, 1] = col * ps[0]
    a[:3, 2] = step
    a[:3, 3] = p0
    return RAS_TO_LPS @ a, ordered


def source_voxel_indices(ds, affine_ras: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Voxel indices ``(I, J, K)``, each ``[Rows, Columns]``, of every pixel of the single-frame instance ``ds`` on the
    grid ``(affine_ras, shape)``; :class:`GeometryError` if a pixel is off the grid (non-integer or outside)."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    ipp = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
    dr, dc = (float(x) for x in ds.PixelSpacing)  # row spacing (between rows), column spacing
    rows, cols = int(ds.Rows), int(ds.Columns)
    inv = np.linalg.inv(lps_affine(affine_ras))
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    lps = ipp[:, None, None] + iop[:3, None, None] * (c * dc) + iop[3:, None, None] * (r * dr)
    vox = np.einsum("ij,jrc->irc", inv[:3, :3], lps) + inv[:3, 3][:, None, None]
    idx = np.rint(vox)
    if np.abs(vox - idx).max() > GEOMETRY_TOL_VOXEL * max(1.0, float(np.abs(vox).max()) / 100):
        raise GeometryError(
            f"DICOM instance {getattr(ds, 'SOPInstanceUID', '?')} does not lie on the label map's voxel grid "
            f"(largest offset {np.abs(vox - idx).max():.3g} voxel); the label map must be on the source series' grid"
        )
    idx = idx.astype(np.int64)
    for ax in range(3):
        if idx[ax].min() < 0 or idx[ax].max() >= shape[ax]:
            raise GeometryError(
                f"DICOM instance {getattr(ds, 'SOPInstanceUID', '?')} lies outside the label map "
                f"(axis {ax}: indices {idx[ax].min()}..{idx[ax].max()}, size {shape[ax]})"
            )
    return idx[0], idx[1], idx[2]


# ------------------------------------------------------------------------------------------------- MR series
@dataclass
class StudyInfo:
    """Patient/study attributes shared by the series of one study."""

    patient_id: str = "MSXAI-SYNTH-001"
    patient_name: str = "Synthetic^Patient"
    study_uid: str = ""
    study_id: str = "1"
    study_description: str = "msxai synthetic MS study"
    accession: str = ""
    frame_of_reference_uid: str = ""
    date: str = field(default_factory=lambda: _dt.date.today().strftime("%Y%m%d"))

    def __post_init__(self):
        if not self.study_uid:
            self.study_uid = stable_uid("study", self.patient_id, self.study_description)
        if not self.frame_of_reference_uid:
            self.frame_of_reference_uid = stable_uid("for", self.study_uid)


def _quantise(volume: np.ndarray) -> tuple[np.ndarray, float, float]:
    """uint16 pixels with RescaleSlope/Intercept reproducing ``volume`` to within slope/2."""
    v = np.asarray(volume, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise InputError("volume has NaN/inf voxels: cannot write DICOM")
    lo, hi = float(v.min()), float(v.max())
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    q = np.rint((v - lo) / slope).clip(0, 65535).astype(np.uint16)
    return q, slope, lo


def _ds(x: float) -> str:
    """A DS string (at most 16 characters)."""
    s = f"{x:.10g}"
    return s if len(s) <= 16 else f"{x:.6e}"


def volume_to_mr_series(volume: np.ndarray, affine: np.ndarray, study: StudyInfo, series_description: str,
                        series_number: int, series_uid: str | None = None) -> list:
    """One MR Image Storage dataset per slice ``k`` of ``volume`` ``[X, Y, Z]`` (RAS ``affine``), in slice order."""
    from pydicom.dataset import Dataset, FileMetaDataset

    volume = np.asarray(volume)
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise InputError(f"expected a 3D volume, got shape {volume.shape}")
    volume, affine = inplane_standard(volume, affine)
    geo = slice_geometry(affine)
    q, slope, intercept = _quantise(volume)
    # the content is part of the UID: another volume never overwrites some of this one's instances
    series_uid = series_uid or stable_uid("series", study.study_uid, series_description, series_number,
                                          content_hash(volume, np.asarray(affine, np.float64)))
    lo, hi = np.percentile(volume[volume > volume.min()] if np.any(volume > volume.min()) else volume, [1, 99.5])
    now = _dt.datetime.now().strftime("%H%M%S")
    out = []
    for k in range(volume.shape[2]):
        sop_uid = stable_uid("sop", series_uid, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = EXPLICIT_VR_LITTLE_ENDIAN
        meta.ImplementationClassUID = UID_ROOT + "1"
        ds = _new_file_dataset(meta)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, sop_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now
        ds.AccessionNumber = study.accession
        ds.Modality = "MR"
        ds.Manufacturer = "msxai"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study.study_description
        ds.SeriesDescription = series_description
        ds.PatientName, ds.PatientID = study.patient_name, study.patient_id
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study.study_uid, series_uid
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = study.study_id, int(series_number), k + 1
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = study.frame_of_reference_uid, ""
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "RM", "NONE", ""
        ds.MRAcquisitionType = "3D"
        ds.EchoTime = ds.RepetitionTime = ds.EchoTrainLength = None
        ds.ProtocolName = series_description
        pos = geo["lps"] @ np.array([0.0, 0.0, float(k), 1.0])
        ds.ImagePositionPatient = [_ds(x) for x in pos[:3]]
        ds.ImageOrientationPatient = [_ds(x) for x in geo["iop"]]
        ds.PixelSpacing = [_ds(x) for x in geo["pixel_spacing"]]
        ds.SliceThickness = ds.SpacingBetweenSlices = _ds(geo["thickness"])
        ds.SliceLocation = _ds(float(np.dot(geo["normal"], pos[:3])))
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _ds(intercept), _ds(slope), "US"
        ds.WindowCenter, ds.WindowWidth = _ds((lo + hi) / 2), _ds(max(hi - lo, 1e-6))
        ds.PixelData = np.ascontiguousarray(q[:, :, k].T).tobytes()
        out.append(ds)
    return out


def study_from_nifti(flair_path, t1_path, study: StudyInfo | None = None) -> dict[str, list]:
    """The FLAIR and T1 NIfTIs of one subject as two MR series (SeriesDescription ``FLAIR`` and ``T1``) of one
    study; both must be on the same grid (one frame of reference)."""
    from msxai.io import load_pair

    image, affine = load_pair(flair_path, t1_path)  # checks files, grids, NaN
    study = study or StudyInfo()
    return {
        "FLAIR": volume_to_mr_series(image[0], affine, study, "FLAIR", 1),
        "T1": volume_to_mr_series(image[1], affine, study, "T1", 2),
    }


def write_series(datasets: Iterable, folder) -> list:
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        p = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(str(p), write_like_original=False)
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------------------------------------- SEG
@dataclass
class Segment:
    value: int  # the label map value
    label: str  # SegmentLabel (LO, <= 64 characters)
    category: tuple = LESION_CATEGORY
    type: tuple = LESION_TYPE
    rgb: tuple = (255, 0, 0)
    description: str = ""


def _code(code: tuple):
    from pydicom.dataset import Dataset

    d = Dataset()
    d.CodeValue, d.CodingSchemeDesignator, d.CodeMeaning = code[0], code[1], str(code[2])[:64]
    return d


def rgb_to_dicom_lab(rgb: Sequence[int]) -> list[int]:
    """sRGB (0-255) -> DICOM CIELab (PS3.3 C.10.7.1.1: L* 0..100 -> 0..65535, a*/b* -128..127 -> 0..65535), D65."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = m @ c / m.sum(axis=1)  # D65 white of this matrix: white maps to L* = 100, a* = b* = 0 exactly
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    L, a, b = 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])
    return [int(round(L * 65535 / 100)), int(round((a + 128) * 65535 / 255)), int(round((b + 128) * 65535 / 255))]


def lesion_segments(label_names: Mapping[str, int]) -> list[Segment]:
    colours = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
    return [Segment(int(v), str(n), LESION_CATEGORY, LESION_TYPE, colours[i % len(colours)])
            for i, (n, v) in enumerate(sorted(label_names.items(), key=lambda kv: kv[1]))]


# display colours of the saliency bins (value of msxai.labelmaps' fixed layout)
SALIENCY_RGB = {1: (255, 255, 255), 2: (215, 25, 28), 3: (253, 174, 97), 4: (171, 217, 233), 5: (44, 123, 182)}


def saliency_segments(label_names: Mapping[str, int]) -> list[Segment]:
    segs = []
    for name, v in sorted(label_names.items(), key=lambda kv: kv[1]):
        v = int(v)
        code = ("OUTLINE" if v == 1 else f"BIN{v}", MSXAI_SCHEME, str(name)[:64])
        segs.append(Segment(v, str(name), SALIENCY_CATEGORY, code, SALIENCY_RGB.get(v, (128, 128, 128))))
    return segs


def write_seg(labels: np.ndarray, affine: np.ndarray, source: Sequence, segments: Sequence[Segment], *,
              series_description: str, series_number: int = 300, algorithm: str = "msxai",
              series_uid: str | None = None, sop_uid: str | None = None, content_label: str = "MSXAI",
              content_description: str = ""):
    """A binary DICOM SEG of ``labels`` ``[X, Y, Z]`` (RAS ``affine``) on the frames of the single-frame ``source``
    series. Segments whose value is absent from ``labels`` are left out; at least one must be present."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq

    labels = np.asarray(labels)
    if labels.ndim == 4 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.ndim != 3:
        raise InputError(f"label map must be 3D, got shape {labels.shape}")
    if not source:
        raise InputError("no source images for the SEG")
    _, source = dataset_affine(list(source))
    grids = [source_voxel_indices(ds, affine, labels.shape) for ds in source]
    present = [s for s in segments if np.any(labels == s.value)]
    if not present:
        raise InputError("the label map holds none of the segments' values: nothing to write as SEG")
    ref = source[0]
    series_uid = series_uid or stable_uid("seg-series", ref.SeriesInstanceUID, series_description, content_hash(labels))
    sop_uid = sop_uid or stable_uid("seg-sop", series_uid)
    now = _dt.datetime.now()

    ds = new_instance(SEGMENTATION_STORAGE, sop_uid)
    copy_study_attributes(ds, ref)
    ds.Modality = "SEG"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series_uid, int(series_number), 1
    ds.SeriesDescription = series_description[:64]
    ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    set_equipment(ds)
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.ContentLabel = content_label.upper()[:16]
    ds.ContentDescription = (content_description or series_description)[:64]
    ds.ContentCreatorName = "msxai^"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(ref.Rows), int(ref.Columns)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.LossyImageCompression = "00"
    ds.SegmentationType = "BINARY"

    seg_seq = []
    for n, s in enumerate(present, start=1):
        item = Dataset()
        item.SegmentNumber = n
        item.SegmentLabel = s.label[:64]
        if s.description:
            item.SegmentDescription = s.description[:64]
        item.SegmentAlgorithmType = "AUTOMATIC"
        item.SegmentAlgorithmName = algorithm[:64]
        item.SegmentedPropertyCategoryCodeSequence = Seq([_code(s.category)])
        item.SegmentedPropertyTypeCodeSequence = Seq([_code(s.type)])
        item.RecommendedDisplayCIELabValue = rgb_to_dicom_lab(s.rgb)
        seg_seq.append(item)
    ds.SegmentSequence = Seq(seg_seq)

    dim_uid = stable_uid("dim", series_uid)
    org = Dataset()
    org.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = Seq([org])
    ds.DimensionOrganizationType = "3D"
    d1, d2 = Dataset(), Dataset()
    d1.DimensionOrganizationUID = d2.DimensionOrganizationUID = dim_uid
    d1.DimensionIndexPointer, d1.FunctionalGroupPointer = 0x0062000B, 0x0062000A
    d1.DimensionDescriptionLabel = "ReferencedSegmentNumber"
    d2.DimensionIndexPointer, d2.FunctionalGroupPointer = 0x00200032, 0x00209113
    d2.DimensionDescriptionLabel = "ImagePositionPatient"
    ds.DimensionIndexSequence = Seq([d1, d2])

    ds.SharedFunctionalGroupsSequence = Seq([shared_plane_groups(ref)])

    frames, per_frame = [], []
    for n, s in enumerate(present, start=1):
        for z, (src, (I, J, K)) in enumerate(zip(source, grids), start=1):
            mask = labels[I, J, K] == s.value
            if not mask.any():
                continue
            frames.append(mask)
            fg = source_frame_group(src, ("113076", "DCM", "Segmentation"), [n, z])
            si = Dataset()
            si.ReferencedSegmentNumber = n
            fg.SegmentIdentificationSequence = Seq([si])
            per_frame.append(fg)
    ds.PerFrameFunctionalGroupsSequence = Seq(per_frame)
    ds.NumberOfFrames = len(frames)
    bits = np.packbits(np.stack(frames).astype(np.uint8).ravel(), bitorder="little").tobytes()
    ds.PixelData = bits + (b"\0" if len(bits) % 2 else b"")

    ds.ReferencedSeriesSequence = referenced_series_sequence(source)
    return ds


# --------------------------------------------------------------------- shared by the multi-frame derived objects
def set_equipment(ds) -> None:
    """General / Enhanced General Equipment of msxai's derived objects (SEG, Parametric Map, SR)."""
    import msxai

    ds.Manufacturer, ds.ManufacturerModelName = "msxai", "msxai"
    ds.DeviceSerialNumber, ds.SoftwareVersions = "0", str(getattr(msxai, "__version__", "0"))


def shared_plane_groups(ref):
    """Shared functional group item of frames on the source instance ``ref``'s plane: orientation and pixel
    measures copied from it."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq

    shared, po, pm = Dataset(), Dataset(), Dataset()
    po.ImageOrientationPatient = list(ref.ImageOrientationPatient)
    pm.PixelSpacing = list(ref.PixelSpacing)
    pm.SliceThickness = getattr(ref, "SliceThickness", None) or _ds(1.0)
    if getattr(ref, "SpacingBetweenSlices", None):
        pm.SpacingBetweenSlices = ref.SpacingBetweenSlices
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Seq([po]), Seq([pm])
    return shared


def source_frame_group(src, derivation: tuple, index_values: Sequence[int]):
    """Per-frame functional group item of a frame lying on the source instance ``src``: its derivation (the source
    by UID, ``derivation`` code), its dimension index values and its position (that of ``src``)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq

    fg, der, srci = Dataset(), Dataset(), Dataset()
    srci.ReferencedSOPClassUID, srci.ReferencedSOPInstanceUID = src.SOPClassUID, src.SOPInstanceUID
    srci.PurposeOfReferenceCodeSequence = Seq([_code(("121322", "DCM", "Source image for image processing operation"))])
    der.SourceImageSequence = Seq([srci])
    der.DerivationCodeSequence = Seq([_code(derivation)])
    fg.DerivationImageSequence = Seq([der])
    fc, pp = Dataset(), Dataset()
    fc.DimensionIndexValues = [int(v) for v in index_values]
    pp.ImagePositionPatient = list(src.ImagePositionPatient)
    fg.FrameContentSequence, fg.PlanePositionSequence = Seq([fc]), Seq([pp])
    return fg


def referenced_series_sequence(source: Sequence):
    """Common Instance Reference: the source series and every one of its instances."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq

    rs, inst = Dataset(), []
    rs.SeriesInstanceUID = source[0].SeriesInstanceUID
    for src in source:
        r = Dataset()
        r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = src.SOPClassUID, src.SOPInstanceUID
        inst.append(r)
    rs.ReferencedInstanceSequence = Seq(inst)
    return Seq([rs])


def read_seg_frames(seg) -> np.ndarray:
    """The binary frames ``[NumberOfFrames, Rows, Columns]`` (uint8) of a BINARY SEG."""
    n, r, c = int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns)
    bits = np.unpackbits(np.frombuffer(seg.PixelData, dtype=np.uint8), bitorder="little")
    return bits[: n * r * c].reshape(n, r, c)


def content_hash(*arrays: np.ndarray) -> str:
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
