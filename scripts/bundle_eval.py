"""Evaluate bundles on the synthetic test split and patient26 (eval/metrics_test.json, eval/metrics_patient26.json)
and copy the means into each bundle's metadata.json ``eval_metrics``.

    python scripts/bundle_eval.py --bundles msxai_dynunet msxai_swinunetr --cohort data/synth_v4 [--threads 1]
    python scripts/bundle_eval.py --bundles msxai_unet --metadata-only   # refresh metadata from the eval JSONs

Metric conventions (msxai.metrics.evaluate_case): voxel Dice/nDSC of the kept predicted lesions against the truth
as given; lesion-wise TPR/FDR/FNR/F1 with the >= 5 mm^3 rule on both sides."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

KEYS = ("dice", "ndsc", "TPR", "FDR", "FNR", "F1", "n_pred", "n_truth")
CONVENTION = ("voxel Dice/nDSC: kept predicted lesions (t 0.3, 18-connected, >= 5 mm^3) against the truth as given; "
              "lesion-wise TPR/FDR/FNR/F1: >= 5 mm^3 on both sides (msxai.metrics.evaluate_case)")


def summary(path: Path) -> dict:
    m = json.loads(path.read_text())
    return {"n_cases": m["n_cases"], **{k: round(float(m["mean"][k]), 4) for k in KEYS if k in m["mean"]}}


def update_metadata(bundle: Path, cohort: str) -> None:
    meta_path = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    em = dict(meta.get("eval_metrics", {}))
    for key, name in (("synthetic_test", "metrics_test.json"), ("patient26", "metrics_patient26.json")):
        f = bundle / "eval" / name
        if f.is_file():
            em[key] = summary(f)
    em["synthetic_test"]["cohort"] = cohort
    em["conventions"] = CONVENTION
    meta["eval_metrics"] = em
    meta_path.write_text(json.dumps(meta, indent=4) + "\n")
    print(f"{bundle.name}: eval_metrics {json.dumps(em)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundles", nargs="+", default=["msxai_unet", "msxai_dynunet", "msxai_swinunetr"])
    p.add_argument("--cohort", default="data/synth_v4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--metadata-only", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from msxai.bundle import evaluate_bundle, resolve_bundle_dir

    for name in a.bundles:
        bundle = resolve_bundle_dir(name)
        if not a.metadata_only:
            for target, split in ((a.cohort, "test"), ("patient26", "test")):
                t0 = time.time()
                m = evaluate_bundle(bundle, target, split=split)
                print(f"{bundle.name} {target}: {json.dumps({k: round(m['mean'][k], 4) for k in KEYS})} "
                      f"({time.time() - t0:.0f} s)", flush=True)
        update_metadata(bundle, a.cohort)


if __name__ == "__main__":
    main()
