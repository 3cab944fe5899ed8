"""Stack registration: align focus-stack frames that moved or changed scale before fusing.

    python Registration.py stack_folder -o aligned/                                # released method
    python Registration.py stack_folder -o aligned/ --method ecc --reference sharpest

Frames are written as ``frame_0000.png``, ``frame_0001.png``, ... at the input
size, bit depth (8 or 16) and colour. An output folder that already holds
files is refused unless ``--overwrite`` is given; then it is replaced as a
whole once every new frame is written. Two methods:

- ``released`` (default), as in the authors' release: a coarse zoom step
  (SIFT matches between the first and the last frame give the total scale
  change of focus breathing, chained through neighbouring frames when the
  outer two share too little detail; it is spread linearly over the stack,
  and every frame is rescaled about the centre and centre-cropped to the
  common field of view of the most magnified frame), then a fine step
  (corners tracked between consecutive frames give a similarity transform
  per step; their chain is the camera trajectory, which is removed, or
  smoothed as a video stabiliser does with ``--smoothing_radius``).
- ``ecc``: every frame is registered directly to one reference frame with
  OpenCV's ECC (affine or homography), coarse to fine on an image pyramid.

Every transform is a 3x3 float64 matrix that maps a pixel (x, y, 1) of an
input frame to its place in the output frame (OpenCV's convention: pixel
centres at integer coordinates). A frame that cannot be registered (blank,
too few features, ECC does not converge, implausible result) is reported
with a ``RegistrationWarning`` and falls back as documented in
docs/registration.md; bad input raises ``utils.InputError``.
"""
import os
import secrets
import shutil
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from cli import ArgumentParser
from options import ALIGN_METHODS
from utils import (IO_THREADS, InputError, check_stack, ensure_output_dir, parallel_map, read_stack,
                   refuse_output_into_input, run_cli, to_gray, to_gray_float, write_image)
from working_scale import estimate_blur, shrunk

METHODS = ALIGN_METHODS          # defined in options.py, where --align offers them
REFERENCES = ("first", "last", "middle", "sharpest")
ECC_MOTIONS = {"affine": cv2.MOTION_AFFINE, "homography": cv2.MOTION_HOMOGRAPHY}

BLANK_STD = 1e-3         # gray standard deviation (range 0..1) below which a frame shows nothing to align on
MIN_MATCHES = 10         # fewest RANSAC inliers accepted for a feature-based transform
WELL_MATCHED = 50        # inliers from which a direct first-to-last zoom match is trusted
ZOOM_MATCH_SIZE = 1024   # long side of the copies the zoom is measured on
MAX_SCALE_CHANGE = 2.0   # a transform that zooms by more than this, either way, is rejected as wrong
MAX_SHIFT_FRACTION = 0.25  # ... and so is one that moves the image centre by more than this share of its size
ECC_MIN_SIZE = 48        # coarsest pyramid level keeps at least this many pixels on its short side
ECC_MAX_LEVELS = 5
AUTO_SIDE = 1024         # auto: long side of the copies the motion is measured on
# auto: a frame that moves less than this anywhere (px at full size) is left exactly as it is. Defocus alone
# makes ECC report up to 0.4 px on the light fields' aligned stacks (docs/registration.md).
AUTO_THRESHOLD = 0.5
# auto: a stack is registered only when some frame moves by more than this share of its blur
# (working_scale.estimate_blur, px): at occlusions a wide blur shifts what ECC sees by up to 0.22 of it
# in aligned renders, while real focus breathing measured 0.34 of it and more (docs/registration.md).
AUTO_MOTION_PER_BLUR = 0.3
# auto: a registration whose ECC correlation stays under this measured nothing (unrelated frames); real
# stacks gave 0.64 (microscopy) to 0.99, unrelated noise frames about 0.
AUTO_MIN_CORRELATION = 0.3


class RegistrationWarning(UserWarning):
    """A frame could not be registered and took the documented fallback."""


def _warn(message):
    warnings.warn(message, RegistrationWarning, stacklevel=3)


# ----------------------------------------------------------------------------- small matrix helpers

def _affine3(m2x3) -> np.ndarray:
    """2x3 affine -> 3x3 float64."""
    return np.vstack([np.asarray(m2x3, dtype=np.float64), [0.0, 0.0, 1.0]])


