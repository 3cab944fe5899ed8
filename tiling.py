"""Fusion tile by tile, with memory that does not grow with the image (``--max_memory``).

Two ways, chosen by the memory bound. The exact path, when one view's
feature-extractor output at half resolution fits for every slice: the
extractor runs on the whole image one slice at a time (its full-resolution
first level in strips of rows, its last upsampling on windows), so its
statistics are the image's own, and the GRU runs in tiles grown by its reach
(2 pixels per slice): the whole image's focus logits up to float rounding.
Otherwise context tiles: the network's image-wide statistics (GroupNorm
means/variances, channel-attention pools) are accumulated over tile
interiors in statistics passes and then applied to every tile; the GRU gets
a halo that makes it exact and the feature extractor a wider one, so the
tiles stay close to whole-image results (docs/performance.md). Either way
the focus logits are decoded with the checkpoint's card like the whole
image's (fusion.py): its views (each with its own statistics), and a blend
on the tile grown by what the blend reaches (``FusionCard.halo``); only the
min-max of the released index rule is image-wide, and it is taken over all
tiles. A refined depth (the card's ``depth_rule``) is filtered last, box by
box on the full-size fused image, index and confidence, each box grown by
the filter's reach, so it is the whole image's.
"""
import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from fast_inference import (CHANNELS_LAST, WholeImage, extract_features, first_level, grow_box, gru_logits,
                            GRU_TILE_SIDE, half_resolution_features, run_jobs, tile_boxes)
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


def _align_corners_up(y, dim, y_start, out_start, out_count, n_in):
    """Samples out_start.. (out_count of them) of the x2 bilinear upsampling, align_corners=True, of a
    whole-image axis of n_in samples, from y along ``dim`` holding samples y_start.. of that axis."""
    out = torch.arange(out_start, out_start + out_count, dtype=torch.float64)
    return _lerp_along(y, dim, out * ((n_in - 1) / (2 * n_in - 1)) - y_start)


def _to_float(array) -> torch.Tensor:
    """uint8 / uint16 numpy or a float tensor -> float32 tensor in [0, 1]."""
    if torch.is_tensor(array):
        return array.float()
    scale = float(np.iinfo(array.dtype).max) if array.dtype.kind in "ui" else 1.0
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)) / scale


def resized_crop(read, in_size, out_size, rows, cols) -> torch.Tensor:
    """Rows and cols (start, stop) of an image of ``in_size`` (H, W) resized bilinearly to ``out_size``
    (align_corners=False, as ``F.interpolate``), reading only the source window they need:
    read(y0, y1, x0, x1) -> float tensor (C, y1 - y0, x1 - x0). Returns (C, rows, cols)."""
    if tuple(in_size) == tuple(out_size):
        return read(rows[0], rows[1], cols[0], cols[1])
    pos_y = _resize_positions(rows[0], rows[1] - rows[0], in_size[0], out_size[0])
    y0, y1 = int(pos_y[0].floor()), min(in_size[0], int(pos_y[-1].floor()) + 2)
    if tuple(cols) == (0, out_size[1]):     # whole rows: the plain resize along them is the same and faster
        part = _lerp_along(read(y0, y1, 0, in_size[1]), 1, pos_y - y0)
        return F.interpolate(part[None], size=(part.shape[1], out_size[1]), mode="bilinear", align_corners=False)[0]
    pos_x = _resize_positions(cols[0], cols[1] - cols[0], in_size[1], out_size[1])
    x0, x1 = int(pos_x[0].floor()), min(in_size[1], int(pos_x[-1].floor()) + 2)
    crop = read(y0, y1, x0, x1)
    return _lerp_along(_lerp_along(crop, 1, pos_y - y0), 2, pos_x - x0)


