"""The OHIF path on one machine, loopback only: Orthanc (+ DICOMweb plugin, authentication on) holding a FLAIR/T1
study, the msxai MONAI Label app serving it through MONAI Label's DICOMweb datastore, and the OHIF viewer the
monailabel wheel ships (``/ohif/`` of the app server, DICOMweb through the server's ``/proxy/dicom/``).

    scripts/ohif_stack.sh up      # = PYTHONPATH=apps/msxai python -m deploy.ohif_stack up
    scripts/ohif_stack.sh status
    scripts/ohif_stack.sh load --flair F.nii.gz --t1 T.nii.gz   # another study into the running Orthanc
    scripts/ohif_stack.sh down

Network: Orthanc 1.10 cannot bind to one address, so it runs in its own network namespace (only ``lo``) and
:mod:`deploy.loopback` relays the host's ``127.0.0.1:<orthanc port>`` into it; its DICOM (DIMSE) port is switched
off; the app server is started with ``--host 127.0.0.1``. Credentials: a user ``msxai`` with a random password
kept in ``<run dir>/credentials.json`` (mode 600), passed to MONAI Label as ``MONAI_LABEL_DICOMWEB_USERNAME`` /
``MONAI_LABEL_DICOMWEB_PASSWORD`` (its settings; the ``/proxy/dicom`` route uses them too).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[1]  # apps/msxai: the MONAI Label app (packages lib, deploy)
REPO_ROOT = APP_DIR.parents[1]
ORTHANC_BIN = "Orthanc"
DICOMWEB_PLUGIN_PATHS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                         "/usr/lib/orthanc/plugins/libOrthancDicomWeb.so")


class StackError(RuntimeError):
    """The stack cannot start (missing package, port taken, a process that died); the message says which."""


def dicomweb_plugin() -> str | None:
    return next((p for p in DICOMWEB_PLUGIN_PATHS if os.path.isfile(p)), None)


def missing_requirements() -> list[str]:
    """What this machine lacks to run the stack (empty list: all there)."""
    out = []
    if not shutil.which(ORTHANC_BIN):
        out.append("Orthanc (Debian package 'orthanc')")
    if not dicomweb_plugin():
        out.append("the Orthanc DICOMweb plugin (Debian package 'orthanc-dicomweb')")
    return out


@dataclass
class StackConfig:
    run_dir: Path = REPO_ROOT / "out" / "ohif_stack"
    orthanc_port: int = 8042
    server_port: int = 8000
    user: str = "msxai"
    password: str = ""
    models: str = "unet"
    bundles_dir: Path | None = None
    netns: bool | None = None  # None: use a network namespace when available, else refuse
    python: str = sys.executable
    extra_env: dict = field(default_factory=dict)

    def __post_init__(self):
        self.run_dir = Path(self.run_dir).resolve()

    @property
    def orthanc_url(self) -> str:
        return f"http://127.0.0.1:{self.orthanc_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.orthanc_url}/dicom-web"

    @property
    def server_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    @property
    def auth(self) -> tuple[str, str]:
        return self.user, self.password

    def load_or_create_password(self) -> str:
        """The stack's Orthanc password: given, kept from an earlier ``up`` or new (random), stored mode 600."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        f = self.run_dir / "credentials.json"
        if not self.password and f.is_file():
            data = json.loads(f.read_text())
            if data.get("user") == self.user:
                self.password = data.get("password", "")
        if not self.password:
            self.password = secrets.token_urlsafe(18)
        fd = os.open(str(f), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"user": self.user, "password": self.password}, fh)
        os.chmod(f, 0o600)
        return self.password


def orthanc_config(cfg: StackConfig) -> dict:
    plugin = dicomweb_plugin()
    return {
        "Name": "msxai-orthanc",
        "StorageDirectory": str(cfg.run_dir / "orthanc-db"),
        "IndexDirectory": str(cfg.run_dir / "orthanc-db"),
        "Plugins": [plugin] if plugin else [],
        "HttpServerEnabled": True,
        "HttpPort": cfg.orthanc_port,
        "RemoteAccessAllowed": False,  # inside the namespace every client is 127.0.0.1 anyway
        "AuthenticationEnabled": True,
        "RegisteredUsers": {cfg.user: cfg.password},
        "DicomServerEnabled": False,  # no DIMSE port at all: DICOMweb only
        "DicomPort": 4242,
        "HttpDescribeErrors": True,
        "SaveJobs": False,
        "StableAge": 2,
        "OverwriteInstances": True,  # the app's SEG of the same result has the same UIDs: replace, never duplicate
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                     "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
    }


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _spawn(argv, log: Path, env=None, cwd=None) -> subprocess.Popen:
    fh = open(log, "ab")
    try:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
    finally:
        fh.close()


