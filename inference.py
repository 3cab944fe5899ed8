"""The one inference path shared by every predict script.

``fuse_gray_batch`` runs the network on gray stacks at their own size (the
released resize up to a multiple of 32 and back); ``render_outputs`` turns
one result into the six released pictures.
"""
import argparse
from dataclasses import dataclass
from typing import Optional
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fast_inference import PRECISIONS, fast_outputs, tiled_forward
from model import (INDEX_RULES, TEST_VIEWS, base_band_correction, checked_base_sigma, checked_base_weight_sigma,
                   checked_depth_window, checked_focus_prior, checked_fusion_temperature, load_model, uses_base_band)
from utils import (depth_colormap, dtype_max, index_picture, resize_back, resize_to_multiple,
                   encoder_params, stack_to_tensor, to_gray, to_uint8, write_image, write_npy)

# The weights every predict script uses unless --model_path says otherwise:
# trained by this project (docs/weights.md); its model card beside it
# (stackmffv2_synthetic.json) names the index rule they were trained for.
DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "stackmffv2_synthetic.pth"


def _argparse_type(check):
    """An argparse type from a model.checked_* function: one clear usage error for a bad value."""
    def parse(text):
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


fusion_temperature_arg = _argparse_type(checked_fusion_temperature)
focus_prior_arg = _argparse_type(checked_focus_prior)
depth_window_arg = _argparse_type(checked_depth_window)
base_sigma_arg = _argparse_type(checked_base_sigma)
base_weight_sigma_arg = _argparse_type(checked_base_weight_sigma)


def add_model_arguments(group):
    """Flags every predict script shares: checkpoint, index rule, device, memory bound, precision."""
    group.add_argument("--model_path", type=str, default=str(DEFAULT_MODEL),
                       help="StackMFF-V2 checkpoint (default: the project's own weights)")
    group.add_argument("--index_rule", type=str, default=None, choices=INDEX_RULES,
                       help="how the slice index is read from the focus logits (default: the rule in the "
                            "checkpoint's model card, else the released minmax_round)")
    group.add_argument("--views", type=int, default=None, choices=TEST_VIEWS,
                       help="test-time views whose focus logits are averaged: 1 the stack as given, 2 also "
                            "mirrored, 4 also flipped up-down, 8 also transposed; costs that many passes "
                            "(default: the model card's, else 1 as released; --max_memory tiles run 1)")
    group.add_argument("--fusion_temperature", type=fusion_temperature_arg, default=None,
                       help="0 takes each pixel from the slice the index names (released); T > 0 blends the "
                            "slices with softmax(focus logits / T) weights (default: the model card's, else 0; "
                            "--max_memory tiles pick by index)")
    # Refinements of the blend (model.soft_fusion_weights, model.blend_slices); a pick by index ignores them.
    for flag, parse, what in (
            ("--focus_prior", focus_prior_arg,
             "p > 0 multiplies each slice's blend weight by its local sharpness (squared Laplacian) to the power "
             "p, so that among the slices the network finds likely the sharpest wins"),
            ("--depth_window", depth_window_arg,
             "w > 0 keeps the blend within about w slices of the expected slice number, so that at the edge of "
             "a near object it takes the slices between the two depths"),
            ("--base_sigma", base_sigma_arg,
             "s > 0 blends in two bands: each slice's base (Gaussian blur of sigma s px) takes the blend weights "
             "smoothed by --base_weight_sigma, its detail the weights as they are, so seams at depth edges fade"),
            ("--base_weight_sigma", base_weight_sigma_arg,
             "px: the Gaussian that smooths the weights of the base band (0: one band)")):
        group.add_argument(flag, type=parse, default=None,
                           help=what + "; needs a fusion temperature > 0 (default: the model card's, else 0)")
    group.add_argument("--device", type=str, default=None,
                       help="cpu, cuda, cuda:1, mps (default: best available; under torchrun cuda:<LOCAL_RANK>)")
    group.add_argument("--max_memory", type=float, default=None,
                       help="GiB: fuse tile by tile so that memory stays within this bound (default: whole image)")
    group.add_argument("--precision", type=str, default="fp32", choices=PRECISIONS,
                       help="fp16/bf16 run the GRU convolutions in half precision (for GPUs)")
    return group


