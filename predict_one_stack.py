"""Fuse one focus stack into an all-in-focus image and a depth map.

    python predict_one_stack.py --input_dir examples/coffee_stack --output_dir results

The input is a folder of slices (sorted by the numbers in their names) or a
multi-page TIFF. Six outputs are written, as released: fused gray, depth
map, color fused image, depth colormap, index .npy and index picture.
"""
import time
from pathlib import Path

from cli import ArgumentParser
from exposure import add_exposure_argument, match_exposure
from inference import (DEPTH_BITS, FUSED_KINDS, OUTPUT_KINDS, add_model_arguments, fuse_images, model_from_args,
                       render_outputs, write_outputs)
from Registration import add_align_argument, align_stack
from utils import (add_output_format_arguments, ensure_output_dir, output_format_from_args, read_stack,
                   read_stack_metadata, refuse_output_into_input, run_cli, select_device)


def get_args_parser():
    parser = ArgumentParser(description=__doc__)
    io = parser.add_argument_group("input and output")
    io.add_argument("--input_dir", type=str, required=True,
                    help="folder of slices (natural file-name order; camera RAW files too), a multi-page "
                         "TIFF or a video file (.mp4, .avi, .mov, .mkv)")
    io.add_argument("--every", type=int, default=1,
                    help="keep slices (video frames) 1, K+1, 2K+1, ... (default: 1, every slice)")
    io.add_argument("--output_dir", type=str, default="./results", help="where the six outputs go")
    io.add_argument("--fixed_names", action="store_true",
                    help="write fused_gray.png, depth_map.png, ... instead of names with a timestamp")
    io.add_argument("--reverse", action="store_true",
                    help="save 1 - depth and N-1 - index (for stacks ordered far to near)")
    io.add_argument("--depth_bits", type=int, default=8, choices=DEPTH_BITS,
                    help="bits of depth_map: 8 (released) or 16, which keeps the sub-slice levels of "
                         "--depth_rule guided (default: 8)")
    add_align_argument(io)
    add_exposure_argument(io)
    add_output_format_arguments(io)
    add_model_arguments(parser.add_argument_group("model"))
    return parser


def output_paths(output_dir: Path, fixed_names: bool, fused_suffix: str = ".png") -> dict:
    suffix = "" if fixed_names else time.strftime("_%Y%m%d_%H%M%S")
    return {stem: output_dir / f"{stem}{suffix}{fused_suffix if stem in FUSED_KINDS else ext}"
            for stem, _, ext in OUTPUT_KINDS}


def main(args):
    refuse_output_into_input(args.output_dir, args.input_dir, what="--output_dir")
    device = select_device(args.device)
    fused_suffix, write_options = output_format_from_args(args)
    images, names = read_stack(args.input_dir, every=args.every)
    if args.align != "none":
        images = align_stack(images, method=args.align, progress=True)
    if args.match_exposure:
        images, gains = match_exposure(images)
        print(f"matched exposure to slice 1: gains {gains.min():.3f} to {gains.max():.3f}")
    model, card = model_from_args(args, device)
    output_dir = ensure_output_dir(args.output_dir)
    start = time.perf_counter()
    result = fuse_images(model, card, images, device, args.max_memory, args.precision)
    elapsed = time.perf_counter() - start
    paths = output_paths(output_dir, args.fixed_names, fused_suffix)
    write_outputs(render_outputs(result, images, args.reverse, args.depth_bits), paths, read_stack_metadata(args.input_dir),
                  **write_options)
    h, w = images[0].shape[:2]
    print(f"fused {len(images)} slices of {w}x{h} in {elapsed:.2f} s on {device}; outputs in {output_dir}")
    return paths


if __name__ == "__main__":
    run_cli(main, get_args_parser())
