"""HTTP routes the msxai app adds to MONAI Label's.

``POST /infer/{task}`` (same signature as MONAI Label's, registered in front of it):

* the explain tasks take a parameter ``network`` (which bundle to explain). Its former name ``model`` is still
  accepted (deprecated, until 0.2.0): MONAI Label 0.8.5 merges the request parameters into a dict whose ``model``
  key is the *task* name, so a ``model`` parameter would replace the task and the request would fail; this route
  moves it to ``explain_model`` (answered with a ``deprecated`` note, :mod:`lib.params`) and then runs MONAI
  Label's own ``run_inference`` (nothing else changes, the answer is MONAI Label's);
* it is a plain (synchronous) route, so FastAPI runs it in its worker threads: the event loop keeps answering
  ``/info``, the datastore and the other routes while a model runs (MONAI Label's ``async`` infer route blocks the
  whole server); model runs are serialised by the app (:class:`lib.service.StudyService`), so queued requests
  only wait, and memory stays that of one run.

Read-only routes for what MONAI Label's datastore API cannot serve: the exact float saliency maps and cached
segmentations kept in ``<studies>/msxai/<image_id>/``, and the study pairing.

* ``GET /msxai/studies`` -> every study image with its T1 (or the naming-rule error);
* ``GET /msxai/artifacts/{image_id}`` -> the files kept for a study (relative paths);
* ``GET /msxai/artifacts/{image_id}/{path}`` -> one of them (NIfTI / JSON).

Paths are checked (:func:`msxai.studies.safe_artifact_path`): nothing outside the study's folder is served.

The datastore write routes and the label history are in :mod:`lib.datastore_routes`. All routes the app adds are
registered in front of MONAI Label's (the first matching route answers) and carry MONAI Label's RBAC dependency
(:mod:`lib.auth` decides who the user is); ``POST /reload`` (MONAI Label's has no RBAC) needs the admin role.
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

from lib.service import ARTIFACTS_URL, URL_PREFIX

logger = logging.getLogger(__name__)
PREFIX = URL_PREFIX
ARTIFACTS = ARTIFACTS_URL[len(PREFIX):]  # "/artifacts", under PREFIX


def build_router(app) -> APIRouter:
    from monailabel.config import settings
    from monailabel.endpoints.user.auth import RBAC

    role_user = settings.MONAI_LABEL_AUTH_ROLE_USER
    router = APIRouter(prefix=PREFIX, tags=["msxai"])

    @router.get("/studies", summary="Study images and their T1 (naming rule of msxai.studies)")
    def msxai_studies(user: User = Depends(RBAC(role_user))):
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

    @router.get(ARTIFACTS + "/{image_id}", summary="Files the app keeps for a study (saliency maps, segmentations)")
    def msxai_artifacts(image_id: str, user: User = Depends(RBAC(role_user))):
        try:
            validate_image_id(image_id)
        except InputError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        if image_id not in app.datastore().list_images():
            raise HTTPException(status_code=404, detail=f"image {image_id!r} is not in the datastore")
        return {"image": image_id, "files": list_artifacts(app.service.studies, image_id)}

    @router.get(ARTIFACTS + "/{image_id}/{relpath:path}", summary="Download one file kept for a study")
    def msxai_artifact(image_id: str, relpath: str, user: User = Depends(RBAC(role_user))):
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
                                     "deprecated explain parameter 'model' kept)")
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
        if "model" in p:  # the deprecated name of "network" (lib.params), which would replace the task name
            p["explain_model"] = p.pop("model")
        # paths and ids only the server sets: MONAI Label merges params over its request, so a "label" or
        # "lesions_label" parameter would make the server read a file of the client's choosing
        for k in ("msxai_t1", "msxai_job", "lesions_label", "label", "image", "file", "session"):
            p.pop(k, None)
        p["msxai_user"] = user.username
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


def build_admin_router() -> APIRouter:
    """``POST /reload`` (re-creates the app: MONAI Label's route has no RBAC at all), the model-file routes (this app
    serves its bundles' weights; MONAI Label's ``PUT /model/{model}`` needs only the annotator role and answers 500
    for an app without trainers), and MONAI Label's background tasks this app does not have (training, scoring,
    sessions: each would start a process that loads every bundle, or store uploads the app never uses)."""
    from monailabel.config import settings
    from monailabel.endpoints.user.auth import RBAC
    from monailabel.interfaces.utils.app import clear_cache

    admin = settings.MONAI_LABEL_AUTH_ROLE_ADMIN
    annotator = settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR
    role_user = settings.MONAI_LABEL_AUTH_ROLE_USER
    router = APIRouter()

    @router.post("/train/", include_in_schema=False)
    @router.post("/train/{model}", summary="Run Training Task (msxai: the bundles are trained with `msxai train`)",
                 tags=["Train"])
    def msxai_train(model: str = "", user: User = Depends(RBAC(admin))):
        raise HTTPException(status_code=404, detail="this app has no trainers: the bundles are trained with "
                                                    "`msxai train` / their train.json, not through the server")

    @router.post("/scoring/", include_in_schema=False)
    @router.post("/scoring/{method}", summary="Run Scoring Task (msxai: none)", tags=["Scoring"])
    def msxai_scoring(method: str = "", user: User = Depends(RBAC(annotator))):
        raise HTTPException(status_code=404, detail="this app has no scoring methods")

    @router.put("/session/", summary="Create new session with Image (msxai: refused)", tags=["Session"])
    def msxai_session(user: User = Depends(RBAC(role_user))):
        raise HTTPException(status_code=405, detail="this app explains studies of its datastore (FLAIR with its "
                                                    "T1); images are not uploaded into sessions")

    @router.post("/reload", include_in_schema=False)
    def msxai_reload(user: User = Depends(RBAC(admin))):
        logger.info(f"msxai: app reload asked by {user.username}")
        clear_cache()
        return {}

    @router.put("/model/{model}", summary="Upload/Update Model File (msxai: refused, the bundles are not "
                                          "updated through the server)", tags=["Model"])
    def msxai_update_model(model: str, user: User = Depends(RBAC(admin))):
        raise HTTPException(status_code=405, detail="this app serves the weights of its bundles (bundles/msxai_*); "
                                                    "they are not replaced through the server")

    @router.delete("/model/{model}", summary="Delete Model File (msxai: refused)", tags=["Model"])
    def msxai_delete_model(model: str, user: User = Depends(RBAC(admin))):
        raise HTTPException(status_code=405, detail="this app serves the weights of its bundles (bundles/msxai_*); "
                                                    "they are not deleted through the server")

    @router.get("/msxai/routes", summary="Every route of this server and the roles it needs (route inventory)",
                tags=["msxai"])
    def msxai_routes(request: Request, user: User = Depends(RBAC(admin))):
        return route_inventory(request.app)

    return router


def route_inventory(fastapi_app) -> list[dict]:
    """Every route in the order requests are matched: path, methods, whether it is in /openapi.json, the RBAC roles
    it needs (``[]``: public) and whether an earlier route with the same path and methods shadows it."""
    from monailabel.endpoints.user.auth import RBAC, get_current_user
    from starlette.routing import Mount

    def roles_of(dependant) -> set:
        out = set()
        for d in dependant.dependencies:
            if isinstance(d.call, RBAC):
                r = d.call.roles
                out |= {r} if isinstance(r, str) else set(r)
            elif d.call is get_current_user:
                out.add("*")
            out |= roles_of(d)
        return out

    def flat(routes):  # FastAPI >= 0.16x keeps an included router as one entry
        for r in routes:
            if hasattr(r, "effective_route_contexts"):
                yield from r.effective_route_contexts()
            else:
                yield r

    rows, seen = [], set()
    for r in flat(fastapi_app.router.routes):
        path = getattr(r, "path", "")
        if isinstance(r, Mount):
            rows.append({"path": path, "path_format": path, "methods": ["GET"], "mount": True, "in_schema": False, "roles": [],
                         "name": r.name, "shadowed": False})
            continue
        methods = sorted(getattr(r, "methods", None) or [])
        dependant = getattr(r, "dependant", None)
        roles = sorted(roles_of(dependant)) if dependant is not None else []
        key = (path, tuple(methods))
        rows.append({"path": path, "path_format": getattr(r, "path_format", path), "methods": methods, "mount": False,
                     "in_schema": bool(getattr(r, "include_in_schema", False)), "roles": roles,
                     "name": getattr(r, "name", ""), "shadowed": key in seen})
        seen.add(key)
    return rows


def _ours(route) -> bool:
    sub = getattr(route, "original_router", None)  # an included router (FastAPI >= 0.16x)
    if sub is not None:
        return bool(sub.routes) and all(_ours(r) for r in sub.routes)
    return getattr(route, "name", "").startswith("msxai_") or getattr(route, "path", "").startswith(PREFIX + "/")


def install_routes(app, extra_routers=()) -> bool:
    """Add the routes to the served FastAPI app (``monailabel.app:app``) once, in front of MONAI Label's; a re-created
    app instance (POST /reload) replaces the routes bound to the old one. A no-op outside the server."""
    mod = sys.modules.get("monailabel.app")
    fastapi_app = getattr(mod, "app", None) if mod else None
    if fastapi_app is None:
        return False
    from monailabel.config import settings
    from monailabel.interfaces.exception import MONAILabelException

    from lib import auth
    from lib.datastore_routes import build_datastore_router, build_label_history_router

    fastapi_app.router.routes = [r for r in fastapi_app.router.routes if not _ours(r)]
    n = len(fastapi_app.router.routes)
    fastapi_app.include_router(build_router(app))
    fastapi_app.include_router(build_label_history_router(app))
    for router in (auth.build_auth_router(), build_infer_router(), build_proxy_guard_router(),
                   build_datastore_router(app), build_admin_router(), *extra_routers):
        fastapi_app.include_router(router, prefix=settings.MONAI_LABEL_API_STR)
    added = fastapi_app.router.routes[n:]
    # in front of MONAI Label's routes: the first matching route answers
    fastapi_app.router.routes = added + fastapi_app.router.routes[:n]

    from starlette.responses import JSONResponse

    from lib.validation import status_for

    async def input_error(request, exc):  # anything a client sent that a library check refused
        return JSONResponse(status_code=status_for(exc), content={"detail": str(exc)})

    async def monailabel_error(request, exc):
        code = 404 if "NotFound" in type(exc).__name__ else 400
        return JSONResponse(status_code=code, content={"detail": exc.msg})

    fastapi_app.exception_handlers[InputError] = input_error
    fastapi_app.exception_handlers[MONAILabelException] = monailabel_error
    # Starlette built its middleware stack (with a copy of the handlers) for the lifespan call that creates this
    # app: build it again at the next request
    fastapi_app.middleware_stack = None
    auth.install(fastapi_app, getattr(app, "auth_policy", None) or auth.AuthPolicy())
    fastapi_app.openapi_schema = None
    logger.info(f"msxai: {len(added)} routes installed in front of MONAI Label's (infer wrapper, proxy guard, "
                "datastore writes, label history, /msxai/*, /reload)")
    return True
