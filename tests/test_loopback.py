"""deploy.loopback (a server in its own network namespace, reachable only through a 127.0.0.1 relay) and the parts of
deploy.ohif_stack that need no Orthanc: its configuration and the listening-socket census."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from deploy.loopback import free_port, netns_available, netns_command
from deploy.ohif_stack import StackConfig, listening_sockets, orthanc_config, port_free

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "msxai"
_ok, _reason = netns_available()


def test_orthanc_config_is_locked_down(tmp_path):
    cfg = StackConfig(run_dir=tmp_path, orthanc_port=18042, password="pw")
    c = orthanc_config(cfg)
    assert c["AuthenticationEnabled"] is True and c["RegisteredUsers"] == {"msxai": "pw"}
    assert c["DicomServerEnabled"] is False and c["RemoteAccessAllowed"] is False
    assert c["HttpPort"] == 18042 and c["DicomWeb"]["Enable"] is True
    assert str(tmp_path) in c["StorageDirectory"]


def test_password_generated_once_and_private(tmp_path):
    cfg = StackConfig(run_dir=tmp_path)
    pw = cfg.load_or_create_password()
    assert len(pw) >= 20
    assert oct((tmp_path / "credentials.json").stat().st_mode & 0o777) == "0o600"
    assert StackConfig(run_dir=tmp_path).load_or_create_password() == pw


@pytest.mark.skipif(not _ok, reason=f"network namespaces not available here: {_reason}")
def test_server_in_netns_reachable_only_through_loopback_relay(tmp_path):
    port = free_port()
    (tmp_path / "hello.txt").write_text("hello from the namespace")
    srv = subprocess.Popen(netns_command([sys.executable, "-m", "http.server", str(port), "--bind", "0.0.0.0",
                                          "--directory", str(tmp_path)]),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    relay = None
    try:
        deadline = time.time() + 10
        while os.readlink(f"/proc/{srv.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            assert time.time() < deadline
            time.sleep(0.1)
        assert port_free(port), "the namespaced server must not occupy the host's port"
        relay = subprocess.Popen([sys.executable, "-m", "deploy.loopback", "--listen", str(port), "--netns-pid",
                                  str(srv.pid), "--target", str(port)], start_new_session=True,
                                 cwd=str(APP_DIR))  # python -m deploy.loopback: the app's package
        deadline = time.time() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello.txt", timeout=2) as r:
                    assert r.read() == b"hello from the namespace"
                    break
            except OSError:
                assert time.time() < deadline, "relay did not answer"
                time.sleep(0.2)
        socks = listening_sockets([srv.pid, relay.pid])
        assert socks == [("127.0.0.1", port)], socks  # the relay only; the server's socket is in its namespace
        # several connections at once through the relay
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as ex:
            bodies = list(ex.map(lambda _: urllib.request.urlopen(f"http://127.0.0.1:{port}/hello.txt").read(),
                                 range(16)))
        assert set(bodies) == {b"hello from the namespace"}
    finally:
        for p in (relay, srv):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, 15)
                p.wait(10)


def test_relay_refuses_non_loopback():
    from deploy.loopback import serve_relay

    with pytest.raises(ValueError, match="loopback only"):
        serve_relay(1, os.getpid(), 1, listen_host="0.0.0.0")
