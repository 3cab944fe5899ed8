"""Synthesise focus stacks from all-in-focus images and their depth maps.

    python make_datasets/make_dataset.py --image_dir data/images --depth_dir data/depth \\
        --output_dir data/synth --mode released --train_layout

For every image ``<image_dir>/<name>.<ext>`` with a depth map
``<depth_dir>/<name>.<ext>`` (8-bit gray, 0 = near; see --invert_depth) a
stack of R slices is rendered, R drawn per image from --slice_counts. Output:

    <output_dir>/AiF/<name>.<format>             the all-in-focus image
    <output_dir>/depth/<name>.png                the 8-bit depth used
    <output_dir>/quantized_depth/<name>.png      focus index k of every pixel, as k / (R-1) x 255
    <output_dir>/dof_stack/<name>/1..R.<format>  slice k is sharp where the focus index is k-1

With --train_layout, also the layout that train.py reads:

    <output_dir>/image_stacks/<name>/1..R.<format>   hard links to the dof_stack files where possible
    <output_dir>/depth_maps/<name>.png           (see --train_depth)
"""
import sys
import zlib
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from cli import ArgumentParser  # noqa: E402
from make_datasets.common import make_dirs, pair_by_stem, read_depth_8bit, run_batch, write_stack
from make_datasets.synthesis import RELEASED_SLICE_COUNTS, physical_stack, released_stack
from utils import (InputError, ensure_output_dir, index_picture, read_image, refuse_output_into_input, run_cli,
                   write_image)

MODES = ("released", "physical")
FORMATS = ("jpg", "png", "tif", "bmp")
# Under --output_dir: the four released folders, then the two of --train_layout.
OUTPUT_FOLDERS = ("AiF", "depth", "quantized_depth", "dof_stack", "image_stacks", "depth_maps")


def get_args_parser():
    parser = ArgumentParser(description=__doc__)
    io = parser.add_argument_group("input and output")
    io.add_argument("--image_dir", type=str, required=True, help="folder of all-in-focus images")
    io.add_argument("--depth_dir", type=str, required=True,
                    help="folder of depth maps named like the images (gray, 8 or 16 bit)")
    io.add_argument("--output_dir", type=str, required=True, help="dataset root to write")
    io.add_argument("--format", type=str, default="jpg", choices=FORMATS,
                    help="file format of the AiF image and the slices (jpg as released; png for 16-bit images)")
    io.add_argument("--invert_depth", action="store_true",
                    help="the depth maps are bright = near (e.g. Depth Anything V2 output); flip them")
    io.add_argument("--train_layout", action="store_true",
                    help="also write image_stacks/<name>/ and depth_maps/<name>.png for train.py")
    io.add_argument("--train_depth", type=str, default="depth", choices=("depth", "focus_index"),
                    help="what depth_maps/ holds: the 8-bit depth itself, or the focus index scaled to 0..255")
    synth = parser.add_argument_group("synthesis")
    synth.add_argument("--mode", type=str, default="released", choices=MODES,
                       help="released: R depth bins, blur by bin distance; "
                            "physical: blur grows continuously with depth, layered near-over-far rendering")
    synth.add_argument("--slice_counts", type=int, nargs="+", default=list(RELEASED_SLICE_COUNTS),
                       help="stack lengths R to draw from, one per image")
    synth.add_argument("--max_sigma", type=float, default=4.0,
                       help="physical mode: Gaussian sigma in pixels at the largest depth distance (255)")
    synth.add_argument("--seed", type=int, default=0,
                       help="seed of the draw of R; each image's draw depends only on the seed and its name")
    return parser


def slice_count_for(name: str, counts, seed: int) -> int:
    """R for one image: reproducible from (seed, name) alone, whatever else is in the folder."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    return int(rng.choice(counts))


def synthesize(image, depth, num_slices, mode, max_sigma):
    """(slices, focus index HxW int64 in [0, R-1]) by the chosen mode."""
    if mode == "released":
        return released_stack(image, depth, num_slices)
    return physical_stack(image, depth, num_slices, max_sigma=max_sigma)


def check_args(args):
    if any(count < 2 for count in args.slice_counts):
        raise InputError(f"--slice_counts must all be at least 2, got {args.slice_counts}")
    if args.max_sigma <= 0:
        raise InputError(f"--max_sigma must be positive, got {args.max_sigma}")


def main(args):
    check_args(args)
    pairs = pair_by_stem(args.image_dir, args.depth_dir)
    for folder in OUTPUT_FOLDERS:
        refuse_output_into_input(Path(args.output_dir, folder), args.image_dir, args.depth_dir,
                                 what="output subfolder")
    root = ensure_output_dir(args.output_dir)
    aif_dir, depth_dir, quantized_dir, stack_dir = make_dirs(root, *OUTPUT_FOLDERS[:4])
    if args.train_layout:
        train_stack_dir, train_depth_dir = make_dirs(root, *OUTPUT_FOLDERS[4:])

    def process(pair):
        name, image_path, depth_path = pair
        if depth_path is None:
            raise InputError(f"no depth map named '{name}.*' in '{args.depth_dir}'")
        image = read_image(image_path)
        depth = read_depth_8bit(depth_path, invert=args.invert_depth)
        if depth.shape != image.shape[:2]:
            raise InputError(f"depth map is {depth.shape[1]}x{depth.shape[0]} but the image is "
                             f"{image.shape[1]}x{image.shape[0]}")
        if image.dtype == np.uint16 and args.format in ("jpg", "bmp"):
            raise InputError(f"16-bit image cannot be saved as {args.format}; use --format png or tif")
        num_slices = slice_count_for(name, args.slice_counts, args.seed)
        slices, focus_index = synthesize(image, depth, num_slices, args.mode, args.max_sigma)
        focus_picture = index_picture(focus_index, num_slices)
        write_stack(stack_dir / name, slices, args.format, copies=[train_stack_dir / name] if args.train_layout else [])
        write_image(aif_dir / f"{name}.{args.format}", image)
        write_image(depth_dir / f"{name}.png", depth)
        write_image(quantized_dir / f"{name}.png", focus_picture)
        if args.train_layout:
            write_image(train_depth_dir / f"{name}.png", depth if args.train_depth == "depth" else focus_picture)

    done = run_batch(pairs, process, desc=f"{args.mode} stacks", name_of=lambda pair: pair[0])
    print(f"wrote {done} stacks to {root}")
    return done


if __name__ == "__main__":
    run_cli(main, get_args_parser())
