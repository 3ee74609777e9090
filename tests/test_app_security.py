"""The app served as it is exposed: `monailabel start_server` on 127.0.0.1 with authentication on (local users,
bearer tokens) and the U-Net bundle, driven with MONAI Label's own client (MONAILabelClient: what the Slicer module
calls) and raw HTTP. One server for the module.

Checked: a start on another address without authentication is refused with the reason; tokens (good, wrong
password, missing, forged, expired, tampered, `alg: none`, removed user, role changed) and roles (403 matrix); the
route inventory (every route of /openapi.json and those left out of it is protected or on the explicit public list);
datastore writes over HTTP (wrong-grid / garbage / empty / traversal-tag saves leave the label byte for byte and
nothing appears outside the studies folder; history and undo; the user in the log); explain admission (cost
estimate, refusal above the budget with the way to narrow it, a segmentation of another study completing before a
running explanation, cancel) and SIGTERM cancelling a running explanation cleanly (last test: it stops the server).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from deploy.loopback import free_port

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "msxai"
PY = sys.executable
BUNDLE = REPO / "bundles" / "msxai_unet"
if str(APP) not in sys.path:
    sys.path.insert(0, str(APP))

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (BUNDLE / "models" / "model.pt").is_file(), reason="bundles/msxai_unet has no weights")]

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
           MONAI_LABEL_DATASTORE_AUTO_RELOAD="false")
PASSWORDS = {"admin1": "admin-password-1", "rev1": "reviewer-password-1", "ann1": "annotator-password-1",
             "user1": "user-password-1"}
ROLES = {"admin1": "admin", "rev1": "reviewer", "ann1": "annotator", "user1": "user"}
BUDGET_S = 600


def _start(studies: Path, log: Path, *extra: str, host: str = "127.0.0.1", wait: bool = True):
    port = free_port()
    fh = open(log, "ab")
    proc = subprocess.Popen(
        [PY, "-m", "monailabel.main", "start_server", "--app", str(APP), "--studies", str(studies),
         "--conf", "models", "unet", "--host", host, "--port", str(port), *extra],
        cwd=str(REPO), env=ENV, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    if not wait:
        return proc, url
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            if requests.get(url + "/auth/", timeout=5).status_code == 200:
                return proc, url
        except requests.RequestException:
            time.sleep(1.0)
    proc.kill()
    raise RuntimeError(f"server did not answer in time:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """``root/studies`` (2 small synthetic subjects, tests/app_helpers.py) and ``root/users.json``; ``root`` is where
    nothing else may ever appear."""
    from app_helpers import write_small_studies

    root = tmp_path_factory.mktemp("exposed")
    studies = write_small_studies(root / "studies")
    from lib.users import UserStore

    store = UserStore.create(root / "users.json")
    for name, role in ROLES.items():
        store.add(name, PASSWORDS[name], role)
    return root, studies, store


@pytest.fixture(scope="module")
def server(world):
    root, studies, store = world
    log = root.parent / f"{root.name}_server.log"
    proc, url = _start(studies, log, "--conf", "auth_users", str(store.path), "--conf", "explain_budget_s",
                       str(BUDGET_S))
    yield {"proc": proc, "url": url, "log": log}
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _token(url, name):
    r = requests.post(url + "/auth/token", data={"username": name, "password": PASSWORDS[name]}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


@pytest.fixture(scope="module")
def tokens(server):
    return {name: _token(server["url"], name) for name in ROLES}


def _h(token):
    return {"Authorization": f"Bearer {token}"}


def _client(server, token=None, tmp=None):
    from monailabel.client import MONAILabelClient

    c = MONAILabelClient(server["url"], tmpdir=str(tmp or server["log"].parent))
    if token:
        c.update_auth({"token_type": "bearer", "access_token": token})
    return c


# --------------------------------------------------------------------------------------------- exposure
def test_start_on_another_address_without_auth_is_refused(world, tmp_path):
    """No --host 127.0.0.1 and no users file: the app stops the start-up with the reason (before binding: the
    address used here is not on this machine, so nothing could listen anyway)."""
    from lib.auth import served_host

    root, studies, _ = world
    log = tmp_path / "refused.log"
    proc, _ = _start(studies, log, host="192.0.2.1", wait=False)
    assert proc.wait(300) != 0
    text = log.read_text()
    assert "msxai refuses to start on '192.0.2.1' without authentication" in text, text[-3000:]
    assert "--host 127.0.0.1" in text and "auth_users" in text
    # the address MONAI Label binds when --host is not given
    assert served_host(["monailabel", "start_server", "--app", "a", "--studies", "s"]) == "0.0.0.0"
    assert served_host(["x", "start_server", "--host", "127.0.0.1"]) == "127.0.0.1"
    assert served_host(["x", "start_server", "-i", "::1"]) == "::1"
    assert served_host(["x", "start_server", "--host=10.0.0.1"]) == "10.0.0.1"
    assert served_host(["pytest"]) is None


# ------------------------------------------------------------------------------------------------ tokens
def test_tokens_through_monailabel_client(server, world, tmp_path):
    from monailabel.client.client import MONAILabelClientException

    from lib.users import UserStore

    url = server["url"]
    c = _client(server, tmp=tmp_path)
    assert c.auth_enabled() is True
    with pytest.raises(MONAILabelClientException) as err:
        c.info()  # no token
    assert "401" in err.value.msg
    with pytest.raises(MONAILabelClientException) as err:
        c.auth_token("ann1", "wrong password")
    assert "401" in err.value.msg
    token = c.auth_token("ann1", PASSWORDS["ann1"])
    assert token["token_type"] == "bearer"
    c.update_auth(token)
    assert c.auth_valid_token() is True
    assert "explain_smoothgrad" in c.info()["models"]

    def status(tok):
        return requests.get(url + "/info/", headers=_h(tok) if tok is not None else {}, timeout=60).status_code

    good = token["access_token"]
    header, payload, sig = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    b64 = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")  # noqa: E731
    import jwt

    _, _, store = world
    forged = jwt.encode(dict(claims, role="admin"), "x" * 64, algorithm="HS256")  # signed with another key
    tampered = ".".join([header, b64(dict(claims, role="admin", sub="admin1")), sig])
    none_alg = ".".join([b64({"alg": "none", "typ": "JWT"}), b64(dict(claims, sub="admin1")), ""])
    secret = json.loads(store.path.read_text())["secret"]
    expired = jwt.encode(dict(claims, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600), secret,
                         algorithm="HS256")
    assert status(good) == 200
    for name, tok in {"none": None, "empty": "", "garbage": "abc.def", "forged": forged, "tampered": tampered,
                      "alg none": none_alg, "expired": expired}.items():
        assert status(tok) == 401, name
    r = requests.get(url + "/info/", headers=_h(expired), timeout=60)
    assert "expired" in r.json()["detail"]

    # a user removed from the file, or whose role changed, loses the tokens issued before
    extra = UserStore(store.path)
    extra.add("temp1", "temp-password-1", "annotator")
    t = _token_for(url, "temp1", "temp-password-1")
    assert status(t) == 200
    time.sleep(1.1)  # 'since' has a one-second resolution
    extra.set_role("temp1", "user")
    assert status(t) == 401
    t = _token_for(url, "temp1", "temp-password-1")
    assert requests.delete(url + "/datastore/label?id=synth000_FLAIR&tag=final", headers=_h(t),
                           timeout=60).status_code == 403
    extra.remove("temp1")
    assert status(t) == 401


def _token_for(url, name, password):
    r = requests.post(url + "/auth/token", data={"username": name, "password": password}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def test_roles(server, tokens):
    url = server["url"]

    def code(method, path, who, **kw):
        return requests.request(method, url + path, headers=_h(tokens[who]), timeout=120, **kw).status_code

    label = {"label": ("l.nii.gz", b"x")}
    assert code("PUT", "/datastore/label?image=synth000_FLAIR&tag=final", "user1", files=label) == 403
    for who in ("ann1", "rev1"):
        assert code("DELETE", "/datastore/label?id=synth000_FLAIR&tag=final", who) == 403
        assert code("GET", "/logs/", who) == 403
        assert code("GET", "/msxai/routes", who) == 403
        assert code("POST", "/reload", who) == 403
    assert code("GET", "/datastore/dataset", "user1") == 403
    assert code("GET", "/logs/?lines=5", "admin1") == 200
    assert code("GET", "/datastore/?output=all", "user1") == 200


# ------------------------------------------------------------------------------------------ route inventory
PUBLIC = {("/", "GET"), ("/favicon.ico", "GET"), ("/openapi.json", "GET"), ("/openapi.json", "HEAD"),
          ("/docs", "GET"), ("/docs", "HEAD"), ("/static", "GET"), ("/auth/", "GET"), ("/auth/token", "POST")}


def test_route_inventory(server, tokens):
    """Every route (those of /openapi.json and those left out of it: the DICOMweb proxy, /ohif, /reload, the
    deprecated datastore routes) is on the public list or answers 401 without a token; routes that need more than
    the user role answer 403 to a user's token."""
    url = server["url"]
    inv = requests.get(url + "/msxai/routes", headers=_h(tokens["admin1"]), timeout=60).json()
    schema = requests.get(url + "/openapi.json", timeout=60).json()
    listed = {(r["path_format"], m) for r in inv for m in r["methods"]}
    for path, ops in schema["paths"].items():
        for m in ops:
            assert (path, m.upper()) in listed, (path, m)
    hidden = {(r["path"], m) for r in inv if not r["in_schema"] for m in r["methods"]}
    for must in [("/proxy/dicom/{path:path}", "GET"), ("/ohif/{path:path}", "GET"), ("/reload", "POST"),
                 ("/datastore/", "PUT"), ("/datastore/", "DELETE")]:
        assert must in hidden, must
    for must in ["/msxai/studies", "/msxai/artifacts/{image_id}", "/logs/", "/session/{session_id}", "/batch/infer",
                 "/datastore/dataset", "/infer/{model}", "/datastore/label", "/msxai/jobs"]:
        assert any(r["path"] == must for r in inv), must
    user_role = "monailabel-user"
    checked = 0
    for r in inv:
        if r["shadowed"]:
            continue
        for m in r["methods"]:
            if (r["path"], m) in PUBLIC:
                assert not r["roles"], r
                continue
            assert r["roles"], f"{m} {r['path']} has no RBAC dependency and is not on the public list"
            path = r["path"].replace("{path:path}", "x/y").replace("{relpath:path}", "x")
            path = path.replace("{", "").replace("}", "")  # {model} -> model: any value
            resp = requests.request(m, url + path, timeout=60)
            assert resp.status_code == 401, (m, r["path"], resp.status_code, resp.text[:200])
            needs = [x for x in r["roles"] if x != "*"]  # "*": any signed-in user
            if needs and user_role not in needs:  # RBAC refuses before the route runs: safe for DELETE too
                resp = requests.request(m, url + path, headers=_h(tokens["user1"]), timeout=60)
                assert resp.status_code == 403, (m, r["path"], resp.status_code)
            checked += 1
    assert checked > 50
    print(f"route inventory: {len(inv)} routes, {checked} (route, method) pairs answered 401 without a token")


