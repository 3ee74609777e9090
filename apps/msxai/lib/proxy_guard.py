"""Which ``/proxy/dicom/...`` paths the app forwards to the PACS (see :func:`lib.routes.build_proxy_guard_router`)."""

from __future__ import annotations

from msxai.errors import InputError

DICOMWEB_RESOURCES = ("studies", "series", "instances")


def split_proxy_path(path: str) -> tuple[str, str]:
    """``"qido/studies/1.2/series"`` -> ``("qido", "studies/1.2/series")`` for MONAI Label's ``/proxy/dicom/...``
    routes, refusing (:class:`InputError`) anything but a DICOMweb resource under the server's DICOMweb root: dot
    segments (``..`` would leave the root and reach the PACS's whole REST API with the stack's credentials), empty
    segments, backslashes, and first segments other than studies/series/instances."""
    op, rest = "", path
    for prefix in ("qido/", "wado/", "stow/"):
        if path.startswith(prefix):
            op, rest = prefix[:-1], path[len(prefix):]
            break
    parts = rest.split("/")
    if (not rest or "\\" in rest or "%" in rest or any(p in ("", ".", "..") for p in parts[:-1])
            or parts[-1] in (".", "..") or parts[0] not in DICOMWEB_RESOURCES):
        raise InputError(f"not a DICOMweb resource path: {path!r} (studies/..., series/... or instances/... only)")
    return op, rest
