"""Focus-stack synthesis from an all-in-focus image and its depth map.

``released_stack`` is the authors' method (docs/architecture.md, "Stack
synthesis as released"): the depth is quantised into R equal bins and
slice k shows bin j through a Gaussian blur whose kernel size grows with
|j - k|.

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


PSFS = ("gaussian", "disc")
# Sub-samples per pixel side when a disc's pixel coverage is measured.
DISC_SUPERSAMPLING = 8


def disc_kernel(radius: float) -> np.ndarray:
    """The pillbox PSF of a lens (a uniform disc of ``radius`` px), float32 (2h+1)x(2h+1), summing to 1.

    Each weight is the share of its pixel's square inside the disc (measured
    on a sub-pixel grid), so the edge is anti-aliased and a sub-pixel
    radius changes the kernel smoothly; below half a pixel it is the identity.
    """
    half = max(int(np.ceil(radius - 0.5)), 0)
    steps = (np.arange(DISC_SUPERSAMPLING) + 0.5) / DISC_SUPERSAMPLING - 0.5
    offsets = (np.arange(-half, half + 1)[:, None] + steps[None, :]).ravel()     # sub-sample centres
    inside = (offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius ** 2
    n = 2 * half + 1
    cover = inside.reshape(n, DISC_SUPERSAMPLING, n, DISC_SUPERSAMPLING).mean(axis=(1, 3))
    if cover.sum() == 0:
        cover[half, half] = 1.0
    return (cover / cover.sum()).astype(np.float32)


def _psf_reach(psf: str, scale: float) -> int:
    """How far (px) the largest blur of ``psf`` at ``scale`` reaches, plus one."""
    if psf == "disc":
        return disc_kernel(scale).shape[0] // 2 + 1
    return _blur_radius(scale) + 1


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


def physical_stack(image: np.ndarray, depth: np.ndarray, num_slices: int, max_sigma: float = 4.0,
                   psf: str = "gaussian"):
    """Render N slices through a thin lens focused at N evenly spaced depths.

    image: HxW or HxWx3 uint8/uint16; depth: HxW uint8, 0 = near, 255 = far.
    Slice k is focused at depth d_k = 255 k / (N - 1). A point at depth d is
    blurred by a Gaussian of sigma = max_sigma * |d - d_k| / 255 pixels: the
    circle of confusion of a thin lens grows linearly with the difference in
    inverse distance (dioptres), and an 8-bit depth map of relative inverse
    depth (as monocular depth models give) is linear in it. With
    ``psf="disc"`` the blur is instead a real lens's pillbox (``disc_kernel``)
    of radius max_sigma * |d - d_k| / 255 pixels.

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
    if psf not in PSFS:
        raise ValueError(f"psf must be one of {PSFS}, got {psf!r}")
    gray = image.ndim == 2
    planes_in = image[None] if gray else image.transpose(2, 0, 1)  # (C, H, W)
    c, h, w = planes_in.shape
    planes = focal_planes(num_slices)
    centres, layer = _depth_layers(depth, num_slices)

    layers = [_premultiplied_layer(planes_in, layer == index, layer < index, _psf_reach(psf, max_sigma))
              + (centres[index],) for index in np.unique(layer)[::-1]]  # far to near

    max_value = float(np.iinfo(image.dtype).max)
    slices = []
    for plane in planes:
        acc = np.zeros((c + 1, h, w), dtype=np.float32)  # premultiplied colour + alpha
        for box, premultiplied, centre in layers:
            sigma = max_sigma * abs(centre - plane) / 255.0
            radius = _blur_radius(sigma)
            rgba = premultiplied.astype(np.float32)
            if psf == "disc":
                kernel = disc_kernel(sigma)
                if kernel.size > 1:
                    rgba = np.stack([cv2.filter2D(p, -1, kernel, borderType=cv2.BORDER_REFLECT_101) for p in rgba])
            elif radius:
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


# ----------------------------------------------------------------------------- light-field mode

def aperture_views(grid: int) -> np.ndarray:
    """(V, 2) offsets (u, v) of the views of a grid x grid camera array within a round aperture, |offset| <= 1.

    grid 5 keeps 13 of its 25 views, grid 7 29 of 49: sparse apertures, as
    the star-shaped view sets of rendered light-field benchmarks are. The
    centre view (0, 0) is always in (grid is odd).
    """
    if grid < 1 or grid % 2 == 0:
        raise ValueError(f"grid must be an odd number >= 1, got {grid}")
    steps = np.linspace(-1.0, 1.0, grid) if grid > 1 else np.zeros(1)
    u, v = np.meshgrid(steps, steps)
    keep = u ** 2 + v ** 2 <= 1.0 + 1e-9
    return np.stack([u[keep], v[keep]], axis=1)


