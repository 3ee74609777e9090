"""Independent readers of the DICOM objects msxai writes (Parametric Map, SR), for the tests: written from the DICOM
standard (pixel position = IPP + column * column spacing * row direction + row * row spacing * column direction,
true value = slope * stored + intercept), sharing no code with msxai.dicom*; and Python twins of what OHIF 3.10's
bundled JavaScript does with them (read from the monailabel wheel's static OHIF build)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np

DCIODVFY = shutil.which("dciodvfy")


def affine(kind: str) -> np.ndarray:
    """Test geometries: the synthetic cohort's LAS orientation, RAS, and an oblique anisotropic grid."""
    a = np.eye(4)
    if kind == "las":
        a[:3, :3] = np.diag([-1.5, 2.0, 2.5])
    elif kind == "ras":
        a[:3, :3] = np.diag([1.0, 1.2, 3.0])
    else:
        c, s = np.cos(0.5), np.sin(0.5)
        rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]])
        a[:3, :3] = rz @ rx @ np.diag([0.9, 1.1, 2.0])
    a[:3, 3] = [-20.0, 13.0, 7.5]
    return a


def pm_volume(pm, affine_ras: np.ndarray, shape) -> np.ndarray:
    """The true (real-world) values of a float Parametric Map placed on the grid ``affine_ras``/``shape`` by the
    physical position of every pixel of every frame; NaN where no frame lies."""
    n, rows, cols = int(pm.NumberOfFrames), int(pm.Rows), int(pm.Columns)
    stored = np.frombuffer(pm.FloatPixelData, dtype="<f4").reshape(n, rows, cols)
    shared = pm.SharedFunctionalGroupsSequence[0]
    iop = np.array([float(x) for x in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    row_spacing, col_spacing = (float(x) for x in shared.PixelMeasuresSequence[0].PixelSpacing)
    rwv = shared.RealWorldValueMappingSequence[0]
    slope, intercept = float(rwv.RealWorldValueSlope), float(rwv.RealWorldValueIntercept)
    inv = np.linalg.inv(affine_ras)
    out = np.full(tuple(shape), np.nan)
    r, c = np.mgrid[0:rows, 0:cols]
    for f, fg in enumerate(pm.PerFrameFunctionalGroupsSequence):
        ipp = np.array([float(x) for x in fg.PlanePositionSequence[0].ImagePositionPatient])
        lps = ipp[None, None, :] + (c * col_spacing)[..., None] * iop[:3] + (r * row_spacing)[..., None] * iop[3:]
        ras = lps * np.array([-1.0, -1.0, 1.0])
        vox = ras @ inv[:3, :3].T + inv[:3, 3]
        idx = np.rint(vox).astype(int)
        assert np.abs(vox - idx).max() < 1e-3, "a PM pixel is off the voxel grid"
        assert np.isnan(out[idx[..., 0], idx[..., 1], idx[..., 2]]).all(), "two frames on one voxel"
        out[idx[..., 0], idx[..., 1], idx[..., 2]] = stored[f] * slope + intercept
    return out


def ohif_pmap_volume(pm, source, fixed: bool = True) -> np.ndarray:
    """What OHIF 3.10 puts in a PM's volume: the cornerstone adapter's ``insertPixelDataPlanar`` copies frame ``i``
    to the slice index of its source image in the referenced volume (whose images cornerstone's
    ``sortImageIdsAndGetSpacing`` orders by ascending position along ``cross(row, column)``), then OHIF multiplies
    by 100 and ``setCompleteScalarDataArray`` fills the volume (slices beyond the buffer stay 0). ``fixed=False``: the
    bundled code as it is (frame ``i`` read at the *byte* offset ``i * rows * columns``, a buffer of
    ``NumberOfFrames`` slices); ``fixed=True``: with apps/msxai/lib/ohif_fixes.py's two fixes. Returns
    ``[slices, rows, cols]`` in that order; raises ``IndexError`` where the JavaScript raises a RangeError."""
    n, rows, cols = int(pm.NumberOfFrames), int(pm.Rows), int(pm.Columns)
    raw = bytes(pm.FloatPixelData)
    data = np.frombuffer(raw, dtype="<f4")
    iop = np.array([float(x) for x in source[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    order = sorted(source, key=lambda d: float(np.dot(normal, np.array([float(x) for x in d.ImagePositionPatient]))))
    index = {str(d.SOPInstanceUID): i for i, d in enumerate(order)}
    sl = rows * cols
    target = np.zeros((len(order) if fixed else n) * sl, dtype=np.float32)
    for i, fg in enumerate(pm.PerFrameFunctionalGroupsSequence):
        if fixed:
            frame = data[i * sl:(i + 1) * sl]
        else:  # new Float32Array(buffer, i * sliceLength, sliceLength): byte offset i * sl
            if (i * sl) % 4:
                raise IndexError(f"frame {i}: byte offset {i * sl} is not a multiple of 4 (RangeError in OHIF)")
            frame = np.frombuffer(raw, dtype="<f4", count=sl, offset=i * sl)
        uid = str(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        k = index[uid]
        if (k + 1) * sl > target.size:
            raise IndexError(f"frame {i}: source slice {k} is beyond the {target.size // sl}-slice buffer (RangeError)")
        target[k * sl:(k + 1) * sl] = frame
    volume = np.zeros((len(order), rows, cols), dtype=np.float32)
    flat = (target * 100).reshape(-1, rows, cols)[: len(order)]
    volume[: flat.shape[0]] = flat
    return volume


def sr_items(item, concept: str | None = None, value_type: str | None = None) -> list:
    """Children of an SR content item (or of the document) with the given concept code value / value type."""
    return [c for c in getattr(item, "ContentSequence", [])
            if (concept is None or ("ConceptNameCodeSequence" in c and c.ConceptNameCodeSequence[0].CodeValue == concept))
            and (value_type is None or c.ValueType == value_type)]


def ohif_sr_measurements(sr) -> list[dict]:
    """OHIF 3.10's ``_getMeasurements`` (extension cornerstone-dicom-sr) in Python: groups of the Imaging
    Measurements container (126010) named Measurement Group (125007), merged by the UID of the tracking unique
    identifier item (112040); a group with a SCOORD/SCOORD3D item becomes a measurement whose tracking UID is the
    *first* UIDREF item, whose coordinates are that item's and whose labels are its NUM items."""
    meas = [c for c in sr.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "126010"]
    if not meas:
        return []
    merged: dict[str, list] = {}
    for g in meas[0].ContentSequence:
        if g.ConceptNameCodeSequence[0].CodeValue != "125007":
            continue
        uid_item = [c for c in g.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "112040"]
        merged.setdefault(str(uid_item[0].UID), []).extend(g.ContentSequence)
    out = []
    for items in merged.values():
        graphic = [c for c in items if c.ValueType in ("SCOORD", "SCOORD3D")]
        if not graphic:
            out.append(None)  # OHIF: a measurement without coordinates (not drawn, crashes the 3D SR path)
            continue
        uidref = [c for c in items if c.ValueType == "UIDREF"][0]
        tid = [c for c in items if c.ConceptNameCodeSequence[0].CodeValue == "112039"][0]
        out.append({"TrackingUniqueIdentifier": str(uidref.UID), "TrackingIdentifier": str(tid.TextValue),
                    "ValueType": graphic[0].ValueType, "GraphicType": str(graphic[0].GraphicType),
                    "GraphicData": [float(x) for x in graphic[0].GraphicData],
                    "FrameOfReference": str(getattr(graphic[0], "ReferencedFrameOfReferenceUID", "")),
                    "labels": [(str(c.ConceptNameCodeSequence[0].CodeMeaning),
                                float(c.MeasuredValueSequence[0].NumericValue)) for c in items if c.ValueType == "NUM"]})
    return out


def ohif_hydrated_rows(sr, instances: dict) -> list[dict]:
    """OHIF 3.10's hydration of an SR (cornerstone adapters' ``MeasurementReport.generateToolState`` with
    ``ArrowAnnotate.getMeasurementData``, then OHIF's ArrowAnnotate measurement mapping) in Python: a group becomes a
    measurement-panel row when its tracking identifier is ``Cornerstone3DTools@^0.1.0:ArrowAnnotate``; the row's
    label (``mapMeasurementToDisplay``: text, else the finding's meaning unless its scheme is ``CORNERSTONEJS``) is
    the Finding's meaning; its point the SCOORD the first NUM item holds,
    on the image that SCOORD references (``instances``: SOP Instance UID -> dataset). Returns the rows with the
    point in patient coordinates (cornerstone's ``imageToWorldCoords``)."""
    if sr.ContentTemplateSequence[0].TemplateIdentifier != "1500":
        raise ValueError("This package can currently only interpret DICOM SR TID 1500")
    meas = [c for c in sr.ContentSequence if c.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements"][0]
    rows = []
    for g in meas.ContentSequence:
        if g.ConceptNameCodeSequence[0].CodeMeaning != "Measurement Group":
            continue
        tid = [c for c in g.ContentSequence if c.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier"][0]
        if str(tid.TextValue) != "Cornerstone3DTools@^0.1.0:ArrowAnnotate":
            continue
        finding = [c for c in g.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "121071"]
        code = finding[0].ConceptCodeSequence[0] if finding else None
        num = [c for c in g.ContentSequence if c.ValueType == "NUM"][0]
        scoord = [c for c in num.ContentSequence if c.ValueType == "SCOORD"][0]
        sop = str(scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        img = instances[sop]
        col, row = (float(x) for x in scoord.GraphicData[:2])
        iop = np.array([float(x) for x in img.ImageOrientationPatient])
        ipp = np.array([float(x) for x in img.ImagePositionPatient])
        dr, dc = (float(x) for x in img.PixelSpacing)
        text = str(code.CodeMeaning) if code is not None and code.CodeValue == "CORNERSTONEFREETEXT" else None
        if text is None and code is not None and code.CodingSchemeDesignator != "CORNERSTONEJS":
            text = str(code.CodeMeaning)
        rows.append({"label": text or "(empty)", "SOPInstanceUID": sop,
                     # DICOM SCOORD: the centre of the top-left pixel is (0.5, 0.5)
                     "point": ipp + (col - 0.5) * dc * iop[:3] + (row - 0.5) * dr * iop[3:]})
    return rows


def dciodvfy_errors(ds, tmp_path) -> tuple[list[str], str]:
    """``(error lines, whole output)`` of dicom3tools' dciodvfy on the dataset written as a file."""
    p = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(str(p), write_like_original=False)
    r = subprocess.run([DCIODVFY, str(p)], capture_output=True, text=True, timeout=120)
    text = r.stdout + r.stderr
    return [line for line in text.splitlines() if line.startswith("Error")], text
