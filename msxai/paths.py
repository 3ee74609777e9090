"""Where msxai finds what is not inside the package: bundles, the real patient, the default cohort and run folders.

An installed msxai (a wheel, anywhere) knows no repository: a bundle is a folder given by path (``--bundle DIR``) or
found by name (``unet``, ``msxai_unet``) in ``$MSXAI_BUNDLES``; the real patient is a folder given as an argument or
``$MSXAI_REAL_DATA``. Only when msxai runs from a development checkout (this package beside ``pyproject.toml`` and
``bundles/``) does :func:`checkout_root` name that repository, and only for defaults: ``<repo>/bundles``,
``<repo>/../shared/data/open_ms_data/patient26``, ``<repo>/data/synth``, ``<repo>/runs``. No other module guesses
where the repository is.
"""

from __future__ import annotations

import os
from pathlib import Path

BUNDLES_ENV = "MSXAI_BUNDLES"
REAL_DATA_ENV = "MSXAI_REAL_DATA"


def checkout_root() -> Path | None:
    """The repository msxai runs from when it is a development checkout (an editable install or ``PYTHONPATH``), the
    folder holding this package, ``pyproject.toml`` and ``bundles/``; None for an installed wheel."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "bundles").is_dir():
        return root
    return None


def checkout_path(*parts: str) -> Path | None:
    """``<repo>/<parts>`` of a development checkout, None for an installed wheel."""
    root = checkout_root()
    return root.joinpath(*parts) if root is not None else None


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


def bundles_dir() -> Path | None:
    """Where bundles are found by name: ``$MSXAI_BUNDLES``, else ``<repo>/bundles`` of a checkout, else None."""
    return _env_path(BUNDLES_ENV) or checkout_path("bundles")


def real_data_dir() -> Path | None:
    """Where the real patient is looked for: ``$MSXAI_REAL_DATA``, else
    ``<repo>/../shared/data/open_ms_data/patient26`` beside a checkout, else None."""
    env = _env_path(REAL_DATA_ENV)
    if env is not None:
        return env
    root = checkout_root()
    return root.parent / "shared" / "data" / "open_ms_data" / "patient26" if root is not None else None
