"""The bundle way of a cohort run: ``configs/batch_inference.json`` (merged over ``inference.json``) builds a
:class:`BundleBatch` from the bundle's own parsed components and runs it; ``configs/multi_gpu_inference.json`` puts
each torchrun process on its own GPU (``cuda:<LOCAL_RANK>``) and initialises nccl, as MONAI model-zoo bundles do::

    python -m monai.bundle run --config_file "['configs/inference.json','configs/batch_inference.json']" \\
        --datalist /data/cohort --output_dir /data/out
    torchrun --nproc_per_node 4 -m monai.bundle run \\
        --config_file "['configs/inference.json','configs/batch_inference.json','configs/multi_gpu_inference.json']" \\
        --datalist /data/cohort --output_dir /data/out
"""

from __future__ import annotations

from pathlib import Path


class BundleBatch:
    """``run()`` = :func:`msxai.batch.run.run_batch` with the bundle assembled from the config's ``segmenter``
    (network with its weights, inferer, threshold, minimum volume, device), ``gradcam_layer`` and ``checkpoint``."""

    def __init__(self, segmenter, bundle_root, bundle_name: str, gradcam_layer: str | None, checkpoint, cases,
                 output_dir, settings, progress: bool = True):
        self.segmenter = segmenter
        self.bundle_root = Path(str(bundle_root))
        self.bundle_name = str(bundle_name)
        self.gradcam_layer = gradcam_layer
        self.checkpoint = checkpoint
        self.cases = cases
        self.output_dir = output_dir
        self.settings = settings
        self.progress = progress if isinstance(progress, bool) else str(progress).lower() not in ("false", "0", "no")

    def bundle(self):
        """The config's ``segmenter`` (a :class:`msxai.bundle.Bundle`) with its name, folder and Grad-CAM++ layer."""
        b = self.segmenter
        b.name, b.path = self.bundle_name, self.bundle_root
        if self.gradcam_layer:
            b.gradcam_layer = str(self.gradcam_layer)
        return b

    def run(self) -> dict:
        from msxai.batch.dist import init_distributed
        from msxai.batch.run import run_batch

        bundle = self.bundle()
        ctx = init_distributed(bundle.device)
        try:
            result = run_batch(bundle, self.cases, self.output_dir, self.settings, ctx, progress=self.progress,
                               checkpoint=self.checkpoint)
        finally:
            ctx.close()  # only a group this object created; multi_gpu_inference.json's finalize closes its own
        return result.get("summary") or {"rank": result["rank"], "cases": len(result["records"])}
