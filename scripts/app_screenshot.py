#!/usr/bin/env python
"""Render what a MONAI Label client receives from the msxai app: a segmentation and an explanation, over the FLAIR.

Everything drawn comes from the server's HTTP answers (label maps, result JSON, the float map fetched from
/msxai/artifacts): the FLAIR is downloaded from the datastore, nothing is recomputed here.

    .venv/bin/python scripts/app_screenshot.py                       # starts a server on a fresh synthetic study
    .venv/bin/python scripts/app_screenshot.py --url http://127.0.0.1:8000 --image synth000_FLAIR

Writes docs/app_screenshot.png (``--out``) and prints the request timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "msxai"))  # the app's deploy package

from deploy.loopback import free_port  # noqa: E402


def start_server(studies: Path, models: str, log: Path):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(REPO / "apps" / "msxai"),
         "--studies", str(studies), "--conf", "models", models, "--host", "127.0.0.1", "--port", str(port)],
        cwd=str(REPO), env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"server exited, see {log}")
        try:
            with urllib.request.urlopen(url + "/info/", timeout=5):
                return proc, url
        except Exception:
            time.sleep(1)
    proc.terminate()
    raise SystemExit(f"server did not start, see {log}")


def copy_study(cohort: Path, image_id: str, studies: Path, crop: int) -> None:
    """Copy a FLAIR, its T1 (naming rule) and, if present, its lesion mask into ``studies``; with ``crop``, only a
    ``crop``^3 box centred on the lesions (affine origin moved accordingly)."""
    import nibabel as nib
    import numpy as np

    from msxai.studies import find_t1

    flair = cohort / f"{image_id}.nii.gz"
    files = {flair: flair.name, find_t1(flair): find_t1(flair).name}
    stem = image_id[: -len("_FLAIR")] if image_id.endswith("_FLAIR") else image_id
    les = cohort / f"{stem}_lesions.nii.gz"
    studies.mkdir(parents=True, exist_ok=True)
    box = None
    if crop:
        img = nib.load(str(flair))
        shape = np.array(img.shape[:3])
        centre = shape // 2
        if les.is_file():
            m = np.asarray(nib.load(str(les)).dataobj) > 0
            if m.any():
                centre = np.round(np.argwhere(m).mean(axis=0)).astype(int)
        lo = np.clip(centre - crop // 2, 0, np.maximum(shape - crop, 0))
        box = tuple(slice(int(a), int(a) + crop) for a in lo)
    for src, name in files.items():
        img = nib.load(str(src))
        if box is None:
            (studies / name).write_bytes(src.read_bytes())
            continue
        arr = np.asarray(img.dataobj)[box]
        aff = img.affine.copy()
        aff[:3, 3] = img.affine[:3, :3] @ np.array([b.start for b in box]) + img.affine[:3, 3]
        nib.save(nib.Nifti1Image(arr, aff), str(studies / name))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running msxai MONAI Label server (default: start one)")
    ap.add_argument("--studies", help="studies folder for the started server (default: a new synthetic study)")
    ap.add_argument("--image", default="synth000_FLAIR")
    ap.add_argument("--model", default="unet")
    ap.add_argument("--lesion", default=None, help="lesion id to explain (default: the largest of <= 150 voxels)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aggregation", default="max", choices=["max", "mean"])
    ap.add_argument("--voxel-size", type=float, default=2.0, help="voxel size of the synthetic study (mm)")
    ap.add_argument("--copy-from", help="take --image (and its T1) from this cohort folder (e.g. data/synth)")
    ap.add_argument("--crop", type=int, default=0,
                    help="with --copy-from: serve a CROP^3 box around the subject's lesions (fast on a CPU)")
    ap.add_argument("--out", default=str(REPO / "docs" / "app_screenshot.png"))
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from monailabel.client import MONAILabelClient

    tmp = Path(tempfile.mkdtemp(prefix="msxai_shot_"))
    proc = None
    url = args.url
    if url is None:
        studies = Path(args.studies) if args.studies else tmp / "studies"
        if args.copy_from:
            copy_study(Path(args.copy_from), args.image, studies, args.crop)
        elif not args.studies:
            subprocess.run([sys.executable, "-m", "msxai", "synth", "--out", str(studies), "--n", "1", "--seed", "7",
                            "--voxel-size", str(args.voxel_size), "--no-progress"], check=True, cwd=str(REPO))
        proc, url = start_server(studies, args.model, tmp / "server.log")
    try:
        client = MONAILabelClient(url, tmpdir=str(tmp))
        info = client.info()
        print(f"server {url}: tasks {sorted(info['models'])}")
        with urllib.request.urlopen(f"{url}/datastore/image?image={args.image}") as r:
            (tmp / "flair.nii.gz").write_bytes(r.read())
        flair_img = nib.load(str(tmp / "flair.nii.gz"))
        flair = np.asarray(flair_img.dataobj, dtype=np.float32)

        t0 = time.time()
        seg_file, seg = client.infer(f"segmentation_{args.model}", args.image, {})
        t_seg = time.time() - t0
        labels = np.asarray(nib.load(seg_file).dataobj)
        if not seg["lesions"]:
            raise SystemExit("the model found no lesion: nothing to explain")
        if args.lesion is None:  # the largest lesion of at most 150 voxels (Eq. 3 costs one VJP per voxel and copy)
            small = [r for r in seg["lesions"] if r["voxels"] <= 150] or seg["lesions"]
            les = max(small, key=lambda r: r["voxels"])
        else:
            les = next(r for r in seg["lesions"] if r["id"] == int(args.lesion))
        k = les["id"]
        t0 = time.time()
        exp_file, exp = client.infer("explain_smoothgrad", args.image,
                                     {"network": args.model, "lesion": k, "samples": args.samples, "seed": args.seed,
                                      "aggregation": args.aggregation})
        t_exp = time.time() - t0
        bins = np.asarray(nib.load(exp_file).dataobj)
        url_map = next(u for u in exp["urls"] if u.endswith(f"lesion_{k}_smoothgrad_flair.nii.gz"))
        with urllib.request.urlopen(url + url_map) as r:
            (tmp / "sal.nii.gz").write_bytes(r.read())
        sal = np.asarray(nib.load(str(tmp / "sal.nii.gz")).dataobj, dtype=np.float32)
        print(f"segmentation_{args.model}: {seg['n_lesions']} lesions in {t_seg:.1f} s; "
              f"explain_smoothgrad lesion {k} (N={args.samples}) in {t_exp:.1f} s")

        z = int(round(les["centroid_vox"][2]))
        sl = lambda a: np.rot90(a[:, :, z])  # noqa: E731  (radiological-ish display of an axial slice)
        f2 = sl(flair)
        vmax = float(np.percentile(flair[flair > 0], 99.5)) if (flair > 0).any() else 1.0
        fig, axes = plt.subplots(1, 3, figsize=(16, 6.2), facecolor="black")
        for ax in axes:
            ax.imshow(f2, cmap="gray", vmin=0, vmax=vmax)
            ax.axis("off")

        # 1) segmentation: instance ids with the names the client shows
        lab2 = sl(labels).astype(int)
        rng = np.random.default_rng(1)
        n = int(labels.max())
        colors = np.vstack([[0, 0, 0, 0], np.c_[rng.uniform(0.3, 1, (n, 3)), np.full(n, 0.85)]])
        axes[0].imshow(np.ma.masked_equal(lab2, 0), cmap=ListedColormap(colors), vmin=0, vmax=n,
                       interpolation="nearest")
        shown = [i for i in np.unique(lab2) if i]
        names = {v: kname for kname, v in seg["label_names"].items()}
        axes[0].legend(handles=[Patch(color=colors[i], label=names.get(i, str(i))) for i in shown[:8]],
                       loc="lower left", fontsize=7, framealpha=0.6)
        axes[0].set_title(f"segmentation_{args.model}: {seg['n_lesions']} lesions (slice z={z})", color="w")

        # 2) explain label map as a client renders it: outline + signed bins, names carry the ranges
        bin_colors = {1: (0.2, 1.0, 0.2, 1), 2: (0.9, 0.1, 0.1, 0.9), 3: (1.0, 0.6, 0.2, 0.8), 4: (0.4, 0.7, 1.0, 0.8),
                      5: (0.1, 0.2, 0.9, 0.9)}
        cm = ListedColormap([(0, 0, 0, 0)] + [bin_colors[v] for v in range(1, 6)])
        axes[1].imshow(np.ma.masked_equal(sl(bins), 0), cmap=cm, vmin=0, vmax=5, interpolation="nearest")
        axes[1].legend(handles=[Patch(color=bin_colors[v], label=nm) for nm, v in
                                sorted(exp["label_names"].items(), key=lambda x: x[1])],
                       loc="lower left", fontsize=7, framealpha=0.6)
        axes[1].set_title(f"explain_smoothgrad, lesion {k}: label map", color="w")

        # 3) the exact float map from /msxai/artifacts
        s2 = sl(sal)
        m = float(np.abs(sal).max()) or 1.0
        im = axes[2].imshow(np.ma.masked_where(np.abs(s2) < 0.05 * m, s2), cmap="seismic", vmin=-m, vmax=m)
        axes[2].contour(sl(labels == k), levels=[0.5], colors="lime", linewidths=0.8)
        cb = fig.colorbar(im, ax=axes[2], fraction=0.04)
        cb.ax.tick_params(colors="w", labelsize=7)
        s = exp["summary"][f"lesion_{k}"]["maps"]["smoothgrad_flair"]
        axes[2].set_title(f"FLAIR SmoothGrad (float map)\npeak {s['peak_max']:.3g} / {s['peak_min']:.3g}, "
                          f"mass in lesion +{s['positive_mass_in_domain']:.3g} / {s['negative_mass_in_domain']:.3g}",
                          color="w", fontsize=9)
        fig.suptitle(f"msxai MONAI Label app - {args.image}: what Slicer/OHIF receive "
                     f"(N={args.samples}, seed={args.seed}, mean p in lesion "
                     f"{exp['summary'][f'lesion_{k}']['mean_probability']:.2f})", color="w")
        fig.tight_layout(rect=(0, 0, 1, 0.94))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=110, facecolor="black")
        print(f"wrote {args.out}")
        print(json.dumps({"explain": {k2: exp[k2] for k2 in ("domains", "label_names", "params", "latencies")}},
                         default=str))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
