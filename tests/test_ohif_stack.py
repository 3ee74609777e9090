"""The OHIF path end to end: Orthanc (DICOMweb, authentication, own network namespace) holding a synthetic FLAIR/T1
study, the msxai MONAI Label app on Orthanc's DICOMweb, results written back as DICOM SEG, and OHIF (served by the
app at /ohif/) driven in headless Chromium.

Started once per module with ``deploy.ohif_stack.up`` (what ``scripts/ohif_stack.sh up`` runs) on free ports, with a
synthetic subject of 91x109x91 voxels (``msxai synth --n 1 --seed 7 --voxel-size 2``, declared 1 mm) and a snapshot of
the U-Net bundle.

Skipped with the reason when the Debian packages (orthanc, orthanc-dicomweb; chromium for the browser test) or
network namespaces (root / CAP_SYS_ADMIN) are not available; ``.ci/run`` installs the packages.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dicom_helpers import DCIODVFY, dciodvfy_errors, ohif_hydrated_rows, ohif_sr_measurements, pm_volume, sr_items
from deploy.loopback import free_port, netns_available
from deploy.ohif_stack import REPO_ROOT, StackConfig, StackError, down, http_status, listening_sockets, \
    missing_requirements, start_server, up

BUNDLE = REPO_ROOT / "bundles" / "msxai_unet"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_missing = missing_requirements()
_netns_ok, _netns_reason = netns_available() if not _missing else (False, "")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(_missing), reason="Debian packages not installed: " + "; ".join(_missing)
                       + " (.ci/run runs scripts/install_ohif_deps.sh)"),
    pytest.mark.skipif(not _missing and not _netns_ok,
                       reason=f"Orthanc is isolated in a network namespace and {_netns_reason}"),
]
VOXEL_MM = 1.0
SCREENSHOT = REPO_ROOT / "docs" / "ohif_screenshot.png"
# the Grad-CAM++ layer of the browser test's explanation: the U-Net's last up-sampling block, whose instance map is
# confined to the lesion's neighbourhood by its receptive field (scripts/gradcam_layers.py: 100 % of the map within
# 15 mm), so "coloured on the lesion, nowhere far away" checks where the PM is drawn, whatever the weights learned.
# The bundle's default layer is deeper; with the U-Net 0.3.0 its instance map spreads over the brain (docs/ohif.md).
LOCAL_LAYER = "model.2.0"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    run = tmp_path_factory.mktemp("ohif_stack")
    bundles = run / "bundles"
    shutil.copytree(BUNDLE, bundles / "msxai_unet", ignore=shutil.ignore_patterns("eval", "logs", "__pycache__"))
    cfg = StackConfig(run_dir=run, orthanc_port=free_port(), server_port=free_port(), models="unet",
                      bundles_dir=bundles, extra_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    # a 2 mm synthetic subject declared a 1 mm scan (a small head): the bundles segment on a 1 mm grid, so a real
    # 2 mm scan would be resampled to 181x217x181 voxels; this keeps the stack's work at 91x109x91. Intensities are
    # integers in [0, 65535], which its DICOM series (uint16, slope 1) hold exactly
    subject = run / "subject"
    subprocess.run([sys.executable, "-m", "msxai", "synth", "--out", str(subject), "--n", "1", "--seed", "7",
                    "--voxel-size", "2", "--no-progress"], check=True, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    for name in ("FLAIR", "T1"):
        img = nib.load(str(subject / f"synth000_{name}.nii.gz"))
        a = img.affine.copy()
        a[:3, :3] *= VOXEL_MM / 2.0
        arr = np.asarray(img.dataobj, np.float32)
        arr = np.rint(np.clip(arr, 0, None) / arr.max() * 65535).astype(np.float32)
        nib.save(nib.Nifti1Image(arr, a), str(subject / f"seed7_{name}.nii.gz"))
    t0 = time.time()
    try:
        state = up(cfg, subject / "seed7_FLAIR.nii.gz", subject / "seed7_T1.nii.gz",
                   log=lambda m: print("[stack]", m))
    except StackError as exc:
        pytest.fail(f"stack did not start: {exc}")
    state["startup_s"] = time.time() - t0
    yield cfg, state
    down(cfg, log=lambda m: print("[stack]", m))


@pytest.fixture(scope="module")
def dw(stack):
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    cfg, _ = stack
    return DICOMwebClient(url=cfg.dicomweb_url, session=create_session_from_user_pass(*cfg.auth))


def _infer(cfg: StackConfig, task: str, image: str, params: dict, timeout: float = 900):
    """POST /infer/<task> like the clients (multipart params); returns (status, JSON answer or text)."""
    boundary = "msxaiboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n{json.dumps(params)}\r\n"
            f"--{boundary}--\r\n").encode()
    url = f"{cfg.server_url}/infer/{task}?image={urllib.parse.quote(image, safe='')}&output=json"
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, text


def _get_json(url: str, auth=None):
    import base64

    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _flair(stack, dw):
    cfg, state = stack
    study = state["study"]["StudyInstanceUID"]
    series = state["study"]["series"]["FLAIR"]
    from pydicom import Dataset

    metas = [Dataset.from_json(m) for m in dw.retrieve_series_metadata(study, series)]
    return study, series, metas


@pytest.fixture(scope="module")
def segmentation(stack):
    cfg, state = stack
    flair = state["study"]["series"]["FLAIR"]
    t0 = time.time()
    code, res = _infer(cfg, "segmentation_unet", flair, {})
    assert code == 200, res
    res["_seconds"] = time.time() - t0
    print(f"[timing] segmentation_unet over DICOMweb: {res['_seconds']:.1f} s")
    return res


def _seg_dataset(dw, study: str, seg_uid: str):
    inst = dw.retrieve_series(study, seg_uid)
    assert len(inst) == 1, f"SEG series {seg_uid} holds {len(inst)} instances"
    return inst[0]


def _check_seg_geometry(seg, flair_metas, flair_series):
    """The SEG references the FLAIR series and lies on its frames: same frame of reference, orientation, spacing,
    size; every frame's position is that of the FLAIR instance it names."""
    by_uid = {str(m.SOPInstanceUID): m for m in flair_metas}
    assert seg.Modality == "SEG" and seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == flair_series
    ref = flair_metas[0]
    assert seg.StudyInstanceUID == ref.StudyInstanceUID and seg.FrameOfReferenceUID == ref.FrameOfReferenceUID
    assert (int(seg.Rows), int(seg.Columns)) == (int(ref.Rows), int(ref.Columns))
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose([float(x) for x in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                               [float(x) for x in ref.ImageOrientationPatient], atol=1e-6)
    np.testing.assert_allclose([float(x) for x in shared.PixelMeasuresSequence[0].PixelSpacing],
                               [float(x) for x in ref.PixelSpacing], atol=1e-6)
    assert len(seg.PerFrameFunctionalGroupsSequence) == int(seg.NumberOfFrames) > 0
    for fg in seg.PerFrameFunctionalGroupsSequence:
        src = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert src in by_uid
        np.testing.assert_allclose([float(x) for x in fg.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(x) for x in by_uid[src].ImagePositionPatient], atol=1e-4)


def _seg_volume_independent(seg, affine_ras: np.ndarray, shape) -> np.ndarray:
    """The SEG as a label volume (value = segment number) on the grid ``affine_ras``/``shape``, read by pydicom-seg
    (not msxai's code) and placed by the physical position of every voxel."""
    import pydicom_seg
    import SimpleITK as sitk

    out = np.zeros(shape, np.int32)
    res = pydicom_seg.SegmentReader().read(seg)
    inv = np.linalg.inv(affine_ras)
    for number in res.available_segments:
        img = res.segment_image(number)
        arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # (x, y, z) = ITK index order
        idx = np.argwhere(arr > 0).astype(np.float64)
        d = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())
        lps = idx @ d.T + np.asarray(img.GetOrigin())
        ras = lps * np.array([-1.0, -1.0, 1.0])
        vox = ras @ inv[:3, :3].T + inv[:3, 3]
        r = np.rint(vox).astype(int)
        assert np.abs(vox - r).max() < 1e-3
        assert not out[tuple(r.T)].any(), "segments overlap"
        out[tuple(r.T)] = number
    return out


