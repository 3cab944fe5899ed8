"""Focus-stack synthesis from an all-in-focus image and its depth map.

``released_stack`` is the authors' method (ARCHITECTURE.md, "Stack
synthesis"): the depth is quantised into R equal bins and slice k shows bin j
through a Gaussian blur whose kernel size grows with |j - k|.

``physical_stack`` is a physically motivated alternative: the blur grows
continuously with the distance from each slice's focal plane (a thin-lens
circle of confusion) and the scene is rendered in depth layers, near over far,
so depth edges blur as they do through a lens.

Fixed edge cases of the released code: its bins were half-open, so depth 255
fell in no bin; here the last bin is closed and every pixel gets a slice. The
released code then refilled pixels that stayed black after compositing (the
pixels of that missing bin, but also any truly black pixel); with complete
bins every pixel is assigned exactly one blur level, so there is nothing to
refill and true black pixels are left alone.
"""
import cv2
import numpy as np
from scipy import ndimage

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


# ----------------------------------------------------------------------------- physical mode

# Depth step (8-bit levels) between the layers of the layered rendering. The
# blur changes by at most max_sigma * LAYER_STEP / 255 pixels between adjacent
# layers (0.19 px at the default max_sigma 4): finer layers change nothing
# visible and only cost time.
LAYER_STEP = 12.0
# Below this sigma a Gaussian kernel is a near-identity; the layer is copied.
MIN_SIGMA = 0.05


def focal_planes(num_slices: int) -> np.ndarray:
    """Depths (float, 0..255) of the N focal planes, evenly spaced; slice k is sharp at plane k."""
    return np.linspace(0.0, 255.0, num_slices)


def nearest_plane(depth: np.ndarray, num_slices: int) -> np.ndarray:
    """8-bit depth HxW -> index HxW int64 in [0, N - 1] of the focal plane nearest each pixel."""
    if num_slices == 1:
        return np.zeros(depth.shape, dtype=np.int64)
    position = depth.astype(np.float64) / 255.0 * (num_slices - 1)
    return np.clip(np.floor(position + 0.5), 0, num_slices - 1).astype(np.int64)


def _depth_layers(depth: np.ndarray, num_slices: int):
    """Split depth into layers whose centres include every focal plane.

    Returns (centres float (L,), layer index HxW int64): each pixel goes to the
    nearest centre, so a pixel on a focal plane lies in a layer with zero blur
    in that plane's slice.
    """
    if num_slices == 1:
        per_gap, gaps = max(1, int(np.ceil(255.0 / LAYER_STEP))), 1
    else:
        gaps = num_slices - 1
        per_gap = max(1, int(np.ceil(255.0 / gaps / LAYER_STEP)))
    centres = np.linspace(0.0, 255.0, gaps * per_gap + 1)
    step = centres[1] - centres[0]
    layer = np.clip(np.floor(depth.astype(np.float64) / step + 0.5), 0, len(centres) - 1).astype(np.int64)
    return centres, layer


def _blur_radius(sigma: float) -> int:
    return int(np.ceil(3.0 * sigma)) if sigma >= MIN_SIGMA else 0


def _premultiplied_layer(image_planes, mask, nearer, reach):
    """One layer's premultiplied colour + alpha over its bounding box.

    image_planes: (C, H, W) uint8/uint16; mask: HxW bool, the layer's pixels; nearer:
    HxW bool, pixels of nearer layers; reach: the largest blur radius + 1.
    The layer is extended up to ``reach`` pixels into ``nearer`` (hidden
    background, coloured like the nearest layer pixel). The box is the
    layer's bounding box grown by 2 x reach, so its outer ``reach`` band is
    all zeros: reflection at a box edge inside the image then reflects only
    zeros, while at the image border it mirrors the scene, as a lens sees it
    continue.
    Returns (box: index tuple into a (C + 1, H, W) array, premultiplied
    colour + alpha (C + 1, h', w') in the image's dtype, alpha 0 or 1).
    """
    h, w = mask.shape
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    y0, y1 = max(rows[0] - 2 * reach, 0), min(rows[-1] + 1 + 2 * reach, h)
    x0, x1 = max(cols[0] - 2 * reach, 0), min(cols[-1] + 1 + 2 * reach, w)
    own = mask[y0:y1, x0:x1]
    distance, (near_r, near_c) = ndimage.distance_transform_edt(~own, return_indices=True)
    alpha = own | ((distance <= reach) & nearer[y0:y1, x0:x1])
    # Kept in the image's own dtype (a quarter of float32's memory for 8 bit);
    # channel-first planes, since compositing contiguous planes is about twice as fast.
    premultiplied = np.concatenate([image_planes[:, y0:y1, x0:x1][:, near_r, near_c] * alpha, alpha[None]])
    return (slice(None), slice(y0, y1), slice(x0, x1)), premultiplied


