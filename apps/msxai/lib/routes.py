"""HTTP routes the msxai app adds to MONAI Label's.

``POST /infer/{task}`` (same signature as MONAI Label's, registered in front of it):

* the explain tasks take a parameter ``model`` (which bundle to explain), but MONAI Label 0.8.5 merges the request
  parameters into a dict whose ``model`` key is the *task* name, so a ``model`` parameter would replace the task
  and the request would fail; this route moves it to ``explain_model`` and then runs MONAI Label's own
  ``run_inference`` (nothing else changes, the answer is MONAI Label's);
* it is a plain (synchronous) route, so FastAPI runs it in its worker threads: the event loop keeps answering
  ``/info``, the datastore and the other routes while a model runs (MONAI Label's ``async`` infer route blocks the
  whole server); model runs are serialised by the app (:class:`msxai.studies.StudyService`), so queued requests
  only wait, and memory stays that of one run.

Read-only routes for what MONAI Label's datastore API cannot serve: the exact float saliency maps and cached
segmentations kept in ``<studies>/msxai/<image_id>/``, and the study pairing.

* ``GET /msxai/studies`` -> every study image with its T1 (or the naming-rule error);
* ``GET /msxai/artifacts/{image_id}`` -> the files kept for a study (relative paths);
* ``GET /msxai/artifacts/{image_id}/{path}`` -> one of them (NIfTI / JSON).

Paths are checked (:func:`msxai.studies.safe_artifact_path`): nothing outside the study's folder is served.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse
# module level: the route's annotations are strings (postponed), resolved from this module's globals; an
# "output" query parameter (OHIF sends output=image) failed with "ResultType is not fully defined" otherwise
from monailabel.endpoints.infer import ResultType  # noqa: F401
from monailabel.endpoints.user.auth import User  # noqa: F401
from starlette.requests import Request  # noqa: F401

from msxai.errors import InputError
from msxai.studies import find_t1, list_artifacts, safe_artifact_path, validate_image_id

logger = logging.getLogger(__name__)
PREFIX = "/msxai"


def build_router(app) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["msxai"])

    @router.get("/studies", summary="Study images and their T1 (naming rule of msxai.studies)")
    def studies():
        ds = app.datastore()
        if hasattr(ds, "study_rows"):  # DICOMweb: series and their T1 series, from QIDO
            return ds.study_rows()
        out = []
        for image_id in sorted(ds.list_images()):
            uri = ds.get_image_uri(image_id)
            row = {"image": image_id, "flair": os.path.basename(uri)}
            try:
                row["t1"] = find_t1(uri).name
            except InputError as exc:
                row["error"] = str(exc)
            out.append(row)
        return out

    @router.get("/artifacts/{image_id}", summary="Files the app keeps for a study (saliency maps, segmentations)")
    def artifacts(image_id: str):
        try:
            validate_image_id(image_id)
        except InputError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        if image_id not in app.datastore().list_images():
            raise HTTPException(status_code=404, detail=f"image {image_id!r} is not in the datastore")
        return {"image": image_id, "files": list_artifacts(app.service.studies, image_id)}

    @router.get("/artifacts/{image_id}/{relpath:path}", summary="Download one file kept for a study")
    def artifact(image_id: str, relpath: str):
        try:
            path = safe_artifact_path(app.service.studies, image_id, relpath)
        except InputError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        if not path.is_file():
            raise HTTPException(status_code=404, detail=f"{image_id}/{relpath} not found")
        media = "application/json" if path.name.endswith(".json") else "application/octet-stream"
        return FileResponse(str(path), media_type=media, filename=path.name)

    return router


def build_infer_router():
    from monailabel.config import RBAC_USER, settings
    from monailabel.endpoints.infer import run_inference
    from monailabel.endpoints.user.auth import RBAC

    router = APIRouter(prefix="/infer", tags=["Infer"])

    @router.post("/{model}", summary=f"{RBAC_USER}Run Inference for supported model (msxai: non-blocking, "
                                     "explain parameter 'model' kept)")
    def msxai_run_inference(
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = Form("{}"),
        file: UploadFile = File(None),
        label: UploadFile = File(None),
        output: Optional[ResultType] = None,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
    ):
        try:
            p = json.loads(params) if params else {}
        except ValueError:
            raise HTTPException(status_code=400, detail="params must be a JSON object") from None
        if not isinstance(p, dict):
            raise HTTPException(status_code=400, detail="params must be a JSON object")
        if "model" in p:
            p["explain_model"] = p.pop("model")
        return run_inference(background_tasks, model, image, session_id, json.dumps(p), file, label, output)

    return router


def build_proxy_guard_router():
    """``/proxy/dicom/...`` (what OHIF reads the PACS through) in front of MONAI Label's own: only DICOMweb resource
    paths are forwarded (:func:`lib.proxy_guard.split_proxy_path`). MONAI Label 0.8.5 forwards any path with the
    DICOMweb credentials, so ``/proxy/dicom/../system`` reached Orthanc's whole REST API (GET and POST)."""
    from monailabel.config import settings
    from monailabel.endpoints.proxy import proxy_dicom
    from monailabel.endpoints.user.auth import RBAC

    from lib.proxy_guard import split_proxy_path

    router = APIRouter(prefix="/proxy", tags=["Others"])

    @router.api_route("/dicom/{path:path}", methods=["GET", "POST"], include_in_schema=False)
    async def msxai_proxy_dicom(request: Request, path: str,
                                user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        try:
            op, rest = split_proxy_path(path)
        except InputError as exc:
            raise HTTPException(status_code=403, detail=str(exc)) from None
        return await proxy_dicom(request, op, rest)

    return router


def install_routes(app) -> bool:
    """Add the routes to the served FastAPI app (``monailabel.app:app``) once; a no-op outside the server."""
    mod = sys.modules.get("monailabel.app")
    fastapi_app = getattr(mod, "app", None) if mod else None
    if fastapi_app is None:
        return False
    # a re-created app instance (POST /reload) replaces the routes bound to the old one
    fastapi_app.router.routes = [
        r for r in fastapi_app.router.routes if not getattr(r, "path", "").startswith(PREFIX + "/")
    ]
    from monailabel.config import settings

    fastapi_app.router.routes = [r for r in fastapi_app.router.routes
                                 if getattr(r, "name", "") not in ("msxai_run_inference", "msxai_proxy_dicom")]
    fastapi_app.include_router(build_router(app))
    n = len(fastapi_app.router.routes)
    fastapi_app.include_router(build_infer_router(), prefix=settings.MONAI_LABEL_API_STR)
    fastapi_app.include_router(build_proxy_guard_router(), prefix=settings.MONAI_LABEL_API_STR)
    added = fastapi_app.router.routes[n:]
    # in front of MONAI Label's POST /infer/{model} and /proxy/dicom/...: the first matching route answers
    fastapi_app.router.routes = added + fastapi_app.router.routes[:n]
    fastapi_app.openapi_schema = None
    logger.info("msxai: routes POST /infer/{model} (wrapper), /proxy/dicom (guard), /msxai/studies, /msxai/artifacts "
                "installed")
    return True
