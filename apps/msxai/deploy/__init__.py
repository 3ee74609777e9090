"""Deployment of the msxai MONAI Label app (not science: nothing under ``msxai/`` imports it).

- :mod:`deploy.ohif_stack`  the OHIF path on one machine: Orthanc (DICOMweb, authentication, own network namespace),
  a FLAIR/T1 study stored by STOW-RS, the app on Orthanc's DICOMweb (``scripts/ohif_stack.sh up|status|load|down``)
- :mod:`deploy.loopback`    a server in its own network namespace reachable only through a ``127.0.0.1`` relay

Importable as ``deploy`` with ``apps/msxai`` on ``sys.path`` (as the app's ``lib`` package is).
"""
