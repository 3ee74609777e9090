#!/usr/bin/env bash
# Debian packages of the OHIF path (docs/ohif.md): Orthanc + its DICOMweb plugin, Chromium for the browser test,
# iproute2 for the network namespace, dicom3tools (dciodvfy: the DICOM SEG / Parametric Map / SR checks). Tolerant: without them (no root, no network, not Debian) the OHIF tests skip
# with the reason, and everything else still runs.
set -uo pipefail
pkgs="orthanc orthanc-dicomweb chromium fonts-liberation iproute2 util-linux dicom3tools"
if command -v Orthanc >/dev/null && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] && command -v chromium >/dev/null \
   && command -v ip >/dev/null && command -v dciodvfy >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install_ohif_deps: no apt-get here; the OHIF tests will skip" >&2; exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "install_ohif_deps: not root; the OHIF tests will skip" >&2; exit 0; fi
fi
start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
# the orthanc package must not start its service (it would listen on all interfaces): deny service starts during
# the install unless a policy-rc.d already decides (containers usually have one that says no)
made_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  $SUDO sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d' && made_policy=1
fi
$SUDO apt-get update -q >/tmp/msxai_apt.log 2>&1 \
  && $SUDO apt-get install -y -q --no-install-recommends $pkgs >>/tmp/msxai_apt.log 2>&1 \
  && echo "install_ohif_deps: $pkgs installed ($(( $(date +%s) - start )) s)" \
  || { echo "install_ohif_deps: apt-get failed (see /tmp/msxai_apt.log); the OHIF tests will skip" >&2; tail -5 /tmp/msxai_apt.log >&2; }
[ "$made_policy" = 1 ] && $SUDO rm -f /usr/sbin/policy-rc.d
# a packaged Orthanc service (if the package started one) would listen on all interfaces: stop it
if command -v service >/dev/null && service orthanc status >/dev/null 2>&1; then $SUDO service orthanc stop || true; fi
exit 0
