"""StackMFF-V2: one-shot multi-focus stack fusion by focal depth regression.

The network has three stages, as in the paper:
1. intra-layer focus estimation (``FeatureExtraction``): a small U-Net run on
   every slice on its own gives 8 focus features per pixel;
2. inter-layer focus estimation (``LayerInteraction``): a bidirectional
   ConvGRU along the slice axis, then the max over its channels, gives one
   focus logit per slice and pixel;
3. focus map regression (``depth_map_creation``): softmax over the slices,
   expected slice number, per-stack min-max to [0, 1].
The fused image takes, at every pixel, the slice at the rounded depth.

``load_model`` is the only way scripts and tests build a network from a file.
"""
import json
import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from network_blocks import BidirectionalConvGRU, InceptionDWConv, SpatialChannelBridge
from utils import InputError, write_text

ENCODER_CHANNELS = (8, 16, 24, 32, 48, 64)


class FeatureExtraction(nn.Module):
    """Per-slice focus features: U-Net with inception-depthwise blocks.

    x (B*N, 1, H, W) in [0, 1], H and W multiples of 32
    -> (B*N, 8, H, W) in (0, 1).
    """

    def __init__(self, channels=ENCODER_CHANNELS, groups: int = 4):
        super().__init__()
        c = channels
        self.encoder1 = nn.Sequential(nn.Conv2d(1, c[0], 3, padding=1))
        for k in range(2, 7):  # encoder2..encoder6: IDW c[k-2] -> c[k-1]
            setattr(self, f"encoder{k}", nn.Sequential(InceptionDWConv(c[k - 2], c[k - 1])))
        for k in range(1, 6):
            setattr(self, f"ebn{k}", nn.GroupNorm(groups, c[k - 1]))
        self.scab = SpatialChannelBridge(c[:5])
        for k in range(1, 6):  # decoder1..decoder5: IDW c[6-k] -> c[5-k]
            setattr(self, f"decoder{k}", nn.Sequential(InceptionDWConv(c[6 - k], c[5 - k])))
            setattr(self, f"dbn{k}", nn.GroupNorm(groups, c[5 - k]))
        self.final = nn.Conv2d(c[0], c[0], 1)

    @staticmethod
    def _up(x):
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips, t = [], x
        for k in range(1, 6):  # t_k at H / 2^k
            t = getattr(self, f"encoder{k}")(t)
            t = F.gelu(F.max_pool2d(getattr(self, f"ebn{k}")(t), 2))
            skips.append(t)
        bridged = self.scab(skips)
        y = F.gelu(self.encoder6(t))                                  # (B*N, 64, H/32, W/32)
        y = F.gelu(self.dbn1(self.decoder1(y))) + bridged[4]          # (B*N, 48, H/32, W/32)
        for k in range(2, 6):                                         # up to H/2
            y = self._up(getattr(self, f"dbn{k}")(getattr(self, f"decoder{k}")(y)))
            y = F.gelu(y) + bridged[5 - k]
        return torch.sigmoid(self._up(self.final(y)))                 # (B*N, 8, H, W)


