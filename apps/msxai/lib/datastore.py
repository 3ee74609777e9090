"""The studies folder as MONAI Label sees it: only study images (the FLAIRs) are listed, never their T1/MPRAGE or
the derived files beside them (lesion masks, brain masks); the naming rule is :mod:`msxai.studies`."""

from __future__ import annotations

import logging
import os

from monailabel.datastore.local import LocalDatastore

from msxai.studies import is_study_image

logger = logging.getLogger(__name__)


class MsxaiDatastore(LocalDatastore):
    """A :class:`LocalDatastore` whose image listing follows :func:`msxai.studies.is_study_image`."""

    def _is_images_dir(self, path) -> bool:
        return os.path.realpath(path) == os.path.realpath(self._datastore.image_path())

    def _list_files(self, path, patterns):
        files = super()._list_files(path, patterns)
        if self._is_images_dir(path):
            files = {k: v for k, v in files.items() if is_study_image(k)}
        return files

    def _remove_non_existing(self) -> int:
        # also forget companions that an earlier, unfiltered datastore_v2.json registered as images
        invalidate = super()._remove_non_existing()
        drop = [
            k
            for k, v in self._datastore.objects.items()
            if not is_study_image(self._filename(k, v.image.ext)) and not v.labels
        ]
        for k in drop:
            logger.info(f"msxai: not a study image (T1/derived file), unlisted: {k}")
            self._datastore.objects.pop(k, None)
        return invalidate + len(drop)