def _scale_about(center, factor) -> np.ndarray:
    """3x3 zoom by ``factor`` that keeps ``center`` (x, y) in place."""
    cx, cy = center
    return np.array([[factor, 0.0, cx * (1 - factor)],
                     [0.0, factor, cy * (1 - factor)],
                     [0.0, 0.0, 1.0]])


def _is_identity(transform) -> bool:
    return np.allclose(transform, np.eye(3), rtol=0, atol=1e-9)


def _image_corners(shape) -> np.ndarray:
    """(4, 2) corner pixel centres of an HxW image, in drawing order."""
    h, w = shape[:2]
    return np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=np.float64)


def map_points(transform, points) -> np.ndarray:
    """Apply a 3x3 transform to (K, 2) points (x, y); returns (K, 2)."""
    homogeneous = np.hstack([points, np.ones((len(points), 1))]) @ np.asarray(transform).T
    return homogeneous[:, :2] / homogeneous[:, 2:3]


def _plausible(transform, shape) -> bool:
    """True when ``transform`` is a believable camera motion for an HxW frame:
    finite, keeps the frame convex and unflipped, zooms by less than
    MAX_SCALE_CHANGE and moves the centre by less than MAX_SHIFT_FRACTION."""
    if not np.all(np.isfinite(transform)):
        return False
    h, w = shape[:2]
    corners = _image_corners(shape)
    with np.errstate(all="ignore"):
        mapped = map_points(transform, corners)
    if not np.all(np.isfinite(mapped)):
        return False
    edges = np.roll(mapped, -1, axis=0) - mapped
    turns = edges[:, 0] * np.roll(edges, -1, axis=0)[:, 1] - edges[:, 1] * np.roll(edges, -1, axis=0)[:, 0]
    if not (np.all(turns > 0)):  # corners given clockwise on screen (y down) stay so: convex, not mirrored
        return False
    area = 0.5 * abs(np.sum(mapped[:, 0] * np.roll(mapped[:, 1], -1) - mapped[:, 1] * np.roll(mapped[:, 0], -1)))
    ratio = area / float((w - 1) * (h - 1))
    if not (MAX_SCALE_CHANGE ** -2 < ratio < MAX_SCALE_CHANGE ** 2):
        return False
    center = np.array([[(w - 1) / 2, (h - 1) / 2]])
    shift = np.linalg.norm(map_points(transform, center) - center)
    return shift < MAX_SHIFT_FRACTION * min(h, w)


# ----------------------------------------------------------------------------- input checks

def _as_frames(images, min_side: int = 2):
    """A folder / multi-page TIFF path or a list of uint8/uint16 images -> list of frames, checked
    (each at least ``min_side`` pixels on its short side)."""
    if isinstance(images, (str, os.PathLike)):
        frames, _ = read_stack(images, min_slices=1)
        return frames
    frames = list(images)
    if not frames:
        raise InputError("no images to align")
    for k, image in enumerate(frames):
        if not isinstance(image, np.ndarray) or image.dtype not in (np.uint8, np.uint16):
            kind = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
            raise InputError(f"frame {k} has {kind} pixels; only 8-bit and 16-bit images can be aligned")
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise InputError(f"frame {k} has an unsupported shape {image.shape}; expected HxW or HxWx3")
        if min(image.shape[:2]) < min_side:
            raise InputError(f"frame {k} is {image.shape[1]}x{image.shape[0]} pixels; "
                             f"registration needs at least 2x2")
    return check_stack(frames, [f"frame {k}" for k in range(len(frames))], "given as a list")


def _is_blank(gray) -> bool:
    return float(gray.std()) < BLANK_STD


def sharpness(gray) -> float:
    """Variance of the Laplacian of a float gray HxW image: larger = more in focus."""
    return float(cv2.Laplacian(gray, cv2.CV_32F, ksize=3).var())


