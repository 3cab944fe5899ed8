"""Extract DIODE images and their depth as 8-bit depth maps.

    python make_datasets/prepare_diode.py --root diode --output_dir data/diode

Expected input (the DIODE release, train and/or val):

    diode/<split>/<indoors|outdoor>/scene_<s>/scan_<t>/<id>.png
    diode/<split>/<indoors|outdoor>/scene_<s>/scan_<t>/<id>_depth.npy       HxWx1 float, metres
    diode/<split>/<indoors|outdoor>/scene_<s>/scan_<t>/<id>_depth_mask.npy  HxW, 1 = valid

Output: <output_dir>/images/<id>.png (byte-identical) and
<output_dir>/depth/<id>.png, 8-bit, 0 = nearest and 255 = farthest valid
point of that image; pixels the mask marks invalid (no laser return) take the
nearest valid pixel's depth. Re-running overwrites the same files.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from make_datasets.common import (add_scale_flag, copy_file, find_files, make_dirs, normalize_depth, require_dir,
                                  run_batch, source_parser)
from utils import InputError, ensure_output_dir, read_image, run_cli, write_image

SPLITS = ("train", "val")
DEPTH_SUFFIX = "_depth.npy"
MASK_SUFFIX = "_depth_mask.npy"


def get_args_parser():
    parser = source_parser(__doc__, "the DIODE folder holding train/ and val/", "where images/ and depth/ go", SPLITS)
    add_scale_flag(parser)
    return parser


def load_npy(path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read '{path}': {exc}") from None


def diode_depth(depth_path: Path, image_shape, scale: str) -> np.ndarray:
    """DIODE depth + mask -> uint8 HxW depth map, 0 = near."""
    depth = load_npy(depth_path)
    depth = depth[..., 0] if depth.ndim == 3 else depth
    mask_path = depth_path.with_name(depth_path.name[: -len(DEPTH_SUFFIX)] + MASK_SUFFIX)
    valid = load_npy(mask_path) > 0 if mask_path.exists() else None
    if depth.shape != tuple(image_shape) or (valid is not None and valid.shape != depth.shape):
        raise InputError(f"depth {depth.shape} and mask do not match the image size {tuple(image_shape)}")
    return normalize_depth(depth, valid, inverse=scale == "inverse")


def main(args):
    root = require_dir(args.root, "DIODE folder")
    depth_files = []
    for split in args.splits:
        depth_files += find_files(root / split, f"**/*{DEPTH_SUFFIX}", f"DIODE {split} folder")
    out = ensure_output_dir(args.output_dir)
    image_out, depth_out = make_dirs(out, "images", "depth")

    def process(depth_path):
        name = depth_path.name[: -len(DEPTH_SUFFIX)]
        image_path = depth_path.with_name(name + ".png")
        if not image_path.exists():
            raise InputError(f"no image '{image_path.name}' beside '{depth_path.name}'")
        depth = diode_depth(depth_path, read_image(image_path).shape[:2], args.scale)
        copy_file(image_path, image_out / image_path.name)
        write_image(depth_out / f"{name}.png", depth)

    count = run_batch(depth_files, process, "DIODE", name_of=lambda p: p.name)
    print(f"extracted {count} DIODE images and depth maps to {out}")
    return count


if __name__ == "__main__":
    run_cli(main, get_args_parser())
