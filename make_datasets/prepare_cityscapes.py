"""Flatten Cityscapes left images into one folder.

    python make_datasets/prepare_cityscapes.py --root cityscapes --output_dir data/cityscapes/images

Expected input (leftImg8bit_trainvaltest):

    cityscapes/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png

Output: <output_dir>/<city>_<seq>_<frame>.png (the '_leftImg8bit' suffix
dropped; city names make them unique across splits), byte-identical copies.
Cityscapes ships no dense depth: put a depth map per image into a sibling
depth/ folder (docs/datasets.md). Re-running overwrites the same files.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from make_datasets.common import copy_images, find_files, require_dir, source_parser
from utils import run_cli

SPLITS = ("train", "val", "test", "train_extra")
SUFFIX = "_leftImg8bit"


def get_args_parser():
    return source_parser(__doc__, "folder that holds leftImg8bit/", "flat folder to write the images to",
                         SPLITS, default_splits=("train", "val"))


def flat_name(path: Path) -> str:
    stem = path.stem
    return stem[: -len(SUFFIX)] if stem.endswith(SUFFIX) else stem


def main(args):
    left = require_dir(Path(args.root) / "leftImg8bit", "Cityscapes leftImg8bit folder")
    files = []
    for split in args.splits:
        files += find_files(left / split, f"*/*{SUFFIX}.png", f"Cityscapes {split} folder")
    count = copy_images(files, args.output_dir, flat_name, "Cityscapes")
    print(f"flattened {count} Cityscapes images to {args.output_dir}")
    return count


if __name__ == "__main__":
    run_cli(main, get_args_parser())
