"""How local is the instance Grad-CAM++ map (Eq. 8-10) of a lesion at each candidate layer of a bundle?

    python scripts/gradcam_layers.py                                   # U-Net, its gradcam_layers + model.2.0,
                                                                       # the synthetic subject of the OHIF test
    python scripts/gradcam_layers.py --bundle unet --flair F --t1 T --layers model.1.submodule.2,model.2.0

For the two largest predicted lesions, per layer: the map's peak distance from the lesion, the fraction of the map's
mass within 15 mm of the lesion, and the brain voxels farther than 15 mm where the map is non-zero (what a viewer
that draws every non-zero value, such as OHIF's Parametric Map viewport, colours far from the lesion). Grad-CAM++ is
cheap (one forward and backward pass per window covering the lesion); the whole run is a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="unet")
    p.add_argument("--flair", default=None, help="default: `msxai synth --n 1 --seed 7` (the OHIF test's subject)")
    p.add_argument("--t1", default=None)
    p.add_argument("--layers", default=None, help="comma-separated module names (default: the bundle's "
                   "gradcam_layers and model.2.0)")
    p.add_argument("--radius-mm", type=float, default=15.0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from msxai.bundle import load_bundle
    from msxai.io import voxel_spacing
    from msxai.saliency.gradcampp import GradCAMPlusPlus

    if (a.flair is None) != (a.t1 is None):
        p.error("give both --flair and --t1, or neither")
    tmp = None
    if a.flair is None:
        tmp = tempfile.TemporaryDirectory()
        subprocess.run([sys.executable, "-m", "msxai", "synth", "--out", tmp.name, "--n", "1", "--seed", "7",
                        "--no-progress"], check=True, capture_output=True)
        a.flair, a.t1 = f"{tmp.name}/synth000_FLAIR.nii.gz", f"{tmp.name}/synth000_T1.nii.gz"
    b = load_bundle(a.bundle, device="cpu")
    layers = a.layers.split(",") if a.layers else list(dict.fromkeys([*b.gradcam_layers, "model.2.0"]))
    prep = b.prepare(a.flair, a.t1)
    prob = torch.softmax(b.network_pred(prep), 0)[1].numpy()
    labels = b.lesions(prob, prep.affine)
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    if not len(ids):
        sys.exit("no lesion predicted: nothing to explain")
    chosen = [int(i) for i in ids[np.argsort(-counts, kind="stable")][:2]]
    spacing = voxel_spacing(prep.affine)
    print(f"{Path(a.flair).name}: {len(ids)} lesions; explained: "
          + ", ".join(f"{i} ({int(counts[list(ids).index(i)])} voxels)" for i in chosen))
    print(f"| layer | lesion | peak distance (mm) | mass within {a.radius_mm:g} mm | non-zero brain voxels farther |")
    print("|---|---|---|---|---|")
    for layer in layers:
        t0 = time.time()
        cam = GradCAMPlusPlus(b.network, torch.as_tensor(prep.image), b.spec, layer, device=torch.device("cpu"))
        for les in chosen:
            dom = labels == les
            m = cam.instance_map(dom)
            dist = ndimage.distance_transform_edt(~dom, sampling=spacing)
            far = dist > a.radius_mm
            total = float(m.sum())
            within = float(m[~far].sum()) / total if total > 0 else float("nan")
            print(f"| {layer} | {les} | {dist.flat[int(m.argmax())]:.1f} | {within:.2f} | "
                  f"{int((m[far & prep.brain_mask] > 0).sum())} |", flush=True)
        print(f"<!-- {layer}: {time.time() - t0:.0f} s -->", flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
