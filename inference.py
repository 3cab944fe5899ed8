"""The one inference path shared by every predict script.

One contract for every path: focus logits (the reference network, the fast
path, or tiles under ``--max_memory``), then ``fusion.fuse`` with the
checkpoint's card. ``fuse_gray_batch`` runs it on gray stacks at their own
size (the released resize up to a multiple of 32 and back); ``fuse_images``
on one stack of slices as read; ``render_outputs`` turns one result into
the six released pictures.
"""
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fast_inference import fast_focus_logits
from fusion import FusionCard, card_from_args, focus_energy, fuse, fuse_colour, view_logits
from memory import GIB, available_bytes
from model import load_model
# The flags and the output kinds are defined in options.py (torch-free); imported from here too.
from options import DEFAULT_MODEL, DEPTH_BITS, FUSED_KINDS, OUTPUT_KINDS, OUTPUT_NAMES  # noqa: F401
from strips import STRIP_BYTES, STRIP_FLOATS_PER_SAMPLE, fuse_in_strips
from tiling import tiled_fuse
from utils import (SIZE_MULTIPLE, colour_scale, depth_colormap, encoder_params, index_picture, next_multiple,
                   parallel_map, resize_back, resize_to_multiple, stack_to_tensor, to_gray, to_integer_image,
                   write_image, write_npy)
from working_scale import estimate_blur, shrunk, working_factor, working_size


def model_from_args(args, device):
    """(network, card) from the flags of ``options.add_model_arguments``: ``model.load_model`` and the
    card beside the checkpoint with the card flags that were given."""
    return load_model(args.model_path, device), card_from_args(args, FusionCard.beside(args.model_path))


@dataclass
class FusionResult:
    """One fused stack at the input size.

    fused_gray: float32 HxW in [0, 1]; depth: float32 HxW in [0, 1];
    index: int64 HxW in [0, N-1]; num_slices: N; card: how it was decoded;
    weights: float32 NxHxW blend weights (summing to 1 over N), None when
    fused picks by index or the colour image is made already; the colour
    image repeats the card's choice. colour: the colour fused image when
    the decoding made it (in strips, like the slices), else None.
    working_factor: how much the network's copy of the stack was shrunk
    (working_scale.py; 1: not at all).
    """
    fused_gray: np.ndarray
    depth: np.ndarray
    index: np.ndarray
    num_slices: int
    card: FusionCard = FusionCard()
    weights: Optional[np.ndarray] = None
    colour: Optional[np.ndarray] = None
    working_factor: float = 1.0


def focus_logits(model, card: FusionCard, x: torch.Tensor, precision: str = "fp32", fast: bool = True):
    """Focus logits of stacks x (B, N, H, W) at multiples of 32, averaged over the card's views:
    by the fast path (fast_inference.py, same numbers) or by the reference ``model.focus_logits``."""
    if fast:
        return view_logits(partial(fast_focus_logits, model, precision=precision), x, card.views)
    with torch.inference_mode():
        return view_logits(model.focus_logits, x, card.views)


