"""The app's ``/proxy/dicom/...`` guard (``apps/msxai/lib/proxy_guard.py``): only DICOMweb resource paths pass."""

import pytest

from lib.proxy_guard import split_proxy_path
from msxai.errors import InputError


def test_proxy_paths_only_dicomweb_resources():
    assert split_proxy_path("qido/studies") == ("qido", "studies")
    assert split_proxy_path("wado/studies/1.2/series/3.4/metadata") == ("wado", "studies/1.2/series/3.4/metadata")
    assert split_proxy_path("stow/studies") == ("stow", "studies")
    assert split_proxy_path("series") == ("", "series")
    assert split_proxy_path("studies/1.2/series/3.4/instances/5.6/frames/1") == (
        "", "studies/1.2/series/3.4/instances/5.6/frames/1")
    for bad in ("../system", "qido/../../system", "studies/../../tools/execute-script", "system", "tools/reset",
                "", "qido/", "studies//x", "studies/./x", "studies\\x", "studies/..", "wado/instances/%2e%2e/x"):
        with pytest.raises(InputError, match="not a DICOMweb resource path"):
            split_proxy_path(bad)
