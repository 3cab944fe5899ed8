"""Fuse every stack of one or more benchmark datasets.

    python predict_datasets.py --test_root data --test_datasets Middlebury Mobile_Depth \\
        --output_dir results --batch_size 4

Reads <test_root>/<dataset>/dof_stack/<scene>/<slices> (slices in natural
file-name order) and writes, as released,
<output_dir>/results_<timestamp>/<dataset>/<kind>/<scene>.<ext> for the six
kinds fused_images, depth_maps, color_fused_images, depth_colormaps,
depth_indices (.npy) and depth_indices_vis, plus summary.json (mean inference
time per stack, scenes done, scenes failed and why). --outputs chooses among
the six. Resume a killed run with --skip_existing (and its --run_name);
scale out with
``torchrun --nproc_per_node=K predict_datasets.py ...``. See
docs/batch_inference.md.
"""
import sys
from functools import partial
from pathlib import Path

from cli import InputError, run_cli
from options import predict_parser

STACK_FOLDER = "dof_stack"


def get_args_parser():
    return predict_parser(__doc__, "stacks")


def find_stack_scenes(dataset_dir: Path, every: int = 1):
    """One Scene per folder in <dataset_dir>/dof_stack, in natural order (every-th slice kept)."""
    # torch and OpenCV load when a run starts, not on import, so that --help answers at once
    from batch_inference import Scene
    from utils import natural_sort_key, read_stack, read_stack_metadata
    stacks = dataset_dir / STACK_FOLDER
    if not dataset_dir.is_dir():
        raise InputError(f"dataset folder '{dataset_dir}' does not exist")
    if not stacks.is_dir():
        raise InputError(f"dataset folder '{dataset_dir}' has no '{STACK_FOLDER}' folder")
    folders = sorted((p for p in stacks.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=natural_sort_key)
    if not folders:
        raise InputError(f"'{stacks}' holds no scene folders")
    return [Scene(folder.name, load=partial(read_stack, folder, every=every),
                  metadata=partial(read_stack_metadata, folder)) for folder in folders]


def main(args):
    from batch_inference import run_batch_inference
    return run_batch_inference(args, partial(find_stack_scenes, every=args.every))


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()).exit_status)
