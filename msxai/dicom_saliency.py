"""An explanation (the output of an explain request) as DICOM objects for a PACS: the float saliency maps as
Parametric Maps (:mod:`msxai.dicom_pmap`) and the per-lesion summary as a TID 1500 SR (:mod:`msxai.dicom_sr`).

Inputs are what the MONAI Label app's ``StudyService.explain_request`` (``apps/msxai/lib/service.py``) saves beside the
study: the float32 maps
``<domain>_smoothgrad_flair.nii.gz`` / ``<domain>_smoothgrad_mprage.nii.gz`` (SmoothGrad) or
``<domain>_gradcampp.nii.gz`` (Grad-CAM++), as :func:`msxai.saliency.engine.write_explanation` writes them, the app's
domain masks ``<domain>_domain.nii.gz`` and the result JSON (its ``summary`` per domain).

* Parametric Maps: per domain, per map (FLAIR, MPRAGE or CAM), the positive and the negative part (each its own
  series, see :mod:`msxai.dicom_pmap`); for at most ``max_pm_domains`` domains per request (a request for all
  lesions of a study would otherwise store hundreds of series), the others are listed as skipped.
* SR: one measurement group per domain: tracking identifier = the domain's name (``lesion 3``), a tracking UID that
  depends on the domain, the method and the study, a POINT at the saliency peak in the domain (the voxel of the
  domain where the first map, FLAIR SmoothGrad or the CAM, has its largest magnitude), the lesion's segment of the
  lesion SEG when given, and the measurements of the summary: volume, mean lesion probability, error score (when
  the bundle's error flag gave one) and, per map, the peak maximum / minimum in the domain, the positive / negative
  mass in the domain and the positive / negative mass of every ring around it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from msxai.dicom import MSXAI_SCHEME, dataset_affine, lps_affine, stable_uid
from msxai.dicom_pmap import saliency_parametric_maps
from msxai.dicom_sr import MM3, VOLUME, Measurement, MeasurementGroup, SegmentReference, write_measurement_report
from msxai.errors import InputError

MAX_PM_DOMAINS = 8
# maps of each method: (map name = summary key and file suffix ``<domain>_<map>.nii.gz``, short name, code prefix)
METHOD_MAPS = {
    "smoothgrad": (("smoothgrad_flair", "FLAIR", "F"), ("smoothgrad_mprage", "MPRAGE", "M")),
    "gradcampp": (("gradcampp", "CAM", "C"),),
}
METHOD_NAMES = {"smoothgrad": "SmoothGrad", "gradcampp": "Grad-CAM++"}
PEAK = ("SALPEAK", MSXAI_SCHEME, "Saliency peak in the lesion")


def _private(code: str, meaning: str) -> tuple:
    return (code, MSXAI_SCHEME, meaning[:64])


def summary_measurements(summary: Mapping, method: str) -> list[Measurement]:
    """The measurements of a domain's summary (:func:`msxai.saliency.summary.lesion_summary` + error score)."""
    out = [Measurement(VOLUME, float(summary["domain_volume_mm3"]), MM3)]
    if summary.get("mean_probability") is not None:
        out.append(Measurement(_private("MEANPROB", "Mean lesion probability in the lesion"),
                               float(summary["mean_probability"])))
    if summary.get("error_score") is not None:
        out.append(Measurement(_private("ERRSCORE", "Segmentation error score (error flag)"),
                               float(summary["error_score"])))
    label = METHOD_NAMES[method]
    maps = [(short, c, (summary.get("maps") or {}).get(key)) for key, short, c in METHOD_MAPS[method]]
    maps = [(short, c, s) for short, c, s in maps if s is not None]
    for short, c, s in maps:  # masses first: OHIF's SR viewport shows the first five numbers beside the point
        out += [Measurement(_private(f"{c}.POSMASS", f"{short} {label} positive mass in the lesion"),
                            s["positive_mass_in_domain"]),
                Measurement(_private(f"{c}.NEGMASS", f"{short} {label} negative mass in the lesion"),
                            s["negative_mass_in_domain"])]
    for short, c, s in maps:
        out += [
            Measurement(_private(f"{c}.PMAXIN", f"{short} {label} peak maximum in the lesion"), s["peak_max_in_domain"]),
            Measurement(_private(f"{c}.PMININ", f"{short} {label} peak minimum in the lesion"), s["peak_min_in_domain"]),
        ]
        for r in s.get("rings") or []:
            band = f"{r['from_mm']:g}-{r['to_mm']:g}"
            out += [Measurement(_private(f"{c}.R{band}.POS", f"{short} {label} positive mass in ring {band} mm"),
                                r["positive_mass"]),
                    Measurement(_private(f"{c}.R{band}.NEG", f"{short} {label} negative mass in ring {band} mm"),
                                r["negative_mass"])]
    return out


def lesion_segment_numbers(seg) -> dict[int, int]:
    """``{lesion id: segment number}`` of a lesion SEG written by msxai (labels ``lesion k`` / ``lesion k (v mm3)``)."""
    out = {}
    for s in getattr(seg, "SegmentSequence", []):
        m = re.fullmatch(r"lesion (\d+)(?: \(.*\))?", str(s.SegmentLabel))
        if m:
            out[int(m.group(1))] = int(s.SegmentNumber)
    return out


