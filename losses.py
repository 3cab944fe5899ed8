"""The training objective: the released depth MSE plus optional terms, as one ``DepthLoss``.

    loss_fn = DepthLoss(LossWeights(ce=0.3, fusion=30))
    loss = loss_fn(logits, depth, target, stack)

As released the loss is the MSE between the network's normalised depth and
depth/255 (``LossWeights()``: every extra term off). The extra terms and
what they are for:

- ``ce``: cross-entropy of the focus logits against the in-focus slice index,
  so that the argmax of the logits names the right slice;
- ``fusion``: L1 between the fused image that the logits' soft blend makes and
  the all-in-focus image. It counts a wrong slice only where the slices
  differ, as the fused image's PSNR does;
- ``distance``: expected distance, in slices, between the softmax over slices
  and the true slice: a far miss costs more than a near one, where
  cross-entropy charges both alike.
"""
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from fusion import FusionCard, blended_image
from utils import InputError

CE_TARGETS = ("true", "sharpest")
SPOILT_MARGIN = 0.02        # gray levels in [0, 1]: how much worse the true slice must be to be replaced
# The blend the fusion term scores when the card picks by index: the plain softmax, one band.
PLAIN_SOFTMAX = FusionCard(fusion_temperature=1.0)


@dataclass(frozen=True)
class LossWeights:
    """Weights of the terms added to the released depth MSE (0: the term is off)."""
    ce: float = 0.0
    fusion: float = 0.0
    distance: float = 0.0

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if not value >= 0:                       # also NaN
                raise ValueError(f"the weight of the {field.name} term must be >= 0, got {value!r}")


def target_slice_index(target: torch.Tensor, n: int) -> torch.Tensor:
    """Ground-truth depth (B, 1, H, W) in [0, 1] -> in-focus slice index floor(target * N), (B, H, W) int64
    (the bins of make_datasets.synthesis)."""
    return (target[:, 0] * n).floor().clamp(0, n - 1).long()


def sharpest_slice_index(stack: torch.Tensor, all_in_focus: torch.Tensor, true_index: torch.Tensor,
                         margin: float = SPOILT_MARGIN) -> torch.Tensor:
    """The true slice index (B, H, W), except where that slice is spoilt (physical blur spills a
    near object's blur over far pixels): there, the slice closest to the all-in-focus image, when
    it is more than ``margin`` closer than the true one. Elsewhere (flat areas, where every slice
    is as close) the true index stays."""
    error = (stack - all_in_focus[:, None]).abs()                                # (B, N, H, W)
    best_error, best = error.min(dim=1)
    true_error = error.gather(1, true_index[:, None])[:, 0]
    return torch.where(true_error > best_error + margin, best, true_index)


class DepthLoss:
    """The released depth MSE plus the terms of ``weights``.

    ``ce_target`` 'sharpest' aims the cross-entropy and the distance term at
    ``sharpest_slice_index`` instead of the true slice (needs the all-in-focus
    channel in the target). The fusion term scores the fused image of ``card``'s
    blend (``fusion.blended_image``: temperature, depth window, focus prior,
    bands), so that the shipped card trains the very fused image the predict
    scripts make; a card that picks by index (temperature 0) is scored by the
    plain softmax blend, as a pick has no gradient.
    """

    def __init__(self, weights: LossWeights = LossWeights(), ce_target: str = "true",
                 card: FusionCard = PLAIN_SOFTMAX):
        if ce_target not in CE_TARGETS:
            raise ValueError(f"ce_target must be one of {CE_TARGETS}, got {ce_target!r}")
        self.weights, self.ce_target = weights, ce_target
        self.card = card if card.fusion_temperature else PLAIN_SOFTMAX

    def __call__(self, logits, depth, target, stack=None) -> torch.Tensor:
        """logits (B, N, H, W), depth (B, 1, H, W) in [0, 1], target (B, 1 or 2, H, W) in [0, 1]
        (ground-truth depth, then the all-in-focus image when there is one), stack (B, N, H, W)
        in [0, 1] (needed by the fusion term and the sharpest target) -> scalar loss."""
        w = self.weights
        value = F.mse_loss(depth.float(), target[:, :1])
        if not (w.ce or w.fusion or w.distance):
            return value
        n = logits.shape[1]
        slice_index = target_slice_index(target, n)                                 # (B, H, W)
        if w.ce:
            value = value + w.ce * F.cross_entropy(logits.float(), self.aimed_index(slice_index, target, stack))
        if w.fusion:
            value = value + w.fusion * self.fusion_error(logits, target, stack, slice_index)
        if w.distance:
            prob = torch.softmax(logits.float(), dim=1)                              # (B, N, H, W)
            slices = torch.arange(n, dtype=torch.float32, device=logits.device).view(1, n, 1, 1)
            aimed = self.aimed_index(slice_index, target, stack)
            distance = (slices - aimed[:, None].float()).abs()                       # (B, N, H, W)
            value = value + w.distance * (prob * distance).sum(dim=1).mean()
        return value

    def aimed_index(self, slice_index, target, stack) -> torch.Tensor:
        """The slice (B, H, W) the cross-entropy and the distance term aim at."""
        if self.ce_target == "true":
            return slice_index
        if target.shape[1] < 2:
            raise InputError("--ce_target sharpest needs the all-in-focus images (--all_in_focus)")
        return sharpest_slice_index(stack.float(), target[:, 1], slice_index)

    def fusion_error(self, logits, target, stack, slice_index) -> torch.Tensor:
        """Mean L1 between the blend's fused image and the all-in-focus image: target[:, 1] when the
        target has that channel, else the slice the ground truth picks."""
        fused = blended_image(stack.float(), logits, self.card)[0][:, 0]                # (B, H, W)
        if target.shape[1] > 1:
            all_in_focus = target[:, 1]                                              # (B, H, W)
        else:
            all_in_focus = stack.gather(1, slice_index[:, None])[:, 0]              # (B, H, W)
        return (fused - all_in_focus).abs().mean()