def http_status(url: str, auth: tuple[str, str] | None = None, timeout: float = 5.0) -> int:
    import base64

    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _wait(check, what: str, timeout: float, procs=()) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p, log in procs:
            if p.poll() is not None:
                tail = Path(log).read_text(errors="replace")[-3000:] if Path(log).is_file() else ""
                raise StackError(f"{what}: process exited with code {p.returncode}; log {log}:\n{tail}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise StackError(f"{what}: not ready after {timeout:.0f} s")


def start_orthanc(cfg: StackConfig) -> dict:
    """Start Orthanc (own network namespace + relay, or refuse) and wait for its REST API; returns pids."""
    from deploy.loopback import netns_available, netns_command

    missing = missing_requirements()
    if missing:
        raise StackError("missing: " + "; ".join(missing) + " (apt-get install orthanc orthanc-dicomweb)")
    if not port_free(cfg.orthanc_port):
        raise StackError(f"127.0.0.1:{cfg.orthanc_port} is taken: pick another --orthanc-port or run 'down' first")
    cfg.load_or_create_password()
    (cfg.run_dir / "orthanc-db").mkdir(parents=True, exist_ok=True)
    conf = cfg.run_dir / "orthanc.json"
    fd = os.open(str(conf), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the password
    with os.fdopen(fd, "w") as fh:
        json.dump(orthanc_config(cfg), fh, indent=1)
    use_ns = cfg.netns
    ok, reason = netns_available()
    if use_ns is None:
        if not ok:
            raise StackError(
                f"cannot isolate Orthanc: {reason}. Orthanc 1.10 listens on every interface (it has no bind "
                "address); run as root, or pass --no-netns to accept that (RemoteAccessAllowed=false still "
                "refuses non-local clients)")
        use_ns = True
    elif use_ns and not ok:
        raise StackError(f"--netns asked for but {reason}")
    log = cfg.run_dir / "orthanc.log"
    argv = [shutil.which(ORTHANC_BIN), str(conf)]
    proc = _spawn(netns_command(argv) if use_ns else argv, log)
    state = {"orthanc_pid": proc.pid, "netns": use_ns}
    procs = [(proc, log)]
    if use_ns:
        rlog = cfg.run_dir / "relay.log"
        _wait(lambda: os.readlink(f"/proc/{proc.pid}/ns/net") != os.readlink("/proc/self/ns/net"),
              "Orthanc's network namespace", 20, procs)
        relay = _spawn([cfg.python, "-m", "deploy.loopback", "--listen", str(cfg.orthanc_port),
                        "--netns-pid", str(proc.pid), "--target", str(cfg.orthanc_port)], rlog,
                       env=_env(cfg), cwd=str(REPO_ROOT))
        state["relay_pid"] = relay.pid
        procs.append((relay, rlog))
    try:
        _wait(lambda: http_status(cfg.orthanc_url + "/system", cfg.auth) == 200, "Orthanc", 60, procs)
    except StackError:
        stop_pids(state)
        raise
    return state


def _env(cfg: StackConfig) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    paths = [str(REPO_ROOT), str(APP_DIR)]  # the msxai library (when not installed) and the app's deploy package
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(cfg.extra_env)
    return env


def server_env(cfg: StackConfig) -> dict:
    env = _env(cfg)
    env.update({
        "MONAI_LABEL_DICOMWEB_USERNAME": cfg.user,
        "MONAI_LABEL_DICOMWEB_PASSWORD": cfg.password,
        "MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "MR"}),
        "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(cfg.run_dir / "cache"),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def start_server(cfg: StackConfig, timeout: float = 300) -> dict:
    """The msxai MONAI Label app on 127.0.0.1 with Orthanc's DICOMweb as its studies."""
    if not port_free(cfg.server_port):
        raise StackError(f"127.0.0.1:{cfg.server_port} is taken: pick another --port or run 'down' first")
    argv = [cfg.python, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR),
            "--studies", cfg.dicomweb_url, "--host", "127.0.0.1", "--port", str(cfg.server_port),
            "--conf", "models", cfg.models]
    if cfg.bundles_dir:
        argv += ["--conf", "bundles_dir", str(cfg.bundles_dir)]
    log = cfg.run_dir / "server.log"
    proc = _spawn(argv, log, env=server_env(cfg), cwd=str(REPO_ROOT))
    state = {"server_pid": proc.pid}
    try:
        _wait(lambda: http_status(cfg.server_url + "/info/") == 200, "MONAI Label server", timeout, [(proc, log)])
    except StackError:
        stop_pids(state)
        raise
    return state


def store_datasets(cfg: StackConfig, datasets, chunk: int = 32) -> list[str]:
    """STOW-RS ``datasets`` into Orthanc; returns the stored SOPInstanceUIDs."""
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    client = DICOMwebClient(url=cfg.dicomweb_url, session=create_session_from_user_pass(*cfg.auth))
    datasets = list(datasets)
    for i in range(0, len(datasets), chunk):
        client.store_instances(datasets[i:i + chunk])
    return [str(d.SOPInstanceUID) for d in datasets]


def load_study(cfg: StackConfig, flair: Path | None = None, t1: Path | None = None, voxel_size: float = 1.0,
               seed: int = 7) -> dict:
    """Convert a FLAIR/T1 NIfTI pair (default: the synthetic subject of ``msxai synth --n 1 --seed 7``) to one
    DICOM study (series FLAIR and T1) and store it in Orthanc."""
    from msxai.dicom import StudyInfo, study_from_nifti

    if flair is None or t1 is None:
        if flair or t1:
            raise StackError("give both --flair and --t1, or neither (synthetic default)")
        d = cfg.run_dir / f"synth_seed{seed}_{voxel_size:g}mm"
        if not (d / "synth000_FLAIR.nii.gz").is_file():
            subprocess.run([cfg.python, "-m", "msxai", "synth", "--out", str(d), "--n", "1", "--seed", str(seed),
                            "--voxel-size", f"{voxel_size:g}", "--no-progress"], check=True, env=_env(cfg),
                           cwd=str(REPO_ROOT), capture_output=True)
        flair, t1 = d / "synth000_FLAIR.nii.gz", d / "synth000_T1.nii.gz"
        study = StudyInfo(patient_id=f"MSXAI-SYNTH-{seed}", patient_name=f"Synthetic^Seed{seed}",
                          study_description=f"msxai synthetic MS study (seed {seed}, {voxel_size:g} mm)")
    else:
        stem = Path(flair).name.split(".")[0]
        study = StudyInfo(patient_id=f"MSXAI-{stem}"[:64], patient_name=f"msxai^{stem}"[:64],
                          study_description=f"msxai study {stem}"[:64])
    # one study per input content: a changed FLAIR/T1 becomes another study, never extra series in this one (which
    # would make its T1 ambiguous)
    from msxai.dicom import stable_uid
    from msxai.io import file_sha256

    study.study_uid = stable_uid("study", study.patient_id, study.study_description, file_sha256(flair),
                                 file_sha256(t1))
    study.frame_of_reference_uid = stable_uid("for", study.study_uid)
    series = study_from_nifti(flair, t1, study)
    for s in series.values():
        store_datasets(cfg, s)
    return {"StudyInstanceUID": study.study_uid,
            "series": {k: str(v[0].SeriesInstanceUID) for k, v in series.items()},
            "flair": str(flair), "t1": str(t1)}


def _is_ours(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return any(k in cmd for k in ("Orthanc", "deploy.loopback", "monailabel.main"))


def stop_pids(state: dict, timeout: float = 20) -> list[int]:
    """Terminate the stack's processes (and their process groups) named in ``state``."""
    stopped = []
    for key in ("server_pid", "relay_pid", "orthanc_pid"):
        pid = state.get(key)
        if not pid or not _is_ours(pid):
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                continue
        deadline = time.time() + timeout
        while time.time() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        stopped.append(pid)
    return stopped


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        st = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return st != "Z"
    except OSError:
        return False


def listening_sockets(pids) -> list[tuple[str, int]]:
    """``(address, port)`` of the TCP sockets listening in the host's network namespace that belong to ``pids``
    (and their children), from ``/proc/net/tcp{,6}`` and each process's file descriptors."""
    inodes = set()
    todo, seen = list(pids), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
            for t in os.listdir(f"/proc/{pid}/task"):
                kids = Path(f"/proc/{pid}/task/{t}/children").read_text().split()
                todo.extend(int(k) for k in kids)
        except OSError:
            continue
    out = []
    for fname, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(fname).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] != "0A" or parts[9] not in inodes:  # 0A = LISTEN
                continue
            addr, port = parts[1].split(":")
            out.append((_hex_addr(addr, v6), int(port, 16)))
    return out


def _hex_addr(h: str, v6: bool) -> str:
    import ipaddress

    b = bytes.fromhex(h)
    if not v6:
        return str(ipaddress.IPv4Address(b[::-1]))
    b = b"".join(b[i:i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(b))


def state_file(cfg: StackConfig) -> Path:
    return cfg.run_dir / "stack.json"


def up(cfg: StackConfig, flair=None, t1=None, voxel_size: float = 1.0, log=print) -> dict:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    if state_file(cfg).is_file():
        old = json.loads(state_file(cfg).read_text())
        if any(_alive(old.get(k, 0) or 0) and _is_ours(old.get(k) or 0) for k in ("server_pid", "orthanc_pid")):
            raise StackError(f"a stack is already running from {cfg.run_dir} (run 'down' first)")
    t0 = time.time()
    state = start_orthanc(cfg)
    state_file(cfg).write_text(json.dumps(state))
    log(f"Orthanc {cfg.orthanc_url} (DICOMweb {cfg.dicomweb_url}; {'own network namespace + loopback relay' if state['netns'] else 'all interfaces, remote access refused'}) up in {time.time() - t0:.1f} s")
    try:
        t1_ = time.time()
        study = load_study(cfg, flair, t1, voxel_size=voxel_size)
        state["study"] = study
        log(f"study {study['StudyInstanceUID']} stored (FLAIR {study['series']['FLAIR']}, T1 {study['series']['T1']}) "
            f"in {time.time() - t1_:.1f} s")
        t2 = time.time()
        state.update(start_server(cfg))
        state_file(cfg).write_text(json.dumps(state))
        log(f"MONAI Label app {cfg.server_url} up in {time.time() - t2:.1f} s")
    except BaseException:
        stop_pids(state)
        raise
    state.update({"orthanc_url": cfg.orthanc_url, "server_url": cfg.server_url, "ohif": cfg.server_url + "/ohif/",
                  "user": cfg.user, "credentials": str(cfg.run_dir / "credentials.json")})
    state_file(cfg).write_text(json.dumps(state, indent=1))
    log(f"open {cfg.server_url}/ohif/ (Orthanc user '{cfg.user}', password in {cfg.run_dir / 'credentials.json'})")
    return state


def down(cfg: StackConfig, log=print) -> list[int]:
    f = state_file(cfg)
    if not f.is_file():
        log(f"no stack state in {cfg.run_dir}")
        return []
    stopped = stop_pids(json.loads(f.read_text()))
    f.unlink()
    log(f"stopped {len(stopped)} process(es)")
    return stopped


def status(cfg: StackConfig) -> dict:
    f = state_file(cfg)
    if not f.is_file():
        return {"running": False}
    state = json.loads(f.read_text())
    pids = [state.get(k) for k in ("orthanc_pid", "relay_pid", "server_pid") if state.get(k)]
    state["alive"] = {str(p): _alive(p) and _is_ours(p) for p in pids}
    state["listening"] = sorted(set(listening_sockets([p for p in pids if _alive(p)])))
    state["running"] = all(state["alive"].values()) if pids else False
    return state


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/ohif_stack.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["up", "down", "status", "load"],
                    help="load: store another FLAIR/T1 study (--flair, --t1) in the running stack's Orthanc")
    ap.add_argument("--run-dir", default=os.environ.get("MSXAI_OHIF_DIR", str(REPO_ROOT / "out" / "ohif_stack")))
    ap.add_argument("--orthanc-port", type=int, default=int(os.environ.get("MSXAI_ORTHANC_PORT", 8042)))
    ap.add_argument("--port", type=int, default=int(os.environ.get("MSXAI_PORT", 8000)), help="app server port")
    ap.add_argument("--models", default="unet", help="bundles served (all or a comma list)")
    ap.add_argument("--flair", type=Path, help="FLAIR NIfTI (default: synthetic subject, seed 7)")
    ap.add_argument("--t1", type=Path, help="T1/MPRAGE NIfTI on the FLAIR's grid")
    ap.add_argument("--voxel-size", type=float, default=1.0, help="synthetic default's voxel size in mm")
    ap.add_argument("--no-netns", action="store_true",
                    help="run Orthanc without its own network namespace (it then listens on all interfaces)")
    a = ap.parse_args(argv)
    cfg = StackConfig(run_dir=Path(a.run_dir), orthanc_port=a.orthanc_port, server_port=a.port, models=a.models,
                      netns=False if a.no_netns else None)
    try:
        if a.action == "up":
            up(cfg, a.flair, a.t1, voxel_size=a.voxel_size)
        elif a.action == "down":
            down(cfg)
        elif a.action == "load":
            if not status(cfg).get("running"):
                raise StackError(f"no running stack in {cfg.run_dir} (run 'up' first)")
            cfg.load_or_create_password()
            st = load_study(cfg, a.flair, a.t1, voxel_size=a.voxel_size)
            print(f"study {st['StudyInstanceUID']} stored (FLAIR {st['series']['FLAIR']}, T1 {st['series']['T1']})")
        else:
            print(json.dumps(status(cfg), indent=1))
    except (StackError, ValueError) as exc:
        print(f"ohif_stack: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