# ------------------------------------------------------------------------------------------ datastore
def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if ".lock" not in p.name}


def test_label_saves_over_http(server, world, tokens, tmp_path):
    from monailabel.client.client import MONAILabelClientException

    root, studies, _ = world
    url = server["url"]
    image = "synth001_FLAIR"
    img = nib.load(str(studies / f"{image}.nii.gz"))
    keep = np.zeros(img.shape, np.uint8)
    keep[20:24, 30:33, 25:28] = 1
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(keep, img.affine), str(good))
    c = _client(server, tokens["ann1"], tmp_path)
    assert c.save_label(image, str(good), tag="final")["label"] == image
    stored = studies / "labels" / "final" / f"{image}.nii.gz"
    assert stored.read_bytes() == good.read_bytes()

    wrong = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), img.affine), str(wrong))
    shifted = img.affine.copy()
    shifted[:3, 3] += 2.0
    moved = tmp_path / "moved.nii.gz"
    nib.save(nib.Nifti1Image(keep, shifted), str(moved))
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"garbage")
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    outside_before = {p.name for p in root.parent.iterdir()}
    before = {k: v for k, v in _tree(root).items() if not k.startswith("studies/msxai/")}
    # through MONAI Label's client (what the Slicer module calls): every bad save raises, nothing changes
    for path, tag in [(wrong, "final"), (moved, "final"), (garbage, "final"), (empty, "final"),
                      (good, "../../outside"), (good, "../final"), (good, ".x")]:
        with pytest.raises(MONAILabelClientException):
            c.save_label(image, str(path), tag=tag)
    # raw HTTP: the status and the message
    cases = [
        (image, "final", wrong, 422, "shape"), (image, "final", moved, 422, "grid"),
        (image, "final", garbage, 422, "cannot read"), (image, "final", empty, 422, "cannot read"),
        (image, "../../outside", good, 400, "tag"), (image, "final/../../x", good, 400, "tag"),
        ("no_such_FLAIR", "final", good, 404, "not in the datastore"), ("", "final", good, 400, "image id"),
        ("../synth000_FLAIR", "final", good, 400, "path separator"),
    ]
    for img_id, tag, path, status, msg in cases:
        with open(path, "rb") as fh:
            r = requests.put(f"{url}/datastore/label?image={urllib.parse.quote(img_id)}&tag={urllib.parse.quote(tag)}",
                             files={"label": (path.name, fh)}, data={"params": "{}"}, headers=_h(tokens["ann1"]),
                             timeout=120)
        assert r.status_code == status, (img_id, tag, path.name, r.status_code, r.text)
        assert msg in r.json()["detail"], (img_id, tag, r.text)
    r = requests.put(f"{url}/datastore/label?image={image}", files={"label": ("label.txt", b"x")},
                     headers=_h(tokens["ann1"]), timeout=60)
    assert r.status_code == 415
    r = requests.put(f"{url}/datastore/label?image={image}", files={"label": ("l.nii.gz", good.read_bytes())},
                     data={"params": "[1"}, headers=_h(tokens["ann1"]), timeout=60)
    assert r.status_code == 400 and "params" in r.json()["detail"]
    # image uploads: garbage and an existing id are refused
    with pytest.raises(MONAILabelClientException):
        c.upload_image(str(garbage), image_id="new_FLAIR")
    r = requests.put(f"{url}/datastore/image?image={image}", files={"file": ("x.nii.gz", good.read_bytes())},
                     headers=_h(tokens["ann1"]), timeout=60)
    assert r.status_code == 409
    # the label, the index and every other file are as they were; nothing appeared outside the studies folder
    assert stored.read_bytes() == good.read_bytes()
    assert {k: v for k, v in _tree(root).items() if not k.startswith("studies/msxai/")} == before
    assert {p.name for p in root.parent.iterdir()} == outside_before
    assert not (studies.parent / "outside").exists() and not (studies / "outside").exists()
    assert set(c.datastore()["objects"][image]["labels"]) == {"final"}

    # a second (valid) save keeps the first; restoring it undoes the save
    second = keep.copy()
    second[30:33, 40:42, 30:32] = 2
    p2 = tmp_path / "second.nii.gz"
    nib.save(nib.Nifti1Image(second, img.affine), str(p2))
    c.save_label(image, str(p2), tag="final")
    hist = requests.get(f"{url}/msxai/labels/{image}/final/history", headers=_h(tokens["user1"]), timeout=60).json()
    assert hist["versions"][0]["by"] == "ann1"
    kept = requests.get(url + hist["versions"][0]["url"], headers=_h(tokens["user1"]), timeout=60)
    assert kept.content == good.read_bytes()
    r = requests.post(f"{url}/msxai/labels/{image}/final/restore?version={hist['versions'][0]['version']}",
                      headers=_h(tokens["ann1"]), timeout=120)
    assert r.status_code == 200, r.text
    assert np.array_equal(np.asarray(nib.load(c.download_label(image, "final")).dataobj), keep)
    log = server["log"].read_text()
    assert f"label saved: image={image} tag=final user=ann1" in log


