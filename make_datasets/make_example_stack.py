"""Build the small example stack shipped in examples/ (re-runnable, deterministic).

    python make_datasets/make_example_stack.py --output_dir examples/coffee_stack

scikit-image's bundled 'coffee' photograph is given a procedural depth (a
table slanting away from the camera with the cup standing out in front) and
is turned into an 8-slice focus stack with the released synthesis.
"""
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import ArgumentParser  # noqa: E402
from make_datasets.synthesis import released_stack  # noqa: E402
from utils import ensure_output_dir, run_cli, write_image  # noqa: E402


def get_args_parser():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", type=str, default="examples/coffee_stack", help="folder for 1.jpg ... N.jpg")
    parser.add_argument("--num_slices", type=int, default=8, help="number of slices")
    parser.add_argument("--width", type=int, default=480, help="width of the slices (height keeps the aspect)")
    parser.add_argument("--quality", type=int, default=92, help="JPEG quality")
    parser.add_argument("--depth_out", type=str, default=None,
                        help="also save the depth map (8-bit PNG) here (default: not saved)")
    return parser


def coffee_scene(width: int):
    """The coffee photo (BGR uint8) and an 8-bit depth map, 0 = near, 255 = far."""
    from skimage import data

    rgb = data.coffee()
    height = round(rgb.shape[0] * width / rgb.shape[1])
    image = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), (width, height), interpolation=cv2.INTER_AREA)
    rows = np.linspace(0.0, 1.0, height)[:, None]
    table = np.repeat(1.0 - rows, width, axis=1)            # far at the top, near at the bottom
    yy, xx = np.mgrid[0:height, 0:width]
    cup = ((xx - 0.52 * width) / (0.33 * width)) ** 2 + ((yy - 0.52 * height) / (0.42 * height)) ** 2 < 1
    depth = np.where(cup, 0.15, 0.3 + 0.7 * table)          # the cup stands out in front of the table
    return image, np.clip(depth * 255, 0, 255).astype(np.uint8)


def main(args):
    image, depth = coffee_scene(args.width)
    slices, _ = released_stack(image, depth, args.num_slices)
    out = ensure_output_dir(args.output_dir)
    for k, s in enumerate(slices, start=1):
        write_image(out / f"{k}.jpg", s, (cv2.IMWRITE_JPEG_QUALITY, args.quality))
    if args.depth_out:
        write_image(args.depth_out, depth)
    print(f"wrote {len(slices)} slices of {image.shape[1]}x{image.shape[0]} to {out}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
