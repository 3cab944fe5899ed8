"""Time the synthesis modes on one synthetic scene and print the figures.

    python make_datasets/benchmark_synthesis.py [--size 512] [--slices 16] [--repeats 3]

The scene is a random colour texture over a depth map of a tilted ground
plane with two objects standing on it (so the layers are large, and the
depth has edges); OpenCV runs on one thread, as for one core.
"""
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np

from cli import ArgumentParser  # noqa: E402
from make_datasets.synthesis import lightfield_stack, physical_stack, released_stack
from utils import run_cli


def get_args_parser():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=512, help="image height and width")
    parser.add_argument("--slices", type=int, default=16, help="slices per stack")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode; the best is printed")
    parser.add_argument("--max_sigma", type=float, default=4.0,
                        help="physical mode's largest blur (the Gaussian's sigma, the disc's and light field's radius)")
    parser.add_argument("--gray", action="store_true", help="time a gray image (make_realistic.py writes gray)")
    return parser


def scene(size: int):
    """(HxWx3 uint8 texture, HxW uint8 depth: ground plane far at the top, two near objects)."""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (3, 3), 0)
    rows = np.linspace(255, 0, size)[:, None].repeat(size, axis=1)
    depth = rows.copy()
    cv2.circle(depth, (size // 3, size // 2), size // 6, 40, -1)
    cv2.rectangle(depth, (size // 2, size // 4), (size * 4 // 5, size * 3 // 5), 120, -1)
    return image, np.clip(depth, 0, 255).astype(np.uint8)


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(args):
    cv2.setNumThreads(1)
    image, depth = scene(args.size)
    if args.gray:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    shape = "x".join(map(str, image.shape))
    for name, fn in (("released", lambda: released_stack(image, depth, args.slices)),
                     ("physical", lambda: physical_stack(image, depth, args.slices, args.max_sigma)),
                     ("disc", lambda: physical_stack(image, depth, args.slices, args.max_sigma, psf="disc")),
                     ("lf 5x5", lambda: lightfield_stack(image, depth, args.slices, args.max_sigma, grid=5)),
                     ("lf 7x7", lambda: lightfield_stack(image, depth, args.slices, args.max_sigma, grid=7))):
        seconds = best_time(fn, args.repeats)
        print(f"{name:9s} {shape}, {args.slices} slices: {seconds:.2f} s (best of {args.repeats})")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
