"""Renderings (matplotlib, not 3D Slicer) of the payloads docs/slicer.md tells Slicer users to load: the DICOM
Parametric Maps and the NIfTI float maps of an explanation of the synthetic 2 mm study (the one of the OHIF test).

    PYTHONPATH=. .venv/bin/python scripts/slicer_renderings.py [--out docs] [--work out/slicer_renderings]

Runs, on the CPU, what the app runs for an explain request (the app's lib.service.StudyService: segmentation, Grad-CAM++ of
the largest lesion, SmoothGrad N=4 of a small one), writes the Parametric Maps as the DICOMweb path stores them
(msxai.dicom_saliency on the FLAIR converted by msxai.dicom), reads them back from the files and draws them over
the FLAIR in three planes through the lesion's saliency peak; the SmoothGrad figure puts the NIfTI map the local
path serves beside the map rebuilt from the positive and negative DICOM parts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LABEL = "RENDERING (matplotlib) of the real payload - not a 3D Slicer screenshot"


def _planes(vol: np.ndarray, p, half: int | None = None) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices through voxel ``p`` (the synthetic grid's orientation, anterior/superior up),
    cropped to ``half`` voxels around it when given."""
    i, j, k = (int(x) for x in p)
    sl = [slice(None)] * 3 if half is None else [slice(max(0, c - half), c + half + 1) for c in (i, j, k)]
    return [np.rot90(vol[sl[0], sl[1], k]), np.rot90(vol[sl[0], j, sl[2]]), np.rot90(vol[i, sl[1], sl[2]])]


