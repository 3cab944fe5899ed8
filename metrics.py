"""Image-fusion and depth metrics as the StackMFF-V2 paper reports them.

Every image metric works on one gray image (HxW) in float arithmetic on the
0..255 scale (``to_gray255`` turns an 8- or 16-bit picture into that); depth
metrics work on depth maps in [0, 1]. Arguments always come as
``(fused, reference)`` or ``(source_a, source_b, fused)``.

Where a well-kept library computes the same quantity it is used
(scikit-image: SSIM, PSNR, MSE, entropy; torchmetrics: VIF; SciPy: filters);
the rest is written here. docs/metrics.md lists each definition and how it
differs from the released evaluation scripts.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from scipy import ndimage
from scipy.special import gamma
from skimage.measure import shannon_entropy
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity
from torchmetrics.functional.image import visual_information_fidelity

from fusion import gaussian_blur
from utils import dtype_max

GRAY_MAX = 255.0
NIQE_PARAMS_PATH = Path(__file__).resolve().parent / "assets" / "niqe_pristine_params.npz"


def to_gray255(image: np.ndarray) -> np.ndarray:
    """uint8/uint16 HxW gray or HxWx3 BGR -> float64 HxW on the 0..255 scale.

    Colour goes through OpenCV's BGR->GRAY, as the fusion pipeline does.
    """
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return gray.astype(np.float64) * (GRAY_MAX / dtype_max(gray.dtype))


def _check_pair(fused, reference):
    fused = np.asarray(fused, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if fused.shape != reference.shape or fused.ndim != 2:
        raise ValueError(f"need two gray images of one size, got {fused.shape} and {reference.shape}")
    return fused, reference


def _gray_levels(image) -> np.ndarray:
    """0..255 float -> int64 gray levels 0..255 (nearest), for histograms."""
    return np.clip(np.rint(image), 0, 255).astype(np.int64)


# ----------------------------------------------------------------------------- against a ground truth

def mse(fused, reference) -> float:
    """Mean squared error (0..255 scale: 0 is perfect)."""
    fused, reference = _check_pair(fused, reference)
    return float(mean_squared_error(reference, fused))


def mae(fused, reference) -> float:
    """Mean absolute error (0..255 scale: 0 is perfect)."""
    fused, reference = _check_pair(fused, reference)
    return float(np.mean(np.abs(fused - reference)))


def rmse(fused, reference) -> float:
    """Root mean squared error (0..255 scale: 0 is perfect)."""
    return float(np.sqrt(mse(fused, reference)))


def psnr(fused, reference) -> float:
    """Peak signal-to-noise ratio in dB with a peak of 255 (inf when identical)."""
    fused, reference = _check_pair(fused, reference)
    if np.array_equal(fused, reference):
        return float("inf")  # skimage would divide by zero and warn
    return float(peak_signal_noise_ratio(reference, fused, data_range=GRAY_MAX))


def ssim(fused, reference) -> float:
    """Structural similarity in [-1, 1] (1 when identical), with Wang et al.'s
    settings: 11x11 Gaussian window of sigma 1.5, K1 0.01, K2 0.03, peak 255."""
    fused, reference = _check_pair(fused, reference)
    return float(structural_similarity(reference, fused, data_range=GRAY_MAX, gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False))


def _floored(fused, reference):
    # Dark pixels would give log(0) and division by zero: count every value
    # below one gray level as one gray level (the smallest non-zero 8-bit value).
    fused, reference = _check_pair(fused, reference)
    return np.maximum(fused, 1.0), np.maximum(reference, 1.0)


def log_rms(fused, reference) -> float:
    """sqrt(mean((ln F - ln G)^2)), values floored at one gray level (0 is perfect)."""
    fused, reference = _floored(fused, reference)
    return float(np.sqrt(np.mean((np.log(fused) - np.log(reference)) ** 2)))


def abs_rel(fused, reference) -> float:
    """mean(|F - G| / G), relative to the ground truth G, floored at one gray level."""
    fused, reference = _floored(fused, reference)
    return float(np.mean(np.abs(fused - reference) / reference))


def sq_rel(fused, reference) -> float:
    """mean((F - G)^2 / G), relative to the ground truth G, floored at one gray level."""
    fused, reference = _floored(fused, reference)
    return float(np.mean((fused - reference) ** 2 / reference))


def vif(fused, reference) -> float:
    """Pixel-domain visual information fidelity (Sheikh & Bovik, 4 scales,
    noise variance 2 on the 0..255 scale): 1 when identical, below 1 for a loss
    of information, above 1 for contrast enhancement. Needs at least 41x41."""
    fused, reference = _check_pair(fused, reference)
    if min(fused.shape) < 41:
        raise ValueError(f"VIF needs images of at least 41x41, got {fused.shape[1]}x{fused.shape[0]}")
    # float32: torchmetrics' convolutions are ~15x slower in float64 on a CPU,
    # and the score moves by under 1e-6.
    preds = torch.from_numpy(fused).float()[None, None]
    target = torch.from_numpy(reference).float()[None, None]
    return float(visual_information_fidelity(preds, target, sigma_n_sq=2.0))


def _entropy_bits(counts) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log2(p)))


def mutual_information(fused, reference) -> float:
    """Mutual information in bits between the 256-level histograms of the two
    images: 0 for independent images, the entropy of the image when identical."""
    fused, reference = _check_pair(fused, reference)
    a, b = _gray_levels(fused).ravel(), _gray_levels(reference).ravel()
    joint = np.bincount(a * 256 + b, minlength=256 * 256).reshape(256, 256)
    return _entropy_bits(joint.sum(1)) + _entropy_bits(joint.sum(0)) - _entropy_bits(joint.ravel())


# ----------------------------------------------------------------------------- without a reference

def spatial_frequency(image) -> float:
    """sqrt(RF^2 + CF^2), RF and CF the RMS of horizontal and vertical neighbour differences."""
    image = np.asarray(image, dtype=np.float64)
    row_frequency_sq = np.mean(np.diff(image, axis=1) ** 2)
    column_frequency_sq = np.mean(np.diff(image, axis=0) ** 2)
    return float(np.sqrt(row_frequency_sq + column_frequency_sq))


def average_gradient(image) -> float:
    """mean of sqrt((dx^2 + dy^2) / 2) over the (H-1)x(W-1) forward differences."""
    image = np.asarray(image, dtype=np.float64)
    dx = np.diff(image, axis=1)[:-1, :]
    dy = np.diff(image, axis=0)[:, :-1]
    return float(np.mean(np.sqrt((dx ** 2 + dy ** 2) / 2)))


def entropy(image) -> float:
    """Shannon entropy in bits of the 256-level histogram, in [0, 8]."""
    return float(shannon_entropy(_gray_levels(np.asarray(image, dtype=np.float64)), base=2))


def standard_deviation(image) -> float:
    """Population standard deviation of the gray values (0..255 scale)."""
    return float(np.std(np.asarray(image, dtype=np.float64)))


# NIQE (Mittal, Soundararajan & Bovik 2013), as the authors' MATLAB
# computequality.m: 96x96 blocks, two scales, 18 natural-scene features per
# block and scale, distance of their Gaussian fit to the pristine model.
_NIQE_BLOCK = 96
_AGGD_ALPHAS = np.arange(0.2, 10.0005, 0.001)
_AGGD_RATIOS = gamma(2 / _AGGD_ALPHAS) ** 2 / (gamma(1 / _AGGD_ALPHAS) * gamma(3 / _AGGD_ALPHAS))
_niqe_params = None


def _niqe_pristine():
    global _niqe_params
    if _niqe_params is None:
        with np.load(NIQE_PARAMS_PATH) as data:
            _niqe_params = data["mu"], data["cov"]
    return _niqe_params


def _gaussian_window(size=7, sigma=7 / 6):
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    window = np.outer(g, g)
    return window / window.sum()


def _matlab_cubic(x):
    x = np.abs(x)
    return np.where(x <= 1, 1.5 * x ** 3 - 2.5 * x ** 2 + 1,
                    np.where(x < 2, -0.5 * x ** 3 + 2.5 * x ** 2 - 4 * x + 2, 0.0))


def _halve_matlab(image):
    """MATLAB imresize(image, 0.5) (bicubic with antialiasing) for even sizes.

    At scale 1/2 every output pixel k sits at input position 2k + 0.5 and
    takes 8 taps, the cubic kernel stretched by 2; borders are mirrored with
    the edge pixel repeated, as MATLAB does.
    """
    offsets = np.arange(-3, 5) - 0.5             # tap positions relative to the centre
    taps = _matlab_cubic(offsets / 2)
    taps /= taps.sum()
    for axis in (0, 1):
        n = image.shape[axis]
        padded = np.pad(image, [(4, 4) if a == axis else (0, 0) for a in range(2)], mode="symmetric")
        out = 0.0
        for t, weight in enumerate(taps):
            # input index 2k - 3 + t, shifted by the 4-pixel pad
            out = out + weight * np.take(padded, np.arange(1 + t, 1 + t + n - 1, 2), axis=axis)
        image = out
    return image


def _aggd_fit(values):
    """Asymmetric generalised Gaussian fit (moment matching on a grid):
    returns (alpha, left scale, right scale); NaNs for a flat block."""
    with np.errstate(invalid="ignore", divide="ignore"):
        left_std = np.sqrt(np.mean(values[values < 0] ** 2)) if np.any(values < 0) else np.nan
        right_std = np.sqrt(np.mean(values[values > 0] ** 2)) if np.any(values > 0) else np.nan
        gamma_hat = left_std / right_std
        r_hat = np.mean(np.abs(values)) ** 2 / np.mean(values ** 2)
        r_norm = r_hat * (gamma_hat ** 3 + 1) * (gamma_hat + 1) / (gamma_hat ** 2 + 1) ** 2
    if not np.isfinite(r_norm):
        return np.nan, np.nan, np.nan
    alpha = _AGGD_ALPHAS[np.argmin((_AGGD_RATIOS - r_norm) ** 2)]
    scale = np.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return alpha, left_std * scale, right_std * scale


def _niqe_block_features(block):
    """18 features of one block of normalised coefficients."""
    alpha, left, right = _aggd_fit(block.ravel())
    features = [alpha, (left + right) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        pair = block * np.roll(block, shift, axis=(0, 1))
        alpha, left, right = _aggd_fit(pair.ravel())
        mean = (right - left) * gamma(2 / alpha) / gamma(1 / alpha)
        features += [alpha, mean, left, right]
    return features


def niqe(image) -> float:
    """Naturalness image quality evaluator, lower is better (about 2-10 for
    photographs), with the standard pristine model shipped in assets/.
    The image must be at least 96x96; only whole 96x96 blocks count."""
    image = np.asarray(image, dtype=np.float64)
    rows, cols = image.shape[0] // _NIQE_BLOCK, image.shape[1] // _NIQE_BLOCK
    if rows == 0 or cols == 0:
        raise ValueError(f"NIQE needs an image of at least {_NIQE_BLOCK}x{_NIQE_BLOCK}, "
                         f"got {image.shape[1]}x{image.shape[0]}")
    image = image[:rows * _NIQE_BLOCK, :cols * _NIQE_BLOCK]
    window = _gaussian_window()
    per_scale = []
    for scale in (1, 2):
        mu = ndimage.correlate(image, window, mode="nearest")
        sigma = np.sqrt(np.abs(ndimage.correlate(image * image, window, mode="nearest") - mu * mu))
        normalised = (image - mu) / (sigma + 1)
        size = _NIQE_BLOCK // scale
        per_scale.append([_niqe_block_features(normalised[r * size:(r + 1) * size, c * size:(c + 1) * size])
                          for c in range(cols) for r in range(rows)])
        if scale == 1:
            image = _halve_matlab(image)
    features = np.concatenate([np.asarray(f, dtype=np.float64) for f in per_scale], axis=1)  # (blocks, 36)
    complete = features[~np.isnan(features).any(axis=1)]
    if len(complete) == 0:
        return float("nan")  # a flat image has no natural-scene statistics
    mu_image = np.nanmean(features, axis=0)  # MATLAB nanmean: per feature; nancov: complete blocks
    cov_image = np.cov(complete, rowvar=False) if len(complete) > 1 else np.zeros((36, 36))
    mu_pristine, cov_pristine = _niqe_pristine()
    diff = mu_pristine - mu_image
    # pinv with MATLAB's default tolerance: max(size) * eps * largest singular value
    inverse = np.linalg.pinv((cov_pristine + cov_image) / 2, rcond=36 * np.finfo(np.float64).eps)
    return float(np.sqrt(diff @ inverse @ diff))


# ----------------------------------------------------------------------------- two-source pairs

# Xydeas & Petrovic (2000) sigmoid constants for edge strength and orientation.
_QABF_STRENGTH = (0.9994, -15.0, 0.5)
_QABF_ORIENTATION = (0.9879, -22.0, 0.8)


def _sobel_strength_orientation(image):
    gx = ndimage.sobel(image, axis=1, mode="reflect")
    gy = ndimage.sobel(image, axis=0, mode="reflect")
    strength = np.hypot(gx, gy)
    with np.errstate(divide="ignore", invalid="ignore"):
        orientation = np.where(gx == 0, np.pi / 2, np.arctan(gy / np.where(gx == 0, 1, gx)))
    return strength, orientation


def _edge_preservation(strength_s, orientation_s, strength_f, orientation_f):
    """Q^{SF} per pixel: how well the fused edges keep the source's edges, in [0, 1)."""
    larger = np.maximum(strength_s, strength_f)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative_strength = np.where(larger > 0, np.minimum(strength_s, strength_f) / larger, 0.0)
    relative_orientation = 1 - np.abs(orientation_s - orientation_f) / (np.pi / 2)
    (g_s, k_s, s_s), (g_o, k_o, s_o) = _QABF_STRENGTH, _QABF_ORIENTATION
    return (g_s / (1 + np.exp(k_s * (relative_strength - s_s)))
            * g_o / (1 + np.exp(k_o * (relative_orientation - s_o))))


