"""Test set-up: the MONAI Label app's packages (``lib``: tasks, routes, proxy guard; ``deploy``: the OHIF stack and
the loopback relay) are importable as the app itself imports them, with ``apps/msxai`` on ``sys.path``."""

import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "msxai"
if str(APP_DIR) not in sys.path:
    sys.path.append(str(APP_DIR))
