"""Keep a server that cannot bind to 127.0.0.1 off the network: run it in its own network namespace (whose only
interface is a loopback) and relay ``127.0.0.1:PORT`` of the host into it.

Orthanc 1.10 (Debian bookworm) has no bind-address option: its HTTP server listens on every interface. Started with
:func:`netns_command` it listens on every interface *of a namespace that has only ``lo``*, so nothing outside the
machine (nor the host's own interfaces) can reach it; :func:`serve_relay` (``python -m deploy.loopback``
with ``apps/msxai`` on ``PYTHONPATH``) listens on
the host's ``127.0.0.1:PORT`` only and opens, for each connection, a socket inside the namespace (a thread that
``setns``-ed into it) to the server's port there.

Needs the right to create network namespaces (root or CAP_SYS_ADMIN; ``unshare -n``); :func:`netns_available`
says whether this machine grants it.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

CLONE_NEWNET = 0x40000000


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (the kernel's pick for port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def netns_available() -> tuple[bool, str]:
    """Whether ``unshare -n`` works here (and ``ip`` exists to bring its loopback up); ``(ok, reason)``."""
    if not shutil.which("unshare"):
        return False, "the unshare command (util-linux) is missing"
    if not shutil.which("ip"):
        return False, "the ip command (iproute2) is missing"
    try:
        r = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, text=True,
                           timeout=20)
    except Exception as exc:  # pragma: no cover
        return False, f"unshare -n failed: {exc}"
    if r.returncode != 0:
        return False, f"unshare -n failed (needs root or CAP_SYS_ADMIN): {r.stderr.strip()[:200]}"
    return True, "network namespaces available"


def netns_command(argv: list[str]) -> list[str]:
    """``argv`` run in a new network namespace with its loopback up (the process keeps the pid of ``unshare``)."""
    import shlex

    return ["unshare", "-n", "sh", "-c", "ip link set lo up && exec " + " ".join(shlex.quote(a) for a in argv)]


def _enter_netns(pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into the network namespace of pid {pid}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def serve_relay(listen_port: int, netns_pid: int, target_port: int, listen_host: str = "127.0.0.1",
                ready: threading.Event | None = None) -> None:
    """Relay ``listen_host:listen_port`` (host namespace) to ``127.0.0.1:target_port`` in the network namespace of
    ``netns_pid``; runs until the process ends or the namespace's process is gone."""
    if listen_host not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError(f"the relay listens on loopback only, not {listen_host!r}")
    connector = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns", initializer=_enter_netns,
                                   initargs=(netns_pid,))
    connector.submit(lambda: None).result()  # fail now if setns is refused
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((listen_host, listen_port))
    srv.listen(64)
    if ready is not None:
        ready.set()

    def handle(client: socket.socket) -> None:
        try:
            upstream = connector.submit(socket.create_connection, ("127.0.0.1", target_port), 10).result()
        except OSError:
            client.close()
            return
        t = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        t.start()
        _pump(client, upstream)
        t.join()
        client.close()
        upstream.close()

    while True:
        if not os.path.exists(f"/proc/{netns_pid}"):
            break
        srv.settimeout(2.0)
        try:
            client, _ = srv.accept()
        except socket.timeout:
            continue
        client.settimeout(None)
        threading.Thread(target=handle, args=(client,), daemon=True).start()
    srv.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.loopback",
                                 description="relay 127.0.0.1:PORT into the network namespace of a process")
    ap.add_argument("--listen", type=int, required=True, help="port on the host's 127.0.0.1")
    ap.add_argument("--netns-pid", type=int, required=True, help="a process inside the target namespace")
    ap.add_argument("--target", type=int, required=True, help="port on 127.0.0.1 inside the namespace")
    a = ap.parse_args(argv)
    try:
        serve_relay(a.listen, a.netns_pid, a.target)
    except OSError as exc:
        print(f"deploy.loopback: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
