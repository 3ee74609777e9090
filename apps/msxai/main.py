"""msxai MONAI Label app: MS lesion segmentation (three bundles) and instance-level saliency, served to the 3D
Slicer MONAILabel module and the OHIF v3 plugin.

    monailabel start_server --app apps/msxai --studies data/synth --conf models all --host 127.0.0.1

``--conf`` keys (all optional):

* ``models``: ``all`` (default) or a comma list of ``unet``, ``dynunet``, ``swinunetr`` -> tasks
  ``segmentation_<model>``; ``explain_smoothgrad`` and ``explain_gradcampp`` take ``model`` as a parameter;
* ``bundles_dir``: where ``msxai_<model>/`` bundles live (default: ``<repo>/bundles``);
* ``explain``: ``true`` (default) / ``false``: serve the explain tasks;
* ``max_samples``: the largest SmoothGrad ``samples`` a request may ask for (default 200);
* ``auth_users``: a users file (:mod:`lib.users`) -> bearer-token authentication with MONAI Label's roles; without
  it the server must listen on loopback (``--host 127.0.0.1``) or it refuses to start (:mod:`lib.auth`);
* ``auth_token_hours``: lifetime of a token (default 12).

Security (who may call what, what is written how, what is refused): docs/security.md.

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
from msxai.studies import InvalidImageIdError, UnknownImageError, validate_image_id  # noqa: E402

from lib.auth import AuthPolicy, SecurityConfigError, check_exposure, served_host  # noqa: E402
from lib.batch import batch_request, install_batch_route  # noqa: E402
from lib.datastore import DicomWebAccessError, MsxaiDatastore, MsxaiDICOMwebDatastore  # noqa: E402
from lib.infers import ExplainTask, SegmentationTask  # noqa: E402
from lib.jobs import JobRegistry, ModelWorker, build_jobs_router, install_signal_handlers  # noqa: E402
from lib.ohif_fixes import install_ohif_fixes  # noqa: E402
from lib.params import MAX_SAMPLES_DEFAULT  # noqa: E402
from lib.routes import install_routes  # noqa: E402
from lib.service import BundleLoadError, StudyService  # noqa: E402
from lib.validation import JobCancelledError, TooExpensiveError, status_for  # noqa: E402

logger = logging.getLogger(__name__)

MODELS = ("unet", "dynunet", "swinunetr")


def http_status(exc: InputError) -> int:
    """404 for things that do not exist, 400 for malformed ids/parameters, 422 for unusable content (the mapping of
    :func:`lib.validation.status_for`)."""
    return status_for(exc)


class MsxaiApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        conf = conf or {}
        # who may use the server (docs/security.md): decided before anything is loaded
        if settings.MONAI_LABEL_AUTH_ENABLE and not conf.get("auth_users"):
            raise SecurityConfigError("MONAI_LABEL_AUTH_ENABLE (MONAI Label's Keycloak authentication) is not used by "
                                      "this app: enable its own with --conf auth_users <users.json>")
        self.auth_policy = AuthPolicy.from_conf(conf)
        check_exposure(served_host(), self.auth_policy)
        models = [m.strip().lower() for m in str(conf.get("models", "all")).split(",") if m.strip()]
        if "all" in models:
            models = list(MODELS)
        bad = [m for m in models if m not in MODELS]
        if bad or not models:
            raise BundleLoadError(f"--conf models: unknown model(s) {bad or models}; choose all or from {', '.join(MODELS)}")
        bundles_dir = Path(conf.get("bundles_dir") or REPO_ROOT / "bundles")
        max_samples = int(conf.get("max_samples", MAX_SAMPLES_DEFAULT))
        # every model computation on one thread; explanations are jobs with a cost budget (lib/jobs.py)
        self.worker = ModelWorker()
        self.jobs = JobRegistry.from_conf(conf, self.worker, max_samples)
        self.service = StudyService(
            studies,
            {m: bundles_dir / f"msxai_{m}" for m in models},
            max_samples=max_samples,
            runner=self.worker,
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
        install_routes(self, extra_routers=[build_jobs_router(self)])
        if served_host() is not None:  # a server process (not an app built by a script or a test)
            install_signal_handlers()
        install_ohif_fixes()  # OHIF 3.10's Parametric Map loader (explain results in OHIF)
        install_batch_route(self)

    # ------------------------------------------------------------------------------------------- datastore
    def datastore(self) -> Datastore:
        """The datastore, re-read from its JSON file when another process wrote it since (MONAI Label's batch infer
        saves labels from a subprocess; without auto-reload the server would keep, and later write back, a copy
        without them). One stat per call."""
        ds = super().datastore()
        path, ts = getattr(ds, "_datastore_config_path", None), getattr(ds, "_config_ts", None)
        if path and os.path.exists(path) and os.stat(path).st_mtime != ts and hasattr(ds, "_init_from_datastore_file"):
            ds._init_from_datastore_file()
        return ds

    def batch_infer(self, request, datastore=None):
        """MONAI Label's batch infer over the datastore, for the segmentation tasks (:func:`lib.batch.batch_request`:
        label tag never ``final``, CPU-safe device); each image runs through :meth:`infer`. An image that fails
        (no T1, NaN, ...) gets ``{"error": ...}`` in the result and the others go on: MONAI Label 0.8.5 catches
        failures only with several workers and otherwise stops the whole batch at the first one."""
        try:
            request = batch_request(request, list(self._infers))
        except InputError as exc:
            raise HTTPException(status_code=http_status(exc), detail=str(exc)) from None

        def infer_one(req, ds):
            try:
                return self.infer(req, ds)
            except HTTPException as exc:
                logger.warning(f"msxai: batch infer: {req.get('image')}: {exc.detail}")
                return {"label": None, "error": f"{exc.status_code}: {exc.detail}"}
            except Exception as exc:  # noqa: BLE001 - one image must not stop the batch
                logger.warning(f"msxai: batch infer: {req.get('image')} failed", exc_info=True)
                return {"label": None, "error": f"{type(exc).__name__}: {exc}"}

        return self._batch_infer(request, datastore if datastore else self.datastore(), infer_one)

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
            infers["explain_smoothgrad"] = ExplainTask(self.service, "smoothgrad", self.jobs)
            infers["explain_gradcampp"] = ExplainTask(self.service, "gradcampp", self.jobs)
        return infers

    def init_trainers(self):
        return {}  # the bundles train with `msxai`/their own train.json, not through the label server

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    def init_scoring_methods(self):
        return {}

    # ---------------------------------------------------------------------------------------------- infer
    def infer(self, request, datastore=None):
        """Validate the image id and turn input errors into 4xx answers with the message; an explanation is a job
        (cost estimate and budget, progress, cancel: lib/jobs.py)."""
        job = None
        user = request.get("msxai_user") or "local"
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
            for k in ("msxai_t1", "msxai_job", "msxai_user", "lesions_label"):  # only the app sets them
                request.pop(k, None)
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
                job = self.jobs.create(user, model, image, {k: request.get(k) for k in (
                    "network", "explain_model", "lesion", "lesions_from", "samples", "aggregation", "sigma", "seed", "layer")
                    if request.get(k) not in (None, "")})
                request["msxai_job"] = job.id
            res = super().infer(request, datastore)
            if job is not None:
                self.jobs.finish(job, "done")
            if isinstance(ds, MsxaiDICOMwebDatastore) and res.get("file") and isinstance(res.get("params"), dict):
                res["params"]["dicom_seg"] = self._store_seg(ds, image, model, res)
                if model.startswith("explain_"):
                    res["params"]["dicom_saliency"] = self._store_saliency(ds, image, res)
            return res
        except InputError as exc:
            if job is not None:
                state = ("refused" if isinstance(exc, TooExpensiveError) else
                         "cancelled" if isinstance(exc, JobCancelledError) else "failed")
                self.jobs.finish(job, state, str(exc))
            logger.info(f"msxai: refused {request.get('model')} request: {exc}")
            raise HTTPException(status_code=http_status(exc), detail=str(exc)) from None
        except MONAILabelException as exc:
            raise HTTPException(status_code=400, detail=exc.msg) from None
        except requests.RequestException as exc:  # the DICOMweb server (PACS) failed, not the request
            logger.warning(f"msxai: DICOMweb server error for {request.get('model')}: {exc}")
            raise HTTPException(status_code=502, detail=f"DICOMweb server {self.studies}: {exc}") from None
        finally:
            if job is not None and job.finished is None:
                self.jobs.finish(job, "failed", "server error (see the server log)")
