"""Fusion tile by tile, with memory that does not grow with the image (``--max_memory``).

The network's image-wide statistics (GroupNorm means/variances,
channel-attention pools) are accumulated over tile interiors in statistics
passes and then applied to every tile; the GRU gets a halo that makes it
exact (2 pixels per slice) and the feature extractor a wider one, so the
tiles stay close to whole-image results (docs/performance.md). Each tile's
focus logits are then decoded with the checkpoint's card like the whole
image's (fusion.py): its views (each with its own statistics), and a blend
on the tile grown by what the blend reaches (``FusionCard.halo``); only the
min-max of the released index rule is image-wide, and it is taken over all
tiles. A refined depth (the card's ``depth_rule``) is filtered last, box by
box on the full-size fused image, index and confidence, each box grown by
the filter's reach, so it is the whole image's.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from fast_inference import CHANNELS_LAST, extract_features, grow_box, gru_logits, gru_tile_side, tile_boxes
from fusion import (DEPTH_RADIUS, Fused, blended_image, depth_confidence, guided_filter_reach, refined_depth, unview,
                    view)
from memory import GIB, return_freed_memory
from model import depth_to_index, expected_slice_number, gather_slices
from utils import SIZE_MULTIPLE, InputError, next_multiple

DEFAULT_FEATURE_HALO = 160      # pixels of context around a tile for the feature extractor
_FIXED_BYTES = 600 * 1024 ** 2  # interpreter, torch, model and allocator slack (measured ~450 MB)


def _lerp_along(y: torch.Tensor, dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of y along ``dim`` at fractional positions pos (1-D, float64).

    Positions outside [0, size - 1] are clamped, as PyTorch's bilinear resize does.
    """
    size = y.shape[dim]
    pos = pos.clamp(0, size - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=size - 1)
    frac = (pos - lo).to(y.dtype)
    shape = [1] * y.dim()
    shape[dim] = -1
    frac = frac.view(shape)
    # Advanced indexing, not index_select: on channels-last tensors index_select
    # along W is 3-4x slower (it was 60% of a tile's feature extraction).
    before = (slice(None),) * dim
    return torch.lerp(y[before + (lo,)], y[before + (hi,)], frac)


def _resize_positions(out_start: int, out_count: int, in_size: int, out_size: int) -> torch.Tensor:
    """Source positions of output pixels out_start.. for a bilinear resize with
    align_corners=False (the released resize up to a multiple of 32)."""
    out = torch.arange(out_start, out_start + out_count, dtype=torch.float64)
    return ((out + 0.5) * (in_size / out_size) - 0.5).clamp_min(0)


def _to_float(array) -> torch.Tensor:
    """uint8 / uint16 numpy or a float tensor -> float32 tensor in [0, 1]."""
    if torch.is_tensor(array):
        return array.float()
    scale = float(np.iinfo(array.dtype).max) if array.dtype.kind in "ui" else 1.0
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)) / scale


def network_input_crop(stack, rows, cols, size) -> torch.Tensor:
    """Rows and cols (start, stop) of the stack resized to ``size`` (H', W').

    stack (N, H, W): uint8/uint16 numpy or float tensor in [0, 1]. Returns
    (N, 1, rows, cols) float32 in [0, 1]: only the source pixels the crop
    needs are converted, so the stack can stay in its integer type.
    """
    n, h, w = stack.shape
    if (h, w) == tuple(size):
        return _to_float(stack[:, rows[0]:rows[1], cols[0]:cols[1]])[:, None]
    pos_y = _resize_positions(rows[0], rows[1] - rows[0], h, size[0])
    pos_x = _resize_positions(cols[0], cols[1] - cols[0], w, size[1])
    y0, y1 = int(pos_y[0].floor()), min(h, int(pos_y[-1].floor()) + 2)
    x0, x1 = int(pos_x[0].floor()), min(w, int(pos_x[-1].floor()) + 2)
    crop = _to_float(stack[:, y0:y1, x0:x1])
    crop = _lerp_along(crop, 1, pos_y - y0)
    return _lerp_along(crop, 2, pos_x - x0)[:, None]


