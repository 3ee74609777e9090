"""MONAI Label batch inference (``POST /batch/infer/{task}``, the clients' "run on all") for the msxai app.

What MONAI Label 0.8.5 does: the route starts ``python -m monailabel.interfaces.utils.app -m batch_infer`` (a
subprocess that creates the app again, loads the bundles again and runs the app's ``infer`` for every image of the
datastore, bypassing the server's model worker), or, with ``run_sync=true``, runs the same loop in the server
process; each result is saved with ``datastore.save_label`` under the request's ``label_tag`` (default
``original``). What this module adds:

* :func:`batch_request` (applied by the app's ``batch_infer``, in whichever process runs it): only the
  segmentation tasks (an explanation is of one lesion or domain of one image); a label tag that is a plain name and
  never ``final`` (the corrected labels a user saved are not overwritten by a model); image ids checked; on a
  machine without CUDA the request's ``device``/``multi_gpu`` (the route's defaults are ``cuda``/``true``, with which
  MONAI Label divides by the number of GPUs, zero here) become ``cpu``/``false``;
* :func:`build_batch_router`: the same checks in front of MONAI Label's route, so a bad request gets a 4xx with the
  reason before any subprocess starts (MONAI Label would start it and report only ``ERROR``).

The server and the subprocess share the segmentation cache (``lib.seg_cache.SegmentationCache``: per-key file lock,
entries renamed into place complete) and the datastore file (the app re-reads it when another process has written
it: ``MsxaiApp.datastore``).
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Optional

from fastapi import APIRouter, Body, Depends, HTTPException
# module level: the route's annotations are strings (postponed), resolved from this module's globals when FastAPI
# builds /openapi.json (a function-local import made it answer 500: "BatchInferImageType is not fully defined")
from monailabel.endpoints.user.auth import User  # noqa: F401
from monailabel.interfaces.tasks.batch_infer import BatchInferImageType  # noqa: F401

from msxai.errors import InputError

logger = logging.getLogger(__name__)
TAG_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# MONAI Label's route defaults (monailabel.endpoints.batch_infer.api_run)
ROUTE_DEFAULTS = {"device": "cuda", "multi_gpu": True, "gpus": "all", "logging": "WARNING", "save_label": True,
                  "label_tag": "original", "max_workers": 1, "max_batch_size": 0}


def batch_request(request: dict, tasks) -> dict:
    """A checked copy of a batch-infer request (see the module docstring); ``InputError`` names what is wrong."""
    import torch

    from msxai.studies import validate_image_id

    r = dict(request or {})
    model = r.get("model")
    if model not in tasks:
        raise InputError(f"no task {model!r} for batch infer; available: "
                         f"{sorted(t for t in tasks if str(t).startswith('segmentation_'))}")
    if not str(model).startswith("segmentation_"):
        raise InputError(f"batch infer runs the segmentation tasks only; {model} explains one lesion or drawn domain "
                         "of one image at a time (msxai batch --explain domains explains whole cohorts)")
    tag = r.get("label_tag") or "original"
    if not isinstance(tag, str) or not TAG_RE.match(tag):
        raise InputError(f"label_tag must be a plain name (letters, digits, '_', '-'), got {tag!r}")
    if tag == "final":
        raise InputError("batch infer saves model labels; it never overwrites 'final' (the labels users corrected): "
                         "use label_tag 'original' (the default) or another name")
    r["label_tag"] = tag
    images = r.get("images", "all")
    if isinstance(images, (list, tuple)):
        r["images"] = [validate_image_id(i) for i in images]
    elif str(getattr(images, "value", images)) not in ("all", "labeled", "unlabeled"):
        raise InputError(f"images must be all, labeled, unlabeled or a list of image ids, got {images!r}")
    if not torch.cuda.is_available():
        r["device"], r["multi_gpu"] = "cpu", False
    return r


def build_batch_router(app) -> APIRouter:
    from monailabel.config import RBAC_ADMIN, settings
    from monailabel.endpoints.user.auth import RBAC

    router = APIRouter(prefix="/batch", tags=["Infer"])

    @router.post("/infer/{model}", summary=f"{RBAC_ADMIN}Run Batch Inference Task (msxai: segmentation tasks, "
                                           "request checked first)")
    def msxai_batch_infer(
        model: str,
        images: Optional[BatchInferImageType] = BatchInferImageType.IMAGES_ALL,
        params: Optional[dict] = Body(None),
        run_sync: Optional[bool] = False,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)),
    ):
        from monailabel.endpoints.batch_infer import run

        params = dict(ROUTE_DEFAULTS) if params is None else params
        if not isinstance(params, dict):
            raise HTTPException(status_code=400, detail="params must be a JSON object")
        try:
            batch_request({**params, "model": model, "images": images}, list(app._infers))
        except InputError as exc:
            raise HTTPException(status_code=404 if model not in app._infers else 400, detail=str(exc)) from None
        return run(model, images, params, run_sync)

    return router


def install_batch_route(app) -> bool:
    """Put :func:`build_batch_router` in front of MONAI Label's ``POST /batch/infer/{model}`` (once; a no-op outside
    the server, e.g. in the batch subprocess)."""
    mod = sys.modules.get("monailabel.app")
    fastapi_app = getattr(mod, "app", None) if mod else None
    if fastapi_app is None:
        return False
    from monailabel.config import settings

    routes = [r for r in fastapi_app.router.routes if getattr(r, "name", "") != "msxai_batch_infer"]
    fastapi_app.router.routes = routes
    n = len(routes)
    fastapi_app.include_router(build_batch_router(app), prefix=settings.MONAI_LABEL_API_STR)
    fastapi_app.router.routes = fastapi_app.router.routes[n:] + fastapi_app.router.routes[:n]
    fastapi_app.openapi_schema = None
    return True
