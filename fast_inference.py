"""Fast and memory-bounded StackMFF-V2 inference.

``model.StackMFFV2.forward`` is the straightforward reference: it runs the
feature extractor on all B*N slices at once and keeps every GRU state. This
module computes the same numbers with the same weights, faster and leaner:

* ``fast_focus_logits``: whole image, the feature extractor a few slices at
  a time on CPU (all at once on GPUs) (channels-last tensors, about 2x faster convolutions on CPU), and a GRU
  computed exactly in small tiles whose states stay in cache (``_gru_tile``),
  its gate convolutions split by linearity,
  ``conv(cat[x, h]) = conv_x(x) + conv_h(h)``. Slices and GRU tiles are
  independent jobs shared by worker threads (``_run_all``).
* ``tiled_fusion``: tiles with a halo whose memory does not grow with the
  image. The network's image-wide statistics (GroupNorm means/variances,
  channel-attention pools, the depth min/max) are accumulated over tile
  interiors in statistics passes and then applied to every tile, so the tiles
  stay close to whole-image results (see docs/performance.md for the drift).
"""
import ctypes
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from model import depth_to_index, expected_slice_number, gather_slices, multi_view_logits
from utils import InputError, next_multiple

FEATURE_CHANNELS = 8
HIDDEN_CHANNELS = 16
NUM_LEVELS = 5          # the encoder halves the size five times: tiles align to 2**5
ALIGN = 2 ** NUM_LEVELS
PRECISIONS = ("fp32", "bf16", "fp16")
_CHANNELS_LAST = torch.channels_last


def autocast_context(precision: str, device):
    """Autocast for 'bf16' / 'fp16', nothing for 'fp32'. Softmax stays float32
    because ``depth_map_creation`` casts the logits first."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# ----------------------------------------------------------------------------- feature extraction


class WholeImage:
    """Feature-extraction context for whole images: the plain, image-wide operations."""

    def norm(self, key, norm, y):
        return F.group_norm(y, norm.num_groups, norm.weight, norm.bias, norm.eps)

    def pool(self, key, u):
        return u.mean(dim=(2, 3))                                   # (b, C)

    def up(self, y):
        return F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=True)


def _max_pool2(y: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(y, 2)`` for even H and W, bit for bit: the max of the four
    strided quarters is twice as fast on CPU as the pooling kernel, which also
    computes indices."""
    return torch.maximum(torch.maximum(y[:, :, 0::2, 0::2], y[:, :, 0::2, 1::2]),
                         torch.maximum(y[:, :, 1::2, 0::2], y[:, :, 1::2, 1::2]))


def extract_features(fe, x: torch.Tensor, ctx=None) -> torch.Tensor:
    """``model.FeatureExtraction`` with its image-wide steps delegated to ``ctx``.

    fe: a FeatureExtraction module; x (b, 1, H, W) in [0, 1]. ``ctx`` supplies
    the group norms, the channel-attention pools and the x2 upsampling
    (``WholeImage`` by default: identical to ``fe(x)``). Returns
    (b, 8, H, W) in (0, 1), channels-last.
    """
    ctx = ctx or WholeImage()
    bridge = fe.scab
    t = x.contiguous(memory_format=_CHANNELS_LAST)
    skips, spatial = [], []
    for k in range(1, NUM_LEVELS + 1):                              # t_k at H / 2^k
        t = getattr(fe, f"encoder{k}")(t)
        t = F.gelu(_max_pool2(ctx.norm(f"ebn{k}", getattr(fe, f"ebn{k}"), t)))
        spatial.append(bridge.satt([t])[0])                          # s_k
        skips.append(t)
    mixed = [s + t_k for s, t_k in zip(spatial, skips)]             # u_k
    pooled = torch.cat([ctx.pool(f"u{k}", u) for k, u in enumerate(mixed, start=1)], dim=1)  # (b, 128)
    weights = bridge.catt.weights_from_pooled(pooled)
    bridged = [a * u + s for a, u, s in zip(weights, mixed, spatial)]
    del skips, spatial, mixed
    y = F.gelu(fe.encoder6(t))                                       # (b, 64, H/32, W/32)
    y = F.gelu(ctx.norm("dbn1", fe.dbn1, fe.decoder1(y))) + bridged[4]
    for k in range(2, NUM_LEVELS + 1):                               # up to H/2
        y = ctx.up(ctx.norm(f"dbn{k}", getattr(fe, f"dbn{k}"), getattr(fe, f"decoder{k}")(y)))
        y = F.gelu(y).add_(bridged[5 - k])
        bridged[5 - k] = None
    return ctx.up(fe.final(y)).sigmoid_()


