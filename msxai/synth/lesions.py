"""Lesions of a synthetic subject: how many, their irregular blob shapes (unions of randomly oriented ellipsoids
perturbed by smooth noise; Dawson's fingers at periventricular sites), where they are placed (periventricular, deep,
juxtacortical white matter; some confluent) and the 18-connected instances kept in the label map."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from msxai import MIN_LESION_MM3
from msxai.synth.anatomy import _random_rotation, smooth_noise
from msxai.synth.config import CONNECTIVITY_18, LESION_SITES, SynthConfig

def _lesion_count(rng, cfg: SynthConfig) -> int:
    if cfg.n_lesions is not None:
        return int(cfg.n_lesions)
    lo, hi = cfg.lesion_count_range
    n = int(round(rng.gamma(1.3, cfg.lesion_count_mean / 1.3)))
    return int(np.clip(n, lo, hi))


def _blob(rng, radius_vox: float, direction: np.ndarray | None) -> tuple[np.ndarray, int]:
    """Implicit field of an irregular blob in a cube of half-size ``h`` (higher = more inside), centred."""
    h = int(np.ceil(2.2 * radius_vox + 2))
    ax = np.arange(-h, h + 1, dtype=np.float32)
    X = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"))
    n_ell = int(rng.integers(1, 5))
    field_ = np.full(X.shape[1:], -np.inf, dtype=np.float32)
    for k in range(n_ell):
        if direction is not None and k == 0:
            # Dawson's finger: long axis along the direction away from the ventricles
            z = direction / (np.linalg.norm(direction) + 1e-9)
            a = np.cross(z, [1.0, 0, 0] if abs(z[0]) < 0.9 else [0, 1.0, 0])
            a /= np.linalg.norm(a)
            R = np.stack([z, a, np.cross(z, a)], axis=1)
            axes = radius_vox * np.array([rng.uniform(1.4, 2.2), rng.uniform(0.6, 0.9), rng.uniform(0.6, 0.9)])
        else:
            R = _random_rotation(rng)
            axes = radius_vox * rng.uniform(0.55, 1.35, 3)
        off = rng.uniform(-0.6, 0.6, 3) * radius_vox if k else np.zeros(3)
        Y = np.tensordot(R.T, X - off[:, None, None, None].astype(np.float32), axes=1)
        q = np.sqrt(((Y / np.maximum(axes, 0.5)[:, None, None, None]) ** 2).sum(0))
        field_ = np.maximum(field_, 1.0 - q)
    sig = max(0.8, radius_vox / 2.5)
    field_ += rng.uniform(0.25, 0.6) * smooth_noise(rng, field_.shape, sig, coarse=1)
    return field_, h


def place_lesions(rng, cfg: SynthConfig, p: np.ndarray, mask: np.ndarray, sites: dict) -> tuple[np.ndarray, list[dict]]:
    """Binary lesion mask and the list of generated blobs (site, target/actual volume)."""
    v = float(cfg.voxel_size)
    vox_mm3 = v**3
    shape = mask.shape
    lesion = np.zeros(shape, dtype=bool)
    n = _lesion_count(rng, cfg)
    if n == 0:
        return lesion, []
    wm = p[2]
    # white matter; next to the ventricles also the partial-volume WM of the ventricle wall, so that
    # periventricular lesions can abut the ventricles as they do in MS
    allowed = ((wm > 0.4) | ((wm > 0.15) & (sites["dist_vent"] <= 3.0) & (p[0] < 0.75))) & mask
    w = np.asarray(cfg.site_weights, dtype=float) * rng.dirichlet(np.full(3, 4.0)) * 3
    blobs: list[dict] = []
    centres: list[np.ndarray] = []
    for _ in range(n):
        avail = [k for k, s in enumerate(LESION_SITES) if len(sites["centres"][s])]
        if not avail:
            break
        confluent = bool(centres) and rng.random() < cfg.confluent_fraction
        site_i = int(rng.choice(avail, p=w[avail] / w[avail].sum()))
        site = LESION_SITES[site_i]
        vol = float(np.exp(rng.normal(np.log(cfg.lesion_volume_median_mm3), cfg.lesion_volume_sigma)))
        if site == "periventricular":
            vol *= 2.0
        elif site == "juxtacortical":
            vol *= 0.7
        vol = float(np.clip(vol, cfg.min_lesion_mm3 * 1.2, cfg.lesion_volume_max_mm3))
        r = (3 * vol / (4 * np.pi)) ** (1 / 3) / v
        if confluent:
            prev = centres[int(rng.integers(len(centres)))]
            c = np.clip(np.round(prev + rng.normal(0, 1, 3) * max(2.0, r)), 0, np.array(shape) - 1).astype(int)
            if not allowed[tuple(c)]:
                cand = sites["centres"][site]
                c = cand[int(rng.integers(len(cand)))]
                confluent = False
        else:
            cand = sites["centres"][site]
            c = cand[int(rng.integers(len(cand)))]
        direction = None
        if site == "periventricular":
            dv = sites["dist_vent"]
            sl = tuple(slice(max(0, ci - 1), ci + 2) for ci in c)
            gr = np.array([np.gradient(dv[sl], axis=a).mean() if dv[sl].shape[a] > 1 else 0.0 for a in range(3)])
            direction = gr if np.linalg.norm(gr) > 1e-6 else None
        fld, h = _blob(rng, r, direction)
        lo = c - h
        hi = c + h + 1
        slo = np.maximum(lo, 0)
        shi = np.minimum(hi, shape)
        fsl = tuple(slice(int(a - b), int(a - b + (d - a))) for a, b, d in zip(slo, lo, shi))
        osl = tuple(slice(int(a), int(b)) for a, b in zip(slo, shi))
        f = np.where(allowed[osl], fld[fsl], -np.inf)
        n_vox = max(1, int(round(vol / vox_mm3)))
        flat = f.ravel()
        ok = np.isfinite(flat) & (flat > -0.35)
        if not ok.any():
            continue
        n_vox = min(n_vox, int(ok.sum()))
        thr = np.partition(flat[ok], -n_vox)[-n_vox]
        blob = f >= thr
        # keep the component holding the blob's peak
        lab, nl = ndi.label(blob, CONNECTIVITY_18)
        if nl > 1:
            peak = np.unravel_index(int(np.argmax(np.where(blob, f, -np.inf))), f.shape)
            blob = lab == lab[peak]
        lesion[osl] |= blob
        centres.append(c)
        blobs.append(
            {"site": site, "target_mm3": round(vol, 1), "mm3": round(float(blob.sum()) * vox_mm3, 1), "confluent": confluent}
        )
    return lesion, blobs


def lesion_instances_18(binary: np.ndarray, voxel_mm3: float, min_mm3: float = MIN_LESION_MM3) -> np.ndarray:
    """18-connected components of ``binary`` with at least ``min_mm3`` mm^3, numbered 1..n (int32), in scan order.

    The project's one lesion-instance rule, :func:`msxai.lesions.lesion_instances`, on isotropic voxels of
    ``voxel_mm3``."""
    from msxai.lesions import lesion_instances

    side = float(voxel_mm3) ** (1.0 / 3.0)
    return lesion_instances(np.asarray(binary, dtype=bool), min_volume_mm3=min_mm3,
                            affine=np.diag([side, side, side, 1.0]))
