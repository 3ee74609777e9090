"""Anatomy of a synthetic subject: the MNI152 2009a templates shipped with nilearn, smooth random fields, the
random deformation of the template, the sharpened CSF/GM/WM maps with gyri and sulci, the skull-stripping-like brain
mask, the candidate lesion sites, and the optional skull."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from msxai.synth.config import BRAIN_CENTER_MM, VENTRICLE_CENTER_MM, SynthConfig

# ----------------------------------------------------------------------------------------------- template


def _nilearn_data_dir() -> Path:
    """nilearn's bundled data folder, found without importing nilearn (its import takes seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed; it ships the MNI152 2009a templates msxai.synth needs")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


@lru_cache(maxsize=1)
def mni_template() -> dict:
    """MNI152 2009a T1 (scaled to [0, 1]), GM, WM and CSF probabilities and intracranial mask, from nilearn.

    The T1 template is brain-extracted: its non-zero voxels are the intracranial space; CSF is what GM and WM
    leave of it. Returned arrays are float32 on the template grid, with ``affine``.
    """
    d = _nilearn_data_dir()
    out = {}
    for key in ("t1", "gm", "wm"):
        path = d / f"mni_icbm152_{key}_tal_nlin_sym_09a_converted.nii.gz"
        if not path.exists():
            raise FileNotFoundError(f"nilearn's MNI152 2009a {key} template is missing: {path}")
        img = nib.load(str(path))
        out[key] = np.asarray(img.dataobj, dtype=np.float32) / 255.0
        out["affine"] = np.asarray(img.affine, dtype=np.float64)
    icv = (out["t1"] > 0).astype(np.float32)
    # smooth the intracranial edge a little so that the mask resamples to a smooth boundary
    icv = np.clip(ndi.gaussian_filter(icv, 0.6) * 1.2, 0, 1)
    out["icv"] = icv.astype(np.float32)
    out["csf"] = np.clip(icv - out["gm"] - out["wm"], 0, 1).astype(np.float32)
    nz = np.argwhere(out["t1"] > 0)
    out["bbox"] = (nz.min(0), nz.max(0))
    return out


# ----------------------------------------------------------------------------------------------- random fields


def _u(rng: np.random.Generator, lohi) -> float:
    lo, hi = lohi
    return float(rng.uniform(lo, hi))


def resample_linear(a: np.ndarray, positions) -> np.ndarray:
    """Separable (tri)linear interpolation of ``a`` at the outer product of per-axis source ``positions``.

    ``out[i, j, k] = a(positions[0][i], positions[1][j], positions[2][k])`` with positions clamped to the array
    (edge values repeat), i.e. ``scipy.ndimage.map_coordinates(a, grid, order=1, mode="nearest")`` on the grid,
    done axis by axis in float32 (a fraction of the cost).
    """
    out = np.asarray(a, dtype=np.float32)
    for axis, pos in enumerate(positions):
        n = out.shape[axis]
        pos = np.clip(np.asarray(pos, dtype=np.float64), 0, n - 1)
        if n == 1:
            out = np.take(out, np.zeros(pos.shape, np.intp), axis=axis)
            continue
        i0 = np.minimum(np.floor(pos).astype(np.intp), n - 2)
        shp = [1] * out.ndim
        shp[axis] = -1
        w = (pos - i0).astype(np.float32).reshape(shp)
        a0 = np.take(out, i0, axis=axis)
        out = a0 + (np.take(out, i0 + 1, axis=axis) - a0) * w
    return out


