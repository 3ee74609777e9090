"""msxai MONAI Label app: MS lesion segmentation (three bundles) and instance-level saliency, served to the 3D
Slicer MONAILabel module and the OHIF v3 plugin.

    monailabel start_server --app apps/msxai --studies data/synth --conf models all

``--conf`` keys (all optional):

* ``models``: ``all`` (default) or a comma list of ``unet``, ``dynunet``, ``swinunetr`` -> tasks
  ``segmentation_<model>``; ``explain_smoothgrad`` and ``explain_gradcampp`` take ``model`` as a parameter;
* ``bundles_dir``: where ``msxai_<model>/`` bundles live (default: ``<repo>/bundles``);
* ``explain``: ``true`` (default) / ``false``: serve the explain tasks;
* ``max_samples``: the largest SmoothGrad ``samples`` a request may ask for (default 200).

A bundle that cannot be loaded (weights missing, ...) stops the start-up with a message naming it. Nothing is
downloaded: no model zoo, no sample tasks (sam2 is not registered), no dcmqi tools.

``--studies http://...`` (a DICOMweb server, e.g. Orthanc: docs/ohif.md) serves MR series; the T1 series of a FLAIR
is found in its study (:func:`msxai.studies.find_t1_series`) and results are stored back as DICOM SEG.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Dict

APP_DIR = Path(__file__).resolve().parent
REPO_ROOT = APP_DIR.parents[1]
try:  # the msxai library: installed (pip install -e .) or the repository this app lives in
    import msxai  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(REPO_ROOT))
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

import requests  # noqa: E402
from fastapi import HTTPException  # noqa: E402
from monailabel.config import settings  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.datastore import Datastore  # noqa: E402
from monailabel.interfaces.exception import MONAILabelException  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402
from monailabel.interfaces.tasks.strategy import Strategy  # noqa: E402
from monailabel.tasks.activelearning.first import First  # noqa: E402
from monailabel.tasks.activelearning.random import Random  # noqa: E402
from monailabel.utils.others.generic import strtobool  # noqa: E402

import msxai as _msxai  # noqa: E402
from msxai.errors import InputError  # noqa: E402
from msxai.studies import (  # noqa: E402
    MAX_SAMPLES_DEFAULT,
    BundleLoadError,
    InvalidImageIdError,
    StudyService,
    UnknownImageError,
    validate_image_id,
)

from lib.datastore import DicomWebAccessError, MsxaiDatastore, MsxaiDICOMwebDatastore  # noqa: E402
from lib.infers import ExplainTask, SegmentationTask  # noqa: E402
from lib.ohif_fixes import install_ohif_fixes  # noqa: E402
from lib.routes import install_routes  # noqa: E402
from lib.validation import status_for  # noqa: E402

logger = logging.getLogger(__name__)

MODELS = ("unet", "dynunet", "swinunetr")


def http_status(exc: InputError) -> int:
    """404 for things that do not exist, 400 for malformed ids/parameters, 422 for unusable content (the mapping of
    :func:`lib.validation.status_for`)."""
    return status_for(exc)


class MsxaiApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        conf = conf or {}
        models = [m.strip().lower() for m in str(conf.get("models", "all")).split(",") if m.strip()]
        if "all" in models:
            models = list(MODELS)
        bad = [m for m in models if m not in MODELS]
        if bad or not models:
            raise BundleLoadError(f"--conf models: unknown model(s) {bad or models}; choose all or from {', '.join(MODELS)}")
        bundles_dir = Path(conf.get("bundles_dir") or REPO_ROOT / "bundles")
        self.service = StudyService(
            studies,
            {m: bundles_dir / f"msxai_{m}" for m in models},
            max_samples=int(conf.get("max_samples", MAX_SAMPLES_DEFAULT)),
        )
        self.explain = strtobool(conf.get("explain", "true"))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="msxai - explainable MS lesion segmentation",
            description=(
                "MS lesion segmentation from FLAIR + T1/MPRAGE (the study image is the FLAIR; its T1 is found by the "
                "naming rule) and instance-level saliency (SmoothGrad, Grad-CAM++) of a lesion or a drawn domain"
            ),
            version=_msxai.__version__,
            # what is labelled: the Slicer module creates one empty segment per app label on every sample
            labels=["lesion"],
        )
        install_routes(self)
        install_ohif_fixes()  # OHIF 3.10's Parametric Map loader (explain results in OHIF)

    # ------------------------------------------------------------------------------------------- datastore
    def init_datastore(self) -> Datastore:
        if self.studies.startswith("http://") or self.studies.startswith("https://"):
            return self._init_msxai_dicomweb()
        return MsxaiDatastore(
            self.studies,
            extensions=("*.nii.gz", "*.nii"),
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _init_msxai_dicomweb(self) -> Datastore:
        """MONAI Label's DICOMweb datastore with the msxai study rule and SEG writer (see docs/ohif.md).

        Credentials: MONAI_LABEL_DICOMWEB_USERNAME/PASSWORD (or MONAI_LABEL_DATASTORE_USERNAME/PASSWORD, copied to
        the former so that MONAI Label's /proxy/dicom route, which OHIF uses, sends them too). The search filter is
        MONAI_LABEL_DICOMWEB_SEARCH_FILTER (MONAI Label's default is CT; the stack sets {"Modality": "MR"}). A
        server that refuses the credentials or cannot be reached stops the start-up with the reason."""
        from dicomweb_client.session_utils import create_session_from_user_pass
        from monailabel.datastore.dicom import DICOMwebClientX

        self.studies = self.studies.rstrip("/").strip()
        user = settings.MONAI_LABEL_DICOMWEB_USERNAME or settings.MONAI_LABEL_DATASTORE_USERNAME
        password = settings.MONAI_LABEL_DICOMWEB_PASSWORD or settings.MONAI_LABEL_DATASTORE_PASSWORD
        settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD = user, password
        session = create_session_from_user_pass(user, password) if user and password else None
        client = DICOMwebClientX(
            url=self.studies,
            session=session,
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
        cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or settings.MONAI_LABEL_DATASTORE_CACHE_PATH or "").strip()
        ds = MsxaiDICOMwebDatastore(
            client=client,
            search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
            cache_path=cache or None,
            fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
            convert_to_nifti=True,
        )
        ds.check_access()
        self.service.relocate(ds._datastore_path)  # artefacts and the segmentation cache beside the series cache
        logger.info(f"msxai: DICOMweb studies {self.studies} (filter {settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER}, "
                    f"user {user or '-'}); cache and artefacts in {ds._datastore_path}")
        return ds

    def _store_seg(self, ds, image: str, model: str, res: dict) -> dict:
        """Write the result of a task as a DICOM SEG of the image series and store it on the DICOMweb server:
        segmentation -> one segment per lesion (instance ids of the cached segmentation, named like the label
        names); explain -> the saliency bins with their names. Failures are reported in the JSON, not raised."""
        import numpy as np

        from msxai.dicom import lesion_segments, saliency_segments
        from msxai.labelmaps import instance_label_names, read_labelmap
        from msxai.studies import artifact_dir

        params = res.get("params") or {}
        try:
            if model.startswith("segmentation_"):
                m = model[len("segmentation_"):]
                arr, aff = read_labelmap(artifact_dir(self.service.studies, image) / f"seg_{m}" / "labels.nii.gz")
                segments, desc = lesion_segments(instance_label_names(arr, params.get("lesions"))), f"msxai lesions {m}"
            else:
                arr, aff = read_labelmap(res["file"])
                segments = saliency_segments(params.get("label_names") or {})
                desc = f"msxai {params.get('method', model)} {params.get('model', '')} " + ",".join(
                    str(k).replace("lesion_", "") for k in (params.get("domains") or {}))
            if not np.any(arr):
                return {"skipped": "empty label map: no SEG written"}
            return ds.store_seg(image, arr, aff, segments, desc[:64])
        except Exception as exc:
            logger.warning(f"msxai: DICOM SEG of {model} for {image} not stored: {exc}")
            return {"error": f"DICOM SEG not stored: {exc}"}

    def _store_saliency(self, ds, image: str, res: dict) -> dict:
        """An explanation's float maps as DICOM Parametric Maps and its per-lesion table as a DICOM SR, stored beside
        its SEG (``msxai.dicom_saliency``; OHIF's basic viewer, linked in the answer, shows both). Lesions of the
        model's segmentation are linked to their segment of the lesion SEG. Failures are reported, not raised."""
        import json

        from msxai.dicom import lesion_segments
        from msxai.labelmaps import instance_label_names, read_labelmap
        from msxai.studies import artifact_dir

        params = res.get("params") or {}
        try:
            run_dir = Path(self.service.studies) / params["artifacts_dir"]
            m, lesion_seg = params.get("model", ""), None
            if str(params.get("domain_source", "")).endswith(f"of segmentation_{m}"):
                seg_dir = artifact_dir(self.service.studies, image) / f"seg_{m}"
                arr, aff = read_labelmap(seg_dir / "labels.nii.gz")
                table = json.loads((seg_dir / "meta.json").read_text()).get("table")
                lesion_seg = (arr, aff, lesion_segments(instance_label_names(arr, table)), f"msxai lesions {m}")
            return ds.store_saliency(image, run_dir, params, lesion_seg)
        except Exception as exc:
            logger.warning(f"msxai: saliency DICOM objects of {image} not stored: {exc}")
            return {"error": f"Parametric Maps / SR not stored: {exc}"}

    def _download_dcmqi_tools(self):
        # MONAILabelApp downloads dcmqi for DICOMweb datastores; this app never downloads anything
        logger.info("msxai: dcmqi tools are not downloaded (offline app): DICOM SEG is written by msxai.dicom")

    # ------------------------------------------------------------------------------------------------ tasks
    def init_infers(self) -> Dict[str, InferTask]:
        infers: Dict[str, InferTask] = {}
        for m in self.service.models:
            infers[f"segmentation_{m}"] = SegmentationTask(self.service, m)
        if self.explain:
            infers["explain_smoothgrad"] = ExplainTask(self.service, "smoothgrad")
            infers["explain_gradcampp"] = ExplainTask(self.service, "gradcampp")
        return infers

    def init_trainers(self):
        return {}  # the bundles train with `msxai`/their own train.json, not through the label server

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    def init_scoring_methods(self):
        return {}

    # ---------------------------------------------------------------------------------------------- infer
    def infer(self, request, datastore=None):
        """Validate the image id and turn input errors into 4xx answers with the message."""
        try:
            model = request.get("model")
            if model not in self._infers:
                raise HTTPException(status_code=404, detail=f"no model {model!r}; available: {sorted(self._infers)}")
            image = request.get("image")
            if not isinstance(image, str):
                raise InvalidImageIdError("image must be a datastore image id")
            if os.path.isabs(image):
                raise InvalidImageIdError(
                    "pass a datastore image id: images uploaded with /infer or given as paths are not accepted "
                    "(a FLAIR needs its T1 beside it: put both in the studies folder or PUT /datastore/image)"
                )
            validate_image_id(image)  # no separators, no '..': never a path outside the datastore
            ds = datastore if datastore else self.datastore()
            uri = ds.get_image_uri(image)
            if not uri or not os.path.isfile(uri):
                known = ds.list_images()
                raise UnknownImageError(
                    f"image {image!r} is not in the datastore ({len(known)} image(s), e.g. {sorted(known)[:3]})"
                )
            request = dict(request)
            request["image_id"] = image
            request.pop("msxai_t1", None)  # only the app sets it
            if str(request.get("save_label", False)).strip().lower() in ("1", "true", "yes", "y", "on"):
                # MONAI Label saves a result as a label when asked: only ever as the model's 'original', never over
                # a clinician's 'final' (the /infer role is below the annotator role that label saves need)
                request["label_tag"] = "original"
            if isinstance(ds, MsxaiDICOMwebDatastore):
                request["msxai_t1"] = ds.get_t1_uri(image)  # T1 series of the same study (msxai.studies rule)
            if model.startswith("explain_"):
                request["save_label"] = False  # saliency bins are not lesion labels
                tag = request.get("lesions_from")
                tag = tag[0] if isinstance(tag, list) and tag else tag
                if tag and tag != "model":
                    if not isinstance(tag, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", tag):
                        raise InputError(f"lesions_from must be 'model' or a datastore label tag (e.g. 'final'), "
                                         f"got {tag!r}")
                    luri = ds.get_label_uri(image, tag) if hasattr(ds, "get_label_uri") else ""
                    if not luri or not os.path.isfile(luri):
                        raise UnknownImageError(f"image {image!r} has no saved label with tag {tag!r}")
                    request["lesions_label"] = luri
            res = super().infer(request, datastore)
            if isinstance(ds, MsxaiDICOMwebDatastore) and res.get("file") and isinstance(res.get("params"), dict):
                res["params"]["dicom_seg"] = self._store_seg(ds, image, model, res)
                if model.startswith("explain_"):
                    res["params"]["dicom_saliency"] = self._store_saliency(ds, image, res)
            return res
        except InputError as exc:
            logger.info(f"msxai: refused {request.get('model')} request: {exc}")
            raise HTTPException(status_code=http_status(exc), detail=str(exc)) from None
        except MONAILabelException as exc:
            raise HTTPException(status_code=400, detail=exc.msg) from None
        except requests.RequestException as exc:  # the DICOMweb server (PACS) failed, not the request
            logger.warning(f"msxai: DICOMweb server error for {request.get('model')}: {exc}")
            raise HTTPException(status_code=502, detail=f"DICOMweb server {self.studies}: {exc}") from None