# ----------------------------------------------------------------------------- ConvGRU

# A box is (y0, y1, x0, x1) in whole-image pixels, end exclusive.


def _grow(box, margin, size=None):
    """box grown by ``margin`` pixels on every side, clipped to the image when ``size`` is given."""
    y0, y1, x0, x1 = box[0] - margin, box[1] + margin, box[2] - margin, box[3] + margin
    if size is None:
        return y0, y1, x0, x1
    return max(0, y0), min(size[0], y1), max(0, x0), min(size[1], x1)


def _window(t, t_box, want, size):
    """The part of t (b, C, h, w) covering ``t_box`` that covers ``want``.

    ``want`` may reach past the image borders (by the conv padding): those
    pixels are zeros, as the network's zero padding. Its part inside the
    image must lie inside ``t_box``.
    """
    inside = _grow(want, 0, size)
    part = t[:, :, inside[0] - t_box[0]:inside[1] - t_box[0], inside[2] - t_box[2]:inside[3] - t_box[2]]
    pad = (inside[2] - want[2], want[3] - inside[3], inside[0] - want[0], want[1] - inside[1])
    return F.pad(part, pad) if any(pad) else part


class _SplitCell:
    """A ConvGRUCell's weights split into the input part and the hidden part.

    conv_gates(cat[x, h]) = conv(x, Wg[:, :Cin]) + conv(h, Wg[:, Cin:]) + bias,
    likewise conv_can; the two input parts are stacked into one 8 -> 48 conv.
    All convolutions run without padding on windows that carry their own
    zeros at the image borders, so a step can compute any box of the image.
    """

    def __init__(self, cell, input_channels: int):
        gates, can = cell.conv_gates, cell.conv_can
        self.hidden = cell.hidden_channels
        self.reach = gates.padding[0]           # 1 for the released 3x3 kernels
        self.w_x = torch.cat((gates.weight[:, :input_channels], can.weight[:, :input_channels]))
        self.b_x = torch.cat((gates.bias, can.bias))
        self.w_gates_h = gates.weight[:, input_channels:].contiguous(memory_format=_CHANNELS_LAST)
        self.w_can_h = can.weight[:, input_channels:].contiguous(memory_format=_CHANNELS_LAST)
        self.w_x = self.w_x.contiguous(memory_format=_CHANNELS_LAST)

    def step(self, x, h, h_box, box, size):
        """One GRU step on ``box``.

        x (1, Cin, H, W): the slice's features over the whole image (size
        (H, W)); h (1, Ch, ...) the previous state over ``h_box``, which must
        hold ``box`` grown by 2 * reach (clipped), or None (zero state).
        Returns the new state (1, Ch, ...) over ``box``.
        """
        ch, r = self.hidden, self.reach
        gate_box = _grow(box, r, size)                     # the reset gate is needed around the box
        whole = (0, size[0], 0, size[1])
        gx = F.conv2d(_window(x, whole, _grow(gate_box, r), size), self.w_x, self.b_x).float()
        inner = (slice(None), slice(None), slice(box[0] - gate_box[0], box[1] - gate_box[0]),
                 slice(box[2] - gate_box[2], box[3] - gate_box[2]))
        # Under autocast the convolutions run in half precision but the state
        # and gates stay float32: the recurrence over N slices would otherwise
        # accumulate rounding error. In-place updates: the step is memory-bound.
        if h is None:                                      # zero state: r * h = 0, (1 - z) * h = 0
            return torch.sigmoid(gx[:, ch:2 * ch][inner]).mul_(torch.tanh(gx[:, 2 * ch:][inner]))
        gates = F.conv2d(_window(h, h_box, _grow(gate_box, r), size), self.w_gates_h).float()
        gates.add_(gx[:, :2 * ch]).sigmoid_()
        reset_h = gates[:, :ch].mul_(_window(h, h_box, gate_box, size))
        candidate = F.conv2d(_window(reset_h, gate_box, _grow(box, r), size), self.w_can_h).float()
        candidate.add_(gx[:, 2 * ch:][inner]).tanh_()
        h = _window(h, h_box, box, size)
        return candidate.sub_(h).mul_(gates[:, ch:][inner]).add_(h)   # (1 - z) h + z c = h + z (c - h)


