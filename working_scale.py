"""The scale the network sees a stack at: shrunk until its blur is as wide as the weights know.

The shipped weights learnt focus from stacks of 128-256 px whose blur spans
a few pixels. A camera bracket of 24 MP holds the same optics with the blur
spread over tens of pixels; at that scale the network no longer tells a
sharp slice from a blurred one. So a model card with ``network_blur`` R
(fusion.FusionCard) has each stack's largest blur B measured
(``estimate_blur``) and, when B > R, the network runs on the stack shrunk
by f = B / R (``working_factor``; never below the card's
``network_min_side``), while the card's decoding runs at full resolution
on the logits resized back. The stack's own size does not decide: a
1024 x 768 render with a wide aperture needs shrinking, a sharp 4 MP
microscope stack may not.

The blur is measured by re-blurring: in blocks of a gray copy of the
stack, the sharpest of a few reference slices is blurred by Gaussians of
growing sigma until it best matches the slice at the far end of the sweep,
the most defocused view of the same scene points. The blocks where
blurring explains the difference give one sigma each; their 90th
percentile is the stack's largest blur (px at full size, a Gaussian's
sigma). A blur too narrow to measure on the shrunk copy is measured again
on a full-size crop of its centre.
"""
import cv2
import numpy as np

ANALYSIS_SIDE = 768                 # long side of the copy the blur is measured on
BLOCK = 32                          # px of that copy per measurement
REFERENCES = 5                      # slices, evenly spread, that the sharp side is taken from
# Gaussian sigmas tried, 0.5 to 9.1 px of the copy: a wider blur shrinks a stack below a long side of
# 256 px at a network_blur of 2.5 (the bound binds first).
SIGMAS = 0.5 * 1.25 ** np.arange(15)
PERCENTILE = 90
ENERGY_FLOOR = 1e-4                 # mean squared Laplacian ([0, 1] gray) of a block with no detail
MEASURABLE = 1.5                    # px: a narrower blur on the shrunk copy is measured again at full size
# A shrink by less changes the blur little and costs the detail the network reads focus from
# (docs/notes/camera-scale.md, candidate S2): such stacks run at their own size.
MIN_SHRINK = 1.5


def shrunk(gray, size) -> np.ndarray:
    """Gray slices (N, H, W), uint8/uint16 or float in [0, 1], area-averaged to ``size`` (h, w) ->
    float32 (N, h, w) in [0, 1]."""
    scale = float(np.iinfo(gray[0].dtype).max) if gray[0].dtype.kind in "ui" else 1.0
    h, w = size
    out = np.empty((len(gray), h, w), np.float32)
    for plane, source in zip(out, gray):
        plane[:] = source if source.shape == (h, w) else cv2.resize(source, (w, h), interpolation=cv2.INTER_AREA)
    return out / scale if scale != 1.0 else out


def _block_means(x: np.ndarray) -> np.ndarray:
    """Mean of every BLOCK x BLOCK block of an (h, w) map (the whole map when it is smaller)."""
    h, w = x.shape
    bh, bw = max(1, h // BLOCK), max(1, w // BLOCK)
    return cv2.resize(x[:bh * BLOCK, :bw * BLOCK], (bw, bh), interpolation=cv2.INTER_AREA)


def blur_at_scale(stack: np.ndarray):
    """Largest blur (Gaussian sigma, px of ``stack``) of a float32 gray stack (N, h, w); None when
    fewer than 4 blocks hold detail that blurring explains (a flat or single-depth stack)."""
    n = len(stack)
    references = sorted(set(np.linspace(0, n - 1, min(REFERENCES, n)).round().astype(int).tolist()))
    energy, errors = [], []
    for r in references:
        far_end = stack[n - 1 if r < (n - 1) / 2 else 0]
        energy.append(_block_means(cv2.Laplacian(stack[r], cv2.CV_32F) ** 2))
        errors.append([_block_means((stack[r] - far_end) ** 2)]
                      + [_block_means((cv2.GaussianBlur(stack[r], (0, 0), s, borderType=cv2.BORDER_REFLECT)
                                       - far_end) ** 2) for s in SIGMAS])
    energy, errors = np.stack(energy), np.array(errors)            # (K, bh, bw), (K, S + 1, bh, bw)
    sharpest = energy.argmax(axis=0)
    rows, cols = np.indices(sharpest.shape)
    curve = errors[sharpest, :, rows, cols]                        # (bh, bw, S + 1): the sharpest reference's
    best = curve.argmin(axis=-1)
    detail = energy.max(axis=0)
    explained = curve.min(axis=-1) < 0.5 * curve[..., 0]     # blurring halves the difference
    valid = explained & (detail > max(ENERGY_FLOOR, 0.05 * np.percentile(detail, 95)))
    if valid.sum() < 4:
        return None
    return float(np.percentile(SIGMAS[best[valid] - 1], PERCENTILE))


def estimate_blur(gray) -> float:
    """The largest blur of a stack, px at full size (a Gaussian's sigma; 0 when it cannot be measured).

    gray: N gray slices (H, W) of one size, uint8/uint16 or float in [0, 1]."""
    h, w = gray[0].shape
    factor = max(1.0, max(h, w) / ANALYSIS_SIDE)
    size = (max(1, round(h / factor)), max(1, round(w / factor)))
    blur = blur_at_scale(shrunk(gray, size))
    if factor > 1 and (blur is None or blur < MEASURABLE):
        y0, x0 = max(0, (h - ANALYSIS_SIDE) // 2), max(0, (w - ANALYSIS_SIDE) // 2)
        centre = [g[y0:y0 + ANALYSIS_SIDE, x0:x0 + ANALYSIS_SIDE] for g in gray]
        fine = blur_at_scale(shrunk(centre, centre[0].shape))
        if fine is not None:
            return fine
    return 0.0 if blur is None else blur * factor


def working_factor(card, blur: float, size) -> float:
    """How much the network's copy of a stack of ``size`` (H, W) is shrunk (1: not at all), for a
    largest blur ``blur`` (px, ``estimate_blur``) and the card's ``network_blur`` and ``network_min_side``;
    a shrink by less than MIN_SHRINK is none."""
    if not card.network_blur:
        return 1.0
    factor = blur / card.network_blur
    if card.network_min_side:
        factor = min(factor, max(size) / card.network_min_side)
    return factor if factor >= MIN_SHRINK else 1.0


def working_size(size, factor: float):
    """(h, w) of a stack of ``size`` (H, W) shrunk by ``factor``."""
    return tuple(max(1, round(s / factor)) for s in size)