def forward_depth(depth: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """The z-buffer of a forward warp: which depth each target pixel sees.

    depth: HxW (smaller = nearer); dx, dy: (K, H, W) displacements in px of
    every source pixel, K warps at once. Each source pixel lands on the
    target pixel nearest its displaced position and the nearest depth
    landing on a pixel wins (a near surface hides the far one behind it).
    Returns (K, H, W) float32: that depth, or inf where nothing lands (a hole).
    """
    k, h, w = dx.shape
    tx = np.rint(np.arange(w, dtype=np.float32)[None, None, :] + dx).astype(np.int32)
    ty = np.rint(np.arange(h, dtype=np.float32)[None, :, None] + dy).astype(np.int32)
    # Unsigned compares catch negative targets too; an outside source writes inf to pixel 0, a no-op.
    inside = (tx.view(np.uint32) < w) & (ty.view(np.uint32) < h)
    target = np.where(inside, (np.arange(k, dtype=np.int32)[:, None, None] * (h * w) + ty * w + tx), 0)
    zbuf = np.full(k * h * w, np.inf, dtype=np.float32)
    np.minimum.at(zbuf, target.ravel(), np.where(inside, depth.astype(np.float32), np.inf).ravel())
    return zbuf.reshape(k, h, w)


def pinhole_views(planes: np.ndarray, depth: np.ndarray, u: float, v: float, max_radius: float, focus: np.ndarray):
    """View (u, v) of the scene, shifted to refocus at each depth of ``focus``.

    planes: (C, H, W) float32 image; depth: HxW float32 (0 = near, 255 = far);
    focus: (K,) depths. A point at depth d moves by
    max_radius * (f - d) / 255 * (u, v) in the view refocused at f (its
    disparity relative to the focal plane). ``forward_depth`` finds the
    surface each view pixel sees; the pixel then samples the image
    (bilinearly) where that surface's point came from, so motion stays
    sub-pixel and a pixel on the focal plane is copied unchanged.
    Returns (views (K, C, H, W) float32, seen (K, H, W) bool: False at holes,
    background that the image does not show).
    """
    h, w = depth.shape
    shift = max_radius * (np.asarray(focus, np.float32)[:, None, None] - depth[None]) / 255.0
    seen_depth = forward_depth(depth, shift * u, shift * v)
    seen = np.isfinite(seen_depth)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    views = np.empty((len(shift), len(planes), h, w), np.float32)
    for k, (f, z) in enumerate(zip(focus, seen_depth)):
        back = np.where(np.isfinite(z), max_radius * (f - z) / 255.0, 0.0).astype(np.float32)
        map_x, map_y = xx - back * np.float32(u), yy - back * np.float32(v)
        for c, plane in enumerate(planes):
            views[k, c] = cv2.remap(plane, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return views, seen


def lightfield_stack(image: np.ndarray, depth: np.ndarray, num_slices: int, max_radius: float = 4.0,
                     grid: int = 5):
    """Render N slices as a light-field camera refocused by shift-and-add.

    image: HxW or HxWx3 uint8/uint16; depth: HxW uint8, 0 = near. The scene
    is seen by the pinhole views of ``aperture_views(grid)``; a point's
    disparity is proportional to 255 - d, so once the views are shifted to
    refocus at plane d_k = 255 k / (N - 1) a point at depth d sits
    max_radius * (d_k - d) / 255 * (u, v) from its place in view (u, v)
    (``pinhole_views``: rendering and refocus shift in one warp, so in-focus
    pixels are never resampled). Slice k is the mean of the refocused
    views: an out-of-focus point becomes one copy per view, spread over a
    disc of radius max_radius * |d - d_k| / 255, and a near surface hides
    the far one in every view, as in real light-field refocusing. A pixel
    that is a hole in a view (background the all-in-focus image does not
    show) is averaged over the views that see it; the centre view sees
    every pixel. At the image border the scene is mirrored.

    Returns (slices like image, focus_index HxW int64: the nearest plane).
    """
    if depth.ndim != 2 or depth.shape != image.shape[:2] or depth.dtype != np.uint8:
        raise ValueError(f"depth must be uint8 HxW like the image {image.shape[:2]}, got {depth.dtype} "
                         f"{depth.shape}")
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"image must be uint8 or uint16, got {image.dtype}")
    pad = int(np.ceil(max_radius)) + 1
    h, w = depth.shape
    planes_in = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    planes = np.stack([np.pad(p, pad, mode="reflect") for p in planes_in]).astype(np.float32)
    padded_depth = np.pad(depth, pad, mode="reflect").astype(np.float32)
    focus = focal_planes(num_slices)
    total = np.zeros((num_slices,) + planes.shape, np.float32)
    count = np.zeros((num_slices, 1) + padded_depth.shape, np.float32)
    for u, v in aperture_views(grid):
        views, seen = pinhole_views(planes, padded_depth, u, v, max_radius, focus)
        total += views * seen[:, None]
        count += seen[:, None]
    out = (total / np.maximum(count, 1e-6))[:, :, pad:pad + h, pad:pad + w]
    out = np.clip(np.floor(out + 0.5), 0, float(np.iinfo(image.dtype).max)).astype(image.dtype)
    slices = [s[0] if image.ndim == 2 else np.ascontiguousarray(s.transpose(1, 2, 0)) for s in out]
    return slices, nearest_plane(depth, num_slices)