def _gru_tile(cells, features, interior, size, out, precision="fp32"):
    """Both GRU directions for the pixels of ``interior`` -> out[:, interior] (logits).

    A state at step t depends on the previous one within 2 * reach pixels
    (the candidate convolves reset * h, and reset is itself a convolution),
    so step t of the forward direction is computed on the interior grown by
    2 * reach * (N - 1 - t): exact results with no halo beyond what later
    steps need, and all states of a tile small enough to stay in cache.
    """
    with autocast_context(precision, features.device):     # autocast is per thread
        _gru_tile_steps(cells, features, interior, size, out)


def _gru_tile_steps(cells, features, interior, size, out):
    forward_cell, backward_cell = cells
    n = features.shape[0]
    span = 2 * forward_cell.reach
    kept, h, h_box = [], None, None
    for t in range(n):
        box = _grow(interior, span * (n - 1 - t), size)
        h, h_box = forward_cell.step(features[t:t + 1], h, h_box, box, size), box
        kept.append(_window(h, box, interior, size).clone())
    h, h_box = None, None
    for t in reversed(range(n)):
        box = _grow(interior, span * t, size)
        h, h_box = backward_cell.step(features[t:t + 1], h, h_box, box, size), box
        both = kept[t].add_(_window(h, box, interior, size))
        out[t, interior[0]:interior[1], interior[2]:interior[3]] = both.amax(dim=1)[0]
        kept[t] = None


def gru_tile_side(num_slices: int) -> int:
    """Interior side of the GRU tiles: small enough for the 16-channel states
    to stay in cache, large enough for the halo (about N pixels on every side
    on average) to stay cheap. Measured on CPU, one thread, 1 MP: 128 best
    for 8 slices, 256 for 16."""
    return min(256, max(128, 16 * num_slices))


def gru_logits(bigru, features: torch.Tensor, precision: str = "fp32", tile: int = None,
               workers: int = 1, bounded: bool = False) -> torch.Tensor:
    """``LayerInteraction`` of one stack: bidirectional ConvGRU, then max over channels.

    bigru: a BidirectionalConvGRU; features (N, 8, H, W). Returns logits (N, H, W).
    The image is cut into tiles of ``tile`` pixels (default: ``gru_tile_side``
    on CPU, the whole image elsewhere) that are computed exactly (see ``_gru_tile``) and independently, by
    ``workers`` threads.
    ``precision``: see ``autocast_context``. ``bounded``: return freed memory
    to the kernel after every tile (see ``return_freed_memory``).
    """
    n, cin, h, w = features.shape
    if tile is None:        # on GPUs small tiles would only add kernel launches: one tile
        tile = gru_tile_side(n) if features.device.type == "cpu" else max(h, w)
    cells = (_SplitCell(bigru.forward_cell_list[0], cin), _SplitCell(bigru.backward_cell_list[0], cin))
    logits = features.new_empty((n, h, w), dtype=torch.float32)
    jobs = [partial(_gru_tile, cells, features, box, (h, w), logits, precision)
            for box in _tiles((h, w), tile)]
    if bounded:
        jobs = [partial(_then_return_freed_memory, job) for job in jobs]
    _run_all(jobs, workers)
    return logits


# ----------------------------------------------------------------------------- threads


def _single_threaded_call(job):
    torch.set_num_threads(1)    # per calling thread for OpenMP: the workers do not compete
    with torch.inference_mode():    # grad mode is per thread too; these paths only infer
        return job()


def _run_all(jobs, workers):
    """Run independent jobs on ``workers`` Python threads, each with one torch thread.

    PyTorch releases the GIL inside its kernels, so the threads run in
    parallel; on CPU this scales better than intra-op threads, whose
    element-wise kernels are memory-bound on large tensors. Returns the
    results in job order.
    """
    if workers <= 1 or len(jobs) <= 1:
        return [job() for job in jobs]
    saved = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(_single_threaded_call, jobs))
    finally:
        torch.set_num_threads(saved)


