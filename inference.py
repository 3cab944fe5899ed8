"""The one inference path shared by every predict script.

``fuse_gray_batch`` runs the network on gray stacks at their own size (the
released resize up to a multiple of 32 and back); ``render_outputs`` turns
one result into the six released pictures.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils import (depth_colormap, dtype_max, index_picture, resize_back, resize_to_multiple,
                   stack_to_tensor, to_uint8)

# The weights every predict script uses unless --model_path says otherwise:
# trained by this project (docs/weights.md); its model card beside it
# (stackmffv2_synthetic.json) names the index rule they were trained for.
DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "stackmffv2_synthetic.pth"

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


@dataclass
class FusionResult:
    """One fused stack at the input size.

    fused_gray: float32 HxW in [0, 1]; depth: float32 HxW in [0, 1];
    index: int64 HxW in [0, N-1]; num_slices: N.
    """
    fused_gray: np.ndarray
    depth: np.ndarray
    index: np.ndarray
    num_slices: int


def fuse_gray_batch(model, gray: torch.Tensor, device=None):
    """Fuse a batch of gray stacks of one size and length.

    gray (B, N, H, W) float in [0, 1], any H and W. Returns B FusionResults:
    the network runs at the next multiple of 32, then fused and depth are
    resized back bilinearly and the index with nearest neighbour (as released).
    """
    device = device or next(model.parameters()).device
    b, n, h, w = gray.shape
    x = resize_to_multiple(gray.float()).to(device)
    with torch.inference_mode():
        fused, depth, index = model(x)  # (B,1,h',w'), (B,1,h',w'), (B,h',w')
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
        ))
    return results


def fuse_images(model, images, device=None) -> FusionResult:
    """Fuse one stack given as a list of uint8/uint16 slices (see utils.read_stack)."""
    return fuse_gray_batch(model, stack_to_tensor(images), device)[0]


def color_fuse(images, index: np.ndarray) -> np.ndarray:
    """Take, at every pixel, the original (colour) slice's value named by index."""
    stack = np.stack(images)                                       # (N, H, W[, 3])
    idx = index.reshape((1,) + index.shape + (1,) * (stack.ndim - 3))
    return np.take_along_axis(stack, idx, axis=0)[0]


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
        "color_fused": color_fuse(images, result.index),
        "depth_colormap": depth_colormap(depth),
        "depth_index": index.astype(np.int32),
        "depth_index_vis": index_picture(index, n),
    }
