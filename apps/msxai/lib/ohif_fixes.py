"""Fixes of the OHIF 3.10 build that monailabel 0.8.5 serves at ``/ohif/``, applied when the app serves it.

DICOM Parametric Maps (what the explain tasks store for OHIF, :mod:`msxai.dicom_pmap`): the cornerstone adapter
that OHIF's ``dicom-pmap`` extension loads them with (``@cornerstonejs/adapters``,
``Cornerstone/ParametricMap.js``, ``insertPixelDataPlanar``) has two bugs in this build:

1. frame ``i`` is read at ``new Float32Array(buffer, i * sliceLength, sliceLength)``: a *byte* offset given in
   elements, so every frame but the first is read from the wrong place (a RangeError when rows x columns is not a
   multiple of 4, as for the 2 mm test study; misplaced data otherwise). Fixed: the offset is multiplied by the
   element size.
2. the volume it fills is as long as the parametric map (``NumberOfFrames`` slices) while frame ``i`` is written at
   the index of its source image in the referenced volume: a map whose frames do not start at the volume's first
   slice fails with a RangeError. Fixed: the buffer has the referenced volume's length (``rows x columns x`` the
   number of its images), slices without a frame stay 0 (transparent in the PM viewport).

The bundle that holds that code is found at start-up by its exact text; the fixed copy is served in its place (same
URL) by a route in front of MONAI Label's ``/ohif/{path}``. A build without that text is served unchanged (logged).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

FIXES = (
    ("new sourcePixelData.constructor(sourcePixelData.buffer, i * sliceLength, sliceLength)",
     "new sourcePixelData.constructor(sourcePixelData.buffer, sourcePixelData.byteOffset + i * sliceLength * "
     "sourcePixelData.BYTES_PER_ELEMENT, sliceLength)"),
    ("var targetPixelData = new sourcePixelData.constructor(sourcePixelData.length);",
     "var targetPixelData = new sourcePixelData.constructor(multiframe.Rows * multiframe.Columns * imageIds.length);"),
)


def ohif_dir() -> Path:
    """MONAI Label's OHIF build (found without importing monailabel, which loads its settings and torch)."""
    import importlib.util

    spec = importlib.util.find_spec("monailabel")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("monailabel is not installed")
    return Path(os.path.realpath(list(spec.submodule_search_locations)[0])) / "endpoints" / "static" / "ohif"


def patched_bundles(folder: Path | None = None) -> dict[str, str]:
    """``{bundle file name: fixed text}`` of the OHIF build's bundles that hold every text of :data:`FIXES`."""
    folder = folder or ohif_dir()
    out = {}
    for p in sorted(folder.glob("*.js")):
        text = p.read_text(encoding="utf-8", errors="surrogateescape")
        if all(text.count(old) == 1 for old, _ in FIXES):
            for old, new in FIXES:
                text = text.replace(old, new)
            out[p.name] = text
    return out


def build_router(bundles: dict[str, str]):
    from fastapi import APIRouter, Depends
    from fastapi.responses import Response
    from monailabel.config import settings
    from monailabel.endpoints.user.auth import RBAC, User

    router = APIRouter(prefix="/ohif", tags=["Others"])
    for name, text in bundles.items():
        body = text.encode("utf-8", errors="surrogateescape")

        def serve(user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)), _body=body):
            return Response(_body, media_type="application/javascript", headers={"Cache-Control": "no-cache"})

        router.add_api_route(f"/{name}", serve, methods=["GET"], include_in_schema=False, name="msxai_ohif_fix")
    return router


def install_ohif_fixes(fastapi_app=None) -> list[str]:
    """Serve the fixed bundles in front of MONAI Label's ``/ohif/{path}``; returns their names."""
    import sys

    if fastapi_app is None:
        mod = sys.modules.get("monailabel.app")
        fastapi_app = getattr(mod, "app", None) if mod else None
    if fastapi_app is None:
        return []
    try:
        bundles = patched_bundles()
    except Exception as exc:  # no OHIF build in this MONAI Label: nothing to fix
        logger.warning(f"msxai: OHIF build not inspected ({exc}); Parametric Maps may not load in OHIF")
        return []
    if not bundles:
        logger.warning("msxai: the OHIF build has no known Parametric Map loader to fix; served unchanged")
        return []
    from monailabel.config import settings

    fastapi_app.router.routes = [r for r in fastapi_app.router.routes if getattr(r, "name", "") != "msxai_ohif_fix"]
    n = len(fastapi_app.router.routes)
    fastapi_app.include_router(build_router(bundles), prefix=settings.MONAI_LABEL_API_STR)
    added = fastapi_app.router.routes[n:]
    fastapi_app.router.routes = added + fastapi_app.router.routes[:n]
    fastapi_app.openapi_schema = None
    logger.info(f"msxai: OHIF Parametric Map loader fixed in {', '.join(bundles)}")
    return sorted(bundles)
