"""From focus logits to the fused image and the depth map, as a checkpoint's model card says.

The network (``model.StackMFFV2``) gives focus logits, one per slice and
pixel. How they become outputs is decided by a ``FusionCard``, read from
the JSON file beside a checkpoint (no file: the released decoding):

* ``views``: the logits are averaged over mirrored/transposed passes
  (``view_logits``);
* ``index_rule``: how the slice index (and depth map) is read;
* ``depth_rule``: the depth output as the index rule gives it (released), or
  that index smoothed by the fused image into a continuous map (``refined_depth``);
* ``fusion_temperature`` 0 takes each pixel from the indexed slice
  (released); above 0 the slices are blended with softmax weights, refined
  by ``depth_window`` and ``focus_prior``, in one band or in two
  (``base_sigma``, ``base_weight_sigma``);
* ``network_blur`` 0 runs the network on the stack at its own size
  (released); above 0 a stack whose blur is wider is shrunk for the network
  (working_scale.py, never below ``network_min_side``) and the logits are
  decoded at full resolution.

``fuse(stack, logits, card)`` is the one decoding of a gray stack;
``fuse_colour`` repeats its choice on the colour slices. Every inference
path (reference, fast, tiled) and the training loss's fusion term go
through these functions.
"""
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple, Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from model import CheckpointError, depth_map_creation, depth_to_index, expected_slice_number, gather_slices
# The card's settings and their flags live in options.py, which needs no torch (imported from here too).
from options import BLEND_SETTINGS, DEPTH_RULES, INDEX_RULES, TEST_VIEWS, CardSettings  # noqa: F401
from utils import InputError, dtype_max, write_text


@dataclass(frozen=True)
class FusionCard(CardSettings):
    """How a checkpoint's logits are decoded: the settings of ``options.CardSettings`` (validated
    when made, one flag each) and what the decoding derives from them."""

    @property
    def refines_depth(self) -> bool:
        """Whether the depth output is the refined one (``refined_depth``) rather than the index rule's."""
        return self.depth_rule == "guided"

    @property
    def two_bands(self) -> bool:
        """Whether the blend runs in two bands (both sigmas above 0)."""
        return bool(self.base_sigma and self.base_weight_sigma)

    def halo(self) -> int:
        """Pixels around a pixel whose logits and slices its fused image depends on (the focus
        prior's Laplacian and blur, the two-band blurs); 0 for a pick by index."""
        if not self.fusion_temperature:
            return 0
        prior = 1 + _gaussian_radius(FOCUS_ENERGY_SIGMA) if self.focus_prior else 0
        if not self.two_bands:
            return prior
        return max(_gaussian_radius(self.base_sigma), prior + _gaussian_radius(self.base_weight_sigma))

    def with_overrides(self, **given) -> "FusionCard":
        """This card with the settings in ``given`` (None: keep the card's). A temperature of 0
        given here drops the card's blend settings, which only a blend uses."""
        given = {k: v for k, v in given.items() if v is not None}
        if given.get("fusion_temperature") == 0:
            given = {**{name: 0.0 for name in BLEND_SETTINGS}, **given}
        return replace(self, **given)

    @classmethod
    def beside(cls, checkpoint) -> "FusionCard":
        """The card recorded beside a checkpoint (``card_path``), else the released decoding.
        CheckpointError with one sentence when the file is unreadable or a setting is wrong."""
        path = card_path(checkpoint)
        if not os.path.isfile(path):
            return cls()
        try:
            with open(path, encoding="utf-8") as f:
                recorded = json.load(f)
            settings = {f.name: recorded[f.name] for f in fields(cls) if f.name in recorded}
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"model card {path!r} is not readable JSON ({type(exc).__name__})") from None
        try:
            return cls(**settings)
        except ValueError as exc:
            raise CheckpointError(f"model card {path!r}: {exc}") from None

    def write_beside(self, checkpoint, **provenance):
        """Write this card beside a checkpoint (atomically), with ``provenance`` (how the weights were made)."""
        write_text(card_path(checkpoint), json.dumps({**provenance, **asdict(self)}, indent=2, sort_keys=True) + "\n")


