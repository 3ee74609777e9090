"""The app object without a server: `--conf` model selection, start-up refusal of a bundle without weights,
the datastore listing only study images."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "msxai"
BUNDLES = REPO / "bundles"

def _app_class():
    from monailabel.config import settings
    from monailabel.utils.others.class_utils import get_class_of_subclass_from_file

    settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False  # no file watcher threads in the test process
    return get_class_of_subclass_from_file("main", str(APP / "main.py"), "MONAILabelApp")


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    d = tmp_path_factory.mktemp("studies")
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    rng = np.random.default_rng(0)
    for stem in ("a", "b"):
        for seq in ("FLAIR", "T1"):
            nib.save(nib.Nifti1Image(rng.random((20, 20, 20)).astype(np.float32), aff), str(d / f"{stem}_{seq}.nii.gz"))
        nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.uint8), aff), str(d / f"{stem}_lesions.nii.gz"))
    return d


def test_models_subset_and_listing(studies):
    import torch

    torch.set_num_threads(1)
    app = _app_class()(app_dir=str(APP), studies=str(studies), conf={"models": "unet, dynunet"})
    info = app.info()
    assert set(info["models"]) == {"segmentation_unet", "segmentation_dynunet", "explain_smoothgrad",
                                   "explain_gradcampp"}
    assert info["models"]["explain_gradcampp"]["config"]["network"] == ["unet", "dynunet"]
    assert info["labels"] == ["lesion"]
    assert sorted(app.datastore().list_images()) == ["a_FLAIR", "b_FLAIR"]
    assert info["trainers"] == {} and "random" in info["strategies"]
    no_explain = _app_class()(app_dir=str(APP), studies=str(studies), conf={"models": "unet", "explain": "false"})
    assert set(no_explain.info()["models"]) == {"segmentation_unet"}


def test_unknown_model_and_missing_weights_stop_startup(studies, tmp_path):
    cls = _app_class()
    from lib.service import BundleLoadError  # after loading the app: MONAI Label's loader reloads its lib package
    with pytest.raises(BundleLoadError, match="unknown model.*resnet"):
        cls(app_dir=str(APP), studies=str(studies), conf={"models": "unet,resnet"})
    bad = tmp_path / "bundles"
    shutil.copytree(BUNDLES / "msxai_unet", bad / "msxai_unet", ignore=shutil.ignore_patterns("*.pt"))
    with pytest.raises(BundleLoadError, match=r"bundle 'unet' .* model weights not found: .*model\.pt"):
        cls(app_dir=str(APP), studies=str(studies), conf={"models": "unet", "bundles_dir": str(bad)})