# ------------------------------------------------------------------------------------------------------- network
def test_nothing_listens_beyond_loopback(stack):
    cfg, state = stack
    pids = [state[k] for k in ("orthanc_pid", "relay_pid", "server_pid")]
    socks = listening_sockets(pids)
    assert socks, "the stack listens nowhere?"
    assert all(addr in ("127.0.0.1", "::1") for addr, _ in socks), socks
    assert {p for _, p in socks} == {cfg.orthanc_port, cfg.server_port}, socks
    # Orthanc itself: another network namespace whose only interface is lo, listening only on its HTTP port
    opid = state["orthanc_pid"]
    assert os.readlink(f"/proc/{opid}/ns/net") != os.readlink("/proc/self/ns/net")
    ifaces = {line.split(":")[0].strip() for line in Path(f"/proc/{opid}/net/dev").read_text().splitlines()[2:]}
    assert ifaces == {"lo"}, ifaces
    ports = set()
    for f in ("tcp", "tcp6"):
        for line in Path(f"/proc/{opid}/net/{f}").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A":
                ports.add(int(parts[1].split(":")[1], 16))
    assert ports == {cfg.orthanc_port}, f"Orthanc listens on {ports} (its DICOM port must be off)"


def test_bad_credentials_refused(stack):
    cfg, _ = stack
    for path in ("/system", "/dicom-web/studies", "/instances"):
        assert http_status(cfg.orthanc_url + path, cfg.auth) == 200
        assert http_status(cfg.orthanc_url + path, (cfg.user, "wrong")) == 401
        assert http_status(cfg.orthanc_url + path, ("nobody", cfg.password)) == 401
        assert http_status(cfg.orthanc_url + path) == 401
    # OHIF reads Orthanc through the app's /proxy/dicom with the stack's credentials: DICOMweb resources only, never
    # the rest of Orthanc's REST API (MONAI Label 0.8.5 forwards any path, '..' included)
    assert http_status(cfg.server_url + "/proxy/dicom/qido/studies") == 200
    for path in ("/proxy/dicom/../system", "/proxy/dicom/%2e%2e/system", "/proxy/dicom/qido/..%2f..%2fsystem",
                 "/proxy/dicom/studies/../../instances", "/proxy/dicom/tools/now"):
        with socket.create_connection(("127.0.0.1", cfg.server_port)) as c:  # raw: no client-side '..' folding
            c.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            head = c.recv(200).decode(errors="replace")
        assert head.startswith("HTTP/1.1 403"), (path, head)
    # the app with wrong credentials stops at start-up with the reason
    bad = StackConfig(run_dir=cfg.run_dir / "bad", orthanc_port=cfg.orthanc_port, server_port=free_port(),
                      models="unet", bundles_dir=cfg.bundles_dir, password="wrong", extra_env=cfg.extra_env)
    bad.run_dir.mkdir(exist_ok=True)
    with pytest.raises(StackError) as ei:
        start_server(bad, timeout=240)
    log = (bad.run_dir / "server.log").read_text(errors="replace")
    assert "HTTP 401" in log and "credentials refused" in log, log[-3000:]
    assert "exited" in str(ei.value)