def physical_stack(image: np.ndarray, depth: np.ndarray, num_slices: int, max_sigma: float = 4.0):
    """Render N slices through a thin lens focused at N evenly spaced depths.

    image: HxW or HxWx3 uint8/uint16; depth: HxW uint8, 0 = near, 255 = far.
    Slice k is focused at depth d_k = 255 k / (N - 1). A point at depth d is
    blurred by a Gaussian of sigma = max_sigma * |d - d_k| / 255 pixels: the
    circle of confusion of a thin lens grows linearly with the difference in
    inverse distance (dioptres), and an 8-bit depth map of relative inverse
    depth (as monocular depth models give) is linear in it.

    Rendering is layered: depth is split into thin layers; each layer's
    premultiplied colour and its coverage (alpha) are blurred with that
    layer's sigma and composited back to front (far first, near over it).
    The background hidden behind a nearer layer, which a blurred near edge
    lets through, is not in the all-in-focus image: each layer is extended
    behind nearer ones (just as far as a blur can reveal) with the colour of
    its nearest own pixel. Any coverage still missing is renormalised
    (colour / accumulated alpha) instead of showing black.
    Deterministic: the same input always gives the same slices.

    Returns (slices: list of N arrays with the image's shape and dtype,
    focus_index: HxW int64 in [0, N - 1], the slice whose focal plane is
    nearest each pixel's depth).
    """
    if num_slices < 1:
        raise ValueError(f"num_slices must be at least 1, got {num_slices}")
    if depth.ndim != 2 or depth.shape != image.shape[:2]:
        raise ValueError(f"depth must be HxW like the image {image.shape[:2]}, got {depth.shape}")
    if depth.dtype != np.uint8:
        raise ValueError(f"depth must be uint8 (0 = near, 255 = far), got {depth.dtype}")
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"image must be uint8 or uint16, got {image.dtype}")
    gray = image.ndim == 2
    planes_in = image[None] if gray else image.transpose(2, 0, 1)  # (C, H, W)
    c, h, w = planes_in.shape
    planes = focal_planes(num_slices)
    centres, layer = _depth_layers(depth, num_slices)

    layers = [_premultiplied_layer(planes_in, layer == index, layer < index, _blur_radius(max_sigma) + 1)
              + (centres[index],) for index in np.unique(layer)[::-1]]  # far to near

    max_value = float(np.iinfo(image.dtype).max)
    slices = []
    for plane in planes:
        acc = np.zeros((c + 1, h, w), dtype=np.float32)  # premultiplied colour + alpha
        for box, premultiplied, centre in layers:
            sigma = max_sigma * abs(centre - plane) / 255.0
            radius = _blur_radius(sigma)
            rgba = premultiplied.astype(np.float32)
            if radius:
                size = 2 * radius + 1
                rgba = np.stack([cv2.GaussianBlur(p, (size, size), sigma, borderType=cv2.BORDER_REFLECT_101)
                                 for p in rgba])
            region = acc[box]
            region *= 1.0 - rgba[c]
            region += rgba
        out = acc[:c] / np.maximum(acc[c], 1e-6)
        out = np.clip(np.floor(out + 0.5), 0, max_value).astype(image.dtype)
        slices.append(out[0] if gray else np.ascontiguousarray(out.transpose(1, 2, 0)))
    return slices, nearest_plane(depth, num_slices)
