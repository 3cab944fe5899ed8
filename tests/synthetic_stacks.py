"""Tiny synthetic training sets in the released layout, built with the released synthesis.

Shared by tests/test_dataset.py and tests/test_train.py.
"""
from pathlib import Path

import cv2
import numpy as np

from make_datasets.synthesis import released_stack


def textured_image(rng, size: int) -> np.ndarray:
    """size x size uint8 gray texture with detail at several scales (focus cues everywhere)."""
    image = np.zeros((size, size), np.float64)
    for cells in (4, 8, 16, 32):
        noise = rng.random((cells, cells))
        image += cv2.resize(noise, (size, size), interpolation=cv2.INTER_NEAREST if cells == 32 else cv2.INTER_CUBIC)
    image = (image - image.min()) / max(np.ptp(image), 1e-9)
    return (image * 255).astype(np.uint8)


def smooth_depth(rng, size: int) -> np.ndarray:
    """size x size uint8 depth: a ramp in a random direction, 0..255 over the image."""
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    ramp = np.cos(angle) * x + np.sin(angle) * y
    ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-9)
    return np.round(ramp * 255).astype(np.uint8)


def make_dataset(root, num_scenes: int, slice_counts=(4, 6), size: int = 64, seed: int = 0, color=False):
    """Write root/image_stacks/<scene>/<k>.png and root/depth_maps/<scene>.png.

    Returns (stack_dir, depth_dir) as strings. Scene k has slice_counts[k % len] slices.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    stack_dir, depth_dir = root / "image_stacks", root / "depth_maps"
    depth_dir.mkdir(parents=True, exist_ok=True)
    for k in range(num_scenes):
        image, depth = textured_image(rng, size), smooth_depth(rng, size)
        if color:
            image = cv2.merge([image, np.roll(image, 3, axis=1), 255 - image])
        slices, _ = released_stack(image, depth, slice_counts[k % len(slice_counts)])
        scene = stack_dir / f"scene{k}"
        scene.mkdir(parents=True)
        for i, picture in enumerate(slices, start=1):
            cv2.imwrite(str(scene / f"{i}.png"), picture)
        cv2.imwrite(str(depth_dir / f"scene{k}.png"), depth)
    return str(stack_dir), str(depth_dir)
