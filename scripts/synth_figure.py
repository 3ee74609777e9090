#!/usr/bin/env python
"""Show the synthetic cohort next to the real patient: docs/synth_vs_real.png and docs/synth_cohort.md.

Generates (or reads, with ``--cohort``) a synthetic cohort, and compares with the real MS patient
(open_ms_data patient26, at ``<repo>/../shared/data/open_ms_data/patient26``):

* the figure: axial and coronal FLAIR/T1 slices with lesion contours, the real patient on the first row, then
  ``--show`` synthetic subjects and one subject generated with ``--skull``;
* the table: lesions per subject, lesion volumes (median, IQR, min, max), lesion sites, tissue contrasts (the same
  3-class k-means on the T1 for both), brain size and generation time.

Example (the command that produced the committed docs)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/synth_figure.py --n 12 --seed 0 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from msxai.data import real_patient_dir  # noqa: E402
from msxai.io import load_volume  # noqa: E402
from msxai.synth import (  # noqa: E402
    LESION_SITES,
    generate_cohort,
    generate_subject,
    lesion_volumes_mm3,
    load_dataset,
    summarize,
    tissue_contrasts,
)

PATIENT = real_patient_dir()  # $MSXAI_REAL_DATA, else ../shared/data/open_ms_data/patient26 beside the repository


def best_slices(lesions: np.ndarray, brain: np.ndarray) -> tuple[int, int]:
    """Axial and coronal slice with most lesion voxels (the middle of the brain when there are none)."""
    les = lesions > 0
    if les.any():
        z = int(np.argmax(les.sum(axis=(0, 1))))
        y = int(np.argmax(les.sum(axis=(0, 2))))
    else:
        idx = np.argwhere(brain)
        z, y = (int(v) for v in np.median(idx, axis=0)[[2, 1]])
    return z, y


def show_row(axes, flair, t1, lesions, title):
    brain = flair != 0
    z, y = best_slices(lesions, brain)
    for ax, img, plane, name in zip(
        axes, (flair, t1, flair, t1), ("axial", "axial", "coronal", "coronal"), ("FLAIR", "T1", "FLAIR", "T1")
    ):
        vmax = np.percentile(img[img > 0], 99.5) if np.any(img > 0) else 1
        sl = (img[:, :, z], lesions[:, :, z]) if plane == "axial" else (img[:, y, :], lesions[:, y, :])
        # radiological display: patient's right on the left of the picture (array x grows to the left: affine -1)
        ax.imshow(sl[0].T, origin="lower", cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
        if np.any(sl[1] > 0):
            ax.contour((sl[1] > 0).T.astype(float), [0.5], colors="red", linewidths=0.6)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{title} {name} {plane} ({'z' if plane == 'axial' else 'y'}={z if plane == 'axial' else y})",
                     fontsize=7)


def fmt(s: dict, digits: int = 0) -> list[str]:
    f = (lambda v: f"{v:.{digits}f}") if s["n"] else (lambda v: "–")
    return [str(s["n"]), f(s["median"]), f"{f(s['q1'])}–{f(s['q3'])}", f(s["min"]), f(s["max"])]


BEGIN, END = "<!-- synth_figure.py: generated block begins -->", "<!-- synth_figure.py: generated block ends -->"


def write_generated_block(path: Path, block: str, title: str) -> None:
    """Write ``block`` between the BEGIN/END markers of ``path``, keeping the hand-written text around them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
    else:
        head, tail = f"{title}\n\n", "\n"
    path.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=12, help="subjects to generate (ignored with --cohort)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cohort", type=Path, help="an existing cohort folder / dataset.json to analyse instead")
    ap.add_argument("--work", type=Path, help="where to write the generated cohort (default: a temporary folder)")
    ap.add_argument("--show", type=int, default=3, help="synthetic subjects in the figure")
    ap.add_argument("--png", type=Path, default=REPO / "docs" / "synth_vs_real.png")
    ap.add_argument("--md", type=Path, default=REPO / "docs" / "synth_cohort.md")
    args = ap.parse_args(argv)

    # timing of one subject in this process (template already cached by a warm-up at 2 mm)
    from msxai.synth import SynthConfig, mni_template

    t0 = time.perf_counter()
    mni_template()
    t_template = time.perf_counter() - t0
    t0 = time.perf_counter()
    generate_subject(12345)
    t_subject = time.perf_counter() - t0
    t0 = time.perf_counter()
    skull_subject = generate_subject(7, skull=True)
    t_skull = time.perf_counter() - t0

    tmp = None
    if args.cohort is None:
        if args.work is None:
            tmp = tempfile.TemporaryDirectory(prefix="msxai_synth_")
            args.work = Path(tmp.name)
        t0 = time.perf_counter()
        ds_path = generate_cohort(args.work, args.n, seed=args.seed, workers=args.workers)
        t_cohort = time.perf_counter() - t0
        command = f"msxai synth --out DIR --n {args.n} --seed {args.seed} --workers {args.workers}"
    else:
        ds_path = args.cohort
        t_cohort = None
        command = f"(existing cohort {args.cohort})"
    ds = load_dataset(ds_path)

    per_subject, volumes, contrasts, sites = [], [], [], {s: 0 for s in LESION_SITES}
    confluent = 0
    for s in ds["subjects"]:
        lab = load_volume(s["label"], dtype=np.int32)
        vols = lesion_volumes_mm3(lab.array, lab.affine)
        volumes += vols
        per_subject.append(len(vols))
        flair = load_volume(s["flair"]).array
        t1 = load_volume(s["t1"]).array
        mask = load_volume(s["brain_mask"], dtype=np.uint8).array > 0
        contrasts.append(tissue_contrasts(flair, t1, lab.array, mask))
        meta_path = Path(s["flair"]).with_name(f"{s['id']}_meta.json")
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            for b in meta.get("blobs", []):
                sites[b["site"]] += 1
                confluent += bool(b.get("confluent"))

    have_real = PATIENT is not None
    if have_real:
        rf = load_volume(PATIENT / "FLAIR.nii.gz")
        rt = load_volume(PATIENT / "T1.nii.gz").array
        rg = load_volume(PATIENT / "consensus_gt.nii.gz", dtype=np.uint8)
        real_vols = lesion_volumes_mm3(rg.array, rg.affine)
        real_con = tissue_contrasts(rf.array, rt, rg.array, rf.array != 0)

    # ---------------------------------------------------------------- figure
    shown = ds["subjects"][: args.show]
    rows = (1 if have_real else 0) + len(shown) + 1
    fig, axes = plt.subplots(rows, 4, figsize=(12, 3.1 * rows))
    axes = np.atleast_2d(axes)
    r = 0
    if have_real:
        show_row(axes[r], rf.array, rt, rg.array, f"REAL patient26 ({len(real_vols)} lesions)")
        r += 1
    for s in shown:
        lab = load_volume(s["label"], dtype=np.int32).array
        show_row(axes[r], load_volume(s["flair"]).array, load_volume(s["t1"]).array, lab,
                 f"{s['id']} ({int(lab.max())} lesions)")
        r += 1
    show_row(axes[r], skull_subject.flair, skull_subject.t1, skull_subject.lesions,
             f"seed 7 --skull ({int(skull_subject.lesions.max())} lesions)")
    fig.suptitle("Synthetic MS cohort (msxai.synth) vs the real patient; red: lesion labels", fontsize=10)
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    plt.close(fig)

    # ---------------------------------------------------------------- table
    sv = summarize(volumes)
    sn = summarize(per_subject)
    lines = [
        "# The synthetic MS cohort (`msxai synth`) compared with the real patient",
        "",
        "This block is produced by `scripts/synth_figure.py` (it rewrites only this block); command:",
        "",
        "```",
        "OMP_NUM_THREADS=1 .venv/bin/python scripts/synth_figure.py "
        + (f"--n {args.n} --seed {args.seed} --workers {args.workers}" if args.cohort is None else f"--cohort {args.cohort}"),
        "```",
        "",
        f"Synthetic cohort: {len(ds['subjects'])} subjects, `{command}` (1 mm, brain-extracted).",
        "Real patient: open_ms_data patient26 (skull-stripped, N4-corrected, MNI, 1 mm), consensus ground truth.",
        "Lesions are 18-connected components of at least 5 mm³ in both.",
        "",
        "![synthetic vs real](synth_vs_real.png)",
        "",
        "## Lesions",
        "",
        "| | lesions / subject (median, IQR, min–max) | lesion count | volume median (mm³) | volume IQR (mm³) | volume min | volume max | total lesion load / subject (mL, median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    loads = []
    for s in ds["subjects"]:
        lab = load_volume(s["label"], dtype=np.int32)
        loads.append(float((lab.array > 0).sum()) * abs(np.linalg.det(lab.affine[:3, :3])) / 1000)
    lines.append(
        f"| synthetic | {sn['median']:.0f} ({sn['q1']:.0f}–{sn['q3']:.0f}), {sn['min']:.0f}–{sn['max']:.0f} | {sv['n']} | "
        f"{sv['median']:.0f} | {sv['q1']:.0f}–{sv['q3']:.0f} | {sv['min']:.0f} | {sv['max']:.0f} | {np.median(loads):.2f} |"
    )
    if have_real:
        rv = summarize(real_vols)
        lines.append(
            f"| real patient26 | {len(real_vols)} | {rv['n']} | {rv['median']:.0f} | {rv['q1']:.0f}–{rv['q3']:.0f} | "
            f"{rv['min']:.0f} | {rv['max']:.0f} | {sum(real_vols) / 1000:.2f} |"
        )
    total_sites = max(1, sum(sites.values()))
    lines += [
        "",
        "Synthetic lesion sites (generated blobs, before confluent blobs merge): "
        + ", ".join(f"{k} {100 * v / total_sites:.0f}%" for k, v in sites.items())
        + f"; {100 * confluent / total_sites:.0f}% seeded next to an earlier lesion (confluent).",
        "",
        "Lesions per subject: " + ", ".join(str(n) for n in per_subject) + ".",
        "",
        "## Tissue contrasts (median relative to WM; CSF/GM/WM from the same 3-class k-means on the T1)",
        "",
        "| | FLAIR CSF | FLAIR GM | FLAIR lesion | T1 CSF | T1 GM | T1 lesion | CSF/GM/WM fractions | brain voxels |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def crow(name, c):
        return (f"| {name} | {c['flair_csf']:.2f} | {c['flair_gm']:.2f} | {c['flair_lesion']:.2f} | {c['t1_csf']:.2f} | "
                f"{c['t1_gm']:.2f} | {c['t1_lesion']:.2f} | {c['csf_fraction']:.2f}/{c['gm_fraction']:.2f}/"
                f"{c['wm_fraction']:.2f} | {c['brain_voxels']} |")

    keys = contrasts[0].keys()
    med = {k: float(np.nanmedian([c[k] for c in contrasts])) for k in keys}
    lo = {k: float(np.nanmin([c[k] for c in contrasts])) for k in keys}
    hi = {k: float(np.nanmax([c[k] for c in contrasts])) for k in keys}
    med["brain_voxels"] = int(med["brain_voxels"])
    lo["brain_voxels"] = int(lo["brain_voxels"])
    hi["brain_voxels"] = int(hi["brain_voxels"])
    lines.append(crow("synthetic (median)", med))
    lines.append(crow("synthetic (min)", lo))
    lines.append(crow("synthetic (max)", hi))
    if have_real:
        lines.append(crow("real patient26", real_con))
    lines += [
        "",
        "## Generation time",
        "",
        f"Measured while writing this page (2 shared CPU cores, `OMP_NUM_THREADS=1`, other jobs running): template "
        f"load {t_template:.1f} s once per process; one 1 mm subject {t_subject:.1f} s (brain-extracted), "
        f"{t_skull:.1f} s with `--skull`"
        + (f"; the whole cohort {t_cohort:.0f} s with {args.workers} worker(s), {t_cohort / max(1, args.n):.1f} s per "
           "subject including writing the NIfTIs." if t_cohort is not None else "."),
        "",
    ]
    write_generated_block(args.md, "\n".join(lines[2:]), title=lines[0])
    print(args.png)
    print(args.md)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