def smooth_noise(rng: np.random.Generator, shape, sigma_vox: float, coarse: int | None = None) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ``sigma_vox`` voxels.

    Large correlation lengths are generated on a grid coarsened by ``coarse`` and upsampled (trilinear).
    """
    shape = tuple(int(s) for s in shape)
    if coarse is None:
        coarse = max(1, int(sigma_vox // 3))
    cshape = shape if coarse <= 1 else tuple(max(2, -(-s // coarse) + 1) for s in shape)
    f = rng.standard_normal(cshape, dtype=np.float32)
    f = ndi.gaussian_filter(f, sigma_vox / coarse, mode="wrap")
    if coarse > 1:  # corners aligned: output i reads the coarse grid at i * (c - 1) / (s - 1)
        f = resample_linear(f, [np.arange(s) * ((c - 1) / max(1, s - 1)) for s, c in zip(shape, cshape)])
    f -= f.mean()
    sd = f.std()
    return (f / sd if sd > 0 else f).astype(np.float32)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


# ----------------------------------------------------------------------------------------------- anatomy


@dataclass
class Deformation:
    """The per-subject map from output voxels to template voxels.

    template world = c + R diag(1/s) (w - c - t) + u(w), then a pull towards the ventricle centre
    (ventricle enlargement), where ``w`` is the output world position, ``c`` the brain centre and ``u`` an elastic
    displacement given by its values on a lattice of every ``step``-th output voxel (trilinear in between).
    """

    linear: np.ndarray  # 3x3
    shift: np.ndarray  # 3
    disp: np.ndarray  # [3, *lattice] mm
    step: int
    ventricle_enlargement: float
    affine: np.ndarray  # output voxel -> world
    template_affine: np.ndarray  # template voxel -> world

    def template_voxels(self, ijk: np.ndarray) -> np.ndarray:
        """Exact template voxel coordinates ``[3, N]`` of output voxel coordinates ``ijk`` ``[3, N]``."""
        ijk = np.asarray(ijk, dtype=float)
        w = self.affine[:3, :3] @ ijk + self.affine[:3, 3:4]
        tw = self.linear @ (w - BRAIN_CENTER_MM[:, None] - self.shift[:, None]) + BRAIN_CENTER_MM[:, None]
        lat = ijk / self.step
        tw = tw + np.stack([ndi.map_coordinates(self.disp[k], lat, order=1, mode="nearest") for k in range(3)])
        d = tw - VENTRICLE_CENTER_MM[:, None]
        g = np.exp(-0.5 * ((d[0] / 14.0) ** 2 + (d[1] / 30.0) ** 2 + (d[2] / 16.0) ** 2))
        tw = tw - self.ventricle_enlargement * d * g
        tinv = np.linalg.inv(self.template_affine)
        return tinv[:3, :3] @ tw + tinv[:3, 3:4]

    def lattice_voxels(self) -> np.ndarray:
        """Template voxel coordinates ``[3, *lattice]`` at the lattice points (output voxels ``step * n``)."""
        cshape = self.disp.shape[1:]
        ci = np.stack(np.meshgrid(*[np.arange(c) * self.step for c in cshape], indexing="ij")).reshape(3, -1)
        return self.template_voxels(ci).reshape(3, *cshape)

    def crop_voxels(self, crop: tuple[slice, ...], lattice: np.ndarray | None = None) -> np.ndarray:
        """Fast path: template voxel coordinates ``[3, *crop]`` by trilinear upsampling of the lattice values.

        Matches ``template_voxels`` up to the (tiny) curvature of the ventricle pull within one lattice cell.
        """
        tv = self.lattice_voxels() if lattice is None else lattice
        pos = [np.arange(c.start, c.stop) / self.step for c in crop]
        return np.stack([resample_linear(tv[k], pos) for k in range(3)])


def _deformation(rng, cfg: SynthConfig, shape, affine, tpl, pad_mm: float = 30.0
                 ) -> tuple[Deformation, tuple[slice, ...], np.ndarray, dict]:
    """A random deformation, the crop around the deformed brain (grown by ``pad_mm``) and its template voxel
    coordinates ``[3, *crop]``."""
    v = float(cfg.voxel_size)
    scale = _u(rng, cfg.scale_range)
    scales = scale * (1 + rng.uniform(-cfg.anisotropy, cfg.anisotropy, 3))
    rot = _rotation(rng, cfg.rotation_deg)
    shift = rng.uniform(-cfg.translation_mm, cfg.translation_mm, 3)
    elastic = _u(rng, cfg.elastic_mm)
    vent = _u(rng, cfg.ventricle_enlargement)
    step = max(1, int(round(4 / v)))
    cshape = tuple(-(-s // step) + 1 for s in shape)
    sig_c = cfg.elastic_sigma_mm / (step * v)
    disp = np.stack([smooth_noise(rng, cshape, sig_c, coarse=1) for _ in range(3)])
    disp *= elastic / max(1e-6, float(np.abs(disp).max()))
    deform = Deformation(rot @ np.diag(1.0 / scales), shift, disp.astype(np.float64), step, vent,
                         np.asarray(affine, float), np.asarray(tpl["affine"], float))
    tv = deform.lattice_voxels()
    # crop: the lattice points that land in the template's intracranial space, grown by a lattice cell + pad_mm
    inside = ndi.map_coordinates(tpl["icv"], tv.reshape(3, -1), order=1, mode="constant", cval=0.0) > 0
    idx = np.argwhere(inside.reshape(tv.shape[1:]))
    if idx.size == 0:
        raise RuntimeError("the deformed template left the field of view")
    pad = int(np.ceil(pad_mm / v)) + step
    c0 = np.maximum(idx.min(0) * step - pad, 0)
    c1 = np.minimum(idx.max(0) * step + pad + 1, shape)
    crop = tuple(slice(int(a), int(b)) for a, b in zip(c0, c1))
    coords = deform.crop_voxels(crop, tv)
    meta = {
        "scale": [round(float(s), 4) for s in scales],
        "rotation_deg_max": cfg.rotation_deg,
        "translation_mm": [round(float(s), 3) for s in shift],
        "elastic_mm": round(elastic, 3),
        "ventricle_enlargement": round(vent, 3),
    }
    return deform, crop, coords, meta


def _tissues(rng, cfg: SynthConfig, tpl, coords) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Deformed, sharpened CSF/GM/WM probabilities ``[3, *crop]``, intracranial mask and the template T1 residual."""
    coords = np.asarray(coords, dtype=np.float64)  # converted once, not once per warped map
    warp = lambda a: ndi.map_coordinates(a, coords, order=1, mode="constant", cval=0.0, prefilter=False)  # noqa: E731
    icv = warp(tpl["icv"])
    gm, wm, t1 = warp(tpl["gm"]), warp(tpl["wm"]), warp(tpl["t1"])
    csf = np.clip(icv - gm - wm, 0, 1)
    # the template's own fine contrast (deep nuclei etc.) relative to its tissue model, used for the MPRAGE
    t1 = (t1 / 0.87 - (csf * 0.31 + gm * 0.75 + wm)) * (icv > 0.5)
    v = float(cfg.voxel_size)
    # Sulci. The template is an average, so its cortex is a thick blur with few sulci. Cortical grey matter lies
    # within a (random, smoothly varying) thickness of the white matter; template GM farther out than that is
    # sulcal CSF (the cerebellum, whose folia the template cannot resolve, is left alone).
    thick = _u(rng, cfg.cortical_thickness_mm)
    thickness = thick * (1 + 0.15 * smooth_noise(rng, icv.shape, 8.0 / v))
    d_wm = ndi.distance_transform_edt(wm < 0.5, sampling=v).astype(np.float32)
    tw = np.tensordot(tpl["affine"][:3, :3], coords, axes=1) + tpl["affine"][:3, 3, None, None, None]
    cereb = (
        ((tw[0] / 55.0) ** 2 + ((tw[1] + 62.0) / 34.0) ** 2 + ((tw[2] + 30.0) / 26.0) ** 2) < 1.0
    ) | ((tw[2] < -30.0) & (np.abs(tw[0]) < 14.0))  # cerebellum and brainstem
    del tw
    sulcal = np.clip((d_wm - thickness) / 1.2 + 0.5, 0, 1)
    # thin sulci: the zero sheets of a smooth random field, inside the cortex away from the white matter
    sheets = np.exp(-((smooth_noise(rng, icv.shape, 4.0 / v) / 0.15) ** 2)) * np.clip((d_wm - 1.5) / 1.0, 0, 1)
    sulcal = np.maximum(sulcal, _u(rng, cfg.thin_sulci) * sheets) * ~cereb
    moved = gm * sulcal
    gm = gm - moved
    csf = csf + moved
    del d_wm, thickness, sulcal, moved, sheets
    gain = _u(rng, cfg.tissue_sharpening)
    amp = _u(rng, cfg.tissue_noise)
    atrophy = _u(rng, cfg.atrophy)
    shape = icv.shape
    logits = np.log(np.stack([csf, gm, wm]) + 0.02) * gain
    logits[0] += atrophy
    for k in range(3):
        logits[k] += amp * smooth_noise(rng, shape, 1.5 / v, coarse=1) * 0.6
        logits[k] += amp * smooth_noise(rng, shape, 6.0 / v) * 0.4
    logits -= logits.max(0, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(0, keepdims=True)
    mask = _skull_stripped_mask(icv > 0.5, gm + wm, v, _u(rng, cfg.mask_margin_mm))
    # like a skull-stripping tool's mask, ours has no holes: enclosed cisterns left out above are CSF
    filled = ndi.binary_fill_holes(mask)
    hole = filled & ~mask
    mask = filled
    p *= mask[None]
    p[0][hole], p[1][hole], p[2][hole] = 1.0, 0.0, 0.0
    meta = {"cortical_thickness_mm": round(thick, 3), "tissue_gain": round(gain, 3), "tissue_noise": round(amp, 3), "atrophy": round(atrophy, 3)}
    return p.astype(np.float32), mask, t1.astype(np.float32), meta


def upsample_strided(a: np.ndarray, f: int, shape) -> np.ndarray:
    """Trilinear upsampling of ``a = full[::f, ::f, ::f]`` back to ``shape``: full voxel ``i`` reads ``a`` at ``i / f``.

    Beyond the last strided sample the edge value is repeated.
    """
    return resample_linear(a, [np.arange(s) / f for s in shape])


def _skull_stripped_mask(icv: np.ndarray, tissue: np.ndarray, v: float, margin_mm: float) -> np.ndarray:
    """Brain mask like a skull-stripping tool's: the brain tissue closed over sulci (4 mm), holes (ventricles)
    filled, grown by about ``margin_mm`` into the surrounding CSF and kept inside the intracranial space.

    The closing runs on a ~2 mm strided grid; its upsampled result, united with the full-resolution tissue, is
    smoothed (Gaussian, 1.2 mm) and thresholded at the level a blurred flat edge has ``margin_mm`` outside.
    """
    from math import erfc, sqrt

    f = max(1, int(round(2.0 / v)))
    t = tissue[::f, ::f, ::f] > 0.5
    vs = v * f
    radius = 4.0
    grown = ndi.distance_transform_edt(~t, sampling=vs) <= radius
    closed = ndi.distance_transform_edt(np.pad(grown, 1), sampling=vs)[1:-1, 1:-1, 1:-1] > radius
    closed = ndi.binary_fill_holes(closed | t)
    fine_tissue = tissue > 0.5
    c = np.maximum(upsample_strided(closed, f, icv.shape), fine_tissue)
    sigma = 1.2
    smooth = ndi.gaussian_filter(c, sigma / v)
    level = 0.5 * erfc(margin_mm / (sigma * sqrt(2)))
    return icv & ((smooth > max(level, 1e-3)) | fine_tissue)


# ----------------------------------------------------------------------------------------------- lesion sites


def lesion_site_maps(p: np.ndarray, mask: np.ndarray, v: float) -> dict:
    """Candidate centres (voxel indices) per lesion site and the distance-to-ventricle field (mm).

    Distances are computed on a grid of about 2 mm (strided) for speed; centres are returned on the full grid.
    """
    f = max(1, int(round(2.0 / v)))
    csf, gm, wm = p[0, ::f, ::f, ::f], p[1, ::f, ::f, ::f], p[2, ::f, ::f, ::f]
    m = mask[::f, ::f, ::f]
    vs = v * f
    ventricles = (csf > 0.5) & (ndi.distance_transform_edt(m, sampling=vs) > 12.0)
    lab, n = ndi.label(ventricles)
    if n:
        sizes = np.bincount(lab.ravel())[1:]
        keep = np.flatnonzero(sizes >= max(2, 0.05 * sizes.max())) + 1
        ventricles = np.isin(lab, keep)
    if ventricles.any():
        dist_vent = ndi.distance_transform_edt(~ventricles, sampling=vs).astype(np.float32)
    else:
        dist_vent = np.full(csf.shape, 99.0, np.float32)
    dist_gm = ndi.distance_transform_edt(gm < 0.5, sampling=vs)
    core = (wm > 0.6) & m
    sites = {
        "periventricular": core & (dist_vent <= 9.0),
        "deep": core & (dist_vent > 9.0) & (dist_gm > 4.0),
        "juxtacortical": (wm > 0.5) & (dist_gm > 0.5) & (dist_gm <= 3.0 + vs / 2),
    }
    dist_vent = upsample_strided(dist_vent, f, mask.shape)
    return {"centres": {k: np.argwhere(s_) * f for k, s_ in sites.items()}, "dist_vent": dist_vent.astype(np.float32)}



# ----------------------------------------------------------------------------------------------- skull


def _skull(rng, cfg, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FLAIR/T1 (WM = 1 units) of the CSF rim, skull tables, diploe, scalp and neck outside ``mask``; head mask."""
    v = float(cfg.voxel_size)
    shape = mask.shape
    d = ndi.distance_transform_edt(~mask, sampling=v)
    # the neck: below the lowest brain slice + 25 mm, extrude the head cross-section downwards
    zs = np.flatnonzero(mask.any(axis=(0, 1)))
    wob = lambda s: 1 + 0.25 * smooth_noise(rng, shape, 20.0 / v)  # noqa: E731
    rim = rng.uniform(1.0, 3.0) * wob(0)
    inner = rim + rng.uniform(1.0, 2.0)
    diploe = inner + rng.uniform(1.5, 4.0) * wob(0)
    outer = diploe + rng.uniform(1.0, 2.0)
    scalp = outer + rng.uniform(4.0, 8.0) * wob(0)
    skin = scalp + 1.5
    flair = np.zeros(shape, np.float32)
    t1 = np.zeros(shape, np.float32)
    layers = [  # (outer edge, FLAIR, T1)
        (rim, 0.12, 0.25),
        (inner, 0.03, 0.05),
        (diploe, 0.75, 0.95),
        (outer, 0.03, 0.05),
        (scalp, 1.05, 1.15),
        (skin, 0.7, 0.7),
    ]
    inside = mask.copy()
    prev = np.zeros(shape)
    for edge, fv, tv in layers:
        shell = (d > prev) & (d <= edge) & ~inside
        flair[shell] = fv
        t1[shell] = tv
        inside |= shell
        prev = edge
    head = inside
    if zs.size:
        z0 = min(shape[2] - 1, int(zs[0] + 25 / v))
        section = head[:, :, z0]
        d2 = ndi.distance_transform_edt(section, sampling=v)
        for z in range(0, z0):
            neck = section & (d2 > (z0 - z) * v * 0.3)  # the head narrows towards the neck
            add = neck & ~head[:, :, z]
            flair[:, :, z][add] = np.where(d2[add] < (z0 - z) * v * 0.3 + 3.0, 1.0, 0.6)  # fat rim, muscle
            t1[:, :, z][add] = np.where(d2[add] < (z0 - z) * v * 0.3 + 3.0, 1.1, 0.55)
            head[:, :, z] |= neck
    # tissue texture so that the extra-cerebral layers are not flat
    tex = 1 + 0.12 * smooth_noise(rng, shape, 2.0 / v, coarse=1)
    return flair * tex, t1 * tex, head
