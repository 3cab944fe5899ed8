"""The exact fast path: StackMFF-V2's focus logits, the same numbers as the reference, faster and leaner.

``model.StackMFFV2.focus_logits`` is the straightforward reference: it runs
the feature extractor on all B*N slices at once and keeps every GRU state.
``fast_focus_logits`` computes the same logits with the same weights: the
feature extractor a few slices at a time on CPU (all at once on GPUs), with
channels-last tensors (about 2x faster convolutions on CPU), and a GRU
computed exactly in small tiles whose states stay in cache (``_gru_tile``),
its gate convolutions split by linearity,
``conv(cat[x, h]) = conv_x(x) + conv_h(h)``. Slices and GRU tiles are
independent jobs shared by worker threads (``run_jobs``). The feature
extractor and the GRU tiles are written so that tiling.py can run them on
crops of a large image too.
"""
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F

from memory import reuse_freed_memory, then_return_freed_memory
from options import PRECISIONS

NUM_LEVELS = 5          # the encoder halves the size five times (hence sizes in multiples of 32)
# Interior side of the GRU's CPU tiles: small enough for the 16-channel states to stay in cache, large
# enough for the halo (about N px a side on average) to stay cheap. On the 2-core Zen 2 CPU, 1 MP, two
# workers, 256 was best from 4 to 16 slices (8: 4.8 s against 5.5 s at 128; an earlier machine preferred
# 128 up to 8 slices).
GRU_TILE_SIDE = 256
CHANNELS_LAST = torch.channels_last


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


def first_level(fe, x: torch.Tensor, ctx) -> torch.Tensor:
    """The extractor's full-resolution part: encoder1, its group norm (by ``ctx``), pooling, GELU.

    x (b, 1, H, W) -> t_1 (b, 8, H/2, W/2); only 3x3-local apart from the norm's statistics."""
    t = fe.encoder1(x.contiguous(memory_format=CHANNELS_LAST))
    return F.gelu(_max_pool2(ctx.norm("ebn1", fe.ebn1, t)))


def half_resolution_features(fe, t1: torch.Tensor, ctx) -> torch.Tensor:
    """The rest of ``model.FeatureExtraction`` from t_1 (``first_level``) up to ``fe.final`` at H/2.

    Returns (b, 8, H/2, W/2) before the last x2 upsampling and sigmoid (``extract_features``)."""
    bridge = fe.scab
    t = t1
    skips, spatial = [], []
    for k in range(1, NUM_LEVELS + 1):                              # t_k at H / 2^k
        if k > 1:
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
    return fe.final(y)


def extract_features(fe, x: torch.Tensor, ctx=None) -> torch.Tensor:
    """``model.FeatureExtraction`` with its image-wide steps delegated to ``ctx``.

    fe: a FeatureExtraction module; x (b, 1, H, W) in [0, 1]. ``ctx`` supplies
    the group norms, the channel-attention pools and the x2 upsampling
    (``WholeImage`` by default: identical to ``fe(x)``). Returns
    (b, 8, H, W) in (0, 1), channels-last.
    """
    ctx = ctx or WholeImage()
    return ctx.up(half_resolution_features(fe, first_level(fe, x, ctx), ctx)).sigmoid_()


# ----------------------------------------------------------------------------- ConvGRU

# A box is (y0, y1, x0, x1) in whole-image pixels, end exclusive.


def tile_boxes(size, tile):
    """Interior boxes (y0, y1, x0, x1) covering an image of ``size`` in steps of ``tile``."""
    h, w = size
    return [(y, min(y + tile, h), x, min(x + tile, w)) for y in range(0, h, tile) for x in range(0, w, tile)]


def grow_box(box, margin, size=None):
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
    inside = grow_box(want, 0, size)
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
        # tanh(a) = 2 sigmoid(2a) - 1, and the 2a folds into the candidate's weights:
        # on CPU sigmoid costs a third of tanh, which was a sixth of the GRU's time.
        self.w_x = torch.cat((gates.weight[:, :input_channels], 2 * can.weight[:, :input_channels]))
        self.b_x = torch.cat((gates.bias, 2 * can.bias))
        self.w_gates_h = gates.weight[:, input_channels:].contiguous(memory_format=CHANNELS_LAST)
        self.w_can_h = (2 * can.weight[:, input_channels:]).contiguous(memory_format=CHANNELS_LAST)
        self.w_x = self.w_x.contiguous(memory_format=CHANNELS_LAST)

    def step(self, x, h, h_box, box, size):
        """One GRU step on ``box``.

        x (1, Cin, H, W): the slice's features over the whole image (size
        (H, W)); h (1, Ch, ...) the previous state over ``h_box``, which must
        hold ``box`` grown by 2 * reach (clipped), or None (zero state).
        Returns the new state (1, Ch, ...) over ``box``.
        """
        ch, r = self.hidden, self.reach
        gate_box = grow_box(box, r, size)                     # the reset gate is needed around the box
        whole = (0, size[0], 0, size[1])
        gx = F.conv2d(_window(x, whole, grow_box(gate_box, r), size), self.w_x, self.b_x).float()
        inner = (slice(None), slice(None), slice(box[0] - gate_box[0], box[1] - gate_box[0]),
                 slice(box[2] - gate_box[2], box[3] - gate_box[2]))
        # Under autocast the convolutions run in half precision but the state
        # and gates stay float32: the recurrence over N slices would otherwise
        # accumulate rounding error. In-place updates: the step is memory-bound.
        if h is None:                                      # zero state: r * h = 0, (1 - z) * h = 0
            candidate = torch.sigmoid(gx[:, 2 * ch:][inner]).mul_(2).sub_(1)
            return candidate.mul_(torch.sigmoid(gx[:, ch:2 * ch][inner]))
        gates = F.conv2d(_window(h, h_box, grow_box(gate_box, r), size), self.w_gates_h).float()
        gates.add_(gx[:, :2 * ch]).sigmoid_()
        reset_h = gates[:, :ch].mul_(_window(h, h_box, gate_box, size))
        candidate = F.conv2d(_window(reset_h, gate_box, grow_box(box, r), size), self.w_can_h).float()
        candidate.add_(gx[:, 2 * ch:][inner]).sigmoid_()     # c = 2 candidate - 1
        h = _window(h, h_box, box, size)
        # (1 - z) h + z c = h + z (c - h), with c - h = 2 candidate - (h + 1)
        return candidate.mul_(2).sub_(h).sub_(1).mul_(gates[:, ch:][inner]).add_(h)


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
        box = grow_box(interior, span * (n - 1 - t), size)
        h, h_box = forward_cell.step(features[t:t + 1], h, h_box, box, size), box
        kept.append(_window(h, box, interior, size).clone())
    h, h_box = None, None
    for t in reversed(range(n)):
        box = grow_box(interior, span * t, size)
        h, h_box = backward_cell.step(features[t:t + 1], h, h_box, box, size), box
        both = kept[t].add_(_window(h, box, interior, size))
        out[t, interior[0]:interior[1], interior[2]:interior[3]] = both.amax(dim=1)[0]
        kept[t] = None