def model_from_args(args, device):
    """``model.load_model`` with the flags of ``add_model_arguments`` (None: the model card's)."""
    return load_model(args.model_path, device, index_rule=args.index_rule, views=args.views,
                      fusion_temperature=args.fusion_temperature, focus_prior=args.focus_prior,
                      depth_window=args.depth_window, base_sigma=args.base_sigma,
                      base_weight_sigma=args.base_weight_sigma)


# Released output kinds: file-name stem used by predict_one_stack.py, folder
# used by the dataset scripts, and file extension.
OUTPUT_KINDS = (
    ("fused_gray", "fused_images", ".png"),
    ("depth_map", "depth_maps", ".png"),
    ("color_fused", "color_fused_images", ".png"),
    ("depth_colormap", "depth_colormaps", ".png"),
    ("depth_index", "depth_indices", ".npy"),
    ("depth_index_vis", "depth_indices_vis", ".png"),
)
# The kinds written in --output_format (utils.OUTPUT_FORMATS); the others stay as above.
FUSED_KINDS = ("fused_gray", "color_fused")


@dataclass
class FusionResult:
    """One fused stack at the input size.

    fused_gray: float32 HxW in [0, 1]; depth: float32 HxW in [0, 1];
    index: int64 HxW in [0, N-1]; num_slices: N; weights: float32 NxHxW
    soft fusion weights (summing to 1 over N), None when fused picks by index;
    base_sigma, base_weight_sigma: the model's two-band blend (0: one band),
    which the colour blend repeats.
    """
    fused_gray: np.ndarray
    depth: np.ndarray
    index: np.ndarray
    num_slices: int
    weights: Optional[np.ndarray] = None
    base_sigma: float = 0.0
    base_weight_sigma: float = 0.0


def fuse_gray_batch(model, gray, device=None, max_memory=None, precision="fp32", fast=True,
                    reserved_bytes=0):
    """Fuse a batch of gray stacks of one size and length.

    gray (B, N, H, W) float in [0, 1], any H and W (or, with ``max_memory``,
    uint8/uint16 numpy gray slices, kept in their integer type). Returns B
    FusionResults: the network runs at the next multiple of 32, then fused
    and depth are resized back bilinearly and the index with nearest
    neighbour (as released).

    fast: the fast path of fast_inference.py (same numbers); False runs the
    straightforward ``model.forward``. max_memory (GiB): tiled inference whose
    memory does not grow with the image (see docs/performance.md for the
    small drift from whole-image results); reserved_bytes: what the caller
    holds meanwhile (the colour slices), counted against max_memory.
    precision: 'fp32', or 'fp16' / 'bf16' for the GRU convolutions (meant for GPUs).
    """
    device = device or next(model.parameters()).device
    b, n, h, w = gray.shape
    if max_memory:
        tiled = [tiled_forward(model, stack, max_memory=max_memory, precision=precision, progress=tqdm,
                               reserved_bytes=reserved_bytes)
                 for stack in gray]
        fused, depth, index = (torch.stack(parts)[:, None] for parts in zip(*tiled))
        index, weights = index[:, 0], None
    else:
        x = resize_to_multiple(torch.as_tensor(gray).float()).to(device)
        if fast:
            fused, depth, index, weights = fast_outputs(model, x, precision)
        else:
            with torch.inference_mode():
                fused, depth, index, weights = model.outputs(x, model.focus_logits_of_views(x))
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
            weights=None if weights is None else weights_at_size(weights[k], (h, w)),
            base_sigma=model.base_sigma,
            base_weight_sigma=model.base_weight_sigma,
        ))
    return results


def weights_at_size(weights: torch.Tensor, size) -> np.ndarray:
    """Soft fusion weights (N, H', W') at the network's size -> float32 (N, H, W), resized
    bilinearly as the fused image is, and renormalised to sum to 1."""
    out = np.stack([resize_back(w, size) for w in weights.float().cpu().numpy()])
    out /= np.maximum(out.sum(axis=0, keepdims=True), 1e-12)
    return out


