"""Fuse one focus stack into an all-in-focus image and a depth map.

    python predict_one_stack.py -i examples/coffee_stack -o results

The input is a folder of slices (sorted by the numbers in their names), a
multi-page TIFF or a video. Six outputs are written, as released (--outputs
chooses among them): fused gray, depth map, color fused image, depth
colormap, index .npy and index picture.
"""
import time
from pathlib import Path

from cli import run_cli
from options import FUSED_KINDS, OUTPUT_KINDS, OUTPUT_NAMES, predict_parser


def get_args_parser():
    return predict_parser(__doc__, "stack")


def output_paths(output_dir: Path, fixed_names: bool, fused_suffix: str = ".png", outputs=OUTPUT_NAMES) -> dict:
    """Stem -> file in ``output_dir`` for each of ``outputs``, named with the run's time unless ``fixed_names``."""
    suffix = "" if fixed_names else time.strftime("_%Y%m%d_%H%M%S")
    return {stem: output_dir / f"{stem}{suffix}{fused_suffix if stem in FUSED_KINDS else ext}"
            for stem, _, ext in OUTPUT_KINDS if stem in outputs}


def main(args):
    # torch and OpenCV load here, not on import, so that --help answers at once
    from exposure import match_exposure
    from inference import fuse_images, model_from_args, render_outputs, write_outputs
    from Registration import align_with_report
    from utils import (output_folder, output_format_from_args, read_stack, read_stack_metadata,
                       refuse_output_into_input, select_device)

    refuse_output_into_input(args.output_dir, args.input_dir, what="--output_dir")
    device = select_device(args.device)
    fused_suffix, write_options = output_format_from_args(args)
    model, card = model_from_args(args, device)          # a wrong checkpoint is told before a long read
    images, names = read_stack(args.input_dir, every=args.every)
    if args.align != "none":
        images, found = align_with_report(images, method=args.align, progress=True, in_place=True)
        print(found)
    if args.match_exposure:
        images, gains = match_exposure(images)
        print(f"matched exposure to slice 1: gains {gains.min():.3f} to {gains.max():.3f}")
    with output_folder(args.output_dir) as output_dir:
        start = time.perf_counter()
        result = fuse_images(model, card, images, device, args.max_memory, args.precision)
        elapsed = time.perf_counter() - start
        paths = output_paths(output_dir, args.fixed_names, fused_suffix, args.outputs)
        outputs = render_outputs(result, images, args.reverse, args.depth_bits, args.outputs, args.legend)
        write_outputs(outputs, paths, read_stack_metadata(args.input_dir), **write_options)
    h, w = images[0].shape[:2]
    print(f"fused {len(images)} slices of {w}x{h} in {elapsed:.2f} s on {device}; outputs in {output_dir}")
    return paths


if __name__ == "__main__":
    run_cli(main, get_args_parser())
