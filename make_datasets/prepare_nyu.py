"""Extract NYU Depth V2 (labeled subset) into images and 8-bit depth maps.

    python make_datasets/prepare_nyu.py --mat nyu_depth_v2_labeled.mat --output_dir data/nyu \\
        [--split_file splits.mat]

Input: nyu_depth_v2_labeled.mat, a MATLAB v7.3 (HDF5) file with datasets
``images`` (N, 3, W, H) uint8 RGB and ``depths`` (N, W, H) float metres
(MATLAB stores arrays transposed). The optional splits.mat holds the
official 1-based ``trainNdxs`` / ``testNdxs``; without it a seeded random
--test_fraction of the images goes to test.

The registered RGB frames carry a white border where the camera saw nothing;
it is cropped (the same box for every image, found as the narrowest white
border over a sample of images, so white walls are not cut off), and the
depth is cropped with it.

Output: <output_dir>/<train|test>/images/<i>.png and
<output_dir>/<train|test>/depth/<i>.png, with i the 1-based index in the
file, 4 digits; depth 0 = nearest, 255 = farthest of that image. Re-running
overwrites the same files.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from cli import ArgumentParser  # noqa: E402
from make_datasets.common import add_scale_flag, make_dirs, normalize_depth, run_batch
from utils import InputError, ensure_output_dir, run_cli, write_image

SAMPLE_IMAGES = 50


def get_args_parser():
    parser = ArgumentParser(description=__doc__)
    io = parser.add_argument_group("input and output")
    io.add_argument("--mat", type=str, required=True, help="nyu_depth_v2_labeled.mat")
    io.add_argument("--output_dir", type=str, required=True, help="where train/ and test/ go")
    split = parser.add_argument_group("split")
    split.add_argument("--split_file", type=str, default=None,
                       help="splits.mat with trainNdxs / testNdxs (1-based); default: random split")
    split.add_argument("--test_fraction", type=float, default=0.1, help="test share of the random split")
    split.add_argument("--seed", type=int, default=0, help="seed of the random split")
    prep = parser.add_argument_group("preprocessing")
    prep.add_argument("--crop", type=str, default="auto", choices=("auto", "none"),
                      help="crop the white border of the registered frames")
    prep.add_argument("--white_level", type=int, default=250,
                      help="a border row/column has at least 90%% of its pixels at or above this in all channels")
    add_scale_flag(prep)
    return parser


def open_mat(path):
    import h5py  # only this script needs it
    try:
        mat = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot open '{path}' as a MATLAB v7.3 (HDF5) file: {exc}") from None
    for key in ("images", "depths"):
        if key not in mat:
            mat.close()
            raise InputError(f"'{path}' has no '{key}' dataset (is it nyu_depth_v2_labeled.mat?)")
    return mat


def rgb_frame(images, i) -> np.ndarray:
    """images[i] (3, W, H) RGB -> HxWx3 BGR uint8."""
    return np.ascontiguousarray(np.asarray(images[i]).transpose(2, 1, 0)[..., ::-1])


def white_border(image: np.ndarray, white_level: int):
    """(top, bottom, left, right) widths of the white frame of one HxWx3 image."""
    white = (image >= white_level).all(axis=2)
    rows, cols = white.mean(axis=1) >= 0.9, white.mean(axis=0) >= 0.9

    def run_length(flags):
        return int(np.argmin(flags)) if not flags.all() else len(flags)
    return run_length(rows), run_length(rows[::-1]), run_length(cols), run_length(cols[::-1])


def crop_box(images, white_level: int):
    """(top, bottom, left, right) border to cut: per side the narrowest over a sample.

    White content at an image's edge can only widen that image's border, so
    the minimum over many images is the true frame.
    """
    count = images.shape[0]
    sample = np.unique(np.linspace(0, count - 1, min(count, SAMPLE_IMAGES)).astype(int))
    widths = np.array([white_border(rgb_frame(images, i), white_level) for i in sample]).min(axis=0)
    height, width = images.shape[3], images.shape[2]
    top, bottom, left, right = (int(v) for v in widths)
    if top + bottom >= height or left + right >= width:
        raise InputError("the images are white all over; use --crop none or a higher --white_level")
    return top, bottom, left, right


def split_indices(count: int, args):
    """(train, test) 0-based index arrays."""
    if args.split_file:
        from scipy.io import loadmat
        try:
            splits = loadmat(args.split_file)
            train, test = (np.asarray(splits[k]).ravel().astype(int) - 1 for k in ("trainNdxs", "testNdxs"))
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"cannot read trainNdxs / testNdxs from '{args.split_file}': {exc}") from None
        if min(train.min(), test.min()) < 0 or max(train.max(), test.max()) >= count:
            raise InputError(f"'{args.split_file}' has indices outside 1..{count}")
        return train, test
    if not 0 <= args.test_fraction < 1:
        raise InputError(f"--test_fraction must be in [0, 1), got {args.test_fraction}")
    order = np.random.default_rng(args.seed).permutation(count)
    num_test = int(round(count * args.test_fraction))
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def main(args):
    if not Path(args.mat).is_file():
        raise InputError(f"'{args.mat}' does not exist")
    out = ensure_output_dir(args.output_dir)
    with open_mat(args.mat) as mat:
        images, depths = mat["images"], mat["depths"]
        count = images.shape[0]
        if images.ndim != 4 or images.shape[1] != 3 or depths.shape != (count,) + images.shape[2:]:
            raise InputError(f"unexpected shapes: images {images.shape}, depths {depths.shape}")
        top, bottom, left, right = crop_box(images, args.white_level) if args.crop == "auto" else (0, 0, 0, 0)
        height, width = images.shape[3], images.shape[2]
        rows, cols = slice(top, height - bottom), slice(left, width - right)
        train, test = split_indices(count, args)
        folders = {}
        for split_name, indices in (("train", train), ("test", test)):
            image_dir, depth_dir = make_dirs(out / split_name, "images", "depth")
            folders.update({int(i): (image_dir, depth_dir) for i in indices})

        def process(i):
            image_dir, depth_dir = folders[i]
            name = f"{i + 1:04d}.png"
            depth = np.asarray(depths[i]).T[rows, cols]
            write_image(image_dir / name, rgb_frame(images, i)[rows, cols])
            write_image(depth_dir / name, normalize_depth(depth, inverse=args.scale == "inverse"))

        done = run_batch(sorted(folders), process, "NYU Depth V2", name_of=lambda i: f"image {i + 1}")
    print(f"extracted {done} NYU images (train {len(train)}, test {len(test)}), "
          f"border cut top {top}, bottom {bottom}, left {left}, right {right}, to {out}")
    return done


if __name__ == "__main__":
    run_cli(main, get_args_parser())