def card_path(checkpoint) -> str:
    """The JSON file beside a checkpoint that holds its card (``x.pth`` -> ``x.json``)."""
    return os.path.splitext(os.fspath(checkpoint))[0] + ".json"


def card_from_args(args, card: FusionCard) -> FusionCard:
    """``card`` with the flags of ``options.add_card_arguments`` that were given; InputError (one line)
    when the result makes no sense, e.g. a blend setting with a pick by index."""
    try:
        return card.with_overrides(**{f.name: getattr(args, f.name) for f in fields(FusionCard)})
    except ValueError as exc:
        raise InputError(f"--{exc}") from None


# ----------------------------------------------------------------------------- views


def _mirror(t: torch.Tensor, k: int) -> torch.Tensor:
    """Bit 0 of k mirrors the last axis (left-right), bit 1 the one before (up-down); its own inverse."""
    dims = ([-1] if k & 1 else []) + ([-2] if k & 2 else [])
    return t.flip(dims) if dims else t


def view(t: torch.Tensor, k: int) -> torch.Tensor:
    """View k of TEST_VIEWS' order on the last two axes: the mirrors of ``_mirror``, then bit 2 transposes."""
    t = _mirror(t, k)
    return t.transpose(-1, -2) if k & 4 else t


def unview(t: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of ``view``."""
    return _mirror(t.transpose(-1, -2) if k & 4 else t, k)


def view_logits(logits_fn, x: torch.Tensor, views: int = 1) -> torch.Tensor:
    """Mean focus logits of ``views`` mirrored/transposed copies of x (B, N, H, W), each mapped back.

    ``logits_fn`` maps (B, N, H', W') -> (B, N, H', W'); views 1 is one plain call."""
    if views not in TEST_VIEWS:
        raise ValueError(f"views must be one of {TEST_VIEWS}, got {views!r}")
    total = logits_fn(x)
    for k in range(1, views):
        total = total + unview(logits_fn(view(x, k).contiguous()), k)
    return total / views if views > 1 else total


# ----------------------------------------------------------------------------- index and depth


def index_and_depth(logits: torch.Tensor, index_rule: str):
    """Focus logits (B, N, H, W) -> (index (B, H, W) int64, depth (B, 1, H, W) in [0, 1]) by ``index_rule``."""
    if index_rule == "argmax":
        n = logits.shape[1]
        index = logits.max(dim=1).indices      # (B, H, W); argmax's own kernel is 5x slower on the CPU
        return index, index.unsqueeze(1).to(torch.float32) / max(n - 1, 1)
    depth = depth_map_creation(logits)
    return depth_to_index(depth, logits.shape[1]), depth


# ----------------------------------------------------------------------------- soft weights

# The focus prior's local sharpness: squared 4-neighbour Laplacian, smoothed
# by a Gaussian of this sigma (pixels), plus a floor (squared Laplacian of
# [0, 1] images, about that of 2-gray-level sensor noise) so that where no
# slice has more than noise the network's weights stay: a prior that chased
# the noisiest slice there would undo the blend's averaging. Both were
# chosen on held-out synthetic stacks, clean and with that noise added
# (docs/weights.md).
FOCUS_ENERGY_SIGMA = 0.5
FOCUS_ENERGY_FLOOR = 1e-3


def _gaussian_radius(sigma: float) -> int:
    return max(1, int(round(4 * sigma)))


def _gaussian_taps(sigma: float) -> torch.Tensor:
    radius = _gaussian_radius(sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every channel: x (B, C, H, W) -> float32, same shape.

    Edge pixels are repeated at the border, so any size works; sigma 0 returns x as float32.
    Each pass is a sum of shifted copies: it computes the same sum as a one-channel conv2d
    over the planes, about 4 times faster on the CPU (bench/benchmark_blend.py). Outside
    autograd on the CPU OpenCV's separable filter computes the same sum, 2-4 times faster again."""
    x = x.float()
    return separable_filter(x, _gaussian_taps(sigma).tolist()) if sigma else x


def _opencv_can(x: torch.Tensor) -> bool:
    """Whether OpenCV may compute on x: on the CPU, and no gradient is needed through it."""
    return x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)


