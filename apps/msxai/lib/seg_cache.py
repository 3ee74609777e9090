"""The app's segmentation cache: the segmentation of a study by a model, kept in memory and under the study's
artefact folder (:func:`msxai.studies.artifact_dir`), shared by the server and MONAI Label's batch-infer subprocess
(one computes, the other waits and reads), keyed by fingerprints of the study's files and the bundle's weights."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from msxai.io import file_sha256, json_default, publish_dir
from msxai.studies import artifact_dir


def file_fingerprint(paths: Sequence[str | Path]) -> str:
    """A short key that changes when any file changes (path, size, mtime in ns)."""
    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        h.update(f"{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def weights_fingerprint(bundle_path: str | Path) -> str:
    """Fingerprint of what a bundle's inference depends on: the contents (:func:`msxai.io.file_sha256`) of its
    weights (``models/*``) and ``configs/inference.json`` (training/evaluation configs do not change a segmentation)."""
    root = Path(bundle_path)
    files = sorted(p for p in (root / "models").glob("*") if p.is_file())
    if (root / "configs" / "inference.json").is_file():
        files.append(root / "configs" / "inference.json")
    return hashlib.sha1("".join(file_sha256(f) for f in files).encode()).hexdigest()[:16] if files else "none"


class SegmentationCache:
    """The segmentation of an image by a model, kept in memory and on disk under
    ``<studies>/msxai/<image_id>/seg_<model>/`` (``labels.nii.gz``, ``prob.nii.gz``, ``meta.json``; on the FLAIR's
    grid, plus ``prob_network.nii.gz`` on the network grid when the bundle's pre-processing resampled the study).

    An entry is valid while the FLAIR, the T1 and the bundle's weights/configs are unchanged (their fingerprints
    are stored in ``meta.json``); it survives server restarts. ``compute`` is called at most once at a time per key
    (concurrent requests for the same key wait for the first), across processes too: MONAI Label's batch infer runs
    the app again in a subprocess beside the server, so each key also holds an exclusive ``flock`` on
    ``.seg_<model>.lock`` while it reads or computes, and an entry is written into a temporary folder that is renamed
    into place complete (a reader never sees a half-written entry)."""

    def __init__(self, studies: str | Path, max_memory_items: int = 8):
        self.studies = Path(studies)
        self.max_memory_items = max_memory_items
        self._mem: dict[tuple[str, str], tuple[str, dict]] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def _dir(self, image_id: str, model: str) -> Path:
        return artifact_dir(self.studies, image_id) / f"seg_{model}"

    def _lock(self, key):
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def get(self, image_id: str, model: str, fingerprint: str, compute) -> dict:
        """Return ``{"labels", "prob", "affine", "table", "prob_network", "network_affine", "from_cache"}``;
        ``compute()`` must return a dict with ``labels`` (int [X,Y,Z]), ``prob`` (float32 [X,Y,Z]), ``affine`` and
        ``table`` (list of dicts), optionally ``prob_network`` and ``network_affine`` (the probability on the
        network grid; the same as ``prob`` when absent)."""
        import nibabel as nib

        from msxai.io import save_volume

        key = (image_id, model)
        with self._lock(key), _process_lock(self._dir(image_id, model).with_name(f".seg_{model}.lock")):
            mem = self._mem.get(key)
            if mem is not None and mem[0] == fingerprint:
                return dict(mem[1], from_cache="memory")
            d = self._dir(image_id, model)
            meta_path = d / "meta.json"
            if meta_path.is_file():
                try:
                    meta = json.loads(meta_path.read_text())
                    if meta.get("fingerprint") == fingerprint:
                        lab = nib.load(str(d / "labels.nii.gz"))
                        prob = nib.load(str(d / "prob.nii.gz"))
                        entry = {
                            "labels": np.asarray(lab.dataobj).astype(np.int32),
                            "prob": np.asarray(prob.dataobj, dtype=np.float32),
                            "affine": np.asarray(lab.affine, dtype=np.float64),
                            "table": meta["table"],
                        }
                        if (d / "prob_network.nii.gz").is_file():
                            net = nib.load(str(d / "prob_network.nii.gz"))
                            entry["prob_network"] = np.asarray(net.dataobj, dtype=np.float32)
                            entry["network_affine"] = np.asarray(net.affine, dtype=np.float64)
                        else:
                            entry["prob_network"], entry["network_affine"] = entry["prob"], entry["affine"]
                        self._remember(key, fingerprint, entry)
                        return dict(entry, from_cache="disk")
                except Exception:  # a damaged cache entry is recomputed
                    pass
            computed = compute()
            entry = {
                "labels": np.asarray(computed["labels"]).astype(np.int32),
                "prob": np.asarray(computed["prob"], dtype=np.float32),
                "affine": np.asarray(computed["affine"], dtype=np.float64),
                "table": computed["table"],
            }
            net = computed.get("prob_network")
            net_affine = computed.get("network_affine")
            on_one_grid = net is None or (np.shape(net) == entry["prob"].shape
                                          and np.allclose(net_affine, entry["affine"], atol=1e-6))
            entry["prob_network"] = entry["prob"] if on_one_grid else np.asarray(net, dtype=np.float32)
            entry["network_affine"] = entry["affine"] if on_one_grid else np.asarray(net_affine, dtype=np.float64)
            tmp = d.with_name(f".{d.name}~tmp~{os.getpid()}~{threading.get_ident()}")
            tmp.mkdir(parents=True, exist_ok=True)
            save_volume(tmp / "labels.nii.gz", entry["labels"], entry["affine"], dtype=np.int32)
            save_volume(tmp / "prob.nii.gz", entry["prob"], entry["affine"], dtype=np.float32)
            if not on_one_grid:
                save_volume(tmp / "prob_network.nii.gz", entry["prob_network"], entry["network_affine"],
                            dtype=np.float32)
            (tmp / "meta.json").write_text(json.dumps({"fingerprint": fingerprint, "model": model,
                                                       "table": entry["table"]}, default=json_default, indent=1))
            publish_dir(tmp, d)
            self._remember(key, fingerprint, entry)
            return dict(entry, from_cache=None)

    def _remember(self, key, fingerprint, entry):
        with self._guard:
            self._mem.pop(key, None)
            self._mem[key] = (fingerprint, entry)
            while len(self._mem) > self.max_memory_items:
                self._mem.pop(next(iter(self._mem)))


class _process_lock:
    """An exclusive ``fcntl.flock`` on ``path`` (created with its folder) for the ``with`` block: one process at a
    time (threads of one process are serialised by the cache's own locks first)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")
        fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
        self.fh.close()
        return False