def _load(path: Path, what: str):
    from msxai.io import load_volume

    if not path.is_file():
        raise InputError(f"{what} of the explanation not found: {path.name}")
    v = load_volume(path, what, dtype=np.float32)
    return np.asarray(v.array), np.asarray(v.affine, dtype=np.float64)


def explain_dicom(run_dir, result: Mapping, source: Sequence, *, lesion_seg=None, margin: int | None = None,
                  coordinates: str = "ohif", max_pm_domains: int = MAX_PM_DOMAINS, series_number: int = 400,
                  sink: Callable | None = None) -> dict:
    """The Parametric Maps and the SR of the explanation saved in ``run_dir`` (``result``: its JSON) on the
    single-frame ``source`` series (the FLAIR it was computed on). ``lesion_seg``: the lesion SEG of the
    segmentation (its segments are referenced by the lesions' groups). Returns ``{"parametric_maps": [{"domain",
    "map", "part", "SeriesInstanceUID", "SeriesDescription", "frames", "slope", "dataset"}], "report": dataset,
    "skipped": [domains without PMs]}``; with ``sink``, every PM is passed to ``sink`` as soon as it is written and
    not kept (``dataset`` is None: a 1 mm map is 29 MB per part). ``margin``: frames written beyond the part's
    extent; ``None`` (default) writes every slice of the series, which OHIF 3.10's PM viewport needs to draw the map
    (:mod:`msxai.dicom_pmap`)."""
    run_dir = Path(run_dir)
    method = str(result.get("method"))
    if method not in METHOD_MAPS:
        raise InputError(f"unknown explanation method {method!r}")
    domains = list(result.get("domains") or {})
    summaries = result.get("summary") or {}
    if not domains:
        raise InputError("the explanation has no domain")
    _, source = dataset_affine(list(source))
    ref = source[0]
    numbers = lesion_segment_numbers(lesion_seg) if lesion_seg is not None else {}
    # lesions of a saved label (lesions_from=final) are named after it: "final lesion 1" is not the model's lesion 1
    saved = re.search(r"the saved '([^']+)' label", str(result.get("domain_source", "")))
    prefix = f"{saved.group(1)} " if saved else ""
    # Grad-CAM++'s layer (the result's "params"): it ends the PM's name, two layers being two series
    layer = str((result.get("params") or {}).get("layer") or "") if method == "gradcampp" else ""
    pms, groups, skipped = [], [], []
    for d, name in enumerate(domains):
        maps = {}
        affine = None
        for key, short, _ in METHOD_MAPS[method]:
            maps[short], affine = _load(run_dir / f"{name}_{key}.nii.gz", f"{short} map of {name}")
        domain, _ = _load(run_dir / f"{name}_domain.nii.gz", f"domain of {name}")
        domain = domain > 0
        if not domain.any():
            raise InputError(f"the domain of {name} is empty")
        display = prefix + name.replace("_", " ")
        if d < max_pm_domains:
            for short, m in maps.items():
                for part, ds in saliency_parametric_maps(m, affine, source, name=display, map_name=short,
                                                         method=method, margin=margin, layer=layer,
                                                         series_number=series_number + len(pms)):
                    rwv = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
                    pms.append({"domain": name, "map": short, "part": part,
                                "SeriesInstanceUID": str(ds.SeriesInstanceUID),
                                "SeriesDescription": str(ds.SeriesDescription), "frames": int(ds.NumberOfFrames),
                                "slope": float(rwv.RealWorldValueSlope), "dataset": None if sink else ds})
                    if sink:
                        sink(ds)
        else:
            skipped.append(name)
        first = np.abs(next(iter(maps.values()))) * domain
        peak = np.unravel_index(int(np.argmax(first)), first.shape) if first.any() else \
            tuple(int(round(c)) for c in np.argwhere(domain).mean(axis=0))
        lps = lps_affine(affine) @ np.array([*map(float, peak), 1.0])
        k = _nearest_slice(source, lps[:3])
        seg_ref = None
        lid = summaries.get(name, {}).get("lesion_id")
        lid = int(name.split("_", 1)[1]) if lid is None and re.fullmatch(r"lesion_\d+", name) else lid
        if lesion_seg is not None and lid in numbers:
            seg_ref = SegmentReference(str(lesion_seg.SOPClassUID), str(lesion_seg.SOPInstanceUID),
                                       str(lesion_seg.SeriesInstanceUID), numbers[lid])
        groups.append(MeasurementGroup(
            tracking_id=display, tracking_uid=stable_uid("tracking", ref.StudyInstanceUID, method, display,
                                                         result.get("model", "")),
            point_lps=lps[:3], measurements=summary_measurements(summaries.get(name) or {}, method)
            if name in summaries else [], segment=seg_ref, image=source[k], point_concept=PEAK))
    ids = prefix + ",".join(n.replace("lesion_", "") for n in domains)
    report = write_measurement_report(
        groups, source, series_description=f"msxai {METHOD_NAMES[method]} {result.get('model', '')} table {ids}",
        series_number=series_number + 99, coordinates=coordinates)
    return {"parametric_maps": pms, "report": report, "skipped": skipped}


def _nearest_slice(source: Sequence, point_lps: np.ndarray) -> int:
    """Index of the (sorted) source instance whose plane is nearest to ``point_lps``."""
    iop = np.asarray(source[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    d = [abs(float(np.dot(normal, point_lps - np.asarray(s.ImagePositionPatient, dtype=np.float64))))
         for s in source]
    return int(np.argmin(d))