def qabf(source_a, source_b, fused) -> float:
    """Gradient-based fusion quality Q^{AB/F} (Xydeas & Petrovic) in [0, 1),
    higher is better; about 0.975 when the fused image equals both sources.
    Sobel gradients, each source weighted by its own edge strength."""
    fused, source_a = _check_pair(fused, source_a)
    _, source_b = _check_pair(fused, source_b)
    strength_f, orientation_f = _sobel_strength_orientation(fused)
    total, weight = 0.0, 0.0
    for source in (source_a, source_b):
        strength, orientation = _sobel_strength_orientation(source)
        total += np.sum(_edge_preservation(strength, orientation, strength_f, orientation_f) * strength)
        weight += np.sum(strength)
    return float(total / weight) if weight > 0 else float("nan")


def _correlation(x, y) -> float:
    x = x - x.mean()
    y = y - y.mean()
    norm = np.sqrt(np.sum(x * x) * np.sum(y * y))
    # A constant difference image carries no information from the other source.
    return float(np.sum(x * y) / norm) if norm > 0 else 0.0


def scd(source_a, source_b, fused) -> float:
    """Sum of the correlations of differences (Aslantas & Bendes 2015):
    corr(F - B, A) + corr(F - A, B), in [-2, 2], higher is better."""
    fused, source_a = _check_pair(fused, source_a)
    _, source_b = _check_pair(fused, source_b)
    return _correlation(fused - source_b, source_a) + _correlation(fused - source_a, source_b)


