"""One synthetic subject (:func:`generate_subject`): anatomy, lesions, FLAIR/MPRAGE contrasts (:func:`_intensities`),
optional skull and the acquisition (partial-volume blur, bias field, Rician noise, arbitrary scale)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from msxai.errors import InputError
from msxai.io import voxel_volume_mm3
from msxai.synth.anatomy import _deformation, _skull, _tissues, _u, lesion_site_maps, mni_template, smooth_noise
from msxai.synth.config import CONNECTIVITY_18, SynthConfig, SynthSubject
from msxai.synth.lesions import lesion_instances_18, place_lesions

# ----------------------------------------------------------------------------------------------- intensities


def _rician(rng, img: np.ndarray, sigma: float) -> np.ndarray:
    n1 = rng.standard_normal(img.shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(img.shape, dtype=np.float32) * sigma
    return np.sqrt((img + n1) ** 2 + n2**2)


def _intensities(rng, cfg, p, mask, t1_tpl, labels, dist_vent) -> tuple[np.ndarray, np.ndarray, dict]:
    v = float(cfg.voxel_size)
    csf, gm, wm = p
    shape = mask.shape
    c = {
        "flair_gm": _u(rng, cfg.flair_gm),
        "flair_csf": _u(rng, cfg.flair_csf),
        "t1_gm": _u(rng, cfg.t1_gm),
        "t1_csf": _u(rng, cfg.t1_csf),
        "flair_caps": _u(rng, cfg.flair_caps),
        "flair_caps_mm": _u(rng, cfg.flair_caps_mm),
        "flair_dawm": _u(rng, cfg.flair_dawm),
        "flair_foci": _u(rng, cfg.flair_foci),
        "flair_gm_het": _u(rng, cfg.flair_gm_heterogeneity),
        "texture": _u(rng, cfg.texture),
    }
    # tissue model (WM = 1)
    # cortex: bright on FLAIR with local variation (real cortex has bright spots that are not lesions)
    gm_field = 1 + c["flair_gm_het"] * np.clip(smooth_noise(rng, shape, 2.0 / v, coarse=1), -2.5, 2.5)
    flair = csf * c["flair_csf"] + gm * c["flair_gm"] * gm_field + wm
    # MPRAGE: the tissue model plus the template's own fine contrast (deep nuclei, etc.)
    t1 = csf * c["t1_csf"] + gm * c["t1_gm"] + wm
    t1 = t1 + 0.5 * t1_tpl * (1 - csf)
    # periventricular caps on FLAIR (normal-appearing, thin hyperintense rim around the ventricles)
    if dist_vent is not None:
        flair = flair * (1 + c["flair_caps"] * np.exp(-dist_vent / c["flair_caps_mm"]) * wm)
    # normal-appearing WM heterogeneity (not lesions, not labelled): diffuse patches (~6 mm correlation) and small
    # faint foci (~1.5 mm), positive parts only, inside WM
    dawm = np.clip(smooth_noise(rng, shape, 6.0 / v), 0, 2.0)
    foci = np.clip(smooth_noise(rng, shape, 1.5 / v, coarse=1) - 1.5, 0, 1.0)
    flair = flair * (1 + (c["flair_dawm"] * dawm + c["flair_foci"] * foci) * wm)
    # anatomical texture: shared part + sequence-specific part
    shared = smooth_noise(rng, shape, 1.0 / v, coarse=1)
    flair *= 1 + c["texture"] * (0.7 * shared + 0.7 * smooth_noise(rng, shape, 1.0 / v, coarse=1))
    t1 *= 1 + 0.6 * c["texture"] * (0.7 * shared + 0.7 * smooth_noise(rng, shape, 1.0 / v, coarse=1))
    # lesions: per-lesion contrast, internal heterogeneity, partial-volume edges
    n = int(labels.max())
    meta_l: dict = {"n_lesions": n}
    if n:
        f_les = rng.uniform(*cfg.flair_lesion, n + 1).astype(np.float32)
        t_les = rng.uniform(*cfg.t1_lesion, n + 1).astype(np.float32)
        black = rng.random(n + 1) < cfg.black_hole_fraction
        t_les[black] = rng.uniform(0.35, 0.55, int(black.sum()))
        ext = labels.copy()
        for _ in range(2):
            ext = np.where(ext > 0, ext, ndi.grey_dilation(ext, footprint=CONNECTIVITY_18))
        binary = (labels > 0).astype(np.float32)
        edge = _u(rng, cfg.lesion_edge_mm)
        soft = ndi.gaussian_filter(binary, edge / v) * 1.3
        soft = np.clip(np.maximum(soft, 0.85 * binary), 0, 1) * (ext > 0) * mask
        het = _u(rng, cfg.lesion_heterogeneity)
        hf = 1 + het * smooth_noise(rng, shape, 1.5 / v, coarse=1)
        # contrast profile: full contrast in the lesion's core, a fraction `rim` of it at its border
        depth = ndi.gaussian_filter(binary, 1.5 / v) * binary
        peak = np.asarray(ndi.maximum(depth, labels, index=np.arange(1, n + 1)), dtype=np.float32)
        depth_n = np.where(labels > 0, depth / np.maximum(np.concatenate([[1.0], peak])[labels], 1e-6), 0.0)
        rim = rng.uniform(0.5, 0.9, n + 1).astype(np.float32)
        profile = rim[ext] + (1 - rim[ext]) * depth_n
        fl = 1 + (f_les[ext] * hf - 1) * profile
        tl = 1 + (t_les[ext] * (2 - hf) - 1) * profile
        c["lesion_edge_mm"] = round(edge, 3)
        flair = flair * (1 - soft) + soft * fl
        t1 = t1 * (1 - soft) + soft * tl
        meta_l.update({"flair_lesion_mean": round(float(f_les[1:].mean()), 3), "t1_lesion_mean": round(float(t_les[1:].mean()), 3), "black_holes": int(black[1:].sum())})
    flair *= mask
    t1 *= mask
    c.update(meta_l)
    return flair.astype(np.float32), t1.astype(np.float32), c


def generate_subject(seed: int, skull: bool = False, config: SynthConfig | None = None) -> SynthSubject:
    """One synthetic subject, fully determined by ``seed`` (and ``skull``/``config``)."""
    cfg = config or SynthConfig()
    seed = int(seed)
    if seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed}")
    ss = np.random.SeedSequence(seed)
    r_anat, r_les, r_int, r_acq, r_skull = (np.random.default_rng(s) for s in ss.spawn(5))
    tpl = mni_template()
    shape, affine = cfg.grid()
    v = float(cfg.voxel_size)
    # the anatomy, lesions and contrasts live in a crop around the brain that does not depend on `skull`,
    # so a subject with --skull has exactly the brain and lesions of the same seed without it
    deform, crop, coords, meta_def = _deformation(r_anat, cfg, shape, affine, tpl, 6.0)
    p, mask, t1_tpl, meta_t = _tissues(r_anat, cfg, tpl, coords)
    del coords
    sites = lesion_site_maps(p, mask, v)
    lesion, blobs = place_lesions(r_les, cfg, p, mask, sites)
    vox_mm3 = voxel_volume_mm3(affine)
    labels = lesion_instances_18(lesion, vox_mm3, cfg.min_lesion_mm3)
    flair, t1, meta_c = _intensities(r_int, cfg, p, mask, t1_tpl, labels, sites["dist_vent"])
    acq = crop  # the region the acquisition step simulates
    if skull:
        grow = int(np.ceil(28.0 / v))
        acq = tuple(slice(max(0, c.start - grow), min(n, c.stop + grow)) for c, n in zip(crop, shape))
        inner = tuple(slice(c.start - a.start, c.stop - a.start) for c, a in zip(crop, acq))
        acq_shape = tuple(a.stop - a.start for a in acq)

        def grown(arr):
            out = np.zeros(acq_shape, dtype=arr.dtype)
            out[inner] = arr
            return out

        mask_acq = grown(mask)
        sf, st, _head = _skull(r_skull, cfg, mask_acq)
        flair = np.where(mask_acq, grown(flair), sf)
        t1 = np.where(mask_acq, grown(t1), st)
    else:
        mask_acq = mask
    # acquisition: partial-volume blur, smooth bias field, Rician noise, arbitrary scale
    meta_a = {}
    for name in ("flair", "t1"):
        img = flair if name == "flair" else t1
        blur = _u(r_acq, cfg.blur_sigma_mm)
        if blur > 0.05:
            img = ndi.gaussian_filter(img, blur / v)
        strength = _u(r_acq, cfg.bias_strength)
        bias = np.exp(strength * smooth_noise(r_acq, img.shape, 40.0 / v))
        img = img * bias
        sigma = _u(r_acq, cfg.flair_noise if name == "flair" else cfg.t1_noise)
        img = _rician(r_acq, img, sigma)  # with --skull the air keeps its Rician noise floor
        level = _u(r_acq, cfg.flair_wm_level if name == "flair" else cfg.t1_wm_level)
        img = img * level
        if not skull:
            img = img * mask_acq  # brain-extracted: 0 outside the brain mask
        meta_a[name] = {"blur_mm": round(blur, 3), "bias": round(strength, 3), "noise": round(sigma, 4),
                        "wm_level": round(level, 1)}
        if name == "flair":
            flair = img
        else:
            t1 = img

    # place the crops into the full grid
    def full(a, dtype, region):
        out = np.zeros(shape, dtype=dtype)
        out[region] = a
        return out

    flair_f = full(flair, np.float32, acq)
    t1_f = full(t1, np.float32, acq)
    if skull:  # Rician noise floor (of zero signal) everywhere outside the simulated region too
        outside = np.ones(shape, bool)
        outside[acq] = False
        n_out = int(outside.sum())
        for arr, name in ((flair_f, "flair"), (t1_f, "t1")):
            sd = meta_a[name]["noise"] * meta_a[name]["wm_level"]
            arr[outside] = np.hypot(r_acq.standard_normal(n_out, dtype=np.float32) * sd,
                                    r_acq.standard_normal(n_out, dtype=np.float32) * sd)
    tissues = np.zeros((3, *shape), np.float32)
    tissues[(slice(None), *crop)] = p
    subject = SynthSubject(
        flair=flair_f,
        t1=t1_f,
        lesions=full(labels, np.int32, crop),
        brain_mask=full(mask.astype(np.uint8), np.uint8, crop),
        affine=affine.copy(),
        tissues=tissues,
        meta={
            "seed": seed,
            "skull": bool(skull),
            "voxel_size": v,
            "deformation": meta_def,
            "tissues": meta_t,
            "contrast": {k: (round(x, 4) if isinstance(x, float) else x) for k, x in meta_c.items()},
            "acquisition": meta_a,
            "blobs": blobs,
            "lesion_volumes_mm3": [
                round(float(x) * vox_mm3, 1) for x in np.bincount(labels.ravel())[1:]
            ],
        },
    )
    return subject
