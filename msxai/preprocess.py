"""Pre-processing of the FLAIR + T1 (MPRAGE) pair: brain mask, z-scoring, optional N4, rigid registration, the T1
brought onto the network grid (:func:`align_onto`: copy, exact re-index, resampling, registration when measured
misaligned) and :class:`PreparedImage` (the network input with the way back to the FLAIR's grid). The bundles'
chain of MONAI transforms (:mod:`msxai.transforms`) calls these.

The paper's networks see each sequence z-scored over the brain (mean 0, standard deviation 1 over the brain voxels,
0 outside). On skull-stripped data, where the brain is the non-zero part of every sequence, :func:`zscore` equals
MONAI's ``NormalizeIntensity(nonzero=True, channel_wise=True)`` (population standard deviation, ddof 0).

SimpleITK is used for N4 and registration. Images are handed to it in the NIfTI world frame of the affine (origin
``A[:3, 3]``, direction ``A[:3, :3] / spacing``); since both images of a registration share that frame, no RAS/LPS
flip is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from msxai import SEQUENCES
from msxai.errors import EmptyDomainError, InputError
from msxai.io import Volume, check_finite, check_not_empty, voxel_spacing


# --------------------------------------------------------------------------------------------------- brain mask
def foreground_mask(image: np.ndarray) -> np.ndarray:
    """Bool ``[X, Y, Z]`` of the voxels that are non-zero in any channel (``[C, X, Y, Z]``) or in the volume."""
    image = np.asarray(image)
    if image.ndim == 4:
        return np.any(image != 0, axis=0)
    if image.ndim == 3:
        return image != 0
    raise InputError(f"expected a [C, X, Y, Z] image or an [X, Y, Z] volume, got shape {tuple(image.shape)}")


def brain_mask(image: np.ndarray) -> np.ndarray:
    """The brain of skull-stripped data: :func:`foreground_mask` (the name used in docs/ARCHITECTURE.md)."""
    return foreground_mask(image)


def _channel_name(c: int, n_channels: int) -> str:
    return f"channel {c} ({SEQUENCES[c]})" if n_channels == len(SEQUENCES) and c < len(SEQUENCES) else f"channel {c}"


# --------------------------------------------------------------------------------------------------- z-score
def zscore(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per channel ``(x - mean) / std`` over ``mask`` (default: :func:`foreground_mask`), 0 outside the mask.

    Accepts ``[C, X, Y, Z]`` or ``[X, Y, Z]``; returns float32 of the same shape. Statistics are computed in float64
    with the population standard deviation (ddof 0), as MONAI does. An empty mask raises EmptyDomainError; a
    channel that is constant over the mask raises InputError naming the channel.
    """
    image = np.asarray(image)
    squeeze = image.ndim == 3
    if squeeze:
        image = image[None]
    if image.ndim != 4:
        raise InputError(f"zscore: expected [C, X, Y, Z] or [X, Y, Z], got shape {tuple(image.shape)}")
    check_finite(image, "image")
    m = foreground_mask(image) if mask is None else np.asarray(mask).astype(bool)
    if m.shape != image.shape[1:]:
        raise InputError(f"zscore: mask shape {tuple(m.shape)} does not match the image grid {tuple(image.shape[1:])}")
    if not m.any():
        raise EmptyDomainError("zscore: the brain mask is empty (no voxel to compute the mean and std over)")
    out = np.zeros(image.shape, dtype=np.float32)
    for c in range(image.shape[0]):
        values = image[c][m].astype(np.float64)
        mean, std = float(values.mean()), float(values.std())
        if not std > 1e-12 * max(1.0, abs(mean)):
            raise InputError(
                f"zscore: {_channel_name(c, image.shape[0])} is constant ({mean:.6g}) inside the brain mask; "
                "cannot normalise it (is the sequence empty or corrupted?)"
            )
        out[c][m] = ((values - mean) / std).astype(np.float32)
    return out[0] if squeeze else out


# --------------------------------------------------------------------------------------------------- SimpleITK
def to_sitk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image whose index (i, j, k) holds ``array[i, j, k]`` and whose geometry is ``affine``."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.array(voxel_spacing(affine))
    direction = affine[:3, :3] / spacing
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in affine[:3, 3]))
    img.SetDirection(tuple(float(d) for d in direction.ravel()))
    return img