def separable_filter(x: torch.Tensor, taps) -> torch.Tensor:
    """x (B, C, H, W) float32 filtered by the same odd list of taps along rows, then columns,
    edge pixels repeated at the border: a sum of shifted copies (see ``gaussian_blur``), or
    OpenCV's separable filter on the CPU when no gradient is needed (the same sums, faster)."""
    if _opencv_can(x):
        kernel = np.asarray(taps, np.float32)
        planes = x.detach().reshape(-1, *x.shape[-2:]).contiguous().numpy()
        out = np.empty_like(planes)
        for plane, filtered in zip(planes, out):
            cv2.sepFilter2D(plane, cv2.CV_32F, kernel, kernel, dst=filtered, borderType=cv2.BORDER_REPLICATE)
        return torch.from_numpy(out).reshape(x.shape)
    r = len(taps) // 2
    for dim, pad in ((-1, (r, r, 0, 0)), (-2, (0, 0, r, r))):
        padded = F.pad(x, pad, mode="replicate")
        size = x.shape[dim]
        x = padded.narrow(dim, 0, size) * taps[0]
        for i in range(1, len(taps)):
            x.add_(padded.narrow(dim, i, size), alpha=taps[i])
    return x


def focus_energy(x: torch.Tensor, sigma: float = FOCUS_ENERGY_SIGMA) -> torch.Tensor:
    """Local sharpness of every slice: x (B, N, H, W) -> (B, N, H, W) >= 0, float32.

    Edge pixels are repeated at the border, so any size works."""
    b, n, h, w = x.shape
    if _opencv_can(x):          # the same 4-neighbour stencil, 3-5 times faster
        planes = x.detach().reshape(b * n, h, w).float().contiguous().numpy()
        laplacian = np.empty_like(planes)
        for plane, out in zip(planes, laplacian):
            cv2.Laplacian(plane, cv2.CV_32F, dst=out, ksize=1, borderType=cv2.BORDER_REPLICATE)
        laplacian = torch.from_numpy(np.square(laplacian, out=laplacian)).reshape(b * n, 1, h, w)
        return gaussian_blur(laplacian, sigma).reshape(b, n, h, w)
    padded = F.pad(x.reshape(b * n, 1, h, w).float(), (1, 1, 1, 1), mode="replicate")
    laplacian = (padded[..., :-2, 1:-1] + padded[..., 2:, 1:-1] + padded[..., 1:-1, :-2] + padded[..., 1:-1, 2:]
                 - 4 * padded[..., 1:-1, 1:-1])
    return gaussian_blur(laplacian ** 2, sigma).reshape(b, n, h, w)