# ------------------------------------------------------------------------------------------------------- the app
def test_study_listing_and_pairing(stack):
    cfg, state = stack
    rows = _get_json(cfg.server_url + "/msxai/studies")
    flair, t1 = state["study"]["series"]["FLAIR"], state["study"]["series"]["T1"]
    assert [(r["image"], r.get("t1")) for r in rows] == [(flair, t1)]
    # MONAI Label's own view of the datastore: one image (the FLAIR; the T1 is its companion, not an image)
    assert _get_json(cfg.server_url + "/datastore/?output=stats")["total"] == 1


def test_segmentation_saved_as_seg(stack, dw, segmentation):
    cfg, state = stack
    study, flair, metas = _flair(stack, dw)
    res = segmentation
    assert res["n_lesions"] == len(res["lesions"]) > 0
    info = res["dicom_seg"]
    assert "error" not in info, info
    seg = _seg_dataset(dw, study, info["SeriesInstanceUID"])
    _check_seg_geometry(seg, metas, flair)
    labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    expected = sorted(res["label_names"], key=lambda k: res["label_names"][k])
    assert len(labels) == res["n_lesions"] and labels == expected
    assert all(s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Lesion" for s in seg.SegmentSequence)
    # voxel for voxel: the SEG equals the lesion map the app computed (its cache, on the converted FLAIR's grid)
    files = _get_json(f"{cfg.server_url}/msxai/artifacts/{flair}")["files"]
    assert "seg_unet/labels.nii.gz" in files and "seg_unet/meta.json" in files
    with urllib.request.urlopen(f"{cfg.server_url}/msxai/artifacts/{flair}/seg_unet/labels.nii.gz") as r:
        p = cfg.run_dir / "labels_http.nii.gz"
        p.write_bytes(r.read())
    lab = nib.load(str(p))
    instances = np.asarray(lab.dataobj).astype(np.int32)
    vol = _seg_volume_independent(seg, lab.affine, instances.shape)
    np.testing.assert_array_equal(vol, instances)
    # the quantitative per-lesion JSON stays available over HTTP
    meta = _get_json(f"{cfg.server_url}/msxai/artifacts/{flair}/seg_unet/meta.json")
    assert [r["id"] for r in meta["table"]] == [r["id"] for r in res["lesions"]]
    assert abs(lab.affine[0, 0]) == pytest.approx(VOXEL_MM)


def test_four_paths_one_chain(stack, segmentation, tmp_path):
    """One input, reoriented: the study's FLAIR/T1 in the voxel order of their DICOM series (in-plane axes flipped
    to the radiological display), written as NIfTI with nibabel, through `msxai segment`, `python -m monai.bundle
    run`, the MONAI Label task (in this process) and the DICOMweb path (the app above, on the series in Orthanc):
    identical lesions.nii.gz."""
    from msxai.cli import main

    cfg, state = stack
    flair_uid = state["study"]["series"]["FLAIR"]
    with urllib.request.urlopen(f"{cfg.server_url}/msxai/artifacts/{flair_uid}/seg_unet/labels.nii.gz") as r:
        (tmp_path / "dicomweb.nii.gz").write_bytes(r.read())
    web = nib.load(str(tmp_path / "dicomweb.nii.gz"))
    codes = nib.aff2axcodes(web.affine)
    src = nib.load(state["study"]["flair"])
    assert nib.aff2axcodes(src.affine) != codes  # the series' voxel order is another than the NIfTI's
    studies = tmp_path / "studies"
    studies.mkdir()
    for name, key in (("FLAIR", "flair"), ("T1", "t1")):
        img = nib.load(state["study"][key])
        ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine),
                                               nib.orientations.axcodes2ornt(codes))
        arr = nib.orientations.apply_orientation(np.asarray(img.dataobj, np.float32), ornt)
        aff = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), aff), str(studies / f"re_{name}.nii.gz"))
    flair, t1 = studies / "re_FLAIR.nii.gz", studies / "re_T1.nii.gz"
    bundle = cfg.bundles_dir / "msxai_unet"
    assert main(["segment", "--bundle", str(bundle), "--flair", str(flair), "--t1", str(t1),
                 "--out", str(tmp_path / "cli")]) == 0
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           str(bundle / "configs" / "inference.json"), "--flair", str(flair), "--t1", str(t1),
                           "--output_dir", str(tmp_path / "monai")], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from lib.infers import SegmentationTask  # the app's task (apps/msxai on sys.path: tests/conftest.py)
    from lib.service import StudyService

    task = SegmentationTask(StudyService(studies, {"unet": bundle}), "unet")
    label_file, res = task({"image": str(flair), "image_id": "re_FLAIR", "label_mode": "instances"})
    results = {"msxai segment": tmp_path / "cli" / "lesions.nii.gz", "monai.bundle run": tmp_path / "monai" /
               "lesions.nii.gz", "MONAI Label task": Path(label_file), "DICOMweb": tmp_path / "dicomweb.nii.gz"}
    arrays = {k: (np.asarray(nib.load(str(p)).dataobj).astype(np.int32), nib.load(str(p)).affine)
              for k, p in results.items()}
    ref, ref_aff = arrays["DICOMweb"]
    assert ref.max() > 0
    for k, (arr, aff) in arrays.items():
        np.testing.assert_allclose(aff, ref_aff, atol=1e-4, err_msg=k)
        np.testing.assert_array_equal(arr, ref, err_msg=k)
    assert res["n_lesions"] == int(ref.max())