# ----------------------------------------------------------------------------- depth maps in slices
# Rule E of docs/notes/real-optics-fusion.md: depth in slice units (index 0..N-1, or depth x (N - 1)).

SPECKLE_STEP = 2            # slices off the 3 x 3 median that make a pixel a speckle
TEXTURE_SIGMA = 2.0         # px: the Gaussian that smooths the gradient magnitude of textured_half


def speckle_share(slices) -> float:
    """Share of pixels whose rounded depth (HxW, in slices) is at least 2 off the 3 x 3 median of
    the rounded map (edge pixels repeated at the border): isolated wrong picks, not depth edges."""
    index = np.rint(np.asarray(slices, dtype=np.float64))
    median = ndimage.median_filter(index, size=3, mode="nearest")
    return float(np.mean(np.abs(index - median) >= SPECKLE_STEP))


def textured_half(image) -> np.ndarray:
    """bool HxW: pixels whose gradient magnitude (central differences), smoothed by a Gaussian of
    2 px, is above its median; where a focus measure can say which slice is sharp."""
    gy, gx = np.gradient(np.asarray(image, dtype=np.float64))
    magnitude = torch.from_numpy(np.hypot(gx, gy).astype(np.float32))[None, None]
    smooth = gaussian_blur(magnitude, TEXTURE_SIGMA)[0, 0].numpy()
    return smooth > np.median(smooth)


