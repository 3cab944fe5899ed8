"""Keep the DUTS images whose background is uniform.

    python make_datasets/prepare_duts.py --root DUTS-TR --output_dir data/duts

Expected input (DUTS-TR, or DUTS-TE with -TE- in the names):

    DUTS-TR/DUTS-TR-Image/<name>.jpg
    DUTS-TR/DUTS-TR-Mask/<name>.png      saliency mask, white = object

The background is the part of the image outside the mask, moved --margin
pixels away from the object so that its blurry rim does not count. An image
is kept when that background is large enough (--min_background) and uniform:
its gray standard deviation is at most --max_std and its mean gradient
magnitude (Sobel, per pixel) at most --max_gradient, both on 0..255.

Output: <output_dir>/images/<name>.jpg and <output_dir>/masks/<name>.png for
the kept images (byte-identical copies), and <output_dir>/duts_filter.csv
with the measures of every image, to tune the thresholds. Re-running with
other thresholds rewrites them and removes the images no longer kept.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np

from make_datasets.common import copy_file, images_by_stem, make_dirs, require_dir, run_batch, source_parser, write_text
from utils import InputError, ensure_output_dir, read_image, run_cli, to_gray_float


def get_args_parser():
    parser = source_parser(__doc__, "the DUTS-TR (or DUTS-TE) folder", "where images/, masks/ and the CSV go")
    rule = parser.add_argument_group("uniform-background rule")
    rule.add_argument("--max_std", type=float, default=12.0,
                      help="largest gray standard deviation of the background (0..255 scale)")
    rule.add_argument("--max_gradient", type=float, default=4.0,
                      help="largest mean Sobel gradient magnitude of the background (0..255 scale)")
    rule.add_argument("--margin", type=int, default=8, help="pixels of background next to the object ignored")
    rule.add_argument("--min_background", type=float, default=0.2,
                      help="smallest fraction of the image that must be background")
    return parser


def background_measures(image: np.ndarray, mask: np.ndarray, margin: int):
    """(background fraction, gray std, mean gradient magnitude) outside the grown mask.

    image: HxW or HxWx3 uint8/uint16; mask: HxW, object where > half its range.
    The std and gradient are on the 0..255 scale; both are NaN without background.
    """
    gray = to_gray_float(image) * 255.0
    obj = (to_gray_float(mask) > 0.5).astype(np.uint8)
    if margin > 0:
        obj = cv2.dilate(obj, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8))
    background = obj == 0
    fraction = float(background.mean())
    if not background.any():
        return fraction, float("nan"), float("nan")
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3) / 8.0  # /8: a unit step per pixel reads 1
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3) / 8.0
    gradient = np.hypot(gx, gy)
    return fraction, float(gray[background].std()), float(gradient[background].mean())


def is_uniform(measures, args) -> bool:
    fraction, std, gradient = measures
    return fraction >= args.min_background and std <= args.max_std and gradient <= args.max_gradient


def find_pairs(root: Path):
    """[(name, image path, mask path)] from <root>/*-Image and <root>/*-Mask."""
    root = require_dir(root, "DUTS folder")
    image_dirs = sorted(p for p in root.glob("*-Image") if p.is_dir())
    mask_dirs = sorted(p for p in root.glob("*-Mask") if p.is_dir())
    if not image_dirs or not mask_dirs:
        raise InputError(f"'{root}' needs a *-Image and a *-Mask folder (e.g. DUTS-TR-Image, DUTS-TR-Mask)")
    masks = images_by_stem(mask_dirs[0])
    images = images_by_stem(image_dirs[0])
    missing = sorted(set(images) - set(masks))
    if missing:
        raise InputError(f"{len(missing)} image(s) have no mask in '{mask_dirs[0]}', e.g. '{missing[0]}'")
    return [(name, path, masks[name]) for name, path in images.items()]


def main(args):
    root = Path(args.root)
    pairs = find_pairs(root)
    out = ensure_output_dir(args.output_dir)
    image_out, mask_out = make_dirs(out, "images", "masks")
    rows = []

    def process(pair):
        name, image_path, mask_path = pair
        image, mask = read_image(image_path), read_image(mask_path)
        if mask.shape[:2] != image.shape[:2]:
            raise InputError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                             f"{image.shape[1]}x{image.shape[0]}")
        measures = background_measures(image, mask, args.margin)
        keep = is_uniform(measures, args)
        rows.append((name, *measures, keep))
        if keep:
            copy_file(image_path, image_out / image_path.name)
            copy_file(mask_path, mask_out / mask_path.name)
        else:  # kept by an earlier run with other thresholds
            (image_out / image_path.name).unlink(missing_ok=True)
            (mask_out / mask_path.name).unlink(missing_ok=True)

    try:
        run_batch(pairs, process, "DUTS filter", name_of=lambda pair: pair[0])
    finally:
        lines = ["name,background_fraction,background_std,background_gradient,kept"]
        lines += [f"{n},{f:.4f},{s:.3f},{g:.3f},{int(k)}" for n, f, s, g, k in rows]
        write_text(out / "duts_filter.csv", "\n".join(lines) + "\n")
    kept = sum(row[-1] for row in rows)
    print(f"kept {kept} of {len(pairs)} DUTS images with a uniform background in {image_out}")
    return kept


if __name__ == "__main__":
    run_cli(main, get_args_parser())