def fast_focus_logits(model, x: torch.Tensor, precision: str = "fp32", chunk: int = None,
                      workers: int = None) -> torch.Tensor:
    """Focus logits of ``model.focus_logits`` computed faster and leaner.

    x (B, N, H, W) in [0, 1], H and W multiples of 32 -> logits (B, N, H, W)
    float32. ``precision`` 'fp16' / 'bf16' runs the GRU convolutions (most of
    the arithmetic) in half precision; the feature extractor stays float32
    because half-precision features change the index at 1-6% of the pixels.
    ``workers`` threads (default: torch.get_num_threads() on CPU, 1 on other
    devices) share the slices of the feature extractor (``chunk`` slices a
    job; one with several workers, to bound memory) and the GRU tiles.
    ``chunk`` defaults to 2 on CPU and to all slices elsewhere: on an H100,
    chunks of 2 made the fast path 1.3-1.7x slower than the straightforward
    one (kernel launches), all slices at once about as fast, with 42-60% of
    its memory (docs/performance.md).
    """
    b, n, h, w = x.shape
    on_cpu = x.device.type == "cpu"
    if workers is None:
        workers = torch.get_num_threads() if on_cpu else 1
    if chunk is None:
        chunk = 2 if on_cpu else n
    if workers > 1:
        chunk = 1
    fe = model.feature_extraction
    out = []
    for k in range(b):
        jobs = [partial(extract_features, fe, x[k, s:s + chunk, None]) for s in range(0, n, chunk)]
        features = torch.cat(_run_all(jobs, workers))                       # (N, 8, H, W)
        out.append(gru_logits(model.layer_interaction.layer_interaction_depth, features, precision,
                              workers=workers))
    return torch.stack(out)


_MALLOC_TUNED = []


def reuse_freed_memory():
    """Let glibc keep freed blocks of up to 1 GiB for reuse (once per process).

    By default tensors over 32 MB get fresh pages from the kernel each time,
    and every page is then faulted in and zeroed: about 7% of the fast path's
    CPU time at 1 MP (measured: 0.85 s -> 0.4 s system time for 8 x 1 MP),
    for about 10% more peak memory. No-op where glibc is not the allocator.
    """
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED.append(True)
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_MMAP_THRESHOLD, GIB)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 2 * GIB)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3       # glibc's mallopt parameters


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _glibc()


def return_freed_memory():
    """Give the allocator's free pages back to the kernel (glibc ``malloc_trim``).

    The tiled path calls it after every chunk of the feature extractor and
    every GRU tile: without it, freed blocks stay resident in glibc's heaps
    (one per worker thread) and the process went up to 20% above
    ``--max_memory`` (30 x 1.5 MP under 2 GiB: peak RSS 2.55 GB without,
    1.94 GB with; docs/performance.md). No-op where glibc is not the allocator.
    """
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _then_return_freed_memory(job):
    result = job()
    return_freed_memory()
    return result


def fast_outputs(model, x: torch.Tensor, precision: str = "fp32", chunk: int = None, workers: int = None):
    """Same contract as ``StackMFFV2.outputs`` from the stack alone: x (B, N, H, W) ->
    (fused, depth, index, weights or None).

    workers: threads (see ``fast_focus_logits``). On CPU it calls ``reuse_freed_memory``."""
    if x.device.type == "cpu":
        reuse_freed_memory()
    with torch.inference_mode():
        logits = multi_view_logits(partial(fast_focus_logits, model, precision=precision, chunk=chunk,
                                           workers=workers), x, model.views)
        return model.outputs(x, logits)


def fast_forward(model, x: torch.Tensor, precision: str = "fp32", chunk: int = None, workers: int = None):
    """Same contract as ``StackMFFV2.forward``: x (B, N, H, W) -> (fused, depth, index)."""
    return fast_outputs(model, x, precision, chunk, workers)[:3]


# ----------------------------------------------------------------------------- tiles

GIB = 1024 ** 3
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
        return y.contiguous(memory_format=_CHANNELS_LAST)


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


def _tiles(size, tile):
    """Interior boxes (y0, y1, x0, x1) covering an image of ``size`` in steps of ``tile``."""
    h, w = size
    return [(y, min(y + tile, h), x, min(x + tile, w)) for y in range(0, h, tile) for x in range(0, w, tile)]


def _with_halo(box, halo, size):
    y0, y1, x0, x1 = box
    return (max(0, y0 - halo), min(size[0], y1 + halo), max(0, x0 - halo), min(size[1], x1 + halo))