def slice_mae(slices, true_index, where=None) -> float:
    """Mean absolute error in slices of a depth (HxW, in slices) against a true index, over ``where``
    (bool HxW; default every pixel)."""
    error = np.abs(np.asarray(slices, dtype=np.float64) - np.asarray(true_index, dtype=np.float64))
    return float(error.mean() if where is None else error[where].mean())


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Metric:
    """One table row. ``kind``: 'reference' fn(fused, all_in_focus);
    'no_reference' fn(fused); 'pair' fn(source_a, source_b, fused);
    'depth' fn(depth, depth_gt) on depth maps in [0, 1]."""
    name: str
    kind: str
    higher_is_better: bool
    fn: Callable


METRICS = (
    Metric("SSIM", "reference", True, ssim),
    Metric("PSNR", "reference", True, psnr),
    Metric("MSE", "reference", False, mse),
    Metric("MAE", "reference", False, mae),
    Metric("RMSE", "reference", False, rmse),
    Metric("logRMS", "reference", False, log_rms),
    Metric("AbsRel", "reference", False, abs_rel),
    Metric("SqRel", "reference", False, sq_rel),
    Metric("VIF", "reference", True, vif),
    Metric("MI", "reference", True, mutual_information),
    Metric("NIQE", "no_reference", False, niqe),
    Metric("SF", "no_reference", True, spatial_frequency),
    Metric("AG", "no_reference", True, average_gradient),
    Metric("EN", "no_reference", True, entropy),
    Metric("SD", "no_reference", True, standard_deviation),
    Metric("Qabf", "pair", True, qabf),
    Metric("SCD", "pair", True, scd),
    Metric("depth MSE", "depth", False, mse),
    Metric("depth MAE", "depth", False, mae),
)
METRIC_NAMES = tuple(m.name for m in METRICS)
