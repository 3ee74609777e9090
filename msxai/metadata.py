"""A bundle's ``configs/metadata.json`` kept true to its weights and its evaluation files.

* ``weights_sha256``: one sha256 of ``models/model.pt`` per version of the ``changelog``; the current ``version`` is the
  highest one and its hash is the file's. New weights are a new version (with a changelog entry), even when only the
  file's bytes changed.
* ``eval_metrics``: the means of ``eval/metrics_<split>.json`` (``evaluate_bundle``'s output), 4 decimals:
  ``metrics_test.json`` -> ``synthetic_test``, ``metrics_patient26.json`` -> ``patient26``, any other split by its
  name. An evaluation file that records the weights it was run with (``weights_sha256``) must name the current ones.

:func:`metadata_problems` lists every disagreement (a test requires none); :func:`refresh_metadata` (``msxai
metadata --bundle DIR [--version X.Y.Z --changelog TEXT]``) rewrites the metadata from the weights and the eval files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from msxai.errors import InputError

METRIC_KEYS = ("dice", "ndsc", "TPR", "FDR", "FNR", "F1")
SPLIT_NAMES = {"test": "synthetic_test"}
WEIGHTS = "models/model.pt"
_VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def version_key(version: str) -> tuple[int, int, int]:
    m = _VERSION_RE.match(str(version))
    if not m:
        raise InputError(f"version must be MAJOR.MINOR.PATCH (e.g. 0.3.0), got {version!r}")
    return tuple(int(x) for x in m.groups())


def weights_sha256(bundle_dir: str | Path) -> str:
    from msxai.io import file_sha256

    path = Path(bundle_dir) / WEIGHTS
    if not path.is_file():
        raise InputError(f"{path}: weights not found")
    return file_sha256(path)


def eval_metrics(bundle_dir: str | Path) -> dict[str, dict]:
    """``{name: {"n_cases", "dice", ...}}`` from ``eval/metrics_<split>.json`` (means, 4 decimals)."""
    out = {}
    for path in sorted((Path(bundle_dir) / "eval").glob("metrics_*.json")):
        split = path.stem[len("metrics_"):]
        try:
            data = json.loads(path.read_text())
            mean = data["mean"]
            row = {"n_cases": int(data["n_cases"])}
            row.update({k: round(float(mean[k]), 4) for k in METRIC_KEYS})
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: not an evaluation file of evaluate_bundle ({exc})") from exc
        if data.get("weights_sha256"):
            row["weights_sha256"] = data["weights_sha256"]
        out[SPLIT_NAMES.get(split, split)] = row
    return out


def metadata_problems(bundle_dir: str | Path) -> list[str]:
    """Every way ``configs/metadata.json`` disagrees with the weights and the evaluation files (empty = true)."""
    bundle_dir = Path(bundle_dir)
    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    problems = []
    changelog = meta.get("changelog") or {}
    hashes = meta.get("weights_sha256") or {}
    version = str(meta.get("version", ""))
    try:
        newest = max(changelog, key=version_key) if changelog else None
    except InputError as exc:
        return [str(exc)]
    if version != newest:
        problems.append(f"version {version} is not the newest changelog entry ({newest})")
    if set(hashes) != set(changelog):
        problems.append(f"weights_sha256 versions {sorted(hashes)} differ from the changelog's {sorted(changelog)}")
    current = weights_sha256(bundle_dir)
    if hashes.get(version) != current:
        problems.append(f"{WEIGHTS} has sha256 {current[:12]}..., version {version} records "
                        f"{str(hashes.get(version))[:12]}...: new weights need a new version and changelog entry")
    others = [v for v, h in hashes.items() if h == current and v != version]
    if others:
        problems.append(f"the weights of version {version} are those of version {others[0]}")
    measured = eval_metrics(bundle_dir)
    stated = meta.get("eval_metrics") or {}
    for name, row in measured.items():
        if row.get("weights_sha256") not in (None, current):
            problems.append(f"eval/{name}: evaluated with other weights ({row['weights_sha256'][:12]}...)")
        want = {k: v for k, v in row.items() if k != "weights_sha256"}
        if stated.get(name) != want:
            problems.append(f"eval_metrics[{name}] = {stated.get(name)} but the eval file gives {want}")
    for name in set(stated) - set(measured):
        problems.append(f"eval_metrics[{name}] has no evaluation file")
    return problems


def refresh_metadata(bundle_dir: str | Path, version: str | None = None, changelog: str | None = None) -> dict:
    """Rewrite ``configs/metadata.json`` from ``models/model.pt`` and ``eval/*.json``: new weights (a hash no version
    records) need ``version`` (above the current one) and a ``changelog`` line; metrics are always taken from the
    eval files. Returns the new metadata. Refuses (nothing written) when the weights changed without a version, or
    a version is given for unchanged weights."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    current = weights_sha256(bundle_dir)
    hashes = dict(meta.get("weights_sha256") or {})
    log = dict(meta.get("changelog") or {})
    old = str(meta.get("version", "0.0.0"))
    known = hashes.get(old) == current
    if version is None:
        if not known:
            raise InputError(f"{WEIGHTS} changed (sha256 {current[:12]}..., version {old} has "
                             f"{str(hashes.get(old))[:12]}...): give --version (above {old}) and --changelog")
    else:
        if version_key(version) <= version_key(old):
            raise InputError(f"version {version} must be above the current {old}")
        if known:
            raise InputError(f"{WEIGHTS} is still version {old}'s (sha256 {current[:12]}...): no new version")
        if not changelog or not str(changelog).strip():
            raise InputError(f"version {version}: give a --changelog line saying what changed")
        log = {version: str(changelog).strip(), **log}
        hashes[version] = current
        meta["version"] = version
    meta["changelog"] = dict(sorted(log.items(), key=lambda kv: version_key(kv[0]), reverse=True))
    meta["weights_sha256"] = dict(sorted(hashes.items(), key=lambda kv: version_key(kv[0]), reverse=True))
    meta["eval_metrics"] = {k: {m: v for m, v in row.items() if m != "weights_sha256"}
                            for k, row in eval_metrics(bundle_dir).items()}
    order = list(meta)
    if "weights_sha256" in order:  # keep it beside the changelog
        order.remove("weights_sha256")
        order.insert(order.index("changelog") + 1, "weights_sha256")
    meta = {k: meta[k] for k in order}
    path.write_text(json.dumps(meta, indent=4) + "\n")
    return meta