def tile_bytes(tile: int, num_slices: int, feature_halo: int, gru_halo: int, chunk: int = 2,
               workers: int = 1) -> int:
    """Peak working memory of one GRU tile of side ``tile``.

    Two moments compete: while the feature extractor runs one chunk of
    slices on the tile grown by both halos (about 90 floats per slice and
    pixel), the features of the slices done so far are kept on the GRU
    window only (8 floats per slice and pixel); then the GRU adds its logits
    and, per worker thread, the states of one of its own small tiles (16
    floats per slice, kept for the backward pass, plus step temporaries on
    the tile grown by 2 pixels per step). Coefficients measured with a
    20 ms RSS sampler on 24 x 640 x 640 and 30 x 1500 x 1000 stacks.
    """
    window = tile + 2 * gru_halo
    fe_pixels = (window + 2 * feature_halo) ** 2
    features = 4 * 8 * num_slices * window ** 2
    extracting = features + 4 * (90 * chunk + 30) * fe_pixels
    small = min(gru_tile_side(num_slices), window)
    per_worker = 4 * (24 * num_slices * small ** 2 + 150 * (small + 4 * num_slices) ** 2)
    recurring = features + 4 * num_slices * window ** 2 + workers * per_worker
    return max(extracting, recurring)


def plan_tiles(size, num_slices, max_memory, fixed_bytes=0, feature_halo=0, gru_halo=0, chunk=2, workers=1):
    """Largest tile side (a multiple of 32) whose working memory fits in ``max_memory`` GiB.

    fixed_bytes: what is held whatever the tile (input stack, outputs).
    InputError when even the smallest tile does not fit.
    """
    budget = max_memory * GIB - fixed_bytes - _FIXED_BYTES
    side = next_multiple(max(size), ALIGN)
    def working(side):
        return tile_bytes(side, num_slices, feature_halo, gru_halo, chunk, workers)

    while side >= ALIGN and working(side) > budget:
        side -= ALIGN
    if side < ALIGN:
        need = (_FIXED_BYTES + fixed_bytes + working(ALIGN)) / GIB
        raise InputError(f"--max_memory {max_memory:g} GiB is too small for a {num_slices}-slice stack "
                         f"of {size[1]}x{size[0]}; it needs at least {need:.2f} GiB")
    return side