def _draw(ax_row, flair, overlay, peak, cmap, vmin, vmax, title, threshold: float, half: int | None = None):
    im = None
    for ax, bg, ov, name in zip(ax_row, _planes(flair, peak, half), _planes(overlay, peak, half),
                                ("axial", "coronal", "sagittal")):
        ax.imshow(bg, cmap="gray", interpolation="nearest")
        shown = np.ma.masked_where(~np.isfinite(ov) | (np.abs(ov) < threshold), ov)
        im = ax.imshow(shown, cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.75, interpolation="nearest")
        ax.set_title(f"{title}: {name}", fontsize=9)
        ax.axis("off")
    return im


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "docs"))
    ap.add_argument("--work", default=str(REPO / "out" / "slicer_renderings"))
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pydicom

    from msxai.dicom import StudyInfo, volume_to_mr_series
    from msxai.dicom_pmap import read_parametric_map
    from msxai.dicom_saliency import explain_dicom
    from msxai.io import load_volume
    sys.path.insert(0, str(REPO / "apps" / "msxai"))  # the app's own modules, as the app imports them
    from lib.service import StudyService

    work, out = Path(args.work), Path(args.out)
    studies = work / "studies"
    if not (studies / "synth000_FLAIR.nii.gz").is_file():
        subprocess.run([sys.executable, "-m", "msxai", "synth", "--out", str(studies), "--n", "1", "--seed", "7",
                        "--voxel-size", "2", "--no-progress"], check=True, cwd=REPO)
    flair_path = studies / "synth000_FLAIR.nii.gz"
    flair = load_volume(flair_path, "FLAIR")
    series = volume_to_mr_series(flair.array, flair.affine, StudyInfo(), "FLAIR", 1)
    service = StudyService(studies, {"unet": REPO / "bundles" / "msxai_unet"})
    base = {"image": str(flair_path), "image_id": "synth000_FLAIR", "network": "unet", "device": "cpu"}
    seg = service.segment_request("unet", dict(base), str(work / "seg.nii.gz"))
    table = sorted(seg["lesions"], key=lambda r: (-r["voxels"], r["id"]))
    big = table[0]["id"]
    small = min((r for r in table if r["voxels"] >= 5), key=lambda r: (r["voxels"], r["id"]))["id"]
    figures = {}
    for method, lesion, extra in (("gradcampp", big, {}), ("smoothgrad", small, {"samples": 4, "seed": 7})):
        t0 = time.time()
        res = service.explain_request(method, dict(base, lesion=lesion, **extra), str(work / f"{method}.nii.gz"))
        run_dir = studies / res["artifacts_dir"]
        d = explain_dicom(run_dir, res, series, coordinates="3d")
        files = []
        for p in d["parametric_maps"]:
            f = work / f"{p['SeriesDescription'].replace(' ', '_').replace('+', 'pos').replace('-', 'neg')}.dcm"
            p["dataset"].save_as(str(f), write_like_original=False)
            files.append((p, f))
        d["report"].save_as(str(work / f"{method}_sr.dcm"), write_like_original=False)
        print(f"{method} lesion {lesion}: {time.time() - t0:.0f} s, {len(files)} Parametric Maps in {work}")
        figures[method] = (lesion, res, run_dir, files)

    # Grad-CAM++: the positive PM over the FLAIR, 3 planes through the peak
    lesion, res, run_dir, files = figures["gradcampp"]
    (p, f), = [(p, f) for p, f in files if p["part"] == "positive"]
    cam = read_parametric_map(pydicom.dcmread(str(f)), flair.affine, flair.array.shape)
    peak = np.unravel_index(np.nanargmax(np.where(np.isfinite(cam), cam, -np.inf)), cam.shape)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    im = _draw(axes, flair.array, cam, peak, "inferno", 0, np.nanmax(cam), f"lesion {lesion} CAM+",
               threshold=0.05 * np.nanmax(cam))
    fig.colorbar(im, ax=axes, shrink=0.8, label="Grad-CAM++ (real-world value of the PM)")
    fig.suptitle(f"{LABEL}\nDICOM Parametric Map '{p['SeriesDescription']}' ({f.stat().st_size / 1e6:.1f} MB, "
                 f"{p['frames']} frames) over the FLAIR series; values below 5% of the peak transparent", fontsize=10)
    fig.savefig(out / "slicer_rendering_pmap.png", dpi=90, bbox_inches="tight")
    plt.close(fig)

    # SmoothGrad FLAIR: positive minus negative PM vs the NIfTI float map served on the local path
    lesion, res, run_dir, files = figures["smoothgrad"]
    parts = {p["part"]: read_parametric_map(pydicom.dcmread(str(f)), flair.affine, flair.array.shape)
             for p, f in files if p["map"] == "FLAIR"}
    signed = np.zeros(flair.array.shape)
    for part, v in parts.items():
        signed += np.nan_to_num(v)  # the negative PM's real-world values are negative (slope < 0)
    nifti = load_volume(run_dir / f"lesion_{lesion}_smoothgrad_flair.nii.gz", "map").array
    dom = load_volume(run_dir / f"lesion_{lesion}_domain.nii.gz", "domain").array > 0
    a = np.abs(nifti) * dom
    peak = np.unravel_index(int(np.argmax(a)), a.shape)
    lim = float(np.abs(nifti).max())
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.6))
    _draw(axes[0], flair.array, signed, peak, "RdBu_r", -lim, lim, "DICOM FLAIR+ and FLAIR- PMs", 0.05 * lim, 20)
    im = _draw(axes[1], flair.array, nifti, peak, "RdBu_r", -lim, lim, "NIfTI lesion map", 0.05 * lim, 20)
    fig.colorbar(im, ax=axes, shrink=0.8, label="SmoothGrad FLAIR saliency (N=4)")
    diff = float(np.abs(signed - nifti).max())
    fig.suptitle(f"{LABEL}\nlesion {lesion}: the two DICOM Parametric Maps (top) and the NIfTI map "
                 f"(bottom, /msxai/artifacts/...); largest difference {diff:.2g}\n"
                 f"80 mm around the peak, |value| below 5% of the peak transparent", fontsize=10)
    fig.savefig(out / "slicer_rendering_smoothgrad.png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    json.dump({m: {"lesion": v[0], "files": [str(f) for _, f in v[3]]} for m, v in figures.items()},
              open(work / "renderings.json", "w"), indent=1)
    print(f"wrote {out / 'slicer_rendering_pmap.png'} and {out / 'slicer_rendering_smoothgrad.png'}; "
          f"SmoothGrad DICOM vs NIfTI largest difference {diff:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