def soft_weights(stack: torch.Tensor, logits: torch.Tensor, card: FusionCard,
                 coarse_energy: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-slice blend weights (B, N, H, W), summing to 1 over the slices: softmax(logits / T).

    A blend instead of a pick: where the network hesitates between slices
    that look alike the mean of the likely ones is closer to the truth than
    either (the shipped weights were trained with this blend as a loss term).
    Small temperatures approach the argmax pick.

    ``depth_window`` w > 0 also multiplies each slice's weight by a Gaussian
    of width w slices around the expected slice number (the released depth
    before its min-max): where the network sees two depths at once, at the
    edge of a near object, the blend moves to the slices between them. With
    real optics that is right: focused on the far side, the near object's
    blur spills over the far pixels, so the far slice is not sharp there.

    ``focus_prior`` p > 0 multiplies each slice's weight by its local
    sharpness (``focus_energy`` of ``stack``) to the power p before
    normalising: among the slices the network finds likely, the one with
    the finest detail at that pixel wins. The network places the depth; the
    pixels themselves say which of the neighbouring slices is sharpest.
    ``coarse_energy`` (B, N, H, W): the same sharpness measured on the stack
    as the network saw it, shrunk (working_scale.py) and resized back; the
    prior then takes the mean of the two logarithms, so that detail at both
    scales counts (a shrunk stack's pixels may hold little of their own).

    The scores split into the network's part (``network_scores``) and the
    full-resolution prior's (``prior_scores``), so that a shrunk stack's
    network part can be computed at the network's size and resized.
    """
    shared = coarse_energy is not None
    return torch.softmax(network_scores(logits, card, coarse_energy) + prior_scores(stack, card, shared), dim=1)


# With a shrunk stack the focus prior is the mean of the log sharpness at both scales.
COARSE_SHARE = 0.5


def network_scores(logits: torch.Tensor, card: FusionCard, coarse_energy: Optional[torch.Tensor] = None):
    """The part of ``soft_weights``' scores (B, N, H, W) that the logits give: logits / T, the depth
    window's, and the focus prior's share measured at the network's scale (``coarse_energy``)."""
    if not card.fusion_temperature:
        raise ValueError("soft weights need a fusion_temperature above 0")
    scores = logits.float() / card.fusion_temperature
    if card.depth_window:
        slice_number = torch.arange(1, logits.shape[1] + 1, dtype=torch.float32, device=logits.device)
        distance = slice_number.view(1, -1, 1, 1) - expected_slice_number(logits)      # (B, N, H, W)
        scores = scores - distance ** 2 / (2 * card.depth_window ** 2)
    if card.focus_prior and coarse_energy is not None:
        scores = scores + COARSE_SHARE * card.focus_prior * torch.log(coarse_energy.float() + FOCUS_ENERGY_FLOOR)
    return scores


def prior_scores(stack: torch.Tensor, card: FusionCard, shared: bool = False):
    """The focus prior's part of ``soft_weights``' scores, from the stack (B, N, H, W) at full size
    (``shared``: the network's scale gave the rest, ``network_scores``); 0 without a prior."""
    if not card.focus_prior:
        return 0.0
    share = 1 - COARSE_SHARE if shared else 1.0
    return share * card.focus_prior * torch.log(focus_energy(stack) + FOCUS_ENERGY_FLOOR)


# ----------------------------------------------------------------------------- blends


def _base_band_correction(planes: torch.Tensor, weights: torch.Tensor, card: FusionCard) -> torch.Tensor:
    """What the two-band blend adds to weights * planes, per plane: (smooth(weights) - weights) * base(planes),
    since sum_k w_k x_k + sum_k (smooth(w)_k - w_k) base(x_k) = detail by w + base by smooth(w).

    planes (B, C, H, W) and weights (B, C or 1, H, W) broadcast: the slices of a gray stack with their
    weights, or the colour channels of one slice with its weight."""
    return (gaussian_blur(weights, card.base_weight_sigma) - weights) * gaussian_blur(planes, card.base_sigma)


def blend(stack: torch.Tensor, weights: torch.Tensor, card: FusionCard) -> torch.Tensor:
    """Fused image sum_k weights_k * stack_k: stack and weights (B, N, H, W) -> (B, 1, H, W) float32.

    With the card's two bands each slice splits into its base (Gaussian
    blur of ``base_sigma`` px) and its detail (the rest). The detail takes
    ``weights``; the base takes them smoothed by a Gaussian of
    ``base_weight_sigma`` px, as multi-resolution blending does. Where the
    weights jump from one slice to another, at a depth edge, the slices'
    smooth parts differ (with real optics a near object's blur spills over
    the far side), and a hard switch there leaves a seam in the low
    frequencies; spread over a few pixels it fades, while the fine detail
    keeps the sharp weights. Smoothing keeps the weights summing to 1, so a
    stack of identical slices still fuses to that slice.
    """
    fused = (weights * stack).sum(dim=1, keepdim=True)
    if not card.two_bands:
        return fused
    return fused + _base_band_correction(stack, weights, card).sum(dim=1, keepdim=True)


def blended_image(stack: torch.Tensor, logits: torch.Tensor, card: FusionCard):
    """The card's blend of a gray stack: (fused (B, 1, H, W) float32, weights (B, N, H, W))."""
    weights = soft_weights(stack, logits, card)
    return blend(stack, weights, card), weights


# ----------------------------------------------------------------------------- refined depth

def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the (2r+1) x (2r+1) square around every pixel: x (B, C, H, W) -> float32, same shape.

    Edge pixels are repeated at the border, as ``gaussian_blur`` does; radius 0 returns x as float32."""
    x = x.float()
    side = 2 * radius + 1
    if not radius:
        return x
    if _opencv_can(x):        # running sums: the same means, faster than the taps for any radius
        planes = x.detach().reshape(-1, *x.shape[-2:]).contiguous().numpy()
        out = np.empty_like(planes)
        for plane, mean in zip(planes, out):
            cv2.boxFilter(plane, cv2.CV_32F, (side, side), dst=mean, normalize=True, borderType=cv2.BORDER_REPLICATE)
        return torch.from_numpy(out).reshape(x.shape)
    return separable_filter(x, [1 / side] * side)


def guided_filter(guide: torch.Tensor, source: torch.Tensor, radius: int, eps: float,
                  confidence: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Edge-aware smoothing of ``source`` by ``guide`` (He et al.'s guided filter), (B, 1, H, W) each.

    In every (2r+1)^2 window the source is fitted as a * guide + b by least
    squares (eps damps a where the guide is flat, so there the window's mean
    wins); each pixel takes the mean of the fits of the windows holding it.
    ``confidence`` (>= 0, same shape) weights the fit's pixels, so an
    untrusted region up to 2r px across takes its value from the trusted
    pixels around it (a wider one, its own mean).
    Reaches 2r pixels (``guided_filter_reach``)."""
    # The floor: a window of untrusted pixels takes its plain mean, never 0 / 0.
    weight = torch.ones_like(source) if confidence is None else confidence.float() + 1e-6

    def mean(x):     # the confidence-weighted window mean
        return box_mean(weight * x, radius) / total

    total = box_mean(weight, radius)
    guide, source = guide.float(), source.float()
    mean_guide, mean_source = mean(guide), mean(source)
    slope = (mean(guide * source) - mean_guide * mean_source) / (mean(guide * guide) - mean_guide ** 2 + eps)
    offset = mean_source - slope * mean_guide
    return box_mean(slope, radius) * guide + box_mean(offset, radius)


def guided_filter_reach(radius: int) -> int:
    """Pixels around a pixel that ``guided_filter`` of ``radius`` reads: two window means."""
    return 2 * radius


# The "guided" depth rule's settings, chosen by rule E on the light fields and real stacks
# (docs/notes/depth-maps.md): window radius (px), the fit's damping where the guide is flat
# ([0, 1] gray levels squared) and the power that turns the decoding's peak weight into trust.
DEPTH_RADIUS = 4
DEPTH_EPS = 0.1
DEPTH_CONFIDENCE_POWER = 16


def depth_confidence(logits: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """How sure the decoding is at every pixel, (B, 1, H, W) in (0, 1]: the largest blend weight to
    DEPTH_CONFIDENCE_POWER (a pick by index: that of softmax(logits)), so only clear peaks count."""
    weights = torch.softmax(logits.float(), dim=1) if weights is None else weights
    return weights.amax(dim=1, keepdim=True) ** DEPTH_CONFIDENCE_POWER


def refined_depth(guide: torch.Tensor, index: torch.Tensor, confidence: torch.Tensor, num_slices: int) -> torch.Tensor:
    """The "guided" depth rule: the index (B, H, W) of ``num_slices`` slices smoothed by
    ``guided_filter`` with the fused gray image (B, 1, H, W) as guide and ``depth_confidence`` as
    trust -> depth (B, 1, H, W) in [0, 1]. Reaches ``guided_filter_reach(DEPTH_RADIUS)`` px."""
    slices = guided_filter(guide, index[:, None].float(), DEPTH_RADIUS, DEPTH_EPS, confidence)
    return (slices / max(num_slices - 1, 1)).clamp(0, 1)


class Fused(NamedTuple):
    """One decoding: fused (B, 1, H, W) float32, depth (B, 1, H, W) in [0, 1], index (B, H, W)
    int64 in [0, N-1], weights (B, N, H, W) of the blend or None for a pick by index."""
    fused: torch.Tensor
    depth: torch.Tensor
    index: torch.Tensor
    weights: Optional[torch.Tensor]


def fuse(stack: torch.Tensor, logits: torch.Tensor, card: FusionCard) -> Fused:
    """Gray stack (B, N, H, W) in [0, 1] and its (view-averaged) focus logits -> the card's outputs
    (a stack the network saw shrunk is decoded by strips.fuse_in_strips with the same rules)."""
    index, depth = index_and_depth(logits, card.index_rule)
    if card.fusion_temperature:
        fused, weights = blended_image(stack, logits, card)
    else:
        fused, weights = gather_slices(stack, index), None
    if card.refines_depth:
        depth = refined_depth(fused, index, depth_confidence(logits, weights), logits.shape[1])
    return Fused(fused, depth, index, weights)


def fuse_colour(images, index: np.ndarray, weights: Optional[np.ndarray], card: FusionCard) -> np.ndarray:
    """The card's fused image of the original slices (uint8/uint16, gray or colour), slice by slice.

    weights None: take, at every pixel, the slice named by ``index`` (H, W)
    (released). Else sum_k weights[k] * images[k] with weights (N, H, W) at
    the images' size, in the card's bands (each colour channel on its own),
    rounded back to the input's type. Memory stays at a few images more
    than the inputs (stacking all N slices first would double it).
    """
    if weights is None:
        fused = images[0].copy()                                      # (H, W[, 3])
        for k in range(1, len(images)):
            chosen = index == k                                       # (H, W)
            fused[chosen] = images[k][chosen]
        return fused
    total = torch.zeros(images[0].shape, dtype=torch.float32)
    for image, weight in zip(images, weights):
        # torch's element-wise kernels use every thread; numpy's one
        planes = torch.from_numpy(image).float() if image.dtype == np.uint8 else torch.from_numpy(
            image.astype(np.float32))                                     # (H, W[, C])
        weight = np.ascontiguousarray(weight, dtype=np.float32)
        if card.two_bands:       # _base_band_correction's terms, every channel in one OpenCV call
            smooth = torch.from_numpy(_filtered_image(weight, card.base_weight_sigma)).sub_(torch.from_numpy(weight))
            base = torch.from_numpy(_filtered_image(planes.numpy(), card.base_sigma))
            total.addcmul_(base, smooth[..., None] if image.ndim == 3 else smooth)
        weight = torch.from_numpy(weight)
        total.addcmul_(planes, weight[..., None] if image.ndim == 3 else weight)
    return total.round_().clamp_(0, dtype_max(images[0].dtype)).numpy().astype(images[0].dtype)


def _filtered_image(image: np.ndarray, sigma: float) -> np.ndarray:
    """``gaussian_blur`` of a float32 (H, W) or (H, W, C) array, channels at once."""
    taps = _gaussian_taps(sigma).numpy()
    return cv2.sepFilter2D(image, cv2.CV_32F, taps, taps, borderType=cv2.BORDER_REPLICATE)