# ------------------------------------------------------------------------------------------ explain admission
def _post_infer(url, token, task, image, params, timeout=1800):
    r = requests.post(f"{url}/infer/{task}?image={image}", data={"params": json.dumps(params)}, headers=_h(token),
                      timeout=timeout)
    return r.status_code, r


def _job_ids(url, token) -> set:
    return {j["id"] for j in requests.get(url + "/msxai/jobs", headers=_h(token), timeout=60).json()["jobs"]}


def _job(url, token, task, image, known: set):
    """The new job (not in ``known``) of ``task`` on ``image`` once it is admitted (has its estimate) and running."""
    deadline = time.time() + 1800
    while time.time() < deadline:
        jobs = [j for j in requests.get(url + "/msxai/jobs", headers=_h(token), timeout=60).json()["jobs"]
                if j["task"] == task and j["image"] == image and j["id"] not in known]
        if jobs and jobs[-1]["estimate"] and jobs[-1]["state"] == "running":
            return jobs[-1]
        if jobs and jobs[-1]["finished"]:
            raise AssertionError(f"job finished before it could be observed: {jobs[-1]}")
        time.sleep(0.5)
    raise AssertionError("no admitted job")


SMALL = {"network": "unet", "foreground": [[30, 36, 30]], "radius_mm": 1.0, "samples": 24, "aggregation": "max",
         "seed": 1}  # one voxel, three noise batches of 8: three chunks