def fuse_images(model, images, device=None, max_memory=None, precision="fp32") -> FusionResult:
    """Fuse one stack given as a list of uint8/uint16 slices (see utils.read_stack).

    With ``max_memory`` the gray stack stays uint8/uint16 (a quarter of the
    float32 size) and each tile is converted on the fly.
    """
    if max_memory:
        gray = np.stack([to_gray(im) for im in images])           # (N, H, W) uint8/uint16
        kept = sum(im.nbytes for im in images)                    # the slices stay for colour fusion
        return fuse_gray_batch(model, gray[None], device, max_memory, precision, reserved_bytes=kept)[0]
    return fuse_gray_batch(model, stack_to_tensor(images), device, precision=precision)[0]


def color_fuse(images, index: np.ndarray) -> np.ndarray:
    """Take, at every pixel, the original (colour) slice's value named by index.

    Slice by slice, so memory stays at one image more than the inputs
    (stacking all N slices first would double it).
    """
    fused = images[0].copy()                                      # (H, W[, 3])
    for k in range(1, len(images)):
        chosen = index == k                                       # (H, W)
        fused[chosen] = images[k][chosen]
    return fused


def color_blend(images, weights: np.ndarray, base_sigma: float = 0.0, base_weight_sigma: float = 0.0) -> np.ndarray:
    """Soft colour fusion: sum over slices of weights[k] * images[k], slice by slice
    (a few float images more than the inputs), rounded back to the input's type.

    With ``base_sigma`` and ``base_weight_sigma`` above 0, the two-band blend of
    ``model.blend_slices``, each colour channel on its own."""
    total = np.zeros(images[0].shape, np.float32)
    two_bands = uses_base_band(base_sigma, base_weight_sigma)
    for image, weight in zip(images, weights):
        if two_bands:
            planes = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
            planes = planes.permute(2, 0, 1) if image.ndim == 3 else planes[None]      # (C, H, W)
            correction = base_band_correction(planes[None], torch.from_numpy(weight)[None, None], base_sigma,
                                              base_weight_sigma)[0].numpy()            # (C, H, W)
            total += correction.transpose(1, 2, 0) if image.ndim == 3 else correction[0]
        total += image * (weight[..., None] if image.ndim == 3 else weight)
    return np.clip(np.rint(total), 0, dtype_max(images[0].dtype)).astype(images[0].dtype)


def render_outputs(result: FusionResult, images, reverse: bool = False) -> dict:
    """The six released outputs of one stack, keyed by OUTPUT_KINDS stems.

    Fused pictures keep the input's bit depth (8 or 16); depth pictures are
    8-bit. ``reverse`` flips depth and index (1 - depth, N-1 - index) for
    stacks ordered far-to-near; it does not change the fused images.
    """
    n = result.num_slices
    depth = 1.0 - result.depth if reverse else result.depth
    index = (n - 1) - result.index if reverse else result.index
    dtype = images[0].dtype
    fused_gray = (np.clip(result.fused_gray, 0, 1) * dtype_max(dtype)).astype(dtype)
    return {
        "fused_gray": fused_gray,
        "depth_map": to_uint8(depth),
        "color_fused": (color_fuse(images, result.index) if result.weights is None
                        else color_blend(images, result.weights, result.base_sigma, result.base_weight_sigma)),
        "depth_colormap": depth_colormap(depth),
        "depth_index": index.astype(np.int32),
        "depth_index_vis": index_picture(index, n),
    }


def write_outputs(outputs: dict, paths: dict, metadata=None, **encoder_options):
    """Write render_outputs' pictures atomically: ``paths`` maps each stem to a file
    (.npy for the index, an image format otherwise). ``metadata`` (utils.ImageMetadata)
    goes into the colour fused image; encoder_options: utils.encoder_params'."""
    for stem, path in paths.items():
        if Path(path).suffix == ".npy":
            write_npy(path, outputs[stem])
        else:
            write_image(path, outputs[stem], encoder_params(Path(path).suffix, **encoder_options),
                        metadata if stem == "color_fused" else None)