def from_sitk(image: sitk.Image) -> np.ndarray:
    """The ``[X, Y, Z]`` array of a SimpleITK image (inverse of :func:`to_sitk`'s array handling)."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def sitk_affine(image: sitk.Image) -> np.ndarray:
    """The 4x4 voxel-to-world affine of a SimpleITK image built by :func:`to_sitk`."""
    affine = np.eye(4)
    affine[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return affine


# --------------------------------------------------------------------------------------------------- N4
def n4_bias_correct(
    volume: np.ndarray,
    mask: np.ndarray | None = None,
    shrink_factor: int = 4,
    iterations: tuple[int, ...] = (50, 50, 30),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    convergence_threshold: float = 1e-6,
) -> np.ndarray:
    """N4 bias-field correction (Tustison et al. 2010) of one ``[X, Y, Z]`` volume; returns float32.

    The bias field is fitted on a ``shrink_factor``-times shrunk copy inside ``mask`` (default: the non-zero voxels,
    or every voxel when none is zero) restricted to positive intensities, one fitting level per entry of
    ``iterations``, then evaluated at full resolution and divided out of the whole volume (zeros stay zero).
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise InputError(f"n4_bias_correct: expected an [X, Y, Z] volume, got shape {tuple(volume.shape)}")
    check_finite(volume, "volume")
    if mask is None:
        mask = np.ones(volume.shape, dtype=bool) if np.all(volume != 0) else volume != 0
    mask = np.asarray(mask).astype(bool)
    if mask.shape != volume.shape:
        raise InputError(f"n4_bias_correct: mask shape {mask.shape} does not match the volume {volume.shape}")
    # N4 fits log intensities: non-positive voxels (e.g. interpolation undershoot at the brain edge) are left out of
    # the fit; the fitted field still corrects them.
    mask = mask & (volume > 0)
    if not mask.any():
        raise EmptyDomainError("n4_bias_correct: no positive voxel inside the mask to fit the bias field on")
    affine = np.diag(list(spacing) + [1.0])
    image = to_sitk(volume.astype(np.float32), affine)
    mask_img = to_sitk(mask.astype(np.uint8), affine)
    shrink = max(1, int(shrink_factor))
    small = sitk.Shrink(image, [shrink] * 3) if shrink > 1 else image
    small_mask = sitk.Shrink(mask_img, [shrink] * 3) if shrink > 1 else mask_img
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
    corrector.SetConvergenceThreshold(convergence_threshold)
    corrector.Execute(small, small_mask)
    log_bias = corrector.GetLogBiasFieldAsImage(image)
    bias = np.exp(from_sitk(log_bias).astype(np.float64))
    return (volume / bias).astype(np.float32)