def reference_index(grays, reference) -> int:
    """Index of the reference frame chosen by name among REFERENCES."""
    if reference not in REFERENCES:
        raise InputError(f"unknown reference '{reference}' (choose from {', '.join(REFERENCES)})")
    n = len(grays)
    if reference == "sharpest":
        return int(np.argmax([sharpness(g) for g in grays]))
    return {"first": 0, "last": n - 1, "middle": (n - 1) // 2}[reference]


def _to_uint8(gray) -> np.ndarray:
    return (np.clip(gray, 0, 1) * 255 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- released method

def sift_features(gray):
    """(keypoints, descriptors) of a float32 HxW image in [0, 1]; descriptors may be None.

    Large frames are shrunk to ZOOM_MATCH_SIZE on their long side first: only
    the ratio of scales is measured, which shrinking leaves unchanged.
    """
    shrink = ZOOM_MATCH_SIZE / max(gray.shape)
    if shrink < 1:
        gray = cv2.resize(gray, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
    return cv2.SIFT_create(nfeatures=4000).detectAndCompute(_to_uint8(gray), None)


def match_zoom(features_a, features_b):
    """Magnification of frame b relative to frame a from matched SIFT features.

    Returns (scale, inliers): the scale of the similarity that maps a's
    features onto b's (> 1: b is magnified) and its RANSAC support, or None
    when fewer than MIN_MATCHES features agree.
    """
    (keys_a, desc_a), (keys_b, desc_b) = features_a, features_b
    if desc_a is None or desc_b is None or len(keys_a) < 2 or len(keys_b) < 2:
        return None
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(desc_a, desc_b, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.75 * p[1].distance]  # Lowe's ratio test
    if len(good) < MIN_MATCHES:
        return None
    points_a = np.float32([keys_a[m.queryIdx].pt for m in good])
    points_b = np.float32([keys_b[m.trainIdx].pt for m in good])
    model, inliers = cv2.estimateAffinePartial2D(points_a, points_b, method=cv2.RANSAC,
                                                 ransacReprojThreshold=2.0, refineIters=20)
    if model is None or int(inliers.sum()) < MIN_MATCHES:
        return None
    return float(np.hypot(model[0, 0], model[1, 0])), int(inliers.sum())


def total_zoom(grays, frames):
    """Magnification of frame ``frames[-1]`` relative to ``frames[0]``, or None.

    As released, the two outer frames are matched directly. In real stacks
    they are often sharp in different places and share few features, so when
    that match has fewer than WELL_MATCHED inliers the product of the zooms
    between neighbouring frames (which share most of their focus) is used.
    """
    features = {k: sift_features(grays[k]) for k in (frames[0], frames[-1])}
    direct = match_zoom(features[frames[0]], features[frames[-1]])
    if direct is not None and direct[1] >= WELL_MATCHED:
        return direct[0]
    total = 1.0
    for a, b in zip(frames, frames[1:]):
        for k in (a, b):
            if k not in features:
                features[k] = sift_features(grays[k])
        step = match_zoom(features[a], features[b])
        if step is None:
            return None if direct is None else direct[0]
        total *= step[0]
    return total


_LK_PARAMS = dict(winSize=(21, 21), maxLevel=3,
                  criteria=(cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 0.001))


def track_similarity(prev_u8, cur_u8):
    """Similarity (3x3) mapping ``cur`` pixels onto ``prev`` pixels from tracked corners.

    prev_u8, cur_u8: uint8 HxW. Corners of ``prev`` are tracked into ``cur``
    with pyramidal Lucas-Kanade and kept only when tracking back lands within
    0.5 px of the start. Returns None when fewer than MIN_MATCHES survive.
    """
    corners = cv2.goodFeaturesToTrack(prev_u8, maxCorners=500, qualityLevel=0.01, minDistance=7, blockSize=7)
    if corners is None or len(corners) < MIN_MATCHES:
        return None
    tracked, found, _ = cv2.calcOpticalFlowPyrLK(prev_u8, cur_u8, corners, None, **_LK_PARAMS)
    back, found_back, _ = cv2.calcOpticalFlowPyrLK(cur_u8, prev_u8, tracked, None, **_LK_PARAMS)
    round_trip = np.linalg.norm((back - corners).reshape(-1, 2), axis=1)
    keep = (found.ravel() == 1) & (found_back.ravel() == 1) & (round_trip < 0.5)
    if keep.sum() < MIN_MATCHES:
        return None
    model, inliers = cv2.estimateAffinePartial2D(tracked[keep], corners[keep], method=cv2.RANSAC,
                                                 ransacReprojThreshold=1.0, refineIters=20)
    if model is None or int(inliers.sum()) < MIN_MATCHES:
        return None
    return _affine3(model)


def _smooth_similarities(transforms, radius):
    """Moving average (window 2*radius+1, clamped at the ends) of similarity
    matrices; a similarity is linear in (a, b, tx, ty), so the mean is one too."""
    stacked = np.stack(transforms)                                          # (K, 3, 3)
    padded = np.concatenate([stacked[:1].repeat(radius, 0), stacked, stacked[-1:].repeat(radius, 0)])
    return [padded[k:k + 2 * radius + 1].mean(axis=0) for k in range(len(transforms))]


def released_transforms(grays, reference="first", smoothing_radius=None, progress=False):
    """Transforms of the released two-step method (zoom, then stabilisation).

    grays: list of N float32 HxW in [0, 1]. ``reference`` names the frame
    whose position the fine step keeps (the zoom step always keeps the field
    of view of the most magnified frame). ``smoothing_radius=None`` removes
    the whole trajectory, as fusion needs; an integer R keeps its moving
    average over 2R+1 frames, as a video stabiliser does.
    Returns N 3x3 float64 transforms (input pixel -> output pixel).
    """
    n = len(grays)
    h, w = grays[0].shape
    center = ((w - 1) / 2, (h - 1) / 2)
    transforms = [np.eye(3) for _ in range(n)]
    valid = [k for k in range(n) if not _is_blank(grays[k])]
    for k in sorted(set(range(n)) - set(valid)):
        _warn(f"frame {k} is blank; it is left as it is")
    if len(valid) < 2:
        _warn("fewer than two frames show anything; nothing is aligned")
        return transforms
    first, last = valid[0], valid[-1]

    # Coarse step: total zoom between the outer frames, spread linearly over the frame number.
    total = total_zoom(grays, valid)
    if total is None or not 1 / MAX_SCALE_CHANGE < total < MAX_SCALE_CHANGE:
        _warn(f"too few features match between frames {first} and {last} to measure the zoom; "
              "the zoom step is skipped")
        total = 1.0
    magnification = {k: 1 + (total - 1) * (k - first) / (last - first) for k in valid}
    most = max(magnification.values())
    zoom = {k: _scale_about(center, most / magnification[k]) for k in valid}
    for k in valid:
        transforms[k] = zoom[k]

    # Fine step: chain the frame-to-frame similarities; a frame that cannot be
    # tracked is skipped and the next one is tracked from the last good frame.
    zoomed = {k: _to_uint8(cv2.warpAffine(grays[k], zoom[k][:2], (w, h), flags=cv2.INTER_LINEAR,
                                          borderMode=cv2.BORDER_REPLICATE)) for k in valid}
    to_first = {first: np.eye(3)}   # zoomed frame k -> zoomed frame `first`
    previous = first
    for k in tqdm(valid[1:], desc="tracking", unit="frame", disable=not progress, leave=False, delay=2):
        step = track_similarity(zoomed[previous], zoomed[k])
        if step is None or not _plausible(step, (h, w)):
            _warn(f"frame {k} cannot be tracked from frame {previous} (too few features); "
                  "it keeps only the zoom correction")
            continue
        to_first[k] = to_first[previous] @ step
        previous = k

    tracked = sorted(to_first)
    ref = reference_index(grays, reference)
    if ref not in to_first:
        raise InputError(f"the {reference} frame ({ref}) is blank or could not be tracked; "
                         "choose another reference")
    # Express the trajectory relative to the reference frame.
    to_ref = {k: np.linalg.inv(to_first[ref]) @ to_first[k] for k in tracked}
    if smoothing_radius:
        # Keep the smoothed path: output = smoothed(position) applied after removing the raw motion.
        positions = [np.linalg.inv(to_ref[k]) for k in tracked]
        for k, smooth in zip(tracked, _smooth_similarities(positions, smoothing_radius)):
            to_ref[k] = smooth @ to_ref[k]
    for k in tracked:
        transforms[k] = to_ref[k] @ zoom[k]
    return transforms


# ----------------------------------------------------------------------------- reference-frame method (ECC)

def _pyramid(gray, levels):
    """[full, half, quarter, ...] via pyrDown: a pixel x at level l+1 sits at 2x at level l."""
    pyramid = [gray]
    for _ in range(levels - 1):
        pyramid.append(cv2.pyrDown(pyramid[-1]))
    return pyramid


def _ecc_levels(shape) -> int:
    levels = 1
    while levels < ECC_MAX_LEVELS and min(shape) / 2 ** levels >= ECC_MIN_SIZE:
        levels += 1
    return levels


def ecc_register(ref_pyramid, cur_pyramid, init, motion="affine", iterations=100, eps=1e-6, min_correlation=0.0):
    """Warp W (3x3, reference pixel -> frame pixel) maximising ECC, coarse to fine.

    Pyramids as from ``_pyramid`` (full size first), float32 in [0, 1].
    ``init`` is the starting W at full size. Returns (W, converged) where
    converged is False when no level converged (W is then ``init``); a level
    whose correlation stays under ``min_correlation`` counts as not converged.
    """
    motion_type = ECC_MOTIONS[motion]
    levels = len(ref_pyramid)
    down = np.diag([0.5, 0.5, 1.0])
    warp = np.linalg.matrix_power(down, levels - 1) @ init @ np.linalg.matrix_power(np.linalg.inv(down), levels - 1)
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, iterations, eps)
    converged = False
    for level in reversed(range(levels)):
        guess = warp.astype(np.float32) if motion == "homography" else warp[:2].astype(np.float32)
        try:
            correlation, found = cv2.findTransformECC(ref_pyramid[level], cur_pyramid[level], guess, motion_type,
                                                      criteria, None, 5)
        except cv2.error:
            correlation, found = 0.0, None   # no convergence at this level: keep the coarser estimate
        if found is not None and correlation >= min_correlation:
            candidate = found.astype(np.float64) if motion == "homography" else _affine3(found)
            if _plausible(candidate, ref_pyramid[level].shape):
                warp, converged = candidate, True
        if level:
            warp = np.linalg.inv(down) @ warp @ down
    return warp, converged


def ecc_transforms(grays, reference="first", motion="affine", progress=False, min_correlation=0.0):
    """Transforms that register every frame onto one reference frame with ECC.

    grays: list of N float32 HxW in [0, 1]. Frames are solved outward from
    the reference, each starting from its already solved neighbour, so large
    drifts (focus breathing) are followed step by step; ``min_correlation``
    as ``ecc_register``'s. Returns N 3x3 float64 transforms (input pixel ->
    output pixel = reference pixel).
    """
    if motion not in ECC_MOTIONS:
        raise InputError(f"unknown ECC motion '{motion}' (choose from {', '.join(ECC_MOTIONS)})")
    n = len(grays)
    ref = reference_index(grays, reference)
    if _is_blank(grays[ref]):
        raise InputError(f"the {reference} frame ({ref}) is blank; choose another reference")
    levels = _ecc_levels(grays[0].shape)
    ref_pyramid = _pyramid(grays[ref], levels)
    warps = {ref: np.eye(3)}          # reference pixel -> frame pixel
    order = [(k, k + 1) for k in range(ref - 1, -1, -1)] + [(k, k - 1) for k in range(ref + 1, n)]
    for k, neighbour in tqdm(order, desc="registering", unit="frame", disable=not progress, leave=False, delay=2):
        start = warps.get(neighbour, np.eye(3))
        if _is_blank(grays[k]):
            _warn(f"frame {k} is blank; it is left as it is")
            continue
        warp, converged = ecc_register(ref_pyramid, _pyramid(grays[k], levels), start, motion,
                                       min_correlation=min_correlation)
        if not converged:
            _warn(f"frame {k} could not be registered to frame {ref} (ECC did not converge); "
                  "it is left as it is")
            continue
        warps[k] = warp
    return [np.linalg.inv(warps[k]) if k in warps else np.eye(3) for k in range(n)]


# ----------------------------------------------------------------------------- automatic method

def motion_extent(transform, shape) -> float:
    """How far (px) ``transform`` moves any pixel of an HxW frame: the largest corner displacement."""
    corners = _image_corners(shape)
    return float(np.abs(map_points(transform, corners) - corners).max())


def _rescaling(shape, size) -> np.ndarray:
    """3x3 map from pixel centres of an image of ``shape`` (H, W) to those of its resized copy (h, w)."""
    sy, sx = size[0] / shape[0], size[1] / shape[1]
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])