class TileContext:
    """Feature-extraction context for one crop: image-wide statistics over tiles.

    ``given`` maps each group norm (``ebn1``.., ``dbn1``..) to global
    (N, G) means and variances and each channel-attention pool (``u1``..) to
    global (N, C) means; where it is None the crop's own statistics are used.
    ``collect``, a StatsAccumulator, receives sums over the tile interior.
    """

    def __init__(self, crop, interior, size, slices, given=None, collect=None):
        self.crop, self.interior, self.size = crop, interior, size   # (y0, y1, x0, x1) at full size
        self.slices, self.given, self.collect = slices, given, collect

    def _level(self, y):
        return int(round(math.log2((self.crop[1] - self.crop[0]) / y.shape[2])))

    def _interior_of(self, y):
        s = 2 ** self._level(y)
        (cy, _, cx, _), (iy0, iy1, ix0, ix1) = self.crop, self.interior
        return y[:, :, (iy0 - cy) // s:(iy1 - cy) // s, (ix0 - cx) // s:(ix1 - cx) // s]

    def norm(self, key, norm, y):
        groups = norm.num_groups
        b, c = y.shape[:2]
        if self.collect is not None:
            inner = self._interior_of(y).double().reshape(b, groups, -1).cpu()
            self.collect.add(key, self.slices, inner.sum(-1), (inner * inner).sum(-1), inner.shape[-1])
        if self.given is None:
            return F.group_norm(y, groups, norm.weight, norm.bias, norm.eps)
        mean, var = self.given[key]
        mean, var = mean[self.slices].to(y.device, torch.float32), var[self.slices].to(y.device, torch.float32)
        rstd = torch.rsqrt(var + norm.eps).repeat_interleave(c // groups, dim=1)
        scale = rstd * norm.weight                                           # (b, C)
        shift = norm.bias - mean.repeat_interleave(c // groups, dim=1) * scale
        return y * scale[:, :, None, None] + shift[:, :, None, None]

    def pool(self, key, u):
        if self.collect is not None:
            inner = self._interior_of(u).double().flatten(2).cpu()
            self.collect.add(key, self.slices, inner.sum(-1), None, inner.shape[-1])
        if self.given is None:
            return u.mean(dim=(2, 3))
        return self.given[key][0][self.slices].to(u.device, u.dtype)

    def up(self, y):
        """x2 bilinear upsampling with align_corners=True on the *whole image's* grid."""
        level = self._level(y)
        for dim, start, full in ((2, self.crop[0], self.size[0]), (3, self.crop[2], self.size[1])):
            n_in = full >> level                                  # whole-image size at this level
            out = torch.arange(start >> (level - 1), (start >> (level - 1)) + 2 * y.shape[dim],
                               dtype=torch.float64)
            y = _lerp_along(y, dim, out * ((n_in - 1) / (2 * n_in - 1)) - (start >> level))
        return y.contiguous(memory_format=CHANNELS_LAST)


class StatsAccumulator:
    """Per-slice sums over tile interiors -> image-wide means and variances."""

    def __init__(self, num_slices):
        self.num_slices = num_slices
        self.sums = {}

    def add(self, key, slices, total, total_sq, count):
        if key not in self.sums:
            width = total.shape[1]
            self.sums[key] = [torch.zeros(self.num_slices, width, dtype=torch.float64),
                              torch.zeros(self.num_slices, width, dtype=torch.float64),
                              torch.zeros(self.num_slices, 1, dtype=torch.float64)]
        entry = self.sums[key]
        entry[0][slices] += total
        if total_sq is not None:
            entry[1][slices] += total_sq
        entry[2][slices] += count

    def finish(self):
        """key -> (mean (N, W), variance (N, W)), float64."""
        out = {}
        for key, (total, total_sq, count) in self.sums.items():
            mean = total / count
            out[key] = (mean, (total_sq / count - mean * mean).clamp_min(0))
        return out


def tile_bytes(tile: int, num_slices: int, feature_halo: int, gru_halo: int, chunk: int = 2,
               workers: int = 1, fusion_halo: int = 0, blends: bool = False) -> int:
    """Peak working memory of one GRU tile of side ``tile``.

    Two moments compete: while the feature extractor runs one chunk of
    slices on the tile grown by both halos (about 90 floats per slice and
    pixel), the features of the slices done so far are kept on the GRU
    window only (8 floats per slice and pixel); then the GRU adds its logits
    and, per worker thread, the states of one of its own small tiles (16
    floats per slice, kept for the backward pass, plus step temporaries on
    the tile grown by 2 pixels per step). Coefficients measured with a
    20 ms RSS sampler on 24 x 640 x 640 and 30 x 1500 x 1000 stacks.
    With ``blends`` a third moment: the card's blend on the tile grown by
    ``fusion_halo`` (scores, sharpness, weights and the two bands' blurs:
    about 12 floats per slice and pixel, counted from its tensors, not
    measured).
    """
    window = tile + 2 * gru_halo
    fe_pixels = (window + 2 * feature_halo) ** 2
    features = 4 * 8 * num_slices * window ** 2
    extracting = features + 4 * (90 * chunk + 30) * fe_pixels
    small = min(gru_tile_side(num_slices), window)
    per_worker = 4 * (24 * num_slices * small ** 2 + 150 * (small + 4 * num_slices) ** 2)
    recurring = features + 4 * num_slices * window ** 2 + workers * per_worker
    blending = 4 * 12 * num_slices * (tile + 2 * fusion_halo) ** 2 if blends else 0
    return max(extracting, recurring, blending)


def plan_tiles(size, num_slices, max_memory, fixed_bytes=0, feature_halo=0, gru_halo=0, chunk=2, workers=1,
               fusion_halo=0, blends=False):
    """Largest tile side (a multiple of 32) whose working memory fits in ``max_memory`` GiB.

    fixed_bytes: what is held whatever the tile (input stack, outputs).
    InputError when even the smallest tile does not fit.
    """
    budget = max_memory * GIB - fixed_bytes - _FIXED_BYTES
    side = next_multiple(max(size))

    def working(side):
        return tile_bytes(side, num_slices, feature_halo, gru_halo, chunk, workers, fusion_halo, blends)

    while side >= SIZE_MULTIPLE and working(side) > budget:
        side -= SIZE_MULTIPLE
    if side < SIZE_MULTIPLE:
        need = (_FIXED_BYTES + fixed_bytes + working(SIZE_MULTIPLE)) / GIB
        raise InputError(f"--max_memory {max_memory:g} GiB is too small for a {num_slices}-slice stack "
                         f"of {size[1]}x{size[0]}; it needs at least {need:.2f} GiB")
    return side


def plan_stats_tile(size, max_memory, fixed_bytes=0, halo=0, chunk=2):
    """Tile side of the statistics passes: the feature extractor of one chunk of
    slices only (about 100 floats per crop pixel and slice), so these tiles are
    much larger. The whole image when it fits in one crop (no halo beyond the borders):
    its statistics are then exact, where those of several tiles drift (coffee example,
    8 x 480 x 320 at --max_memory 1: 98.3% index agreement with 2 x 2 statistics tiles)."""
    whole = next_multiple(max(size))
    if not max_memory:
        return whole
    budget = max_memory * GIB - fixed_bytes - _FIXED_BYTES
    if size[0] * size[1] * 400 * chunk <= budget:
        return whole
    side = math.isqrt(max(0, int(budget // (400 * chunk)))) - 2 * halo
    return max(SIZE_MULTIPLE, min(side // SIZE_MULTIPLE * SIZE_MULTIPLE, whole))


# ----------------------------------------------------------------------------- views of boxes


def view_box(box, k, size):
    """Box (y0, y1, x0, x1) of an image of ``size`` -> the same pixels' box in ``fusion.view(image, k)``."""
    y0, y1, x0, x1 = box
    if k & 1:
        x0, x1 = size[1] - x1, size[1] - x0
    if k & 2:
        y0, y1 = size[0] - y1, size[0] - y0
    return (x0, x1, y0, y1) if k & 4 else (y0, y1, x0, x1)


def unview_box(box, k, size):
    """The inverse of ``view_box``: a box of view k -> the box of the image of ``size``."""
    if k & 4:
        box = (box[2], box[3], box[0], box[1])
    return view_box(box, k & 3, size)        # the mirrors are their own inverses


def view_size(size, k):
    return (size[1], size[0]) if k & 4 else tuple(size)


# ----------------------------------------------------------------------------- the tiled path


def tiled_fuse(model, card, stack, max_memory=None, tile=None, halo=None, stat_passes=2,
               precision="fp32", chunk=2, progress=None, stats_tile=None, reserved_bytes=0) -> Fused:
    """Fuse one stack tile by tile with image-wide statistics, decoded by ``card``; memory bounded by the tile.

    stack (N, H, W): uint8/uint16 numpy gray slices, or a float tensor in [0, 1].
    The network runs at (H', W'), the next multiples of 32, as released.
    ``tile`` (a multiple of 32) or ``max_memory`` (GiB) sets the tile size;
    ``halo`` is the feature extractor's context around each tile (default 160:
    on the leaves stack at 128-px tiles, 99.8% index agreement with the
    whole-image result, against 98.9% with 96);
    the GRU pass adds 2N rounded up to 32 (exact for the GRU), with a blend
    2N + ``card.halo()`` rounded up (exact for the blend too).
    ``stat_passes`` passes over the tiles gather the GroupNorm and
    channel-attention statistics (each pass makes one more layer exact).
    ``stats_tile`` is the tile of the statistics passes (default: the largest
    that ``max_memory`` allows for one slice, or the whole image).
    ``reserved_bytes``: memory the caller holds meanwhile (e.g. the colour
    slices kept for the colour fused image), taken out of ``max_memory``.
    Returns ``fusion.Fused`` at (H', W') with a batch of one; a blend keeps
    its weights (N full-size maps, counted in the memory plan).
    """
    n, h, w = stack.shape
    size = (next_multiple(h), next_multiple(w))
    device = next(model.parameters()).device
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    halo = DEFAULT_FEATURE_HALO if halo is None else halo
    blends, fusion_halo = bool(card.fusion_temperature), card.halo()
    # Each GRU step sees two pixels further; a blend needs logits fusion_halo px beyond the tile.
    gru_halo = next_multiple(2 * n + fusion_halo)
    held = stack.numel() * stack.element_size() if torch.is_tensor(stack) else stack.nbytes
    held += size[0] * size[1] * 16 + reserved_bytes              # outputs and the caller's share
    if blends:
        held += 2 * 4 * n * size[0] * size[1]    # the weights, and their copy resized to the input
    refines = card.refines_depth
    if refines:
        held += 4 * size[0] * size[1]            # the decoding's confidence, one full-size map
    if tile is None:
        tile = (plan_tiles(size, n, max_memory, held, halo, gru_halo, chunk, workers, fusion_halo, blends)
                if max_memory else 512)
    if stats_tile is None:
        stats_tile = plan_stats_tile(size, max_memory, held, halo, chunk)
    if stats_tile >= max(size):
        stat_passes = 1                 # one tile: its own statistics are the image's
    if tile % SIZE_MULTIPLE or halo % SIZE_MULTIPLE:
        raise ValueError(f"tile ({tile}) and halo ({halo}) must be multiples of {SIZE_MULTIPLE}")
    fe = model.feature_extraction
    bigru = model.layer_interaction.layer_interaction_depth
    boxes = tile_boxes(size, tile)
    stats_boxes = [tile_boxes(view_size(size, k), stats_tile) for k in range(card.views)]
    total_steps = card.views * len(boxes) + stat_passes * sum(map(len, stats_boxes))
    bar = progress(total=total_steps, desc="tiles", unit="tile") if progress else None

    def features(k, crop, interior, given, collect, keep=None):
        """Run the feature extractor on ``crop`` of view k, one chunk of slices at a time.

        Returns the (N, 8, h, w) features of the ``keep`` window only (the
        halo beyond it served the extractor's context), or None without one
        (statistics passes)."""
        source = unview_box(crop, k, size)
        rows, cols = (source[0], source[1]), (source[2], source[3])
        kept = None
        for s in range(0, n, chunk):
            sl = slice(s, min(n, s + chunk))
            x = view(network_input_crop(stack[sl], rows, cols, size), k).to(device)
            ctx = TileContext(crop, interior, view_size(size, k), sl, given, collect)
            part = extract_features(fe, x, ctx)
            del x
            return_freed_memory()
            if keep is not None:
                if kept is None:
                    kept = part.new_empty((n, part.shape[1], keep[1] - keep[0], keep[3] - keep[2]))
                kept[sl] = part[:, :, keep[0] - crop[0]:keep[1] - crop[0], keep[2] - crop[2]:keep[3] - crop[2]]
            del part
        return kept

    def tile_logits(box, around):
        """Focus logits (N, h, w) on ``around`` (``box`` grown by at most 32 px), averaged over the
        card's views as ``fusion.view_logits`` does."""
        total = None
        for k in range(card.views):
            inner = view_box(around, k, size)
            window = grow_box(view_box(box, k, size), gru_halo, view_size(size, k))   # the GRU is exact on inner
            crop = grow_box(window, halo, view_size(size, k))                  # what the extractor needs around it
            feats = features(k, crop, inner, given[k], None, keep=window)   # (N, 8, h, w) on the window
            logits = gru_logits(bigru, feats, precision, workers=workers, bounded=True)
            del feats
            part = unview(logits[:, inner[0] - window[0]:inner[1] - window[0],
                                 inner[2] - window[2]:inner[3] - window[2]], k)
            total = part if total is None else total + part
            if bar:
                bar.update()
        return total / card.views if card.views > 1 else total

    with torch.inference_mode():
        given = []
        for k in range(card.views):
            view_given = None
            for _ in range(stat_passes):
                collect = StatsAccumulator(n)
                for box in stats_boxes[k]:
                    # Only the statistics are kept: the GRU needs no extra halo here.
                    features(k, grow_box(box, halo, view_size(size, k)), box, view_given, collect)
                    if bar:
                        bar.update()
                view_given = collect.finish()
            given.append(view_given)
        number = torch.empty(size, dtype=torch.float32)          # expected slice number in [1, N] (argmax: index)
        fused = torch.empty((1, 1) + size, dtype=torch.float32)
        weights = torch.empty((1, n) + size, dtype=torch.float32) if blends else None
        confidence = torch.empty((1, 1) + size, dtype=torch.float32) if refines else None
        for box in boxes:
            around = grow_box(box, fusion_halo, size)              # what the blend needs
            logits = tile_logits(box, around)
            inside = (slice(box[0] - around[0], box[1] - around[0]), slice(box[2] - around[2], box[3] - around[2]))
            inner = logits[(slice(None),) + inside]
            if card.index_rule == "argmax":   # per pixel: no image-wide statistic needed
                number[box[0]:box[1], box[2]:box[3]] = inner.argmax(dim=0).float().cpu()
            else:
                number[box[0]:box[1], box[2]:box[3]] = expected_slice_number(inner[None])[0, 0].cpu()
            if blends:
                x = network_input_crop(stack, (around[0], around[1]), (around[2], around[3]), size)[:, 0]
                part, part_weights = blended_image(x[None].to(logits.device), logits[None], card)
                fused[:, :, box[0]:box[1], box[2]:box[3]] = part[(slice(None), slice(None)) + inside].cpu()
                weights[:, :, box[0]:box[1], box[2]:box[3]] = part_weights[(slice(None), slice(None)) + inside].cpu()
            if refines:     # per pixel: the tile's interior alone is exact
                confidence[:, :, box[0]:box[1], box[2]:box[3]] = depth_confidence(
                    inner[None], weights[:, :, box[0]:box[1], box[2]:box[3]] if blends else None).cpu()
        if bar:
            bar.close()
        if card.index_rule == "argmax":
            index = number.long()                                   # (H', W')
            depth = number.div_(max(n - 1, 1))
        else:
            lo, hi = number.min(), number.max()
            depth = number.sub_(lo).div_((hi - lo).clamp_min(1e-12))   # in place: one full-size float map
            index = depth_to_index(depth[None, None], n)[0]            # (H', W')
        if not blends:
            for box in boxes:
                rows, cols = (box[0], box[1]), (box[2], box[3])
                x = network_input_crop(stack, rows, cols, size)[:, 0]  # (N, h, w)
                fused[0, 0, box[0]:box[1], box[2]:box[3]] = gather_slices(
                    x[None], index[None, box[0]:box[1], box[2]:box[3]])[0, 0]
        depth = depth[None, None]
        if refines:
            depth = refined_tiles(fused, index[None], confidence, n, boxes, size)
    return Fused(fused, depth, index[None], weights)


def refined_tiles(fused, index, confidence, num_slices, boxes, size) -> torch.Tensor:
    """``fusion.refined_depth`` of full-size maps (fused and confidence (1, 1, H, W), index
    (1, H, W)), box by box on crops grown by the filter's reach: the whole image's result, with
    working memory of a few crops."""
    depth = torch.empty_like(fused)
    reach = guided_filter_reach(DEPTH_RADIUS)
    for box in boxes:
        y0, y1, x0, x1 = grow_box(box, reach, size)
        part = refined_depth(fused[..., y0:y1, x0:x1], index[:, y0:y1, x0:x1], confidence[..., y0:y1, x0:x1],
                             num_slices)
        depth[..., box[0]:box[1], box[2]:box[3]] = part[..., box[0] - y0:box[1] - y0, box[2] - x0:box[3] - x0]
    return depth