class LayerInteraction(nn.Module):
    """Focus logits from features of all slices: BiConvGRU, then max over channels.

    features (B, N, 8, H, W) -> logits (B, N, H, W).
    """

    def __init__(self, input_channels: int = 8, hidden_channels: int = 16):
        super().__init__()
        self.layer_interaction_depth = BidirectionalConvGRU(input_channels, hidden_channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layer_interaction_depth(features).amax(dim=2)  # (B, N, H, W)


def expected_slice_number(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, N, H, W) -> expected slice number under softmax over N, (B, 1, H, W) in [1, N].

    The softmax runs in float32 whatever the logits' precision.
    """
    n = logits.shape[1]
    prob = torch.softmax(logits.float(), dim=1)                               # (B, N, H, W)
    slice_number = torch.arange(1, n + 1, dtype=prob.dtype, device=prob.device).view(1, n, 1, 1)
    return (prob * slice_number).sum(dim=1, keepdim=True)                     # (B, 1, H, W) in [1, N]


def depth_map_creation(logits: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Normalised focal depth from focus logits.

    logits (B, N, H, W) -> depth (B, 1, H, W) in [0, 1]: the expected slice
    number under softmax over N, min-max normalised per stack. A flat map
    (for example N = 1) gives zeros, never NaN.
    """
    depth = expected_slice_number(logits)                                     # (B, 1, H, W)
    lo = depth.amin(dim=(1, 2, 3), keepdim=True)
    hi = depth.amax(dim=(1, 2, 3), keepdim=True)
    return (depth - lo) / (hi - lo).clamp_min(eps)


def depth_to_index(depth: torch.Tensor, num_slices: int) -> torch.Tensor:
    """Slice index from normalised depth (B, 1, H, W) -> (B, H, W) int64 in [0, N-1].

    Round half to even, as ``torch.round``.
    """
    scaled = (depth[:, 0] * (num_slices - 1)).clamp(0, num_slices - 1)
    return torch.round(scaled).long()


def gather_slices(stack: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick, at every pixel, the slice named by index.

    stack (B, N, H, W), index (B, H, W) -> (B, 1, H, W).
    """
    return torch.gather(stack, 1, index.unsqueeze(1))


# How the slice index is read from the focus logits:
# - "minmax_round" (released): round(min-max normalised expected slice * (N-1));
# - "argmax": the slice of highest focus logit at every pixel; its depth output
#   is index / (N - 1), so depth map and fused image agree.
INDEX_RULES = ("minmax_round", "argmax")


def argmax_index_and_depth(logits: torch.Tensor):
    """logits (B, N, H, W) -> (index (B, H, W) int64, depth (B, 1, H, W) in [0, 1])."""
    n = logits.shape[1]
    index = logits.argmax(dim=1)                                          # (B, H, W)
    depth = index.unsqueeze(1).to(torch.float32) / max(n - 1, 1)         # (B, 1, H, W)
    return index, depth


# Test-time views: the focus logits of the stack as given (1), also mirrored
# left-right (2), also up-down and both (4), and the same four transposed (8),
# each mapped back and averaged. The network is not equivariant to these
# mirrors, so the views disagree where it is unsure; their mean is steadier.
TEST_VIEWS = (1, 2, 4, 8)


def _mirror(t: torch.Tensor, k: int) -> torch.Tensor:
    """Bit 0 of k mirrors the last axis (left-right), bit 1 the one before (up-down); its own inverse."""
    dims = ([-1] if k & 1 else []) + ([-2] if k & 2 else [])
    return t.flip(dims) if dims else t


def _view(t: torch.Tensor, k: int) -> torch.Tensor:
    """View k of TEST_VIEWS' order on the last two axes: the mirrors of ``_mirror``, then bit 2 transposes."""
    t = _mirror(t, k)
    return t.transpose(-1, -2) if k & 4 else t


def _unview(t: torch.Tensor, k: int) -> torch.Tensor:
    return _mirror(t.transpose(-1, -2) if k & 4 else t, k)


def multi_view_logits(logits_fn, x: torch.Tensor, views: int = 1) -> torch.Tensor:
    """Mean focus logits of ``views`` mirrored/transposed copies of x (B, N, H, W), each mapped back.

    ``logits_fn`` maps (B, N, H', W') -> (B, N, H', W'); views 1 is one plain call."""
    if views not in TEST_VIEWS:
        raise ValueError(f"views must be one of {TEST_VIEWS}, got {views!r}")
    total = logits_fn(x)
    for k in range(1, views):
        total = total + _unview(logits_fn(_view(x, k).contiguous()), k)
    return total / views if views > 1 else total


def checked_non_negative(value, name: str) -> float:
    """``value`` as a float >= 0, else ValueError naming ``name``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}") from None
    if not number >= 0:                           # also NaN
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return number


def checked_fusion_temperature(value) -> float:
    """``value`` as a float >= 0 (0: pick by index), else ValueError saying so."""
    return checked_non_negative(value, "fusion_temperature")


def checked_focus_prior(value) -> float:
    """``value`` as a float >= 0 (0: the network's weights alone), else ValueError saying so."""
    return checked_non_negative(value, "focus_prior")


def checked_depth_window(value) -> float:
    """``value`` as a float >= 0 (0: no window), else ValueError saying so."""
    return checked_non_negative(value, "depth_window")


def checked_base_sigma(value) -> float:
    """``value`` as a float >= 0 (0: one band), else ValueError saying so."""
    return checked_non_negative(value, "base_sigma")


def checked_base_weight_sigma(value) -> float:
    """``value`` as a float >= 0 (0: the base takes the detail's weights), else ValueError saying so."""
    return checked_non_negative(value, "base_weight_sigma")


# The focus prior's local sharpness: squared 4-neighbour Laplacian, smoothed
# by a Gaussian of this sigma (pixels), plus a floor (squared Laplacian of
# [0, 1] images, about that of 2-gray-level sensor noise) so that where no
# slice has more than noise the network's weights stay: a prior that chased
# the noisiest slice there would undo the blend's averaging. Both were
# chosen on held-out synthetic stacks, clean and with that noise added
# (docs/weights.md).
FOCUS_ENERGY_SIGMA = 0.5
FOCUS_ENERGY_FLOOR = 1e-3


def _gaussian_taps(sigma: float) -> torch.Tensor:
    radius = max(1, int(round(4 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every channel: x (B, C, H, W) -> float32, same shape.

    Edge pixels are repeated at the border, so any size works; sigma 0 returns x as float32.
    Each pass is a sum of shifted copies: it computes the same sum as a one-channel conv2d
    over the planes, about 4 times faster on the CPU (bench/benchmark_blend.py, docs/weights.md)."""
    x = x.float()
    if not sigma:
        return x
    taps = _gaussian_taps(sigma).tolist()
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
    padded = F.pad(x.reshape(b * n, 1, h, w).float(), (1, 1, 1, 1), mode="replicate")
    laplacian = (padded[..., :-2, 1:-1] + padded[..., 2:, 1:-1] + padded[..., 1:-1, :-2] + padded[..., 1:-1, 2:]
                 - 4 * padded[..., 1:-1, 1:-1])
    return gaussian_blur(laplacian ** 2, sigma).reshape(b, n, h, w)


def soft_fusion_weights(logits: torch.Tensor, temperature: float, stack: torch.Tensor = None,
                        focus_prior: float = 0.0, depth_window: float = 0.0) -> torch.Tensor:
    """Per-slice fusion weights softmax(logits / temperature) over the slice axis (dim 1).

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
    """
    scores = logits.float() / temperature
    if depth_window:
        slice_number = torch.arange(1, logits.shape[1] + 1, dtype=torch.float32, device=logits.device)
        distance = slice_number.view(1, -1, 1, 1) - expected_slice_number(logits)      # (B, N, H, W)
        scores = scores - distance ** 2 / (2 * depth_window ** 2)
    if focus_prior:
        scores = scores + focus_prior * torch.log(focus_energy(stack) + FOCUS_ENERGY_FLOOR)
    return torch.softmax(scores, dim=1)


def blend_slices(stack: torch.Tensor, weights: torch.Tensor, base_sigma: float = 0.0,
                 base_weight_sigma: float = 0.0) -> torch.Tensor:
    """Fused image sum_k weights_k * stack_k: stack and weights (B, N, H, W) -> (B, 1, H, W) float32.

    ``base_sigma`` s > 0 blends in two bands: each slice splits into its base
    (Gaussian blur of sigma s px) and its detail (the rest). The detail takes
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
    correction = base_band_correction(stack, weights, base_sigma, base_weight_sigma)
    return fused if correction is None else fused + correction.sum(dim=1, keepdim=True)


def uses_base_band(base_sigma: float, base_weight_sigma: float) -> bool:
    """Whether these settings blend in two bands (both sigmas above 0)."""
    return bool(base_sigma and base_weight_sigma)


def base_band_correction(planes: torch.Tensor, weights: torch.Tensor, base_sigma: float,
                         base_weight_sigma: float):
    """What the two-band blend adds to weights * planes, per plane: (smooth(weights) - weights) * base(planes),
    since sum_k w_k x_k + sum_k (smooth(w)_k - w_k) base(x_k) = detail by w + base by smooth(w).

    planes (B, C, H, W) and weights (B, C or 1, H, W) broadcast: the slices of a gray stack with their
    weights, or the colour channels of one slice with its weight. None when either sigma is 0 (one band).
    """
    if not uses_base_band(base_sigma, base_weight_sigma):
        return None
    return (gaussian_blur(weights, base_weight_sigma) - weights) * gaussian_blur(planes, base_sigma)


class StackMFFV2(nn.Module):
    """The whole network.

    forward(x): x (B, N, H, W) gray stack in [0, 1], H and W multiples of 32.
    Returns (fused (B, 1, H, W) in [0, 1], depth (B, 1, H, W) in [0, 1],
    index (B, H, W) int64 in [0, N-1]). ``index_rule`` is one of INDEX_RULES;
    ``views`` one of TEST_VIEWS (1, the released single pass, unless the
    model card asks for more). ``fusion_temperature`` 0 picks each pixel
    from the slice named by the index (released); above 0 the fused image
    blends the slices with ``soft_fusion_weights``, kept near the expected
    slice with ``depth_window`` and sharpened by the pixels' own detail with
    ``focus_prior`` above 0, in two bands (``blend_slices``) with
    ``base_sigma`` and ``base_weight_sigma`` above 0.
    """

    def __init__(self, index_rule: str = "minmax_round", views: int = 1, fusion_temperature: float = 0.0,
                 focus_prior: float = 0.0, depth_window: float = 0.0, base_sigma: float = 0.0,
                 base_weight_sigma: float = 0.0):
        super().__init__()
        if index_rule not in INDEX_RULES:
            raise ValueError(f"index_rule must be one of {INDEX_RULES}, got {index_rule!r}")
        if views not in TEST_VIEWS:
            raise ValueError(f"views must be one of {TEST_VIEWS}, got {views!r}")
        self.index_rule, self.views = index_rule, views
        self.fusion_temperature = checked_fusion_temperature(fusion_temperature)
        self.focus_prior = checked_focus_prior(focus_prior)
        self.depth_window = checked_depth_window(depth_window)
        self.base_sigma = checked_base_sigma(base_sigma)
        self.base_weight_sigma = checked_base_weight_sigma(base_weight_sigma)
        self.feature_extraction = FeatureExtraction()
        self.layer_interaction = LayerInteraction()

    def focus_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, H, W) -> focus logits (B, N, H, W)."""
        b, n, h, w = x.shape
        features = self.feature_extraction(x.reshape(b * n, 1, h, w))  # (B*N, 8, H, W)
        return self.layer_interaction(features.reshape(b, n, -1, h, w))

    def forward(self, x: torch.Tensor):
        return self.outputs(x, self.focus_logits_of_views(x))[:3]

    def focus_logits_of_views(self, x: torch.Tensor) -> torch.Tensor:
        """Focus logits averaged over this model's test-time views."""
        return multi_view_logits(self.focus_logits, x, self.views)

    def outputs(self, x: torch.Tensor, logits: torch.Tensor):
        """Stack x and its focus logits (B, N, H, W) -> (fused (B, 1, H, W), depth (B, 1, H, W),
        index (B, H, W), weights): weights (B, N, H, W) are the soft fusion weights, None when
        the fused image picks by index."""
        index, depth = self.index_and_depth(logits)                  # (B, H, W), (B, 1, H, W)
        if not self.fusion_temperature:
            return gather_slices(x, index), depth, index, None
        weights = soft_fusion_weights(logits, self.fusion_temperature, x, self.focus_prior, self.depth_window)
        return blend_slices(x, weights, self.base_sigma, self.base_weight_sigma), depth, index, weights

    def index_and_depth(self, logits: torch.Tensor):
        """Focus logits (B, N, H, W) -> (index (B, H, W) int64, depth (B, 1, H, W) in [0, 1])
        by this model's index rule."""
        if self.index_rule == "argmax":
            return argmax_index_and_depth(logits)
        depth = depth_map_creation(logits)
        return depth_to_index(depth, logits.shape[1]), depth


class CheckpointError(InputError):
    """A checkpoint file that is missing, unreadable or of another network."""


_PREFIXES = ("module.", "_orig_mod.")


def _strip_prefixes(state_dict):
    """Remove a *leading* ``module.`` or ``_orig_mod.`` (DataParallel, compile) only."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def read_state_dict(path) -> dict:
    """Read the network weights from a checkpoint file, or raise CheckpointError.

    Accepts a bare state dict or a dict holding one under ``model`` (what
    ``train.py`` writes) or ``state_dict``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt file can make the unpickler raise anything
        raise CheckpointError(f"checkpoint {path!r} is not a readable PyTorch checkpoint "
                              f"({type(exc).__name__})") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path!r} holds no state dict of tensors")
    return _strip_prefixes(obj)


def model_card_path(path) -> str:
    """The JSON file beside a checkpoint that records how to use it (``x.pth`` -> ``x.json``)."""
    return os.path.splitext(os.fspath(path))[0] + ".json"


def write_model_card(path, card: dict):
    """Write the model card of checkpoint ``path`` (atomically)."""
    write_text(model_card_path(path), json.dumps(card, indent=2, sort_keys=True) + "\n")


class InferenceSettings(NamedTuple):
    """How a checkpoint is meant to be run (its model card), else the released way."""
    index_rule: str = "minmax_round"
    views: int = 1
    fusion_temperature: float = 0.0
    focus_prior: float = 0.0
    depth_window: float = 0.0
    base_sigma: float = 0.0
    base_weight_sigma: float = 0.0


def _card_number(card: dict, key: str, check, card_path: str) -> float:
    raw = card.get(key, 0.0)
    try:
        if isinstance(raw, str):                  # JSON must hold a number, not text that parses as one
            raise ValueError(raw)
        return check(raw)
    except ValueError:
        raise CheckpointError(f"model card {card_path!r} has {key} {raw!r}; a number >= 0 is needed") from None


def read_inference_settings(path) -> InferenceSettings:
    """The InferenceSettings recorded in the model card beside a checkpoint, else the released ones."""
    card_path = model_card_path(path)
    if not os.path.isfile(card_path):
        return InferenceSettings()
    try:
        with open(card_path, encoding="utf-8") as f:
            card = json.load(f)
        rule, views = card.get("index_rule", "minmax_round"), card.get("views", 1)
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"model card {card_path!r} is not readable JSON ({type(exc).__name__})") from None
    if rule not in INDEX_RULES:
        raise CheckpointError(f"model card {card_path!r} names an unknown index_rule {rule!r}")
    if views not in TEST_VIEWS:
        raise CheckpointError(f"model card {card_path!r} asks for {views!r} views; one of {TEST_VIEWS} is needed")
    return InferenceSettings(rule, views,
                             _card_number(card, "fusion_temperature", checked_fusion_temperature, card_path),
                             _card_number(card, "focus_prior", checked_focus_prior, card_path),
                             _card_number(card, "depth_window", checked_depth_window, card_path),
                             _card_number(card, "base_sigma", checked_base_sigma, card_path),
                             _card_number(card, "base_weight_sigma", checked_base_weight_sigma, card_path))


def load_model(path, device="cpu", index_rule=None, views=None, fusion_temperature=None,
               focus_prior=None, depth_window=None, base_sigma=None, base_weight_sigma=None) -> StackMFFV2:
    """Build StackMFFV2 from a checkpoint: load on CPU, strict, then move and eval().

    ``index_rule``, ``views``, ``fusion_temperature``, ``focus_prior``,
    ``depth_window``, ``base_sigma`` and ``base_weight_sigma`` None take
    what the JSON model card beside the checkpoint (``model_card_path``)
    records, else the released "minmax_round", 1 view and 0 (pick by index).
    Raises CheckpointError with one sentence naming the file when it is
    missing, not a checkpoint, or the weights of another architecture.
    """
    state_dict = read_state_dict(path)
    asked = dict(index_rule=index_rule, views=views, fusion_temperature=fusion_temperature,
                 focus_prior=focus_prior, depth_window=depth_window, base_sigma=base_sigma,
                 base_weight_sigma=base_weight_sigma)
    settings = read_inference_settings(path)._replace(**{k: v for k, v in asked.items() if v is not None})
    model = StackMFFV2(**settings._asdict())
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state_dict)
                         if tuple(expected[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong_shape:
            details.append(f"{len(wrong_shape)} of another shape (e.g. {wrong_shape[0]})")
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} is not a StackMFF-V2 checkpoint: "
                              f"its parameters do not match ({'; '.join(details)})")
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model.to(device).eval()