def test_explain_too_expensive_is_refused_with_the_way_to_narrow_it(server, world, tokens, tmp_path):
    """What the OHIF panel sends by default (lesion=all, N = 50, Eq. 3), here on the lesions of a saved label: an
    answer naming the estimate, the budget and how to narrow the request; nothing is computed."""
    root, studies, _ = world
    img = nib.load(str(studies / "synth000_FLAIR.nii.gz"))
    lab = np.zeros(img.shape, np.uint8)
    for i, c in enumerate([(25, 30, 28), (35, 40, 30), (30, 45, 35)]):
        lab[c[0]:c[0] + 3, c[1]:c[1] + 3, c[2]:c[2] + 3] = 1  # three 27-voxel lesions
    p = tmp_path / "three.nii.gz"
    nib.save(nib.Nifti1Image(lab, img.affine), str(p))
    _client(server, tokens["ann1"], tmp_path).save_label("synth000_FLAIR", str(p), tag="final")
    code, r = _post_infer(server["url"], tokens["user1"], "explain_smoothgrad", "synth000_FLAIR",
                          {"network": "unet", "lesion": "all", "samples": 50, "aggregation": ["max", "mean"],
                           "lesions_from": "final"})
    detail = r.json()["detail"]
    assert code == 422, detail
    for part in ("3 domain(s) (81 voxels)", "samples=50", "Eq. 3", "is estimated at", "budget of 10 min",
                 "To narrow it", "aggregation=mean"):
        assert part in detail, (part, detail)
    assert "lesion=" in detail or "samples=" in detail.split("To narrow it")[1]
    job = [j for j in requests.get(server["url"] + "/msxai/jobs", headers=_h(tokens["user1"]),
                                   timeout=60).json()["jobs"] if j["image"] == "synth000_FLAIR"][-1]
    assert job["state"] == "refused" and job["chunks_done"] == 0 and job["estimate"]["seconds"] > BUDGET_S
    print("refused:", detail)