@pytest.mark.parametrize("task,params", [("explain_gradcampp", {}), ("explain_smoothgrad", {"samples": 2, "seed": 7})])
def test_explain_saved_as_seg(stack, dw, segmentation, task, params, tmp_path):
    cfg, _ = stack
    study, flair, metas = _flair(stack, dw)
    smallest = min(segmentation["lesions"], key=lambda r: (r["voxels"], r["id"]))
    lesion = smallest["id"] if task == "explain_smoothgrad" else max(
        segmentation["lesions"], key=lambda r: (r["voxels"], -r["id"]))["id"]
    t0 = time.time()
    code, res = _infer(cfg, task, flair, dict(params, model="unet", lesion=lesion))
    print(f"[timing] {task} lesion {lesion} over DICOMweb: {time.time() - t0:.1f} s")
    assert code == 200, res
    info = res["dicom_seg"]
    assert "error" not in info, info
    seg = _seg_dataset(dw, study, info["SeriesInstanceUID"])
    _check_seg_geometry(seg, metas, flair)
    # the label map the app answered, fetched over HTTP, against the SEG read independently
    url = [u for u in res["urls"] if u.endswith("labelmap.nii.gz")][0]
    with urllib.request.urlopen(cfg.server_url + url) as r:
        p = cfg.run_dir / f"{task}_labelmap.nii.gz"
        p.write_bytes(r.read())
    lab = nib.load(str(p))
    arr = np.asarray(lab.dataobj).astype(np.int32)
    names = {v: k for k, v in res["label_names"].items()}
    present = [v for v in sorted(names) if np.any(arr == v)]
    labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    assert labels == [names[v] for v in present] and len(labels) == int(len(seg.SegmentSequence)) >= 1
    assert all(s.SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator == "99MSXAI"
               for s in seg.SegmentSequence)
    vol = _seg_volume_independent(seg, lab.affine, arr.shape)
    expected = np.zeros_like(arr)
    for n, v in enumerate(present, start=1):
        expected[arr == v] = n
    np.testing.assert_array_equal(vol, expected)
    # the quantitative summary stays available over HTTP
    summary = _get_json(cfg.server_url + [u for u in res["urls"] if u.endswith("summary.json")][0])
    assert list(summary["domains"]) == [f"lesion_{lesion}"]
    assert f"lesion_{lesion}" in summary["summary"]
    _check_saliency_dicom(cfg, dw, res, summary, study, flair, metas, segmentation, lesion, tmp_path)


def _check_saliency_dicom(cfg, dw, res, summary, study, flair, metas, segmentation, lesion, tmp_path):
    """The explanation's float maps as Parametric Maps and its table as an SR in Orthanc, read back independently
    (tests/dicom_helpers.py) and compared with the NIfTI maps and the summary JSON served over HTTP."""
    info = res["dicom_saliency"]
    assert "error" not in info, info
    assert info["viewer"] == f"/ohif/viewer?StudyInstanceUIDs={study}"
    name = f"lesion_{lesion}"
    files = {"smoothgrad": {"FLAIR": f"{name}_smoothgrad_flair.nii.gz", "MPRAGE": f"{name}_smoothgrad_mprage.nii.gz"},
             "gradcampp": {"CAM": f"{name}_gradcampp.nii.gz"}}[res["method"]]
    expected = []
    for short, fname in files.items():
        with urllib.request.urlopen(cfg.server_url + [u for u in res["urls"] if u.endswith("/" + fname)][0]) as r:
            (tmp_path / fname).write_bytes(r.read())
        img = nib.load(str(tmp_path / fname))
        m = np.asarray(img.dataobj, dtype=np.float64)
        for part, values in (("positive", np.maximum(m, 0)), ("negative", np.minimum(m, 0))):
            if np.any(values):
                expected.append((short, part, values, img.affine))
    assert [(p["map"], p["part"]) for p in info["parametric_maps"]] == [(e[0], e[1]) for e in expected]
    for p, (short, part, values, aff) in zip(info["parametric_maps"], expected):
        pm = _seg_dataset(dw, study, p["SeriesInstanceUID"])
        assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and "FloatPixelData" in pm
        assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == flair
        assert (int(pm.Rows), int(pm.Columns)) == (int(metas[0].Rows), int(metas[0].Columns))
        assert pm.FrameOfReferenceUID == metas[0].FrameOfReferenceUID
        got = pm_volume(pm, aff, values.shape)
        covered = ~np.isnan(got)
        assert covered[values != 0].all(), f"{p['SeriesDescription']}: a non-zero voxel has no frame"
        np.testing.assert_allclose(got[covered], values[covered], rtol=0, atol=1e-6 * np.abs(values).max())
        stored = np.frombuffer(pm.FloatPixelData, dtype="<f4")
        assert stored.min() >= 0 and stored.max() == pytest.approx(1.0, abs=1e-6)
        if DCIODVFY:
            errors, text = dciodvfy_errors(pm, tmp_path)
            assert not errors, text
    # the SR: one group (the lesion), its numbers = the summary JSON, its segment = the lesion in the lesion SEG
    sr = _seg_dataset(dw, study, info["sr"]["SeriesInstanceUID"])
    assert sr.Modality == "SR" and sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    groups = sr_items(sr_items(sr, "126010")[0], "125007")
    assert len(groups) == 1
    g, s = groups[0], summary["summary"][name]
    nums = {str(c.ConceptNameCodeSequence[0].CodeMeaning): float(c.MeasuredValueSequence[0].FloatingPointValue)
            for c in sr_items(g, value_type="NUM")}
    assert nums["Volume"] == pytest.approx(s["domain_volume_mm3"])
    assert nums["Mean lesion probability in the lesion"] == pytest.approx(s["mean_probability"])
    for key, ms in s["maps"].items():
        short = {"smoothgrad_flair": "FLAIR", "smoothgrad_mprage": "MPRAGE", "gradcampp": "CAM"}[key]
        label = "SmoothGrad" if res["method"] == "smoothgrad" else "Grad-CAM++"
        assert nums[f"{short} {label} positive mass in the lesion"] == pytest.approx(ms["positive_mass_in_domain"])
        assert nums[f"{short} {label} peak maximum in the lesion"] == pytest.approx(ms["peak_max_in_domain"])
        for ring in ms["rings"]:
            band = f"{ring['from_mm']:g}-{ring['to_mm']:g}"
            assert nums[f"{short} {label} negative mass in ring {band} mm"] == pytest.approx(ring["negative_mass"])
    assert ("Segmentation error score (error flag)" in nums) == (s.get("error_score") is not None)
    ref = sr_items(g, "121191")[0].ReferencedSOPSequence[0]
    lesion_seg = _seg_dataset(dw, study, segmentation["dicom_seg"]["SeriesInstanceUID"])
    assert info["lesion_seg"] == segmentation["dicom_seg"]["SeriesInstanceUID"]
    assert ref.ReferencedSOPInstanceUID == lesion_seg.SOPInstanceUID
    number = int(ref.ReferencedSegmentNumber)
    assert [str(x.SegmentLabel) for x in lesion_seg.SegmentSequence if int(x.SegmentNumber) == number][0].startswith(
        f"lesion {lesion} (")
    # what OHIF 3.10 makes of it (Python twins of its bundled code): one measurement, one named panel row
    assert len(ohif_sr_measurements(sr)) == 1
    rows = ohif_hydrated_rows(sr, {str(m.SOPInstanceUID): m for m in metas})
    assert [r["label"] for r in rows] == [f"lesion {lesion}"]
    if DCIODVFY:
        errors, text = dciodvfy_errors(sr, tmp_path)
        assert not errors, text