def fuse_gray_batch(model, card: FusionCard, gray, device=None, max_memory=None, precision="fp32", fast=True,
                    reserved_bytes=0):
    """Fuse a batch of gray stacks of one size and length: logits (reference, fast or tiled), then
    ``fusion.fuse`` with ``card``.

    gray (B, N, H, W) float in [0, 1], any H and W (or, with ``max_memory``,
    uint8/uint16 numpy gray slices, kept in their integer type). Returns B
    FusionResults: the network runs at the next multiple of 32; a pick by
    index (temperature 0) is decoded there and fused and depth are resized
    back bilinearly, the index with nearest neighbour (as released); a
    blend is decoded at the input size from the logits resized back.

    fast: the fast path of fast_inference.py (same numbers); False runs the
    straightforward ``model.focus_logits``. max_memory (GiB): tiled inference
    (tiling.py) whose memory does not grow with the image (see
    docs/performance.md for the small drift from whole-image results;
    without it a CPU run is tiled when ``memory_guard`` finds the whole image
    too big for the free memory); reserved_bytes: what the caller holds meanwhile (the colour slices),
    counted against max_memory. precision: 'fp32', or 'fp16' / 'bf16' for
    the GRU convolutions (meant for GPUs).
    """
    device = device or next(model.parameters()).device
    b, n, h, w = gray.shape
    net_h, net_w = next_multiple(h), next_multiple(w)                 # the network's size
    if not max_memory and device.type == "cpu":
        max_memory = memory_guard(b * n * net_h * net_w)
    if max_memory:
        tiled = [tiled_fuse(model, card, stack, max_memory=max_memory, precision=precision, progress=tqdm,
                            reserved_bytes=reserved_bytes)
                 for stack in gray]
        if card.fusion_temperature and tiled[0].fused.shape[-2:] != (h, w):     # context tiles decode at (H', W')
            tqdm.write(f"tiled: the blend was decoded at {net_w}x{net_h} (the network's size) "
                       f"and resized back, not at the input's {w}x{h} as the whole image is")
        fused, depth, index = (torch.cat(parts) for parts in list(zip(*tiled))[:3])
        weights = None if tiled[0].weights is None else torch.cat([t.weights for t in tiled])
    else:
        stack = torch.as_tensor(gray).float()
        x = resize_to_multiple(stack).to(device)
        with torch.inference_mode():
            logits = focus_logits(model, card, x, precision, fast)
            if card.fusion_temperature and (net_h, net_w) != (h, w):
                # A blend is decoded at the input size: resampling the fused image back would soften it.
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
                x = stack.to(device)
            fused, depth, index, weights = fuse(x, logits, card)
    fused = fused[:, 0].float().cpu().numpy()
    depth = depth[:, 0].float().cpu().numpy()
    index = index.cpu().numpy().astype(np.int32)
    results = []
    for k in range(b):
        results.append(FusionResult(
            fused_gray=resize_back(fused[k], (h, w)),
            depth=resize_back(depth[k], (h, w)),
            index=resize_back(index[k], (h, w), nearest=True).astype(np.int64),
            num_slices=n,
            card=card,
            weights=None if weights is None else weights_at_size(weights[k], (h, w)),
        ))
    return results


# Peak memory of a whole-image CPU fusion beyond what the process already holds, per slice
# pixel at the network's size: about 80 bytes on the fast path (docs/performance.md's
# table, 8 x 1 MP to 16 x 4 MP), plus room for the blend's weights and views.
WHOLE_IMAGE_BYTES_PER_SAMPLE = 120


def memory_guard(samples: int, available=None):
    """None when a whole-image fusion of ``samples`` slice pixels fits in the available memory
    (``memory.available_bytes()`` unless given); else a ``--max_memory`` (GiB) that does, said in one line."""
    available = available_bytes() if available is None else available
    needed = samples * WHOLE_IMAGE_BYTES_PER_SAMPLE
    if available is None or needed <= 0.9 * available:
        return None
    bound = 0.8 * available / GIB
    tqdm.write(f"memory: the whole image needs about {needed / GIB:.1f} GiB, {available / GIB:.1f} GiB is "
               f"available: fusing tile by tile (as --max_memory {bound:.1f})")
    return bound


# Full-size float maps the strip decoding holds beside the strips (fused, depth, index, confidence, colour).
FULL_SIZE_MAPS = 8