def test_segmentation_of_another_study_goes_between_explain_chunks(server, tokens):
    """An admitted explanation is running; a segmentation of another study arrives: it runs at the next checkpoint
    (after at most one chunk) and its answer comes while the explanation is still running (asserted by order and
    state, not by a timer). Then the explanation is cancelled by its user."""
    import threading

    url = server["url"]
    done: list[str] = []
    answers = {}

    def explain():
        answers["explain"] = _post_infer(url, tokens["ann1"], "explain_smoothgrad", "synth000_FLAIR", SMALL)
        done.append("explain")

    known = _job_ids(url, tokens["ann1"])
    t = threading.Thread(target=explain)
    t.start()
    job = _job(url, tokens["ann1"], "explain_smoothgrad", "synth000_FLAIR", known)
    assert job["chunks_total"] == 3 and job["estimate"]["seconds"] <= BUDGET_S
    c0 = job["chunks_done"]
    code, _ = _post_infer(url, tokens["user1"], "segmentation_unet", "synth001_FLAIR", {})
    done.append("segmentation")
    assert code == 200
    now = requests.get(f"{url}/msxai/jobs/{job['id']}", headers=_h(tokens["ann1"]), timeout=60).json()
    assert now["state"] == "running" and now["chunks_done"] < now["chunks_total"], now
    assert now["yielded"] and now["yielded"][0][0] <= c0 + 1, now  # it went at the first checkpoint
    # another user cannot see or cancel it; its user can
    assert requests.delete(f"{url}/msxai/jobs/{job['id']}", headers=_h(tokens["user1"]), timeout=60).status_code == 404
    r = requests.delete(f"{url}/msxai/jobs/{job['id']}", headers=_h(tokens["ann1"]), timeout=60)
    assert r.status_code == 200
    t.join(1800)
    assert done == ["segmentation", "explain"]
    code, resp = answers["explain"]
    assert code == 409 and "cancelled by ann1" in resp.json()["detail"], resp.text
    final = requests.get(f"{url}/msxai/jobs/{job['id']}", headers=_h(tokens["admin1"]), timeout=60).json()
    assert final["state"] == "cancelled" and final["chunks_done"] < final["chunks_total"]


