"""MONAI Label infer tasks of the msxai app: thin wrappers around :mod:`lib.service` / :mod:`msxai.labelmaps`.

The tasks implement :class:`monailabel.interfaces.tasks.infer_v2.InferTask` directly instead of deriving from
``BasicInferTask``: every step (pre-processing, sliding-window inference, lesion extraction) already lives in the
bundle (:mod:`msxai.bundle`), saliency must run with gradients (``BasicInferTask.run_inferer`` runs under
``torch.no_grad()``), and ``BasicInferTask.__call__`` overwrites the result's ``label_names`` with the task's static
labels, while an explanation names its labels with the value ranges of this result.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Dict, Tuple

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.utils.others.generic import device_list

from msxai.io import to_jsonable
from msxai.labelmaps import static_saliency_names

from lib.params import EXPLAIN_DEFAULTS
from lib.service import StudyService

logger = logging.getLogger(__name__)


class _MsxaiTask(InferTask):
    def __init__(self, service: StudyService, type, labels, description, config):
        super().__init__(type=type, labels=labels, dimension=3, description=description, config=config)
        self.service = service

    def is_valid(self) -> bool:
        return True

    @staticmethod
    def result_file(request: Dict[str, Any]) -> str:
        ext = request.get("result_extension") or ".nii.gz"
        return tempfile.NamedTemporaryFile(suffix=ext, prefix="msxai_", delete=False).name


class SegmentationTask(_MsxaiTask):
    """``segmentation_<model>``: the lesion label map of the study (instance ids, or the binary mask for clients
    that map values through a fixed label list) + the per-lesion table in the result JSON."""

    def __init__(self, service: StudyService, model: str):
        self.model = model
        bundle = service.bundle(model)
        super().__init__(
            service,
            type=InferType.SEGMENTATION,
            labels={"lesion": 1},
            description=(
                f"MS lesions (FLAIR + T1) by the {bundle.name} bundle: instance label map (t = {bundle.threshold}, "
                f"18-connected, >= {bundle.min_volume_mm3} mm3) and per-lesion table"
            ),
            config={"device": device_list(), "label_mode": ["auto", "instances", "binary"]},
        )

    def __call__(self, request) -> Tuple[str, Dict]:
        t0 = time.time()
        out = self.result_file(request)
        try:
            result = self.service.segment_request(self.model, request, out)
        except BaseException:
            os.unlink(out)
            raise
        result["latencies"] = {"total": round(time.time() - t0, 3)}
        return out, to_jsonable(result)


class ExplainTask(_MsxaiTask):
    """``explain_smoothgrad`` / ``explain_gradcampp``: instance-level saliency of a lesion (id, list or ``all``)
    or of a domain the client gives (uploaded label or foreground points), as a binned label map + the quantitative
    summary in the result JSON; the exact float maps are saved beside the study."""

    def __init__(self, service: StudyService, method: str, jobs=None):
        self.method = method
        self.jobs = jobs  # lib.jobs.JobRegistry: cost budget, progress, cancel (None: run unbounded)
        models = service.models
        defaults = EXPLAIN_DEFAULTS[method]
        config = {"network": list(models), "device": device_list()}
        config.update({k: v for k, v in defaults.items()})
        config["lesions_from"] = ["model", "final"]
        if method == "smoothgrad":
            config["sequence"] = ["FLAIR", "MPRAGE"]
            config["aggregation"] = ["max", "mean"]
        super().__init__(
            service,
            type=InferType.SEGMENTATION,  # so that the Slicer module and the OHIF plugin list it and show the result
            labels=static_saliency_names("SmoothGrad" if method == "smoothgrad" else "CAM"),
            description=(
                "Instance-level SmoothGrad (Spagnolo et al. 2026, Eq. 3) of a lesion or a client-drawn domain: "
                "domain outline + strong/medium positive/negative saliency"
                if method == "smoothgrad"
                else "Instance-level Grad-CAM++ of a lesion or a client-drawn domain: domain outline + "
                "strong/medium activation"
            ),
            config=config,
        )

    def __call__(self, request) -> Tuple[str, Dict]:
        t0 = time.time()
        out = self.result_file(request)
        job = self.jobs.get(request.get("msxai_job")) if self.jobs is not None else None
        try:
            if job is None:
                result = self.service.explain_request(self.method, request, out)
            else:
                with job.bound():  # model work of this request queues as an explanation (lib/jobs.py)
                    result = self.service.explain_request(self.method, request, out, admit=job.admit,
                                                          checkpoint=job.checkpoint)
        except BaseException:
            os.unlink(out)
            raise
        result["latencies"] = {"total": round(time.time() - t0, 3)}
        if job is not None:
            result["job"] = {"id": job.id, "estimate_s": (job.estimate or {}).get("seconds"),
                             "chunks": job.chunks_done, "explain_s": round(time.time() - (job.started or t0), 1)}
        return out, to_jsonable(result)