def test_final_label_saved_as_seg(stack, dw, segmentation):
    """A label saved as 'final' (PUT /datastore/label, what the clients' Save Label does) becomes a SEG in Orthanc,
    written by msxai (no dcmqi); the app's result SEGs do not count as labels, the final one does."""
    cfg, _ = stack
    study, flair, metas = _flair(stack, dw)
    assert _get_json(cfg.server_url + "/datastore/?output=stats")["completed"] == 0  # result SEGs are not labels
    lab = nib.load(str(cfg.run_dir / "labels_http.nii.gz")) if (cfg.run_dir / "labels_http.nii.gz").is_file() else None
    if lab is None:
        with urllib.request.urlopen(f"{cfg.server_url}/msxai/artifacts/{flair}/seg_unet/labels.nii.gz") as r:
            (cfg.run_dir / "labels_http.nii.gz").write_bytes(r.read())
        lab = nib.load(str(cfg.run_dir / "labels_http.nii.gz"))
    mask = (np.asarray(lab.dataobj) > 0).astype(np.uint8)
    path = cfg.run_dir / "final.nii.gz"
    nib.save(nib.Nifti1Image(mask, lab.affine), str(path))
    boundary = "msxaiboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n{{}}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"label\"; filename=\"final.nii.gz\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{cfg.server_url}/datastore/label?image={flair}&tag=final", data=body, method="PUT",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=300) as r:
        assert r.status == 200
    segs = [x for x in dw.search_for_series(study, search_filters={"Modality": "SEG"}, fields=["SeriesDescription"])
            if x.get("0008103E", {}).get("Value") == ["msxai final label"]]
    assert len(segs) == 1
    seg = _seg_dataset(dw, study, segs[0]["0020000E"]["Value"][0])
    _check_seg_geometry(seg, metas, flair)
    assert [str(x.SegmentLabel) for x in seg.SegmentSequence] == ["lesion"]
    np.testing.assert_array_equal(_seg_volume_independent(seg, lab.affine, mask.shape), mask)
    assert _get_json(cfg.server_url + "/datastore/?output=stats")["completed"] == 1
    # a lesion of the saved label can be explained (the clinician's label, e.g. a lesion the model missed)
    code, res = _infer(cfg, "explain_gradcampp", flair, {"network": "unet", "lesions_from": "final", "lesion": 1})
    assert code == 200, res
    assert "saved 'final' label" in res["domain_source"] and "error" not in res["dicom_seg"]


def test_bad_input_over_dicomweb(stack, dw):
    """Unknown series 404, a FLAIR without a T1 series in its study 422 with the reason; the server keeps serving."""
    from msxai.dicom import StudyInfo, volume_to_mr_series
    from deploy.ohif_stack import store_datasets

    cfg, state = stack
    code, res = _infer(cfg, "segmentation_unet", "1.2.3.4.5.6", {})
    assert code == 404 and "not on the DICOMweb server" in json.dumps(res), res
    code, res = _infer(cfg, "segmentation_unet", "../etc/passwd", {})
    assert code == 400, res
    vol = np.asarray(nib.load(state["study"]["flair"]).dataobj, np.float32)[::4, ::4, ::4]
    lonely = volume_to_mr_series(vol, np.diag([-8.0, 8.0, 8.0, 1.0]), StudyInfo(patient_id="MSXAI-LONELY"),
                                 "FLAIR", 1)
    store_datasets(cfg, lonely)
    code, res = _infer(cfg, "segmentation_unet", str(lonely[0].SeriesInstanceUID), {})
    assert code == 422 and "no T1/MPRAGE series" in json.dumps(res), res
    assert http_status(cfg.server_url + "/info/") == 200