def memory_factor(shape, held: int, max_memory=None, device=None) -> float:
    """The least shrink (>= 1) of an (N, H, W) stack whose whole-image network pass, beside ``held``
    bytes, the decoding's strips and maps, fits in ``max_memory`` GiB (CPU: else the memory free).
    A GPU's memory is not checked here."""
    n, h, w = shape
    if (device is not None and torch.device(device).type != "cpu") and not max_memory:
        return 1.0
    budget = max_memory * GIB if max_memory else available_bytes()
    if budget is None:
        return 1.0
    strips = min(STRIP_BYTES, 4 * STRIP_FLOATS_PER_SAMPLE * n * h * w)
    room = 0.9 * budget - held - strips - FULL_SIZE_MAPS * 4 * h * w
    needed = n * h * w * WHOLE_IMAGE_BYTES_PER_SAMPLE
    factor = float(np.sqrt(needed / max(room, needed / max(h, w) ** 2)))   # at worst one pixel a slice
    return max(1.0, factor)


def weights_at_size(weights: torch.Tensor, size) -> np.ndarray:
    """Soft fusion weights (N, H', W') at the network's size -> float32 (N, H, W), resized
    bilinearly as the fused image is, and renormalised to sum to 1."""
    out = np.stack([resize_back(w, size) for w in weights.float().cpu().numpy()])
    out /= np.maximum(out.sum(axis=0, keepdims=True), 1e-12)
    return out


def fuse_images(model, card: FusionCard, images, device=None, max_memory=None, precision="fp32") -> FusionResult:
    """Fuse one stack given as a list of uint8/uint16 slices (see utils.read_stack), decoded by ``card``
    (``FusionCard.beside(checkpoint)`` for a checkpoint's own; ``model_from_args`` gives both).

    A card with ``network_blur`` shrinks a stack whose blur is wider for the
    network (``fuse_at_working_scale``). With ``max_memory`` the gray stack
    stays uint8/uint16 (a quarter of the float32 size) and each tile is
    converted on the fly.
    """
    kept = sum(im.nbytes for im in images)                        # the slices stay for colour fusion
    return fuse_stacks(model, card, [images], device, max_memory, precision, reserved_bytes=kept)[0]


def fuse_stacks(model, card: FusionCard, stacks, device=None, max_memory=None, precision="fp32",
                reserved_bytes=0) -> list:
    """Fuse stacks of one size and length (lists of slices): each that its blur asks to shrink on its own
    (``fuse_at_working_scale``), the others in one batch (``fuse_gray_batch``: with ``max_memory`` their
    gray slices stay uint8/uint16, ``reserved_bytes`` counted as held); results in order."""
    results, batch = [None] * len(stacks), []
    for k, images in enumerate(stacks):
        factor, gray = working_scale_of(card, images, max_memory, device)
        if factor > 1:
            results[k] = fuse_at_working_scale(model, card, images, gray, factor, device, precision)
        else:
            batch.append((k, gray))
    if batch:
        if max_memory:
            gray = np.stack([np.stack([to_gray(im) for im in stacks[k]]) if gray is None else gray
                             for k, gray in batch])                                    # (B, N, H, W) integers
        else:
            gray = torch.cat([stack_to_tensor(stacks[k]) for k, _ in batch])          # (B, N, H, W) floats
        fused = fuse_gray_batch(model, card, gray, device, max_memory, precision, reserved_bytes=reserved_bytes)
        for (k, _), result in zip(batch, fused):
            results[k] = result
    return results


def working_scale_of(card: FusionCard, images, max_memory=None, device=None):
    """(how much the network's copy of the stack is shrunk, its gray slices (N, H, W) or None):
    1 and None for a card without ``network_blur``; else the measured blur's factor
    (working_scale.py), raised where the network's pass would not fit in memory, said in one line."""
    if not card.network_blur:
        return 1.0, None
    gray = np.stack([to_gray(im) for im in images])
    factor = working_factor(card, estimate_blur(gray), gray.shape[1:])
    if factor > 1:
        least = memory_factor(gray.shape, sum(im.nbytes for im in images) + gray.nbytes, max_memory, device)
        if least > factor:
            tqdm.write(f"memory: the network sees the stack shrunk {least:.1f} times, not {factor:.1f}, "
                       f"to fit in {max_memory or available_bytes() / GIB:.1f} GiB")
            factor = least
    return factor, gray