def auto_transforms(frames, reference="middle", progress=False):
    """The default registration: every frame onto the reference with ECC (affine, as ``ecc_transforms``),
    measured on copies of at most AUTO_SIDE px. The stack is registered only when some frame moves by more
    than AUTO_MOTION_PER_BLUR of the stack's blur (what defocus alone can fake), and then only the frames
    that move by AUTO_THRESHOLD px or more; the others are left as they are (identity), so an aligned stack
    comes out untouched. Whether it moved is first measured on copies half as large (a quarter of the
    work): only a stack that moved is measured again at AUTO_SIDE."""
    h, w = frames[0].shape[:2]
    if min(h, w) < ECC_MIN_SIZE:                   # too small to measure a motion on
        return [np.eye(3)] * len(frames)
    factor = max(1.0, max(h, w) / AUTO_SIDE)
    size = (max(2, round(h / factor)), max(2, round(w / factor)))
    # Gray, then shrunk, frame by frame: no full-size float copy of a camera's stack.
    small = list(np.concatenate(parallel_map(lambda f: shrunk([to_gray(f)], size), frames)))
    threshold = max(AUTO_THRESHOLD, AUTO_MOTION_PER_BLUR * estimate_blur(small) * factor)
    half = (size[0] // 2, size[1] // 2)
    if min(half) >= ECC_MIN_SIZE:
        check = _motion((h, w), list(shrunk(small, half)), reference, progress)
        if max(motion_extent(t, (h, w)) for t in check) < threshold:
            return [np.eye(3)] * len(frames)
    found = _motion((h, w), small, reference, progress)
    extents = [motion_extent(t, (h, w)) for t in found]
    if max(extents) < threshold:
        return [np.eye(3)] * len(found)
    return [t if extent >= AUTO_THRESHOLD else np.eye(3) for t, extent in zip(found, extents)]


def _motion(shape, small, reference, progress):
    """auto's ECC transforms of gray copies ``small`` (float, one size), at the full ``shape``."""
    down = _rescaling(shape, small[0].shape)
    return [np.linalg.inv(down) @ t @ down
            for t in ecc_transforms(small, reference, "affine", progress, AUTO_MIN_CORRELATION)]


def describe_motion(transforms, shape, unmeasured: int = 0) -> str:
    """One line on what registration found: how many frames moved, how far, and their scale;
    ``unmeasured``: frames whose motion could not be measured (left as they are)."""
    moved = [(k, t) for k, t in enumerate(transforms) if not _is_identity(t)]
    lost = f"; {unmeasured} could not be measured and were left as they are" if unmeasured else ""
    if not moved:
        return f"align: no slice moved more than defocus alone can show; the slices are used as they are{lost}"
    scales = [float(np.sqrt(abs(np.linalg.det(t[:2, :2])))) for _, t in moved]
    farthest = max(motion_extent(t, shape) for _, t in moved)
    return (f"align: {len(moved)} of {len(transforms)} slices moved (up to {farthest:.1f} px, scale "
            f"{min(scales):.3f} to {max(scales):.3f}) and were registered{lost}")


def warp_stack(frames: list, transforms, fill=True) -> list:
    """Every frame resampled by its transform (``warp_frame``), in place: ``frames`` (a list) gets the
    warped frames, each replacing its original as soon as it is made, so a camera's stack is never held
    twice. With ``fill``, what a frame leaves uncovered (its content moved inward) is taken from the
    nearest frame towards an unmoved one, so the border holds real content of a neighbouring focus,
    not a smear of the frame's edge. Returns ``frames``."""
    moved = [k for k, t in enumerate(transforms) if not _is_identity(t)]
    for start in range(0, len(moved), IO_THREADS):          # a few at a time, side by side
        batch = moved[start:start + IO_THREADS]
        for k, warped in zip(batch, parallel_map(lambda k: warp_frame(frames[k], transforms[k]), batch)):
            frames[k] = warped
    if not fill or not moved:
        return frames
    h, w = frames[0].shape[:2]
    still = [k for k, t in enumerate(transforms) if _is_identity(t)]
    anchor = still[len(still) // 2] if still else (len(frames) - 1) // 2
    for k in sorted(moved, key=lambda k: abs(k - anchor)):   # neighbours towards the anchor come first
        if k == anchor:
            continue
        ones = np.ones((h, w), np.uint8)
        uncovered = 1 - warp_frame(ones, transforms[k], flags=cv2.INTER_NEAREST, border=cv2.BORDER_CONSTANT)
        cv2.copyTo(frames[k + 1 if k < anchor else k - 1], uncovered, frames[k])
    return frames


# ----------------------------------------------------------------------------- public API

def warp_frame(image, transform, size=None, flags=cv2.INTER_CUBIC, border=cv2.BORDER_REPLICATE) -> np.ndarray:
    """Resample one uint8/uint16 HxW[x3] frame by ``transform`` (input -> output pixel).

    Bicubic (``flags``); pixels that come from outside the frame repeat its
    edge (``border``; BORDER_CONSTANT: zeros). An identity transform returns
    an exact copy.
    """
    h, w = size or image.shape[:2]
    if _is_identity(transform) and (h, w) == image.shape[:2]:
        return image.copy()
    if np.allclose(transform[2], [0, 0, 1], rtol=0, atol=1e-12):
        return cv2.warpAffine(image, transform[:2], (w, h), flags=flags, borderMode=border)
    return cv2.warpPerspective(image, transform, (w, h), flags=flags, borderMode=border)


def estimate_transforms(images, method="released", reference=None, motion=None,
                        smoothing_radius=None, progress=False):
    """Per-frame 3x3 transforms (input pixel -> output pixel) for a checked stack.

    images: list of N uint8/uint16 HxW or HxWx3 frames of one size (or a
    folder / multi-page TIFF path). See ``align_stack`` for the options.
    """
    frames = _as_frames(images, min_side=1 if method == "auto" else 2)
    if method not in METHODS:
        raise InputError(f"unknown registration method '{method}' (choose from {', '.join(METHODS)})")
    reference = reference or ("middle" if method == "auto" else "first")
    if reference not in REFERENCES:
        raise InputError(f"unknown reference '{reference}' (choose from {', '.join(REFERENCES)})")
    if smoothing_radius is not None and smoothing_radius < 0:
        raise InputError(f"smoothing radius must be 0 or more, not {smoothing_radius}")
    # an option of another method would be ignored without a word
    if method != "released" and smoothing_radius is not None:
        raise InputError(f"--smoothing_radius applies to --method released only; with --method {method} "
                         "it has no effect")
    if method != "ecc" and motion is not None:
        raise InputError(f"--motion applies to --method ecc only; with --method {method} it has no effect")
    if len(frames) == 1:
        return [np.eye(3)]
    if method == "auto":
        return auto_transforms(frames, reference, progress)
    grays = [to_gray_float(f) for f in frames]
    if method == "ecc":
        return ecc_transforms(grays, reference, motion or "affine", progress)
    return released_transforms(grays, reference, smoothing_radius, progress)


def align_stack(images, method="released", reference=None, motion=None,
                smoothing_radius=None, progress=False):
    """Register a focus stack; returns the aligned frames.

    images: list of N uint8/uint16 HxW (gray) or HxWx3 (BGR) frames of one
    size, or a folder / multi-page TIFF path (read with utils.read_stack).
    method: 'auto' (ECC on reduced copies onto the reference, frames that
    hardly move left untouched), 'released' (zoom, then stabilisation) or
    'ecc' (every frame onto the reference at full size). reference: 'first',
    'last', 'middle' or 'sharpest' (None: 'middle' for auto, else 'first').
    motion: ECC model, 'affine' (None) or 'homography'. smoothing_radius: released
    method only, None removes all motion, R keeps a (2R+1)-frame moving
    average of it. Returns N frames with the input's size, dtype and channels;
    auto and ecc fill what a moved frame leaves uncovered from its neighbour
    (``warp_stack``). Raises InputError for bad input; frames that cannot be
    registered get the documented fallback and a RegistrationWarning.
    """
    return align_with_report(images, method, reference, motion, smoothing_radius, progress)[0]


def align_with_report(images, method="auto", reference=None, motion=None, smoothing_radius=None,
                      progress=False, in_place=False):
    """``align_stack``'s frames and the one line of ``describe_motion`` on what was found. With auto a
    frame that cannot be registered is counted in that line rather than warned about: in an aligned
    stack that is common and harmless. ``in_place``: a list of frames given gets the aligned frames
    (``warp_stack``), so that a large stack is never held twice."""
    frames = _as_frames(images, min_side=1 if method == "auto" else 2)
    if in_place and isinstance(images, list) and frames is not images:
        images[:] = frames                   # the checked frames (gray ones made colour), in the caller's list
        frames = images
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transforms = estimate_transforms(frames, method, reference, motion, smoothing_radius, progress)
    unmeasured = 0
    for warning in caught:
        if method == "auto" and issubclass(warning.category, RegistrationWarning):
            unmeasured += 1
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    found = describe_motion(transforms, frames[0].shape[:2], unmeasured)
    return warp_stack(frames if in_place else list(frames), transforms, fill=method != "released"), found


# ----------------------------------------------------------------------------- command line

def get_args_parser():
    parser = ArgumentParser(description=__doc__)
    io = parser.add_argument_group("input and output")
    io.add_argument("input", type=str, help="folder of frames (natural file-name order) or a multi-page TIFF")
    io.add_argument("-o", "--output", type=str, default="./aligned",
                    help="folder for the aligned frames frame_0000.png, frame_0001.png, ... (empty or new)")
    io.add_argument("--overwrite", action="store_true",
                    help="replace an output folder that already holds files (all of them) with the new frames")
    reg = parser.add_argument_group("registration")
    reg.add_argument("--method", type=str, choices=METHODS, default="released",
                     help="released: zoom then stabilisation (default); ecc: every frame onto the reference; "
                          "auto: ECC on reduced copies, frames that move less than half a pixel untouched")
    reg.add_argument("--reference", type=str, choices=REFERENCES, default=None,
                     help="frame whose position (auto, ecc: and geometry) the others are aligned to "
                          "(default: middle for auto, first for the others)")
    reg.add_argument("--motion", type=str, choices=tuple(ECC_MOTIONS), default=None,
                     help="ecc only: motion model (default affine)")
    reg.add_argument("--smoothing_radius", type=int, default=None,
                     help="released only: keep a moving average of the camera path over 2R+1 frames "
                          "(video-stabiliser style); default removes all motion")
    return parser


def check_output_folder(output, overwrite: bool) -> Path:
    """The output folder (links resolved); InputError when it is a file, or holds
    files and ``overwrite`` is off: the next fusion would mix old frames with new."""
    target = Path(output).resolve()
    if target.exists() and not target.is_dir():
        raise InputError(f"output '{output}' is a file, not a folder")
    held = sum(1 for _ in target.iterdir()) if target.is_dir() else 0
    if held and not overwrite:
        raise InputError(f"output folder '{output}' already holds {held} file(s); choose an empty or new folder, "
                         f"or pass --overwrite to replace them all")
    return target


def write_frames(frames, output: Path) -> list:
    """Write frame_0000.png, ... into a temporary sibling of ``output``, then swap it
    in: the folder holds the old files or the new frames, never a mix of both."""
    parent = ensure_output_dir(output.parent)
    token = secrets.token_hex(8)
    fresh, old = parent / f".{output.name}.{token}.part", parent / f".{output.name}.{token}.old"
    try:
        fresh.mkdir()
        for k, frame in enumerate(tqdm(frames, desc="writing", unit="frame", leave=False)):
            write_image(fresh / f"frame_{k:04d}.png", frame)
        if output.exists():
            os.replace(output, old)
        os.replace(fresh, output)
    except BaseException as exc:
        shutil.rmtree(fresh, ignore_errors=True)
        if old.exists() and not output.exists():
            os.replace(old, output)              # the old files come back whole
        if isinstance(exc, OSError):
            raise InputError(f"cannot write the aligned frames to '{output}': {exc.strerror or exc}") from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    return [output / f"frame_{k:04d}.png" for k in range(len(frames))]


def main(args):
    start = time.perf_counter()
    refuse_output_into_input(args.output, args.input, what="output folder (-o)")
    output = check_output_folder(args.output, args.overwrite)
    frames, names = read_stack(args.input, min_slices=1)
    aligned, found = align_with_report(frames, args.method, args.reference, args.motion, args.smoothing_radius,
                                       progress=True)
    print(found)
    paths = write_frames(aligned, output)
    h, w = frames[0].shape[:2]
    print(f"aligned {len(frames)} frames of {w}x{h} with the {args.method} method in "
          f"{time.perf_counter() - start:.2f} s; frames in {args.output}")
    return paths


if __name__ == "__main__":
    run_cli(main, get_args_parser())
