"""Per-channel intensity normalisation of the network input, selectable by name.

Every function is a pure function of ``(image [C, X, Y, Z] or [X, Y, Z], brain mask [X, Y, Z])`` returning float32
of the image's shape, 0 outside the mask. Training and inference (the bundle's pre-processing chain,
:class:`msxai.transforms.NormalizeIntensityd`) call the one named by the bundle's ``normalization`` key
(``configs/train.json`` and ``configs/inference.json``), so a network is always served the normalisation it was
trained with.

- ``zscore_brain`` (default, the paper's): ``(x - mean) / std`` over the brain (:func:`msxai.preprocess.zscore`,
  MONAI ``NormalizeIntensity(nonzero=True, channel_wise=True)`` on skull-stripped data). Its statistics move with
  the lesion load: hyperintense FLAIR lesions raise the mean and the standard deviation.
- ``median_iqr``: ``(x - median) / (IQR / 1.349)`` over the brain (a robust z-score: for a normal distribution
  ``IQR / 1.349`` is the standard deviation). A lesion load of a few per cent of the brain moves the quartiles
  little.
- ``nawm_mode``: ``(x - mode) / width``, anchored on the normal-appearing tissue peak of the brain histogram: the
  mode of the smoothed histogram (256 bins between the 0.5th and 99.5th percentiles, Gaussian smoothing of 3 bins)
  and the peak's half width at half maximum divided by ``sqrt(2 ln 2)`` (the standard deviation of a Gaussian
  peak of that width). On FLAIR and T1 the dominant peak is the white matter (with the grey matter next to it);
  lesions sit in a tail and neither move the mode nor widen the peak.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage

from msxai.errors import EmptyDomainError, InputError

DEFAULT_NORMALIZATION = "zscore_brain"
IQR_TO_SD = 1.3489795003921634  # IQR of the standard normal distribution
HWHM_TO_SD = float(np.sqrt(2.0 * np.log(2.0)))  # half width at half maximum of a unit Gaussian
MODE_BINS = 256
MODE_SMOOTH_BINS = 3.0
MODE_RANGE_PERCENTILES = (0.5, 99.5)


def _channels(image: np.ndarray, mask: np.ndarray | None, who: str) -> tuple[np.ndarray, np.ndarray, bool]:
    from msxai.io import check_finite
    from msxai.preprocess import foreground_mask

    image = np.asarray(image)
    squeeze = image.ndim == 3
    if squeeze:
        image = image[None]
    if image.ndim != 4:
        raise InputError(f"{who}: expected [C, X, Y, Z] or [X, Y, Z], got shape {tuple(image.shape)}")
    check_finite(image, "image")
    m = foreground_mask(image) if mask is None else np.asarray(mask).astype(bool)
    if m.shape != image.shape[1:]:
        raise InputError(f"{who}: mask shape {tuple(m.shape)} does not match the image grid {tuple(image.shape[1:])}")
    if not m.any():
        raise EmptyDomainError(f"{who}: the brain mask is empty (no voxel to compute the statistics over)")
    return image, m, squeeze


def _apply(image: np.ndarray, mask: np.ndarray | None, who: str,
           stats: Callable[[np.ndarray], tuple[float, float]]) -> np.ndarray:
    """``(x - centre) / scale`` per channel with ``(centre, scale) = stats(values in the mask)``; 0 outside."""
    from msxai.preprocess import _channel_name

    image, m, squeeze = _channels(image, mask, who)
    out = np.zeros(image.shape, dtype=np.float32)
    for c in range(image.shape[0]):
        values = image[c][m].astype(np.float64)
        centre, scale = stats(values)
        if not scale > 1e-12 * max(1.0, abs(centre)):
            raise InputError(f"{who}: {_channel_name(c, image.shape[0])} has no intensity spread inside the brain "
                             f"mask (centre {centre:.6g}); cannot normalise it (is the sequence empty or corrupted?)")
        out[c][m] = ((values - centre) / scale).astype(np.float32)
    return out[0] if squeeze else out


def zscore_brain(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Mean / standard deviation over the brain (the paper's; :func:`msxai.preprocess.zscore`)."""
    from msxai.preprocess import zscore

    return zscore(image, mask)