# ----------------------------------------------------------------------------------------------------- the viewer
@pytest.mark.skipif(not CHROMIUM, reason="Debian package chromium not installed (.ci/run installs it)")
def test_ohif_in_headless_chromium(stack, dw, segmentation, tmp_path):
    """Open the study in /ohif/ (MONAI Label mode), connect the MONAI Label panel, run segmentation_unet from it, set
    the explain task's lesion in its options dialog, run explain_gradcampp, and see each result drawn over the
    FLAIR."""
    pytest.importorskip("playwright", reason="the playwright wheel is not installed (requirements.txt)")
    from PIL import Image
    from playwright.sync_api import sync_playwright

    cfg, state = stack
    study, flair = state["study"]["StudyInstanceUID"], state["study"]["series"]["FLAIR"]
    # the lesion with the most voxels on the middle axial slice (OHIF opens the MPR views and the PM viewport in the
    # middle of the volume; a lesion that only grazes that slice shows just its faint rim there)
    depth = len(dw.search_for_instances(study, flair))
    mid = depth // 2
    ids, counts = np.unique(np.asarray(_labels(cfg, flair).dataobj)[:, :, mid], return_counts=True)
    assert ids.max() > 0, "no lesion on the middle axial slice"
    lesion = int(ids[1:][np.argmax(counts[1:])]) if ids[0] == 0 else int(ids[np.argmax(counts)])
    # and a second lesion in the same request: the SR's table has a row per lesion
    second = max((r for r in segmentation["lesions"] if r["id"] != lesion), key=lambda r: (r["voxels"], -r["id"]))["id"]
    lesions = f"{lesion},{second}"

    logs, errors = [], []
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
    # (Playwright gives every launch a fresh temporary profile: no --user-data-dir needed)
    t0 = time.time()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            ctx = browser.new_context(viewport={"width": 1600, "height": 900})
            # the panel's server URL (default: port 8000 of the page's host) is kept in this cookie
            ctx.add_cookies([{"name": "MONAILABEL_SERVER_URL", "value": cfg.server_url + "/", "url": cfg.server_url}])
            ctx.add_init_script("""window.__errs = []; const _d = console.debug; console.debug = function(...a) {
                if (String(a[0]).includes('Error Boundary')) window.__errs.push(String(a[1] && a[1].stack));
                return _d.apply(this, a); };""")
            page = ctx.new_page()
            page.set_default_timeout(120000)  # a busy CI machine (software WebGL) renders slowly
            page.on("console", lambda m: logs.append(m.text))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{cfg.server_url}/ohif/monai-label?StudyInstanceUIDs={study}", timeout=180000)
            # the viewport: all images of the FLAIR loaded and drawn
            deadline = time.time() + 180
            while not any("displaySetsToAllImages" in m for m in logs):
                assert time.time() < deadline, "OHIF did not load the study's images:\n" + "\n".join(logs[-30:])
                page.wait_for_timeout(500)
            page.wait_for_selector("canvas", state="visible")
            page.wait_for_timeout(2000)
            t_view = time.time() - t0
            try:
                page.click("text=Confirm and Hide", timeout=5000)  # the 'investigational use' banner
            except Exception:
                pass
            before = tmp_path / "before.png"
            page.screenshot(path=str(before))
            # connect the MONAI Label panel (the refresh button beside the server URL)
            page.locator(".settingsTable button.actionButton").first.click()
            page.wait_for_selector("text=msxai - explainable MS lesion segmentation", timeout=60000)
            # the explain task's options: one lesion (default 'all')
            page.click("text=Options / Configurations")
            page.select_option("select[name=selectName]", "explain_gradcampp")
            page.fill("#inferexplain_gradcampplesion", lesions)
            page.fill("#inferexplain_gradcampplayer", LOCAL_LAYER)
            page.click("button:has-text('Confirm')")
            models = page.locator(".modelSelector select.selectBox").first
            assert {"segmentation_unet", "explain_smoothgrad", "explain_gradcampp"} <= set(
                models.inner_text().split())
            run = page.locator(".modelSelector button.actionButton").first

            def drawn(n: int):
                deadline = time.time() + 60
                while sum("updated the segmentation's scalar data" in m for m in logs) < n:
                    assert time.time() < deadline, "the panel did not draw the result:\n" + "\n".join(logs[-30:])
                    page.wait_for_timeout(500)
                page.wait_for_timeout(3000)

            # 1) the segmentation (the lesion mask: the panel maps values through /info's static labels)
            models.select_option("segmentation_unet")
            with page.expect_response(lambda r: "/infer/segmentation_unet" in r.url, timeout=600000) as resp:
                run.click()
            assert resp.value.status == 200, resp.value.text()[:500]
            drawn(1)
            seg_shot = tmp_path / "ohif_segmentation.png"
            page.screenshot(path=str(seg_shot))
            # 2) the explanation of one lesion
            models.select_option("explain_gradcampp")
            with page.expect_response(lambda r: "/infer/explain_gradcampp" in r.url, timeout=600000) as resp:
                run.click()
            r = resp.value
            assert r.status == 200, r.text()[:500]
            sent = (r.request.post_data or "").replace(" ", "")
            assert f'"lesion":"{lesions}"' in sent and f'"layer":"{LOCAL_LAYER}"' in sent, r.request.post_data
            drawn(2)
            shot = tmp_path / "ohif.png"
            page.screenshot(path=str(shot))
            errs = page.evaluate("window.__errs")
            # 3) the stored DICOM SEG in OHIF's own SEG viewer (default mode): named segments over the FLAIR
            page.goto(f"{cfg.server_url}/ohif/viewer?StudyInstanceUIDs={study}", timeout=180000)
            deadline = time.time() + 180
            while sum("displaySetsToAllImages" in m for m in logs) < 2:
                assert time.time() < deadline, "OHIF did not reload the study:\n" + "\n".join(logs[-30:])
                page.wait_for_timeout(500)
            page.wait_for_timeout(2000)
            page.dblclick(f"text={segmentation['dicom_seg']['SeriesDescription']}")
            page.click("button:has-text('Yes')", timeout=60000)  # "Do you want to open this Segmentation?"
            page.wait_for_timeout(3000)
            page.mouse.click(1580, 100)  # the segmentation panel's icon on the right edge
            first = segmentation["dicom_seg"]["segments"][0]
            page.wait_for_selector(f"text={first}", timeout=30000)
            page.mouse.move(800, 450)
            for _ in range(depth // 2 - 1):  # the SEG viewport opens on the first slice: scroll to the middle
                page.mouse.wheel(0, 100)
                page.wait_for_timeout(60)
            page.wait_for_timeout(3000)
            seg_view = tmp_path / "ohif_dicom_seg.png"
            page.screenshot(path=str(seg_view))
            errs += page.evaluate("window.__errs")
            # 4) the Parametric Map of the explained lesion (positive Grad-CAM++) over the FLAIR, OHIF's PM viewport
            # (OHIF asked for the label map: the series are found by their names in Orthanc)
            stored = {x["0008103E"]["Value"][0] for x in dw.search_for_series(study, fields=["SeriesDescription"])}
            pm_desc = f"msxai CAM++ CAM+ lesion {lesion} [{LOCAL_LAYER}]"
            sr_desc = f"msxai Grad-CAM++ unet table {lesions}"
            assert {pm_desc, sr_desc, f"msxai CAM++ CAM+ lesion {second} [{LOCAL_LAYER}]"} <= stored, stored
            page.get_by_text(pm_desc, exact=True).dblclick()
            deadline = time.time() + 300
            # loaded into a viewport (vtk logs the PM volume's id, "pmap.<uid>") and OHIF's indicator gone
            while not (any("id, pmap." in m for m in logs) and "Loading Parametric Map" not in page.inner_text("body")):
                assert time.time() < deadline, "OHIF did not load the Parametric Map:\n" + "\n".join(logs[-30:])
                page.wait_for_timeout(1000)
            page.wait_for_timeout(6000)
            pm_view = tmp_path / "ohif_pmap.png"
            page.screenshot(path=str(pm_view))
            pm_geo = page.evaluate(_PM_VIEWPORT_JS)
            pm_canvas = page.evaluate(_WORLD_TO_PAGE_JS, [pm_geo["id"], _lesion_points_on_plane(cfg, flair, lesion, pm_geo)])
            pm_covered = page.evaluate(_COVERED_JS, pm_geo["id"])  # notifications, banners over the viewport
            errs += page.evaluate("window.__errs")
            # 5) the SR: its viewport, then "track" it: the measurement panel lists one row per explained lesion
            page.get_by_text(sr_desc, exact=True).dblclick()
            page.click("button:has-text('Yes')", timeout=60000)  # "Do you want to continue tracking ...?"
            page.wait_for_timeout(3000)
            page.locator('[data-cy="trackedMeasurements-btn"]').first.click()
            page.wait_for_selector(f"text=Measurements ({len(lesions.split(','))})", timeout=30000)
            page.evaluate("""() => window.cornerstone.getRenderingEngines().flatMap(e => e.getViewports())
                .forEach(v => { v.resetProperties && v.resetProperties(); v.render(); })""")  # the PM's 0..100 window
            page.wait_for_timeout(2000)
            sr_view = tmp_path / "ohif_sr.png"
            page.screenshot(path=str(sr_view))
            panel = page.evaluate("JSON.stringify(window.services.measurementService.getMeasurements()"
                                  ".map(m => [m.toolName, m.finding && m.finding.text, m.referenceSeriesUID]))")
            errs += page.evaluate("window.__errs")
        finally:
            browser.close()
    print(f"[timing] OHIF: study on screen {t_view:.1f} s, whole browser session {time.time() - t0:.1f} s")
    assert not errs, errs
    # the result is drawn: the viewports changed where the overlay is, and the overlay has colour (grey FLAIR)
    a = np.asarray(Image.open(before).convert("RGB")).astype(int)
    view = (slice(60, 880), slice(290, 1310))  # the three viewports
    for result in (seg_shot, shot):
        b = np.asarray(Image.open(result).convert("RGB")).astype(int)
        changed = np.abs(a[view] - b[view]).sum(-1) > 30
        coloured = (np.ptp(b[view], axis=-1) > 60) & changed
        assert coloured.sum() > 20, f"{result.name}: no coloured overlay drawn ({coloured.sum()} px)"
    b = np.asarray(Image.open(seg_view).convert("RGB")).astype(int)[150:780, 450:1150]  # inside the image, no text
    assert ((np.ptp(b, axis=-1) > 60).sum()) > 20, "the DICOM SEG shows no coloured segment on the middle slice"
    # the PM: the overlay's colours on the explained lesion's pixels, none far from it
    frac, n_far = _check_pm_screenshot(pm_view, pm_canvas, pm_covered)
    assert sorted(json.loads(panel)) == sorted(["ArrowAnnotate", f"lesion {i}", flair] for i in lesions.split(","))
    if os.environ.get("MSXAI_SAVE_SCREENSHOT") == "1":
        shutil.copy(pm_view, SCREENSHOT.with_name("ohif_screenshot_pmap.png"))
        shutil.copy(sr_view, SCREENSHOT.with_name("ohif_screenshot_sr.png"))
        shutil.copy(shot, SCREENSHOT)
        shutil.copy(seg_shot, SCREENSHOT.with_name("ohif_screenshot_segmentation.png"))
        shutil.copy(seg_view, SCREENSHOT.with_name("ohif_screenshot_dicom_seg.png"))
    assert frac >= 0.5, f"the PM overlay colours {frac:.0%} of the explained lesion's pixels on the slice"
    assert n_far == 0, f"the PM overlay colours {n_far} pixels farther than 15 mm from the explained lesion"


# the PM viewport's geometry (window.cornerstone: what OHIF exposes), and world (LPS) -> page pixel coordinates
_PM_VIEWPORT_JS = """() => {
  const vps = window.cornerstone.getRenderingEngines().flatMap(e => e.getViewports());
  const vp = vps.find(v => (v.getActors ? v.getActors() : []).some(a => String(a.uid).includes('pmap.'))) || vps[0];
  const cam = vp.getCamera();
  return {id: vp.id, focal: Array.from(cam.focalPoint), normal: Array.from(cam.viewPlaneNormal)};
}"""
_WORLD_TO_PAGE_JS = """([id, pts]) => {
  const vp = window.cornerstone.getRenderingEngines().flatMap(e => e.getViewports()).find(v => v.id === id);
  const r = vp.element.getBoundingClientRect();
  const map = p => { const c = vp.worldToCanvas(p); return [c[0] + r.left, c[1] + r.top]; };
  return {lesion: pts.lesion.map(map), corners: pts.corners.map(map), mm10: pts.mm10.map(map),
          viewport: [r.left, r.top, r.width, r.height]};
}"""


# points (every 4 px) of the viewport that another element (a notification, OHIF's banner) covers
_COVERED_JS = """(id) => {
  const vp = window.cornerstone.getRenderingEngines().flatMap(e => e.getViewports()).find(v => v.id === id);
  const r = vp.element.getBoundingClientRect(), out = [];
  for (let y = Math.ceil(r.top); y < r.bottom; y += 4)
    for (let x = Math.ceil(r.left); x < r.right; x += 4) {
      const el = document.elementFromPoint(x, y);
      if (el && !vp.element.contains(el)) out.push([x, y]);
    }
  return out;
}"""


def _labels(cfg, flair):
    """The U-Net's lesion instances of the FLAIR series, as the app serves them (its NIfTI, the FLAIR's grid)."""
    p = cfg.run_dir / "labels_http.nii.gz"
    if not p.is_file():
        with urllib.request.urlopen(f"{cfg.server_url}/msxai/artifacts/{flair}/seg_unet/labels.nii.gz") as r:
            p.write_bytes(r.read())
    return nib.load(str(p))


def _lesion_points_on_plane(cfg, flair, lesion, geo) -> dict:
    """World (LPS) positions of the lesion's voxels on the displayed plane (within half a voxel), the corners of the
    FLAIR slice through the plane, and two points 10 mm apart (the screen scale)."""
    img = _labels(cfg, flair)
    lab = np.asarray(img.dataobj).astype(np.int32)
    lps = np.diag([-1.0, -1.0, 1.0]) @ img.affine[:3]
    focal, normal = np.asarray(geo["focal"]), np.asarray(geo["normal"])
    half = 0.5 * min(np.linalg.norm(img.affine[:3, :3], axis=0)) + 1e-3
    vox = np.argwhere(lab == lesion)
    world = vox @ lps[:, :3].T + lps[:, 3]
    on = world[np.abs((world - focal) @ normal) <= half]
    assert len(on), f"lesion {lesion} is not on the PM viewport's slice (focal point {focal})"
    shape = np.array(lab.shape) - 1
    corners = [np.array([i, j, k]) * shape for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    cw = np.array([c @ lps[:, :3].T + lps[:, 3] for c in corners])
    cw = cw - np.outer((cw - focal) @ normal, normal)  # projected on the plane
    u = np.cross(normal, [0.0, 0.0, 1.0]) if abs(normal[2]) < 0.9 else np.cross(normal, [1.0, 0.0, 0.0])
    u /= np.linalg.norm(u)
    return {"lesion": on.tolist(), "corners": cw.tolist(), "mm10": [focal.tolist(), (focal + 10 * u).tolist()]}


def _check_pm_screenshot(path, canvas: dict, covered) -> tuple[float, int]:
    """``(fraction of the lesion's pixels coloured by the overlay (the PM's rainbow over the grey FLAIR), coloured
    pixels farther than 15 mm from it inside the image)`` (what covers the viewport there, OHIF's notifications, left
    out); the caller expects >= 0.5 and 0."""
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    colour = np.ptp(img, axis=-1)
    les = np.rint(np.asarray(canvas["lesion"])).astype(int)
    at = colour[les[:, 1].clip(0, img.shape[0] - 1), les[:, 0].clip(0, img.shape[1] - 1)]
    frac = float((at > 70).mean())
    print(f"[pmap] {len(les)} lesion pixels on the slice, {frac:.0%} coloured (RGB spread > 70), median spread "
          f"{np.median(at):.0f}")
    px_per_mm = np.linalg.norm(np.subtract(*canvas["mm10"])) / 10
    corners = np.asarray(canvas["corners"])
    x0, y0 = corners.min(axis=0) + 8
    x1, y1 = corners.max(axis=0) - 8
    vx, vy, vw, vh = canvas["viewport"]
    x0, y0, x1, y1 = max(x0, vx + 8), max(y0, vy + 8), min(x1, vx + vw - 8), min(y1, vy + vh - 8)
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    inside = (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
    from scipy import ndimage

    if covered:
        c = np.asarray(covered, dtype=int)
        hidden = np.zeros(img.shape[:2], bool)
        hidden[c[:, 1].clip(0, img.shape[0] - 1), c[:, 0].clip(0, img.shape[1] - 1)] = True
        inside &= ~ndimage.binary_dilation(hidden, iterations=6)

    near = np.zeros(img.shape[:2], bool)
    near[les[:, 1].clip(0, img.shape[0] - 1), les[:, 0].clip(0, img.shape[1] - 1)] = True
    dist = ndimage.distance_transform_edt(~near)
    far = inside & (dist > 15 * px_per_mm)
    n_far = int((colour[far] > 70).sum())
    print(f"[pmap] {far.sum()} image pixels farther than 15 mm: {n_far} coloured, largest spread {colour[far].max()}")
    assert far.sum() > 1000, f"only {far.sum()} image pixels farther than 15 mm from the lesion: nothing to check"
    return frac, n_far
