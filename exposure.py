"""Exposure and white-balance matching between the slices of a focus stack.

A bracket shot with auto exposure, a flickering lamp or a drifting microscope
light has slices that differ by a few percent in brightness or colour; fused
as they are, the picture takes its pixels from slices of different brightness
and shows patches along the depth steps. ``match_exposure`` scales every
slice, channel by channel, onto the reference slice (the first), with gains
fitted on the pixels where defocus changes little: where both slices are
sharp, or where the scene is flat in every slice.
"""
import cv2
import numpy as np

from utils import dtype_max, to_gray

FIT_SIDE = 512          # the fit runs on copies whose long side is at most this (px)
SMOOTH_SIGMA = 4.0      # px at fit size: noise, texture and most of the defocus average out before pixels are compared
SHARP_SHARE = 0.5       # "sharp in slice k": its detail is at least this share of the stack's best there
FLAT_QUANTILE = 0.2     # "flat": the stack's best detail is among this lowest share of the picture
CLIP_MARGIN = 0.02      # pixels this close to black or white in either slice say nothing about gain
OUTLIER_LOG = 0.1       # pixels whose ratio is this far (in log) from the median ratio are left out
MIN_PIXELS = 64         # fewer usable pixels than this: the slice keeps gain 1


def _fit_copies(images):
    """float32 copies in [0, 1], shrunk (area average) to FIT_SIDE, each HxWxC."""
    h, w = images[0].shape[:2]
    scale = min(1.0, FIT_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    top = dtype_max(images[0].dtype)
    copies = []
    for image in images:
        small = image if scale == 1.0 else cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        small = small.astype(np.float32) / top
        copies.append(small[:, :, None] if small.ndim == 2 else small)
    return copies


def _detail(gray):
    """Local sharpness: smoothed absolute Laplacian."""
    return cv2.GaussianBlur(np.abs(cv2.Laplacian(gray, cv2.CV_32F, ksize=3)), (0, 0), SMOOTH_SIGMA)


def _gain(reference, other):
    """Gain g with g * other ~ reference on the given pixels (1-D arrays): median of the
    ratios, then the ratio of sums over the pixels that agree with it."""
    if reference.size < MIN_PIXELS:
        return 1.0
    log_ratio = np.log(reference) - np.log(other)
    agree = np.abs(log_ratio - np.median(log_ratio)) < OUTLIER_LOG
    if agree.sum() < MIN_PIXELS:
        return 1.0
    return float(reference[agree].sum() / other[agree].sum())


def exposure_gains(images, reference=0) -> np.ndarray:
    """Per-slice, per-channel gains (N, C) that bring each slice onto slice ``reference``.

    images: uint8/uint16 slices of one size, HxW or HxWx3. The reference's
    gains are 1. Fitted on the pixels that are sharp in both slices or flat
    in the whole stack, and neither clipped in any channel.
    """
    copies = _fit_copies(images)
    smooth = [cv2.GaussianBlur(c, (0, 0), SMOOTH_SIGMA).reshape(c.shape) for c in copies]
    detail = np.stack([_detail(to_gray(c if c.shape[2] == 3 else c[:, :, 0])) for c in copies])   # (N, h, w)
    best = detail.max(axis=0)
    flat = best <= np.quantile(best, FLAT_QUANTILE)
    sharp = detail >= SHARP_SHARE * best
    unclipped = [np.all((c > CLIP_MARGIN) & (c < 1 - CLIP_MARGIN), axis=2) for c in copies]
    ref = smooth[reference]
    gains = np.ones((len(images), ref.shape[2]))
    for k, slice_ in enumerate(smooth):
        if k == reference:
            continue
        use = unclipped[k] & unclipped[reference] & ((sharp[k] & sharp[reference]) | flat)
        for c in range(ref.shape[2]):
            gains[k, c] = _gain(ref[..., c][use], slice_[..., c][use])
    return gains


def apply_gains(image, gains) -> np.ndarray:
    """image * gains (one per channel), rounded and clipped back to the image's type."""
    scaled = image.astype(np.float32) * np.asarray(gains, np.float32).reshape((1, 1, -1) if image.ndim == 3 else ())
    return np.clip(np.rint(scaled), 0, dtype_max(image.dtype)).astype(image.dtype)


def match_exposure(images, reference=0):
    """The slices scaled onto slice ``reference`` (see exposure_gains), and the gains (N, C)."""
    gains = exposure_gains(images, reference)
    matched = [image if k == reference else apply_gains(image, gains[k]) for k, image in enumerate(images)]
    return matched, gains