def median_iqr_stats(values: np.ndarray) -> tuple[float, float]:
    """``(median, IQR / 1.349)`` of a 1-D sample (numpy's linear-interpolation percentiles)."""
    q25, q50, q75 = np.percentile(values, [25.0, 50.0, 75.0])
    return float(q50), float(q75 - q25) / IQR_TO_SD


def median_iqr(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Robust z-score ``(x - median) / (IQR / 1.349)`` over the brain, per channel."""
    return _apply(image, mask, "median_iqr", median_iqr_stats)


def mode_stats(values: np.ndarray, bins: int = MODE_BINS, smooth_bins: float = MODE_SMOOTH_BINS,
               percentiles: tuple[float, float] = MODE_RANGE_PERCENTILES) -> tuple[float, float]:
    """``(mode, sd)`` of the dominant histogram peak of a 1-D sample.

    Histogram of ``bins`` equal bins between the given percentiles, Gaussian-smoothed (``smooth_bins`` bins); the
    mode is the centre of the highest bin, refined by a parabola through it and its neighbours; ``sd`` is the
    half width at half maximum of that peak (the mean of its left and right half widths, each found by linear
    interpolation where the smoothed histogram first falls below half the peak; a side that never falls below it
    inside the range uses the other side) divided by ``sqrt(2 ln 2)``."""
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = np.percentile(values, percentiles)
    if not hi > lo:
        return float(lo), 0.0
    counts, edges = np.histogram(values, bins=int(bins), range=(float(lo), float(hi)))
    h = ndimage.gaussian_filter1d(counts.astype(np.float64), float(smooth_bins), mode="constant")
    width = edges[1] - edges[0]
    centres = edges[:-1] + width / 2
    k = int(np.argmax(h))
    mode = centres[k]
    if 0 < k < len(h) - 1:
        a, b, c = h[k - 1], h[k], h[k + 1]
        den = a - 2 * b + c
        if den < 0:
            mode += 0.5 * (a - c) / den * width
    half = h[k] / 2.0

    def half_width(direction: int) -> float | None:
        j = k
        while 0 <= j + direction < len(h):
            j += direction
            if h[j] < half:
                # linear interpolation between bins j - direction (>= half) and j (< half)
                prev = h[j - direction]
                frac = (prev - half) / (prev - h[j]) if prev != h[j] else 0.0
                x_prev = centres[j - direction]
                return abs(x_prev + direction * frac * width - mode)
        return None

    left, right = half_width(-1), half_width(+1)
    sides = [s for s in (left, right) if s is not None]
    if not sides:
        return float(mode), float(hi - lo) / 2.0 / HWHM_TO_SD
    return float(mode), float(np.mean(sides)) / HWHM_TO_SD


def nawm_mode(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``(x - mode) / sd`` anchored on the dominant (normal-appearing white matter) histogram peak, per channel."""
    return _apply(image, mask, "nawm_mode", mode_stats)


NORMALIZATIONS: dict[str, Callable[..., np.ndarray]] = {
    "zscore_brain": zscore_brain,
    "median_iqr": median_iqr,
    "nawm_mode": nawm_mode,
}


def check_normalization(name) -> str:
    """The normalisation name, or an InputError listing the known ones."""
    key = DEFAULT_NORMALIZATION if name in (None, "") else str(name)
    if key not in NORMALIZATIONS:
        raise InputError(f"unknown normalization {name!r}: choose one of {', '.join(NORMALIZATIONS)}")
    return key


def normalize(image: np.ndarray, mask: np.ndarray | None = None, method: str = DEFAULT_NORMALIZATION) -> np.ndarray:
    """Normalise ``image`` (``[C, X, Y, Z]`` or ``[X, Y, Z]``) over ``mask`` (default: its non-zero voxels) with the
    function named ``method`` (see :data:`NORMALIZATIONS`)."""
    return NORMALIZATIONS[check_normalization(method)](image, mask)