def plan_stats_tile(size, max_memory, fixed_bytes=0, halo=0, chunk=2):
    """Tile side of the statistics passes: the feature extractor of one chunk of
    slices only (about 100 floats per crop pixel and slice), so these tiles are
    much larger."""
    if not max_memory:
        return next_multiple(max(size), ALIGN)
    budget = max_memory * GIB - fixed_bytes - _FIXED_BYTES
    side = math.isqrt(max(0, int(budget // (400 * chunk)))) - 2 * halo
    return max(ALIGN, min(side // ALIGN * ALIGN, next_multiple(max(size), ALIGN)))


def tiled_forward(model, stack, max_memory=None, tile=None, halo=None, stat_passes=2,
                  precision="fp32", chunk=2, progress=None, stats_tile=None, reserved_bytes=0):
    """Fuse one stack tile by tile with image-wide statistics; memory bounded by the tile.

    stack (N, H, W): uint8/uint16 numpy gray slices, or a float tensor in [0, 1].
    The network runs at (H', W'), the next multiples of 32, as released.
    ``tile`` (a multiple of 32) or ``max_memory`` (GiB) sets the tile size;
    ``halo`` is the feature extractor's context around each tile (default 160:
    on the leaves stack at 128-px tiles, 99.8% index agreement with the
    whole-image result, against 98.9% with 96);
    the GRU pass adds 2N rounded up to 32 (exact for the GRU).
    ``stat_passes`` passes over the tiles gather the GroupNorm and
    channel-attention statistics (each pass makes one more layer exact).
    ``stats_tile`` is the tile of the statistics passes (default: the largest
    that ``max_memory`` allows for one slice, or the whole image).
    ``reserved_bytes``: memory the caller holds meanwhile (e.g. the colour
    slices kept for the colour fused image), taken out of ``max_memory``.
    Returns (fused, depth, index) at (H', W'): float32 in [0, 1], float32
    in [0, 1], int64 in [0, N-1].
    """
    n, h, w = stack.shape
    size = (next_multiple(h, ALIGN), next_multiple(w, ALIGN))
    device = next(model.parameters()).device
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    halo = DEFAULT_FEATURE_HALO if halo is None else halo
    gru_halo = next_multiple(2 * n, ALIGN)       # each GRU step sees two pixels further
    held = stack.numel() * stack.element_size() if torch.is_tensor(stack) else stack.nbytes
    held += size[0] * size[1] * 16 + reserved_bytes              # outputs and the caller's share
    if tile is None:
        tile = plan_tiles(size, n, max_memory, held, halo, gru_halo, chunk, workers) if max_memory else 512
    if stats_tile is None:
        stats_tile = plan_stats_tile(size, max_memory, held, halo, chunk)
    if stats_tile >= max(size):
        stat_passes = 1                 # one tile: its own statistics are the image's
    if tile % ALIGN or halo % ALIGN:
        raise ValueError(f"tile ({tile}) and halo ({halo}) must be multiples of {ALIGN}")
    fe = model.feature_extraction
    boxes = _tiles(size, tile)
    stats_boxes = _tiles(size, stats_tile)
    total_steps = len(boxes) + len(stats_boxes) * stat_passes
    bar = progress(total=total_steps, desc="tiles", unit="tile") if progress else None

    def features(crop, interior, given, collect, keep=None):
        """Run the feature extractor on ``crop``, one chunk of slices at a time.

        Returns the (N, 8, h, w) features of the ``keep`` window only (the
        halo beyond it served the extractor's context), or None without one
        (statistics passes)."""
        rows, cols = (crop[0], crop[1]), (crop[2], crop[3])
        kept = None
        for s in range(0, n, chunk):
            sl = slice(s, min(n, s + chunk))
            x = network_input_crop(stack[sl], rows, cols, size).to(device)
            ctx = TileContext(crop, interior, size, sl, given, collect)
            part = extract_features(fe, x, ctx)
            del x
            return_freed_memory()
            if keep is not None:
                if kept is None:
                    kept = part.new_empty((n, part.shape[1], keep[1] - keep[0], keep[3] - keep[2]))
                kept[sl] = part[:, :, keep[0] - crop[0]:keep[1] - crop[0], keep[2] - crop[2]:keep[3] - crop[2]]
            del part
        return kept

    with torch.inference_mode():
        given = None
        for _ in range(stat_passes):
            collect = StatsAccumulator(n)
            for box in stats_boxes:
                # Only the statistics are kept: the GRU needs no extra halo here.
                features(_with_halo(box, halo, size), box, given, collect)
                if bar:
                    bar.update()
            given = collect.finish()
        number = torch.empty(size, dtype=torch.float32)          # expected slice number in [1, N] (argmax: index)
        for box in boxes:
            window = _with_halo(box, gru_halo, size)              # what the GRU needs to be exact
            crop = _with_halo(box, halo + gru_halo, size)         # what the extractor needs around it
            feats = features(crop, box, given, None, keep=window)   # (N, 8, h, w) on the window
            logits = gru_logits(model.layer_interaction.layer_interaction_depth, feats, precision,
                                workers=workers, bounded=True)
            del feats
            inner = logits[:, box[0] - window[0]:box[1] - window[0], box[2] - window[2]:box[3] - window[2]]
            if model.index_rule == "argmax":   # per pixel: no image-wide statistic needed
                number[box[0]:box[1], box[2]:box[3]] = inner.argmax(dim=0).float().cpu()
            else:
                number[box[0]:box[1], box[2]:box[3]] = expected_slice_number(inner[None])[0, 0].cpu()
            if bar:
                bar.update()
        if bar:
            bar.close()
        if model.index_rule == "argmax":
            index = number.long()                                   # (H', W')
            depth = number.div_(max(n - 1, 1))
        else:
            lo, hi = number.min(), number.max()
            depth = number.sub_(lo).div_((hi - lo).clamp_min(1e-12))   # in place: one full-size float map
            index = depth_to_index(depth[None, None], n)[0]            # (H', W')
        fused = torch.empty(size, dtype=torch.float32)
        for box in boxes:
            rows, cols = (box[0], box[1]), (box[2], box[3])
            x = network_input_crop(stack, rows, cols, size)[:, 0]  # (N, h, w)
            fused[box[0]:box[1], box[2]:box[3]] = gather_slices(
                x[None], index[None, box[0]:box[1], box[2]:box[3]])[0, 0]
    return fused, depth, index
