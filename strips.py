"""The card's decoding at full resolution, in strips of rows: memory of the stack as read.

When the network has seen a shrunk stack (working_scale.py), its logits are
decoded at the input's size. Holding N float copies of a 24 MP stack would
take gigabytes, so ``fuse_in_strips`` walks down the image in strips: each
strip, grown by what the card's decoding reaches (``FusionCard.halo``),
gets its slices converted to float, the logits and the blend's network
scores resized to it from the network's size, and fusion.py's rules decode
it; its interior is kept. Every strip's interior is what the whole image's
decoding gives there (the strips are grown by all the rules reach). A
guided depth is filtered last, on the full-size fused image, index and
confidence, box by box (``tiling.refined_tiles``), as the tiled path does.
"""
import numpy as np
import torch

from fast_inference import grow_box
from fusion import (FusionCard, blend, depth_confidence, fuse_colour, index_and_depth, network_scores,
                    prior_scores)
from model import gather_slices
from tiling import network_input_crop, refined_tiles, resized_crop

# Working memory of one strip: about this many float32 values per slice and pixel of it
# (the slices, logits, prior, weights and their blurred copies), within STRIP_BYTES.
STRIP_FLOATS_PER_SAMPLE = 12
STRIP_BYTES = 512 * 1024 ** 2
MIN_STRIP_ROWS = 16


def strip_rows(num_slices: int, width: int, halo: int, budget: int = STRIP_BYTES) -> int:
    """Rows of one strip's interior so that the strip with its halo stays within ``budget`` bytes."""
    rows = budget // (4 * STRIP_FLOATS_PER_SAMPLE * num_slices * width) - 2 * halo
    return max(MIN_STRIP_ROWS, int(rows))


def fuse_in_strips(images, gray: np.ndarray, logits: torch.Tensor, card: FusionCard, coarse_energy=None,
                   rows=None, progress=None):
    """Decode logits given at the network's (smaller) size on the full-size stack, strip by strip.

    images: the N slices as read (uint8/uint16, HxW or HxWx3); gray: their gray
    (N, H, W) in the same integer type; logits (N, h, w) of the whole image at
    the network's size; coarse_energy (N, h, w) or None: ``fusion.soft_weights``'.
    The blend's network part (``fusion.network_scores``) is computed at the
    network's size and resized with the logits (both are smooth there); the
    focus prior's full-size part, the blend, the index and the colour image
    at full size. rows: strip height (default: ``strip_rows``). Returns (fused
    gray (H, W) float32, depth (H, W) float32, index (H, W) int64, colour fused
    like images[0]).
    """
    n, h, w = gray.shape
    halo = card.halo()
    rows = rows or strip_rows(n, w, halo)
    fused = torch.empty((1, 1, h, w), dtype=torch.float32)
    depth = torch.empty((1, 1, h, w), dtype=torch.float32)
    index = torch.empty((1, h, w), dtype=torch.int64)
    confidence = torch.empty((1, 1, h, w), dtype=torch.float32) if card.refines_depth else None
    colour = np.empty_like(images[0])
    scores = network_scores(logits[None], card, None if coarse_energy is None else coarse_energy[None])[0] \
        if card.fusion_temperature else None

    def resized(maps, y0, y1):      # rows y0..y1 of ``maps`` (N, h', w') resized to (H, W), as (1, N, rows, W)
        return resized_crop(lambda a, b, c, d: maps[:, a:b, c:d].float(), maps.shape[1:], (h, w),
                            (y0, y1), (0, w))[None]

    starts = range(0, h, rows)
    for r0 in (progress(starts, desc="decode", unit="strip", leave=False) if progress else starts):
        r1 = min(h, r0 + rows)
        y0, y1, _, _ = grow_box((r0, r1, 0, w), halo, (h, w))
        inner = slice(r0 - y0, r1 - y0)
        x = network_input_crop(gray, (y0, y1), (0, w), (h, w))[:, 0][None]          # (1, N, rows', W)
        part_logits = resized(logits, y0, y1)
        part_index, part_depth = index_and_depth(part_logits, card.index_rule)
        if scores is None:
            part_fused, weights = gather_slices(x, part_index), None
        else:
            weights = torch.softmax(resized(scores, y0, y1) + prior_scores(x, card, coarse_energy is not None), dim=1)
            part_fused = blend(x, weights, card)
        fused[..., r0:r1, :] = part_fused[..., inner, :]
        depth[..., r0:r1, :] = part_depth[..., inner, :]
        index[:, r0:r1] = part_index[:, inner]
        if confidence is not None:
            confidence[..., r0:r1, :] = depth_confidence(part_logits, weights)[..., inner, :]
        colour[r0:r1] = fuse_colour([im[y0:y1] for im in images], part_index[0].numpy(),
                                    None if weights is None else weights[0].numpy(), card)[inner]
    if confidence is not None:
        depth = refined_tiles(fused, index, confidence, n, [(r0, min(h, r0 + rows), 0, w) for r0 in starts], (h, w))
    return fused[0, 0].numpy(), depth[0, 0].numpy(), index[0].numpy(), colour