# --------------------------------------------------------------------------------------------------- registration
def estimate_rigid(
    moving: Volume,
    fixed: Volume,
    seed: int = 0,
    shrink_factors: tuple[int, ...] = (4, 2, 1),
    smoothing_sigmas_mm: tuple[float, ...] = (2.0, 1.0, 0.0),
    iterations: int = 300,
    sampling_percentage: float = 0.25,
    max_samples: int = 100_000,
    min_step_mm: float = 1e-4,
    init: str = "world",
) -> sitk.Euler3DTransform:
    """Rigid (Euler3D) transform mapping *fixed* world points to *moving* world points, fitted by Mattes mutual
    information (50 bins, seeded random sampling of ``sampling_percentage`` of the voxels of each pyramid level, at
    most ``max_samples``) with a regular-step gradient descent (first step ~1 mm, halved on
    every reversal, stops below ``min_step_mm``) over a multi-resolution pyramid.

    ``init``: where the search starts - ``"world"`` (default) the identity in world coordinates, right for scans of
    one session that share the scanner frame; ``"geometry"`` aligns the centres of the two grids; ``"moments"`` the
    intensity centres of mass (for images whose world coordinates are unrelated).
    """
    fixed_img = to_sitk(fixed.array.astype(np.float32), fixed.affine)
    moving_img = to_sitk(moving.array.astype(np.float32), moving.affine)
    if init == "world":  # same-session scans share the scanner frame: start from the identity
        initial = sitk.Euler3DTransform()
        centre = fixed.affine[:3, :3] @ ((np.array(fixed.array.shape) - 1) / 2.0) + fixed.affine[:3, 3]
        initial.SetCenter(tuple(float(c) for c in centre))
    elif init in ("geometry", "moments"):
        mode = (sitk.CenteredTransformInitializerFilter.GEOMETRY if init == "geometry"
                else sitk.CenteredTransformInitializerFilter.MOMENTS)
        initial = sitk.CenteredTransformInitializer(fixed_img, moving_img, sitk.Euler3DTransform(), mode)
    else:
        raise InputError(f"registration init must be 'world', 'geometry' or 'moments', got {init!r}")
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    # at most `max_samples` random samples per level (a 1 mm brain has ~7M voxels; 100k keep MI well estimated)
    n_vox = int(np.prod(fixed.array.shape))
    percentages = [min(sampling_percentage, max_samples * f**3 / n_vox) for f in shrink_factors]
    reg.SetMetricSamplingPercentagePerLevel(percentages, seed=int(seed) + 1)  # seed 0 would mean "wall clock"
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=min_step_mm, numberOfIterations=iterations, relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink_factors))
    reg.SetSmoothingSigmasPerLevel(list(smoothing_sigmas_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    transform = sitk.Euler3DTransform(initial)
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(fixed_img, moving_img)
    return transform


def resample_onto(moving: Volume, fixed_affine: np.ndarray, fixed_shape: tuple[int, int, int],
                  transform: sitk.Transform | None = None, order: int = 1, default: float = 0.0) -> Volume:
    """``moving`` resampled onto the grid (``fixed_affine``, ``fixed_shape``) through ``transform`` (fixed world ->
    moving world; identity when None); linear (order 1) or nearest-neighbour (order 0) interpolation."""
    moving_img = to_sitk(moving.array.astype(np.float32), moving.affine)
    reference = to_sitk(np.zeros(fixed_shape, dtype=np.float32), fixed_affine)
    interp = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear, 3: sitk.sitkBSpline}.get(order)
    if interp is None:
        raise InputError(f"interpolation order must be 0, 1 or 3, got {order}")
    out = sitk.Resample(moving_img, reference, transform or sitk.Transform(3, sitk.sitkIdentity), interp, default,
                        sitk.sitkFloat32)
    return Volume(from_sitk(out), np.asarray(fixed_affine, dtype=np.float64))


def register_rigid(moving: Volume, fixed: Volume, seed: int = 0, init: str = "world") -> Volume:
    """Rigidly register ``moving`` to ``fixed`` (mutual information, Euler3D; see :func:`estimate_rigid`) and return
    it resampled (linear) onto the fixed grid, with the fixed affine. Voxels that map outside ``moving`` are 0."""
    for vol, name in ((moving, "moving"), (fixed, "fixed")):
        if np.asarray(vol.array).ndim != 3:
            raise InputError(f"register_rigid: {name} image must be 3-D, got shape {tuple(np.shape(vol.array))}")
        check_finite(vol.array, f"{name} image")
        check_not_empty(vol.array, f"{name} image")
    transform = estimate_rigid(moving, fixed, seed=seed, init=init)
    return resample_onto(moving, fixed.affine, fixed.array.shape, transform)


def foreground_box_corners(vol: Volume) -> np.ndarray:
    """World coordinates ``[8, 3]`` of the corners of the bounding box of the head/brain in ``vol`` (voxels above 10 %
    of its 99th intensity percentile; the whole grid when none is)."""
    a = np.asarray(vol.array)
    hi = float(np.percentile(a[a > 0], 99)) if np.any(a > 0) else 0.0
    idx = np.argwhere(a > 0.1 * hi) if hi > 0 else np.empty((0, 3))
    lo, up = (idx.min(0), idx.max(0)) if len(idx) else (np.zeros(3), np.array(a.shape) - 1.0)
    corners = np.array([[x, y, z] for x in (lo[0], up[0]) for y in (lo[1], up[1]) for z in (lo[2], up[2])], float)
    return corners @ np.asarray(vol.affine)[:3, :3].T + np.asarray(vol.affine)[:3, 3]


def rigid_displacement_mm(transform: sitk.Transform, points: np.ndarray) -> float:
    """The largest distance (mm) a rigid ``transform`` moves any of ``points`` (world coordinates ``[N, 3]``)."""
    moved = np.array([transform.TransformPoint(tuple(float(c) for c in p)) for p in np.asarray(points)])
    return float(np.linalg.norm(moved - np.asarray(points), axis=1).max())


def binned(vol: Volume, mm: float = 3.0) -> Volume:
    """``vol`` averaged over bins of about ``mm`` millimetres (SimpleITK ``BinShrink``; the grid's corners keep their
    place), for fast coarse work on large volumes."""
    factors = [max(1, int(round(mm / s))) for s in vol.spacing]
    factors = [f if n // f >= 24 else max(1, n // 24) for f, n in zip(factors, vol.array.shape)]
    if factors == [1, 1, 1]:
        return vol
    small = sitk.BinShrink(to_sitk(np.asarray(vol.array, np.float32), vol.affine), factors)
    return Volume(from_sitk(small), sitk_affine(small))


def misalignment_mm(moving: Volume, fixed: Volume, seed: int = 0) -> float:
    """How far ``moving`` is from being aligned with ``fixed`` (both in one world frame, any grids): a coarse rigid
    registration (mutual information on 3 mm binned copies, two pyramid levels) and the largest displacement (mm) it
    applies to the corners of ``fixed``'s head/brain box. Measured below 1.2 mm for FLAIR/T1 pairs registered by
    their provider (patient26: 0.7 mm), about 15 mm for a head turned by 3-4 degrees and shifted by 4 mm."""
    transform = estimate_rigid(binned(moving), binned(fixed), seed=seed, shrink_factors=(2, 1),
                               smoothing_sigmas_mm=(3.0, 0.0), iterations=200, max_samples=30_000)
    return rigid_displacement_mm(transform, foreground_box_corners(fixed))


def reindex_onto(moving: Volume, fixed_affine: np.ndarray, fixed_shape) -> Volume | None:
    """``moving`` on the grid (``fixed_affine``, ``fixed_shape``) without interpolation when every fixed voxel centre
    is a voxel centre of ``moving`` (the grids differ by an axis reorder/flip and a whole-voxel shift): the values
    are copied, 0 outside ``moving``. ``None`` when the grids are not related that way (then resample)."""
    m = np.linalg.inv(np.asarray(moving.affine, np.float64)) @ np.asarray(fixed_affine, np.float64)
    r, t = np.rint(m[:3, :3]), np.rint(m[:3, 3])
    if not (np.allclose(m[:3, :3], r, atol=1e-6) and np.allclose(m[:3, 3], t, atol=1e-4)):
        return None
    if not (np.all(np.abs(r).sum(0) == 1) and np.all(np.abs(r).sum(1) == 1)):
        return None
    src = np.asarray(moving.array)
    fixed_shape = tuple(int(n) for n in fixed_shape)
    perm = [int(np.nonzero(r[:, j])[0][0]) for j in range(3)]  # fixed axis j reads moving axis perm[j]
    src = np.transpose(src, perm)
    index, valid = [], []
    for j in range(3):
        i = perm[j]
        idx = (r[i, j] * np.arange(fixed_shape[j]) + t[i]).astype(np.int64)
        ok = (idx >= 0) & (idx < src.shape[j])
        index.append(idx[ok])
        valid.append(np.nonzero(ok)[0])
    out = np.zeros(fixed_shape, np.float32)
    out[np.ix_(*valid)] = src[np.ix_(*index)]
    return Volume(out, np.asarray(fixed_affine, np.float64))


REGISTER_MODES = ("auto", "always", "never")


def align_onto(moving: Volume, fixed: Volume, register: str | bool = "auto", tolerance_mm: float = 2.0,
               seed: int = 0) -> tuple[Volume, dict]:
    """``moving`` (the T1 on its own grid) on ``fixed``'s grid (the FLAIR's network grid): resampled in world
    coordinates (linear; 0 outside its field of view; an exact copy when both grids are the same), then rigidly
    registered (:func:`estimate_rigid`, resampled once from ``moving``) when ``register`` is ``"always"``, or when
    it is ``"auto"`` and :func:`misalignment_mm` exceeds ``tolerance_mm``. Returns the volume and what was done:
    ``{"resampled", "misalignment_mm", "registered", "residual_mm"}`` (the residual is :func:`misalignment_mm` of the
    registered volume)."""
    mode = {True: "always", False: "never"}.get(register, register) if isinstance(register, bool) else str(register)
    if mode not in REGISTER_MODES:
        raise InputError(f"register must be one of {REGISTER_MODES} (or true/false), got {register!r}")
    same = (tuple(moving.array.shape) == tuple(fixed.array.shape)
            and np.allclose(moving.affine, fixed.affine, atol=1e-6))
    if same:
        on_grid = Volume(np.asarray(moving.array, np.float32).copy(), np.asarray(fixed.affine, np.float64))
    else:
        exact = reindex_onto(moving, fixed.affine, fixed.array.shape)
        on_grid = exact if exact is not None else resample_onto(moving, fixed.affine, fixed.array.shape)
    info = {"resampled": not same, "misalignment_mm": None, "registered": False, "residual_mm": None}
    if mode == "never":
        info["note"] = "registration turned off"
        return on_grid, info
    if mode == "auto":
        if same:  # a T1 written on the FLAIR's own grid was put there by a registration (e.g. the data's provider)
            info["note"] = "T1 on the FLAIR's grid: taken as aligned (not measured; register='always' forces it)"
            return on_grid, info
        try:
            info["misalignment_mm"] = round(misalignment_mm(on_grid, fixed, seed), 3)
        except RuntimeError as exc:  # SimpleITK: e.g. too few voxels to sample
            info["note"] = f"misalignment not measured ({str(exc).strip().splitlines()[-1][:200]}); not registered"
            return on_grid, info
        if info["misalignment_mm"] <= tolerance_mm:
            info["note"] = f"aligned within {tolerance_mm} mm: not registered"
            return on_grid, info
    transform = estimate_rigid(moving, fixed, seed=seed)
    registered = resample_onto(moving, fixed.affine, fixed.array.shape, transform)
    info.update(registered=True, residual_mm=round(misalignment_mm(registered, fixed, seed), 3),
                transform={"rotation_deg": [round(float(np.degrees(a)), 3) for a in
                                            (transform.GetAngleX(), transform.GetAngleY(), transform.GetAngleZ())],
                           "translation_mm": [round(float(t), 3) for t in transform.GetTranslation()]})
    return registered, info


# --------------------------------------------------------------------------------------------------- resampling
# --------------------------------------------------------------------------------------------------- pipeline
@dataclass
class PreparedImage:
    """The network input of one subject.

    ``image``: float32 ``[2, X, Y, Z]`` (FLAIR, T1) on the network grid, normalised over ``brain_mask``; ``raw``:
    the same before normalisation; ``affine``: the network grid's voxel-to-world matrix; ``brain_mask``: bool
    ``[X, Y, Z]``. From a bundle's pre-processing chain (:mod:`msxai.transforms`) also: ``native_affine`` and
    ``native_shape`` (the FLAIR's own grid, where outputs go back to), ``data`` (the chain's output dictionary: it
    holds the transforms that :func:`msxai.transforms.invert_to_native` undoes) and ``info`` (what the chain did).
    """

    image: np.ndarray
    affine: np.ndarray
    brain_mask: np.ndarray
    raw: np.ndarray
    native_affine: np.ndarray | None = None
    native_shape: tuple[int, int, int] | None = None
    data: dict | None = None
    info: dict = field(default_factory=dict)
    chain: object = None  # the pre-processing Compose whose recorded transforms map results back

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.brain_mask.shape)

    def to_native(self, array: np.ndarray, nearest: bool = False) -> np.ndarray:
        """A float map on the network grid (``[X, Y, Z]`` or ``[C, X, Y, Z]``) on the FLAIR's native grid: the
        probability's own inversion (``Invertd`` of the chain's Spacingd and Orientationd, linear; ``nearest`` for
        labels); a copy when the grids are one."""
        a = np.asarray(array, dtype=np.float32)
        if self.on_native_grid:
            return a.copy()
        if self.data is not None and self.chain is not None:
            from msxai.transforms import invert_to_native

            return invert_to_native(a, self.data, self.chain, nearest=nearest)
        native = [resample_onto(Volume(c, self.affine), self.native_affine, self.native_shape,
                                order=0 if nearest else 1).array for c in (a[None] if a.ndim == 3 else a)]
        return native[0] if a.ndim == 3 else np.stack(native)

    def to_network(self, mask: np.ndarray, name: str = "domain") -> np.ndarray:
        """A bool mask on the FLAIR's native grid (a lesion, an uploaded label, a domain around clicks) carried to
        the network grid (:func:`msxai.transforms.carry_to_network`, nearest)."""
        m = np.asarray(mask, bool)
        if self.on_native_grid:
            return m.copy()
        from msxai.transforms import carry_to_network

        return carry_to_network(m, self.native_affine, self.affine, self.shape, name)

    @property
    def on_native_grid(self) -> bool:
        """Whether the network grid is the FLAIR's own grid (a canonical input: nothing to map back)."""
        if self.native_affine is None:
            return True
        return tuple(self.native_shape) == self.shape and np.allclose(self.native_affine, self.affine, atol=1e-6)