def test_sigterm_cancels_a_running_explanation_cleanly(server, world, tokens):
    """Last test of the module: SIGTERM while an explanation runs. Its request is answered (503, shutting down)
    at the next chunk, the server exits, no temp file is left and the saved labels are intact."""
    import signal
    import threading

    root, studies, _ = world
    url, proc = server["url"], server["proc"]
    labels_before = {p.name: p.read_bytes() for p in (studies / "labels" / "final").iterdir()}
    answers = {}
    known = _job_ids(url, tokens["ann1"])
    t = threading.Thread(target=lambda: answers.update(r=_post_infer(url, tokens["ann1"], "explain_smoothgrad",
                                                                      "synth000_FLAIR", dict(SMALL, seed=2))))
    t.start()
    job = _job(url, tokens["ann1"], "explain_smoothgrad", "synth000_FLAIR", known)
    assert job["chunks_done"] < job["chunks_total"]
    proc.send_signal(signal.SIGTERM)
    t.join(1800)
    code, r = answers["r"]
    assert code == 503 and "shutting down" in r.json()["detail"], r.text
    proc.wait(600)
    log = server["log"].read_text()
    assert "explanation(s) cancelled" in log and f"job {job['id']}" in log
    leftovers = [p for p in studies.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
    assert {p.name: p.read_bytes() for p in (studies / "labels" / "final").iterdir()} == labels_before