def fuse_at_working_scale(model, card: FusionCard, images, gray: np.ndarray, factor: float, device=None,
                          precision="fp32") -> FusionResult:
    """Fuse one stack with the network on a copy shrunk by ``factor`` (working_scale.py): area-averaged to
    the nearest multiples of 32, its logits and (for the focus prior) its sharpness decoded at the
    input's size in strips (strips.py), with memory of the stack as read and a few full-size maps."""
    device = device or next(model.parameters()).device
    size = tuple(max(SIZE_MULTIPLE, round(s / SIZE_MULTIPLE) * SIZE_MULTIPLE)
                 for s in working_size(gray.shape[1:], factor))
    x = torch.from_numpy(shrunk(gray, size))[None].to(device)
    with torch.inference_mode():
        logits = focus_logits(model, card, x, precision)[0].float().cpu()
        coarse = focus_energy(x)[0].cpu() if card.focus_prior and card.fusion_temperature else None
        fused, depth, index, colour = fuse_in_strips(images, gray, logits, card, coarse)
    return FusionResult(fused_gray=fused, depth=depth, index=index, num_slices=len(images), card=card,
                        colour=colour, working_factor=factor)


def render_outputs(result: FusionResult, images, reverse: bool = False, depth_bits: int = 8,
                   outputs=OUTPUT_NAMES, legend: Optional[bool] = None) -> dict:
    """The released outputs of one stack that ``outputs`` names (OUTPUT_KINDS stems), keyed by stem.

    Fused pictures keep the input's bit depth (8 or 16); the depth map has
    ``depth_bits`` (DEPTH_BITS), the other depth pictures are 8-bit. Levels
    are rounded, except with the released decoding (``card.released``), whose
    pictures are truncated as the released script writes them. ``reverse``
    flips depth and index (1 - depth, N-1 - index) for stacks ordered
    far-to-near; it does not change the fused images. ``legend``: the depth
    colormap with its colour scale (``utils.colour_scale``); None: on, except
    with the released decoding. The index is stored in the smallest unsigned
    type that holds it (uint8 up to 256 slices).
    """
    if depth_bits not in DEPTH_BITS:
        raise ValueError(f"depth_bits must be one of {DEPTH_BITS}, got {depth_bits!r}")
    n, released = result.num_slices, result.card.released
    depth = 1.0 - result.depth if reverse else result.depth
    index = (n - 1) - result.index if reverse else result.index

    def colormap():
        picture = depth_colormap(depth)
        return colour_scale(picture, n, reverse) if (not released if legend is None else legend) else picture

    render = {   # each computed only when asked for
        "fused_gray": lambda: to_integer_image(result.fused_gray, images[0].dtype, truncate=released),
        "depth_map": lambda: to_integer_image(depth, np.uint16 if depth_bits == 16 else np.uint8, truncate=released),
        "color_fused": lambda: (fuse_colour(images, result.index, result.weights, result.card)
                                if result.colour is None else result.colour),
        "depth_colormap": colormap,
        "depth_index": lambda: index.astype(np.min_scalar_type(max(n - 1, 0))),
        "depth_index_vis": lambda: index_picture(index, n, truncate=released),
    }
    return {stem: render[stem]() for stem in outputs}


def write_outputs(outputs: dict, paths: dict, metadata=None, **encoder_options):
    """Write render_outputs' pictures atomically: ``paths`` maps each stem to a file
    (.npy for the index, an image format otherwise). ``metadata`` (utils.ImageMetadata)
    goes into the colour fused image; encoder_options: utils.encoder_params'."""
    def write(item):
        stem, path = item
        if Path(path).suffix == ".npy":
            write_npy(path, outputs[stem])
        else:
            write_image(path, outputs[stem], encoder_params(Path(path).suffix, **encoder_options),
                        metadata if stem == "color_fused" else None)
    parallel_map(write, paths.items())         # the encoders run side by side