def gru_logits(bigru, features: torch.Tensor, precision: str = "fp32", tile: int = None,
               workers: int = 1, bounded: bool = False, region=None) -> torch.Tensor:
    """``LayerInteraction`` of one stack: bidirectional ConvGRU, then max over channels.

    bigru: a BidirectionalConvGRU; features (N, 8, H, W). Returns logits (N, H, W) float32.
    The image is cut into tiles of ``tile`` pixels (default: ``GRU_TILE_SIDE``
    on CPU, the whole image elsewhere) that are computed exactly (see ``_gru_tile``) and independently, by
    ``workers`` threads. ``region`` (y0, y1, x0, x1): only its pixels are
    computed (the rest of the logits is left unset), its tiles counted from its corner.
    ``precision``: see ``autocast_context``. ``bounded``: return freed memory
    to the kernel after every tile (see ``return_freed_memory``).
    """
    n, cin, h, w = features.shape
    if tile is None:        # on GPUs small tiles would only add kernel launches: one tile
        tile = GRU_TILE_SIDE if features.device.type == "cpu" else max(h, w)
    y0, y1, x0, x1 = region or (0, h, 0, w)
    cells = (_SplitCell(bigru.forward_cell_list[0], cin), _SplitCell(bigru.backward_cell_list[0], cin))
    logits = features.new_empty((n, h, w), dtype=torch.float32)
    jobs = [partial(_gru_tile, cells, features, (a + y0, b + y0, c + x0, d + x0), (h, w), logits, precision)
            for a, b, c, d in tile_boxes((y1 - y0, x1 - x0), tile)]
    if bounded:
        jobs = [partial(then_return_freed_memory, job) for job in jobs]
    run_jobs(jobs, workers, one_thread=True)        # one tile alone: intra-op threads stalled (run_jobs)
    return logits


# ----------------------------------------------------------------------------- threads


def _single_threaded_call(job):
    torch.set_num_threads(1)    # per calling thread for OpenMP: the workers do not compete
    with torch.inference_mode():    # grad mode is per thread too; these paths only infer
        return job()


def run_jobs(jobs, workers, one_thread=False):
    """Run independent jobs on ``workers`` Python threads, each with one torch thread.

    PyTorch releases the GIL inside its kernels, so the threads run in
    parallel; on CPU this scales better than intra-op threads, whose
    element-wise kernels are memory-bound on large tensors. Returns the
    results in job order. With one worker the jobs run in the calling
    thread, with its torch threads unless ``one_thread``: the feature
    extractor of a 1536 x 1152 slice took 10x the CPU time on 2 intra-op
    threads of the shared 2-core CPU (24.0 s against 2.4 s for 6 slices).
    """
    saved = torch.get_num_threads()
    try:
        if workers <= 1 or len(jobs) <= 1:
            if one_thread:
                torch.set_num_threads(1)
            return [job() for job in jobs]
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
    its memory (docs/performance.md). On CPU it calls ``reuse_freed_memory``.
    """
    b, n, h, w = x.shape
    on_cpu = x.device.type == "cpu"
    if on_cpu:
        reuse_freed_memory()
    if workers is None:
        workers = torch.get_num_threads() if on_cpu else 1
    if chunk is None:
        chunk = 2 if on_cpu else n
    if workers > 1:
        chunk = 1
    fe = model.feature_extraction
    out = []
    with torch.inference_mode():
        for k in range(b):
            jobs = [partial(extract_features, fe, x[k, s:s + chunk, None]) for s in range(0, n, chunk)]
            features = torch.cat(run_jobs(jobs, workers))                       # (N, 8, H, W)
            out.append(gru_logits(model.layer_interaction.layer_interaction_depth, features, precision,
                                  workers=workers))
        return torch.stack(out)


def fast_forward(model, x: torch.Tensor, precision: str = "fp32", chunk: int = None, workers: int = None):
    """Same contract as ``StackMFFV2.forward`` (the released decoding): x (B, N, H, W) -> (fused, depth, index)."""
    from fusion import FusionCard, fuse         # fusion decodes; this module only makes logits
    with torch.inference_mode():
        return fuse(x, fast_focus_logits(model, x, precision, chunk, workers), FusionCard())[:3]
