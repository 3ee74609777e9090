"""MONAI Label's datastore write routes, served in front of its own (same paths, parameters, roles and answers), so
that every write goes through the checked, atomic writes of :mod:`lib.datastore` and every refusal is a 4xx with a
message (MONAI Label 0.8.5's own routes answer 200 to a label on the wrong grid or a traversal tag, and 500 to an
unknown image). They are plain (synchronous) routes: file I/O runs in FastAPI's threads, not on the event loop.

* ``PUT /datastore/label`` (annotator), ``DELETE /datastore/label`` (admin);
* ``PUT /datastore/image`` and the deprecated ``PUT /datastore/`` (annotator; what ``MONAILabelClient.upload_image``
  calls), ``DELETE /datastore/image`` and ``DELETE /datastore/`` (admin);
* ``PUT /datastore/image/info``, ``PUT /datastore/label/info``, ``PUT /datastore/updatelabelinfo`` (annotator);
* ``GET /datastore/dataset`` (annotator): 404 instead of 500 when no study has a ``final`` label;
* ``GET /msxai/labels/{image}/{tag}/history`` (user) and ``POST /msxai/labels/{image}/{tag}/restore`` (annotator):
  the kept versions of a label, and undoing a save.

Every label save and delete is logged (logger ``msxai.audit``) with the authenticated user.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from typing import Optional

from fastapi import APIRouter, Depends, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse
from monailabel.config import RBAC_ADMIN, RBAC_ANNOTATOR, RBAC_USER, settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import MONAILabelException

from msxai.errors import InputError

from lib.service import ARTIFACTS_URL
from lib.validation import LABEL_EXTENSIONS, UnsupportedFormatError, copy_upload, extension_of, status_for, \
    validate_tag

logger = logging.getLogger(__name__)

ANNOTATOR = settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR
ADMIN = settings.MONAI_LABEL_AUTH_ROLE_ADMIN
USER = settings.MONAI_LABEL_AUTH_ROLE_USER


@contextlib.contextmanager
def answer_4xx():
    """Input errors become 4xx answers with their message (never a 500 for what a client sent)."""
    try:
        yield
    except InputError as exc:
        raise HTTPException(status_code=status_for(exc), detail=str(exc)) from None
    except MONAILabelException as exc:
        code = 404 if "NotFound" in type(exc).__name__ else 400
        raise HTTPException(status_code=code, detail=exc.msg) from None


def json_object(text: Optional[str], name: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        raise HTTPException(status_code=400, detail=f"{name} must be a JSON object") from None
    if not isinstance(value, dict):
        raise HTTPException(status_code=400, detail=f"{name} must be a JSON object")
    return value


def build_datastore_router(app) -> APIRouter:
    router = APIRouter(prefix="/datastore", tags=["Datastore"])

    def _upload(upload: UploadFile, accepted, d: str) -> str:
        name = upload.filename or "upload.nii.gz"
        try:
            ext = extension_of(name, accepted)
        except UnsupportedFormatError as exc:
            raise HTTPException(status_code=415, detail=str(exc)) from None
        path = os.path.join(d, "upload" + ext)
        copy_upload(upload.file, path)
        return path

    @router.put("/label", summary=f"{RBAC_ANNOTATOR}Save Finished Label (msxai: checked, atomic, previous kept)")
    def msxai_save_label(
        image: str,
        params: str = Form("{}"),
        tag: str = DefaultLabelTag.FINAL.value,
        label: UploadFile = File(...),
        user: User = Depends(RBAC(ANNOTATOR)),
    ):
        p = json_object(params, "params")
        tag = tag or DefaultLabelTag.FINAL.value
        ds = app.datastore()
        accepted = LABEL_EXTENSIONS + ((".bin",) if hasattr(ds, "store_seg") else ())
        with answer_4xx(), tempfile.TemporaryDirectory(prefix="msxai_label_") as d:
            validate_tag(tag)
            path = _upload(label, accepted, d)
            label_id = ds.save_label(image, path, tag, p, user=user.username)
        res = app.on_save_label(image, label_id) or {}
        res.update({"image": image, "label": label_id})
        return res

    @router.delete("/label", summary=f"{RBAC_ADMIN}Remove Label (msxai: its last version is kept)")
    def msxai_remove_label(id: str, tag: str, user: User = Depends(RBAC(ADMIN))):
        with answer_4xx():
            app.datastore().remove_label(id, tag, user=user.username)
        return {}

    def add_image(image, params, file, user):
        p = json_object(params, "params")
        with answer_4xx(), tempfile.TemporaryDirectory(prefix="msxai_image_") as d:
            path = _upload(file, (".nii.gz", ".nii"), d)
            image_id = app.datastore().add_image(image, path, p, user=user.username, filename=file.filename or path)
        return {"image": image_id}

    @router.put("/image", summary=f"{RBAC_ANNOTATOR}Upload new Image (msxai: checked like a study, never replaces)")
    def msxai_add_image(image: Optional[str] = None, params: str = Form("{}"), file: UploadFile = File(...),
                        user: User = Depends(RBAC(ANNOTATOR))):
        return add_image(image, params, file, user)

    @router.put("/", include_in_schema=False, deprecated=True)
    def msxai_add_image_deprecated(image: Optional[str] = None, params: str = Form("{}"),
                                   file: UploadFile = File(...), user: User = Depends(RBAC(ANNOTATOR))):
        return add_image(image, params, file, user)

    def remove_image(id, user):
        with answer_4xx():
            app.datastore().remove_image(id, user=user.username)
        return {}

    @router.delete("/image", summary=f"{RBAC_ADMIN}Remove Image and corresponding labels (msxai: labels kept)")
    def msxai_remove_image(id: str, user: User = Depends(RBAC(ADMIN))):
        return remove_image(id, user)

    @router.delete("/", include_in_schema=False, deprecated=True)
    def msxai_remove_image_deprecated(id: str, user: User = Depends(RBAC(ADMIN))):
        return remove_image(id, user)

    @router.put("/image/info", summary=f"{RBAC_ANNOTATOR}Update Image Info")
    def msxai_put_image_info(image: str, info: str = Form("{}"), user: User = Depends(RBAC(ANNOTATOR))):
        i = json_object(info, "info")
        i["user"] = user.username
        with answer_4xx():
            return app.datastore().update_image_info(image, i)

    def label_info(label, tag, info, user):
        i = json_object(info, "info")
        i["user"] = user.username
        with answer_4xx():
            return app.datastore().update_label_info(label, tag, i)

    @router.put("/label/info", summary=f"{RBAC_ANNOTATOR}Update Label Info")
    def msxai_put_label_info(label: str, tag: str, info: str = Form("{}"), user: User = Depends(RBAC(ANNOTATOR))):
        return label_info(label, tag, info, user)

    @router.put("/updatelabelinfo", include_in_schema=False, deprecated=True)
    def msxai_update_label_info(label: str, tag: str, params: str = Form("{}"),
                                user: User = Depends(RBAC(ANNOTATOR))):
        return label_info(label, tag, params, user)

    @router.get("/dataset", summary=f"{RBAC_ANNOTATOR}Download full dataset as ZIP archive")
    def msxai_download_dataset(limit_cases: Optional[int] = None, user: User = Depends(RBAC(ANNOTATOR))):
        ds = app.datastore()
        if not ds.datalist():
            raise HTTPException(status_code=404, detail="no study has a 'final' label: nothing to download")
        path = ds.get_dataset_archive(limit_cases)
        logger.info(f"msxai: dataset archive downloaded by {user.username}")
        return FileResponse(path, media_type="application/zip", filename="dataset.zip")

    return router


def build_label_history_router(app) -> APIRouter:
    router = APIRouter(prefix="/msxai/labels", tags=["msxai"])

    @router.get("/{image}/{tag}/history", summary=f"{RBAC_USER}Kept versions of a label (newest first)")
    def msxai_label_history(image: str, tag: str, user: User = Depends(RBAC(USER))):
        with answer_4xx():
            ds = app.datastore()
            ds._existing_image(image)
            rows = ds.label_history(image, tag)
        for r in rows:
            r["url"] = f"{ARTIFACTS_URL}/{image}/{r['file']}"
        return {"image": image, "tag": tag, "versions": rows}

    @router.post("/{image}/{tag}/restore", summary=f"{RBAC_ANNOTATOR}Make a kept version the current label "
                                                    "(the current one is kept in turn)")
    def msxai_label_restore(image: str, tag: str, version: str, user: User = Depends(RBAC(ANNOTATOR))):
        with answer_4xx():
            app.datastore().restore_label(image, tag, version, user=user.username)
        return {"image": image, "tag": tag, "restored": version}

    return router
