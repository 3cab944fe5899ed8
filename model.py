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

The file reads top-down: the three stages (their blocks are in
network_blocks.py), the fused image, the whole network and its released
initialisation, the loader. ``load_model`` is the only way scripts and tests
build a network from a file; decoding beyond the released one is fusion.py's.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from network_blocks import BidirectionalConvGRU, ConvGRUCell, InceptionDWConv, SpatialChannelBridge
from utils import InputError

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


class StackMFFV2(nn.Module):
    """The whole network.

    forward(x): x (B, N, H, W) gray stack in [0, 1], H and W multiples of 32.
    Returns, as released, (fused (B, 1, H, W) in [0, 1], depth (B, 1, H, W)
    in [0, 1], index (B, H, W) int64 in [0, N-1]): the depth is the min-max
    normalised expected slice and the fused image takes, at every pixel, the
    slice at the rounded depth. Other decodings of ``focus_logits`` (a
    checkpoint's model card) live in fusion.py.
    """

    def __init__(self):
        super().__init__()
        self.feature_extraction = FeatureExtraction()
        self.layer_interaction = LayerInteraction()

    def focus_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, H, W) -> focus logits (B, N, H, W)."""
        b, n, h, w = x.shape
        features = self.feature_extraction(x.reshape(b * n, 1, h, w))  # (B*N, 8, H, W)
        return self.layer_interaction(features.reshape(b, n, -1, h, w))

    def forward(self, x: torch.Tensor):
        depth = depth_map_creation(self.focus_logits(x))              # (B, 1, H, W)
        index = depth_to_index(depth, x.shape[1])                     # (B, H, W)
        return gather_slices(x, index), depth, index


def init_weights(model: nn.Module):
    """Released initialisation (docs/architecture.md, "Training as released"), in place.

    Convs Kaiming-normal (fan_out, relu) with zero bias, GRU convs orthogonal
    with zero bias, norms weight 1 bias 0, linear layers normal(std 0.001).
    """
    gru_convs = {id(conv) for cell in model.modules() if isinstance(cell, ConvGRUCell)
                 for conv in (cell.conv_gates, cell.conv_can)}
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            if id(module) in gru_convs:
                nn.init.orthogonal_(module.weight)
            else:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.001)
            nn.init.zeros_(module.bias)


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


def load_model(path, device="cpu") -> StackMFFV2:
    """Build StackMFFV2 from a checkpoint: load on CPU, strict, then move and eval().

    Raises CheckpointError with one sentence naming the file when it is
    missing, not a checkpoint, or the weights of another architecture. How
    to decode its logits is the card beside it (``fusion.FusionCard.beside``).
    """
    state_dict = read_state_dict(path)
    model = StackMFFV2()
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
