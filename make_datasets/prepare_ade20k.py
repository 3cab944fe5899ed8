"""Extract ADE20K scene images into one flat folder.

    python make_datasets/prepare_ade20k.py --root ADEChallengeData2016 --output_dir data/ade20k/images

Expected input (the ADEChallengeData2016 release; annotations are not used):

    ADEChallengeData2016/images/training/ADE_train_00000001.jpg ...
    ADEChallengeData2016/images/validation/ADE_val_00000001.jpg ...

Output: <output_dir>/<name>.jpg, byte-identical copies. ADE20K has no depth:
put a depth map per image into a sibling depth/ folder (docs/datasets.md).
Re-running overwrites the same files.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from make_datasets.common import copy_images, find_files, require_dir, source_parser
from utils import is_image_file, run_cli

SPLITS = ("training", "validation")


def get_args_parser():
    parser = source_parser(__doc__, "the ADEChallengeData2016 folder", "flat folder to write the images to", SPLITS)
    parser.add_argument("--min_size", type=int, default=0,
                        help="leave out images whose shorter side is below this many pixels (0: keep all)")
    return parser


def main(args):
    images_root = require_dir(Path(args.root) / "images", "ADE20K images folder")
    files = []
    for split in args.splits:
        files += [p for p in find_files(images_root / split, "*", f"ADE20K {split} folder") if is_image_file(p)]
    count = copy_images(files, args.output_dir, lambda p: p.stem, "ADE20K", min_size=args.min_size)
    print(f"extracted {count} ADE20K images to {args.output_dir}")
    return count


if __name__ == "__main__":
    run_cli(main, get_args_parser())
