"""Focus-stack synthesis from an all-in-focus image and its depth map.

``released_stack`` is the authors' method (ARCHITECTURE.md, "Stack
synthesis"): the depth is quantised into R equal bins and slice k shows bin j
through a Gaussian blur whose kernel size grows with |j - k|.

Fixed edge case of the released code: its bins were half-open, so depth 255
fell in no bin; here the last bin is closed and every pixel gets a slice.
"""
import cv2
import numpy as np

RELEASED_SLICE_COUNTS = (8, 12, 16, 20, 24)


def quantize_depth(depth: np.ndarray, num_bins: int) -> np.ndarray:
    """8-bit depth HxW -> bin index HxW in [0, num_bins - 1] (equal bins over 0..255)."""
    scaled = np.floor(depth.astype(np.float64) / 255.0 * num_bins)
    return np.clip(scaled, 0, num_bins - 1).astype(np.int64)


def gaussian_blur_levels(image: np.ndarray, num_levels: int):
    """Blurs of image with kernel sizes 1, 3, ..., 2*num_levels - 1 (size 1 = sharp).

    The sigma follows from the kernel size (OpenCV's rule for sigma = 0).
    """
    levels = [image.copy()]
    for level in range(1, num_levels):
        size = 2 * level + 1
        levels.append(cv2.GaussianBlur(image, (size, size), 0))
    return levels


def released_stack(image: np.ndarray, depth: np.ndarray, num_slices: int):
    """The released synthesis: N slices, each in focus at one depth bin.

    image: HxW or HxWx3 uint8; depth: HxW uint8 (0 = near).
    Returns (slices list of N arrays like image, quantised depth HxW int64).
    """
    bins = quantize_depth(depth, num_slices)
    levels = np.stack(gaussian_blur_levels(image, num_slices))     # (R, H, W[, 3])
    slices = []
    for k in range(num_slices):
        level = np.minimum(np.abs(bins - k), num_slices - 1)       # (H, W)
        idx = level.reshape((1,) + level.shape + (1,) * (levels.ndim - 3))
        slices.append(np.take_along_axis(levels, idx, axis=0)[0])
    return slices, bins