def network_input_crop(stack, rows, cols, size) -> torch.Tensor:
    """Rows and cols (start, stop) of the stack resized to ``size`` (H', W').

    stack (N, H, W): uint8/uint16 numpy or float tensor in [0, 1]. Returns
    (N, 1, rows, cols) float32 in [0, 1]: only the source pixels the crop
    needs are converted, so the stack can stay in its integer type.
    """
    return resized_crop(lambda y0, y1, x0, x1: _to_float(stack[:, y0:y1, x0:x1]), stack.shape[1:], size,
                        rows, cols)[:, None]


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

    def gather(self, key, groups, y):
        """Add y's per-group sums over the tile interior to ``collect``."""
        inner = self._interior_of(y)
        b, c = inner.shape[:2]
        # Per channel first (a reduction along the memory order of channels-last), in float64.
        total = inner.sum(dim=(2, 3), dtype=torch.float64).reshape(b, groups, -1).sum(-1).cpu()
        total_sq = torch.linalg.vector_norm(inner, dim=(2, 3), dtype=torch.float64).square()
        total_sq = total_sq.reshape(b, groups, -1).sum(-1).cpu()
        self.collect.add(key, self.slices, total, total_sq, inner[0, 0].numel() * (c // groups))

    def norm(self, key, norm, y):
        groups = norm.num_groups
        b, c = y.shape[:2]
        if self.collect is not None:
            self.gather(key, groups, y)
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
            y = _align_corners_up(y, dim, start >> level, start >> (level - 1), 2 * y.shape[dim], full >> level)
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
    recurring = features + 4 * num_slices * window ** 2 + workers * _gru_worker_bytes(num_slices, window)
    blending = 4 * 12 * num_slices * (tile + 2 * fusion_halo) ** 2 if blends else 0
    return max(extracting, recurring, blending)


def _gru_worker_bytes(num_slices, window):
    """One GRU worker thread's own small tile on a window of side ``window`` (see ``tile_bytes``)."""
    small = min(GRU_TILE_SIDE, window)
    return 4 * (24 * num_slices * small ** 2 + 150 * (small + 4 * num_slices) ** 2)


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


def view_input(stack, k, box, size, device) -> torch.Tensor:
    """The network's input (b, 1, h, w) on ``box`` of view k of the stack (b, H, W) resized to ``size``."""
    source = unview_box(box, k, size)
    return view(network_input_crop(stack, (source[0], source[1]), (source[2], source[3]), size), k).to(device)


# ----------------------------------------------------------------------------- exact features at half resolution

STRIP_ROWS = 64          # full-resolution rows of one strip of the extractor's first level
# Peak bytes per full-resolution pixel of half_resolution_features on one slice, its input t_1 and
# output included (68-74 measured with a 5 ms RSS sampler on 1536 x 1152, 1 and 2 threads), and
# the slice's network input (4).
HALF_RES_BYTES = 80


def first_level_in_strips(fe, x, strip=STRIP_ROWS) -> torch.Tensor:
    """``fast_inference.first_level`` of the whole network input x (b, 1, H', W') -> t_1 (b, 8, H'/2, W'/2).

    Its full-resolution tensors only ever exist for a strip of rows: encoder1
    is a 3x3 convolution and the pooling 2 x 2, so the strips are exact; a
    first pass sums ebn1's statistics over the strips, the second applies them.
    """
    b, _, h, w = x.shape
    strips = [(r, min(r + strip, h), 0, w) for r in range(0, h, strip)]
    # the conv reaches 1 row; 2 keep the pooling's row pairs aligned
    crops = [grow_box(box, 2, (h, w)) for box in strips]
    collect = StatsAccumulator(b)
    for box, crop in zip(strips, crops):
        t = fe.encoder1(x[:, :, crop[0]:crop[1]].contiguous(memory_format=CHANNELS_LAST))
        TileContext(crop, box, (h, w), slice(0, b), collect=collect).gather("ebn1", fe.ebn1.num_groups, t)
    given, t1 = collect.finish(), None
    for box, crop in zip(strips, crops):
        t = first_level(fe, x[:, :, crop[0]:crop[1]], TileContext(crop, box, (h, w), slice(0, b), given))
        if t1 is None:
            t1 = torch.empty((b, t.shape[1], h // 2, w // 2), device=t.device, memory_format=CHANNELS_LAST)
        t1[:, :, box[0] // 2:box[1] // 2] = t[:, :, (box[0] - crop[0]) // 2:(box[1] - crop[0]) // 2]
    return t1


def half_resolution_stack(fe, stack, k, size, device, workers=1) -> torch.Tensor:
    """``fe.final``'s output (N, 8, H'/2, W'/2) of view k for every slice: the feature extractor on the
    whole image, so with its own image-wide statistics, short of the last x2 upsampling (``features_on``).

    ``workers`` threads take one slice each (each holds a slice's working memory, HALF_RES_BYTES)."""
    n = stack.shape[0]
    vsize = view_size(size, k)
    z = torch.empty((n, fe.final.out_channels, vsize[0] // 2, vsize[1] // 2), device=device,
                    memory_format=CHANNELS_LAST)

    def one_slice(s):
        x = view_input(stack[s:s + 1], k, (0, vsize[0], 0, vsize[1]), size, device)
        t1 = first_level_in_strips(fe, x)
        del x
        z[s:s + 1] = half_resolution_features(fe, t1, WholeImage())
        del t1
        return_freed_memory()

    run_jobs([partial(one_slice, s) for s in range(n)], workers, one_thread=True)
    return z


def _source_span(start, stop, n_in):
    """Samples (lo, hi) of a whole-image axis of n_in samples that its x2 upsampling reads for outputs start..stop."""
    scale = (n_in - 1) / (2 * n_in - 1)
    return int(start * scale), min(n_in, int((stop - 1) * scale) + 2)


def features_on(z, window, workers=1) -> torch.Tensor:
    """The extractor's features (N, 8, h, w) on ``window`` (y0, y1, x0, x1) of the full-size image, from
    ``half_resolution_stack``'s z: its last x2 upsampling (on the whole image's grid) and sigmoid;
    ``workers`` threads take a slice each."""
    n, c, h2, w2 = z.shape
    y0, y1, x0, x1 = window
    (r0, r1), (c0, c1) = _source_span(y0, y1, h2), _source_span(x0, x1, w2)
    out = torch.empty((n, c, y1 - y0, x1 - x0), device=z.device, memory_format=CHANNELS_LAST)

    def one_slice(s):               # a slice at a time: the interpolation's temporaries stay small
        # (h, w, C) views of the channels-last memory: each gather moves C contiguous floats (2x faster)
        part = _align_corners_up(z[s, :, r0:r1, c0:c1].permute(1, 2, 0), 0, r0, y0, y1 - y0, h2)
        out[s].permute(1, 2, 0)[:] = _align_corners_up(part, 1, c0, x0, x1 - x0, w2).sigmoid_()

    run_jobs([partial(one_slice, s) for s in range(n)], workers, one_thread=True)
    return out


def half_resolution_bytes(tile, size, num_slices, fe_workers=1, workers=1, fusion_halo=0, blends=False) -> int:
    """Peak working memory of the exact path (``plan_half_resolution``) with GRU tiles of side ``tile``.

    Held throughout: one view's z (8 bytes per slice and full-size pixel)
    and the image's logits (4). Then three moments compete: ``fe_workers``
    slices in the extractor at once (HALF_RES_BYTES each, and a strip),
    a GRU tile (its features on the tile grown by the GRU's reach, 32 bytes
    per slice and pixel, the logits, the upsampling of a slice per worker
    thread, the workers' own small GRU tiles as in ``tile_bytes``), and the card's
    blend on a tile (as in ``tile_bytes``).
    """
    pixels = size[0] * size[1]
    held = 12 * num_slices * pixels
    extracting = fe_workers * (HALF_RES_BYTES * pixels + 4 * 30 * (STRIP_ROWS + 4) * max(size))
    window = min(tile + 4 * (num_slices - 1), max(size))
    recurring = (4 * (9 * num_slices + 24 * workers) * window ** 2
                 + workers * _gru_worker_bytes(num_slices, window))
    blending = 4 * 12 * num_slices * (tile + 2 * fusion_halo) ** 2 if blends else 0
    return held + max(extracting, recurring, blending)


def plan_half_resolution(size, num_slices, max_memory=None, fixed_bytes=0, workers=1, fusion_halo=0,
                         blends=False, smallest=128):
    """(GRU tile side, extractor threads) of the exact path within ``max_memory`` GiB (no bound: None),
    or None when even ``smallest`` tiles do not fit (then the context tiles run).

    The largest tile first (the GRU's halo is 2 (N - 1) px a side), then the most extractor threads.
    A tile smaller than the image is a multiple of the GRU's own tiles (``GRU_TILE_SIDE``) where it can
    be, so that these are the whole image's."""
    budget = max_memory * GIB - fixed_bytes - _FIXED_BYTES if max_memory else math.inf
    whole, small = next_multiple(max(size)), GRU_TILE_SIDE
    smallest = min(smallest, whole)           # an image smaller than that is one tile
    best = None
    for fe_workers in sorted({1, workers}):
        side = whole
        while side >= smallest and half_resolution_bytes(side, size, num_slices, fe_workers, workers,
                                                         fusion_halo, blends) > budget:
            side -= SIZE_MULTIPLE
        if small <= side < whole:
            side -= side % small
        if side >= smallest and (best is None or side >= best[0]):
            best = (side, fe_workers)
    return best


# ----------------------------------------------------------------------------- the tiled path


def tiled_fuse(model, card, stack, max_memory=None, tile=None, halo=None, stat_passes=2,
               precision="fp32", chunk=2, progress=None, stats_tile=None, reserved_bytes=0) -> Fused:
    """Fuse one stack tile by tile with image-wide statistics, decoded by ``card``; memory bounded by the tile.

    stack (N, H, W): uint8/uint16 numpy gray slices, or a float tensor in [0, 1].
    The network runs at (H', W'), the next multiples of 32, as released.

    Two ways, chosen by memory. Without ``tile``, when ``max_memory`` (GiB;
    None: no bound) holds one view's extractor output at half resolution
    for every slice (8 bytes per slice pixel) beside the image's logits (4),
    the exact path runs (``plan_half_resolution``): the extractor on the
    whole image one slice at a time, its full-resolution first and last
    steps in strips and windows, then the GRU in tiles grown by its reach
    (exact), the whole-image result up to float rounding.

    Otherwise (or with ``tile``) context tiles: ``tile`` (a multiple of 32,
    else planned from ``max_memory``) is the GRU tile and ``halo`` the
    feature extractor's context around it (default 160: on the leaves stack
    at 128-px tiles, 99.8% index agreement with the whole-image result,
    against 98.9% with 96); the GRU adds 2N rounded up to 32, with a blend
    2N + ``card.halo()`` rounded up (exact for the GRU and the blend).
    ``stat_passes`` passes over the tiles gather the GroupNorm and
    channel-attention statistics (each pass makes one more layer exact).
    ``stats_tile`` is the tile of the statistics passes (default: the largest
    that ``max_memory`` allows for one slice, or the whole image).

    ``reserved_bytes``: memory the caller holds meanwhile (e.g. the colour
    slices kept for the colour fused image), taken out of ``max_memory``.
    Returns ``fusion.Fused`` with a batch of one at (H', W'), except a blend
    on the exact path: like the whole image's, it is decoded at the input
    size (H, W) from the logits resized back, since resampling the fused
    image would soften it. A blend keeps its weights (N full-size maps,
    counted in the memory plan).
    """
    n, h, w = stack.shape
    size = (next_multiple(h), next_multiple(w))
    device = next(model.parameters()).device
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    blends, fusion_halo = bool(card.fusion_temperature), card.halo()
    held = stack.numel() * stack.element_size() if torch.is_tensor(stack) else stack.nbytes
    held += size[0] * size[1] * 16 + reserved_bytes              # outputs and the caller's share
    if blends:
        held += 2 * 4 * n * size[0] * size[1]    # the weights, and their copy resized to the input
    refines = card.refines_depth
    if refines:
        held += 4 * size[0] * size[1]            # the decoding's confidence, one full-size map
    plan = None if tile is not None else plan_half_resolution(size, n, max_memory, held, workers, fusion_halo,
                                                               blends)
    with torch.inference_mode():
        if plan:
            tile, fe_workers = plan
            logits_on, bar = exact_logits(model, card, stack, size, tile, fe_workers, workers, precision,
                                           progress)
        else:
            logits_on, tile, bar = _context_tile_logits(model, card, stack, size, max_memory, tile, halo, stat_passes,
                                                   precision, chunk, progress, stats_tile, held)
        # The exact path holds the whole image's logits, so a blend can be decoded at the input size.
        out = (h, w) if plan and blends else size
        boxes = tile_boxes(out, tile)
        number = torch.empty(out, dtype=torch.float32)           # expected slice number in [1, N] (argmax: index)
        fused = torch.empty((1, 1) + out, dtype=torch.float32)
        weights = torch.empty((1, n) + out, dtype=torch.float32) if blends else None
        confidence = torch.empty((1, 1) + out, dtype=torch.float32) if refines else None
        for box in boxes:
            around = grow_box(box, fusion_halo, out)               # what the blend needs
            logits = resized_crop(lambda y0, y1, x0, x1: logits_on(box, (y0, y1, x0, x1)), size, out,
                                  (around[0], around[1]), (around[2], around[3]))     # (the exact path ignores box)
            inside = (slice(box[0] - around[0], box[1] - around[0]), slice(box[2] - around[2], box[3] - around[2]))
            inner = logits[(slice(None),) + inside]
            if card.index_rule == "argmax":   # per pixel: no image-wide statistic needed
                number[box[0]:box[1], box[2]:box[3]] = inner.argmax(dim=0).float().cpu()
            else:
                number[box[0]:box[1], box[2]:box[3]] = expected_slice_number(inner[None])[0, 0].cpu()
            if blends:
                x = network_input_crop(stack, (around[0], around[1]), (around[2], around[3]), out)[:, 0]
                part, part_weights = blended_image(x[None].to(logits.device), logits[None], card)
                fused[:, :, box[0]:box[1], box[2]:box[3]] = part[(slice(None), slice(None)) + inside].cpu()
                weights[:, :, box[0]:box[1], box[2]:box[3]] = part_weights[(slice(None), slice(None)) + inside].cpu()
            if refines:     # per pixel: the tile's interior alone is exact
                confidence[:, :, box[0]:box[1], box[2]:box[3]] = depth_confidence(
                    inner[None], weights[:, :, box[0]:box[1], box[2]:box[3]] if blends else None).cpu()
            del logits
            return_freed_memory()
        del logits_on                       # the exact path's logits of the whole image
        return_freed_memory()
        if bar:
            bar.close()
        if card.index_rule == "argmax":
            index = number.long()                                   # (H', W')
            depth = number.div_(max(n - 1, 1))
        else:
            lo, hi = number.min(), number.max()
            depth = number.sub_(lo).div_((hi - lo).clamp_min(1e-12))   # in place: one full-size float map
            index = depth_to_index(depth[None, None], n)[0]            # (H', W') or (H, W)
        if not blends:
            for box in boxes:
                rows, cols = (box[0], box[1]), (box[2], box[3])
                x = network_input_crop(stack, rows, cols, size)[:, 0]  # (N, h, w)
                fused[0, 0, box[0]:box[1], box[2]:box[3]] = gather_slices(
                    x[None], index[None, box[0]:box[1], box[2]:box[3]])[0, 0]
        depth = depth[None, None]
        if refines:
            depth = refined_tiles(fused, index[None], confidence, n, boxes, out)
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


def exact_logits(model, card, stack, size, tile, fe_workers, workers, precision, progress):
    """The exact path's focus logits of the whole image (N, H', W'), averaged over the card's views
    as ``fusion.view_logits`` does -> (a function (box, around) -> the logits on ``around``, the progress bar)."""
    n = stack.shape[0]
    device = next(model.parameters()).device
    fe, bigru = model.feature_extraction, model.layer_interaction.layer_interaction_depth
    reach = 2 * (n - 1)                 # GRU step t sees 2 px further; the last state 2 (N - 1)
    total = torch.zeros((n,) + tuple(size), dtype=torch.float32)
    gru_boxes = [tile_boxes(view_size(size, k), tile) for k in range(card.views)]
    bar = progress(total=card.views * n + sum(map(len, gru_boxes)), desc="tiles", unit="step") if progress else None
    for k in range(card.views):
        vsize = view_size(size, k)
        z = half_resolution_stack(fe, stack, k, size, device, fe_workers)
        if bar:
            bar.update(n)
        for box in gru_boxes[k]:
            window = grow_box(box, reach, vsize)
            inner = (box[0] - window[0], box[1] - window[0], box[2] - window[2], box[3] - window[2])
            feats = features_on(z, window, workers)
            # Its own tiles start at the box corner: the whole image's, for tiles planned as multiples of theirs.
            logits = gru_logits(bigru, feats, precision, workers=workers, region=inner)
            del feats
            part = unview(logits[:, inner[0]:inner[1], inner[2]:inner[3]], k)
            y0, y1, x0, x1 = unview_box(box, k, size)
            total[:, y0:y1, x0:x1] += part.cpu()
            del logits, part
            return_freed_memory()
            if bar:
                bar.update()
        del z
        return_freed_memory()
    if card.views > 1:
        total /= card.views
    return (lambda box, around: total[:, around[0]:around[1], around[2]:around[3]].to(device)), bar


def _context_tile_logits(model, card, stack, size, max_memory, tile, halo, stat_passes, precision, chunk,
                         progress, stats_tile, held):
    """Context tiles (``tiled_fuse``): the statistics passes, then -> (a function (box, around) -> the
    focus logits on ``around``, averaged over the card's views; the tile side; the progress bar)."""
    n = stack.shape[0]
    device = next(model.parameters()).device
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    halo = DEFAULT_FEATURE_HALO if halo is None else halo
    blends, fusion_halo = bool(card.fusion_temperature), card.halo()
    # Each GRU step sees two pixels further; a blend needs logits fusion_halo px beyond the tile.
    gru_halo = next_multiple(2 * n + fusion_halo)
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
        kept = None
        for s in range(0, n, chunk):
            sl = slice(s, min(n, s + chunk))
            x = view_input(stack[sl], k, crop, size, device)
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

    return tile_logits, tile, bar
