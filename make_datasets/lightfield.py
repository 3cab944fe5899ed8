"""Focus stacks of real optics from 4D light fields, by shift-and-add refocusing.

    python make_datasets/lightfield.py --input ../shared/data/lightfields/hci_dino --output_dir data/lf
    python make_datasets/lightfield.py --input ../shared/data/lightfields --output_dir data/lf --num_slices 16

``--input`` is one light field (a folder of sub-aperture views) or a folder of
them. Views are named as HCI (``input_CamNNN.png``, NNN = 9 x row + column,
centre ``input_Cam040``) or Lytro (``NAME_RR_CC.png``, row and column 01..09,
centre ``NAME_05_05``); any subset of the 9 x 9 grid that holds the centre
view works (e.g. HCI's 33-view star). Output, as make_dataset.py writes it:

    <output_dir>/dof_stack/<scene>/1..N.png     slice k refocused at plane k (1 = nearest)
    <output_dir>/AiF/<scene>.png                the centre view: the exact all-in-focus image
    <output_dir>/quantized_depth/<scene>.png    focus index k of every pixel, as k / (N-1) x 255
    <output_dir>/planes/<scene>.txt             the N planes' disparities, px per grid step

Refocusing: a scene point at disparity d seen at p in the centre view lies at
p + d * (row - row0, col - col0) in view (row, col); the slice at d is the mean
of the views sampled there (bicubic, so shifts are sub-pixel). The planes
span the scene's own disparity range: a sweep over --search finds each
pixel's best disparity, and the --percentiles of the confident pixels are the
nearest and farthest planes (no depth map needed).

Focus index: at every pixel, the plane whose shifted views agree best, i.e.
the smallest variance across the views, averaged over a Gaussian window of
--window px (photo-consistency: where a slice is in focus its views coincide,
and the refocused pixel equals the centre view's). In textureless regions no
plane wins clearly and the index is noisy; there every plane looks alike too.
"""
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np

from cli import ArgumentParser  # noqa: E402
from make_datasets.common import TruthStack, require_dir, run_batch, write_truth_stack
from utils import (InputError, check_stack, dtype_max, ensure_output_dir, is_image_file, list_images, read_image,
                   run_cli, to_gray_float)

GRID = 9                       # both formats index a 9 x 9 grid
CENTRE = (GRID // 2, GRID // 2)
HCI_NAME = re.compile(r"^input_Cam(\d{3})$")
LYTRO_NAME = re.compile(r"^.+_(\d{2})_(\d{2})$")


def get_args_parser():
    parser = ArgumentParser(description=__doc__)
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", type=str, required=True,
                    help="a light-field folder of views, or a folder of such folders")
    io.add_argument("--output_dir", type=str, required=True, help="dataset root to write")
    stack = parser.add_argument_group("focus stack")
    add_stack_arguments(stack)
    return parser


def add_stack_arguments(group):
    """Flags of ``light_field_stack``, shared with the benchmark."""
    group.add_argument("--num_slices", type=int, default=10, help="planes of the focus stack")
    group.add_argument("--search", type=float, default=4.0,
                       help="px per grid step: the sweep that finds the disparity range covers -S..S")
    group.add_argument("--percentiles", type=float, nargs=2, default=[2.0, 98.0], metavar=("LO", "HI"),
                       help="percentiles of the confident pixels' best disparity taken as the nearest and "
                            "farthest planes")
    group.add_argument("--window", type=float, default=2.0,
                       help="px: Gaussian sigma over which the views' agreement is averaged")


# ----------------------------------------------------------------------------- reading

def view_position(stem: str):
    """(row, col) in the 9 x 9 grid of a view's file stem, or None for another name."""
    match = HCI_NAME.match(stem)
    if match:
        number = int(match.group(1))
        return (number // GRID, number % GRID) if number < GRID * GRID else None
    match = LYTRO_NAME.match(stem)
    if match:
        row, col = int(match.group(1)) - 1, int(match.group(2)) - 1
        return (row, col) if 0 <= row < GRID and 0 <= col < GRID else None
    return None


def read_light_field(folder):
    """{(row, col): image} of the views in ``folder``; InputError without a centre view or with mixed sizes."""
    folder = require_dir(folder, "light-field folder")
    views = {}
    for path in list_images(folder):
        position = view_position(path.stem)
        if position is None:
            continue
        if position in views:
            raise InputError(f"two views of grid position {position} in '{folder}' (e.g. '{path.name}')")
        views[position] = path
    if CENTRE not in views:
        raise InputError(f"'{folder}' has no centre view (input_Cam040.* or *_05_05.*) among "
                         f"{len(views)} recognised view(s)")
    if len(views) < 2:
        raise InputError(f"'{folder}' holds only the centre view; refocusing needs at least two views")
    positions = sorted(views)
    images = check_stack([read_image(views[pos]) for pos in positions], [views[pos].name for pos in positions],
                         folder)
    return dict(zip(positions, images))


def holds_views(folder: Path) -> bool:
    return any(is_image_file(p) and view_position(p.stem) is not None for p in folder.iterdir())


def find_light_fields(root):
    """The light-field folders at ``root``: itself when it holds views, else its subfolders that do."""
    root = require_dir(root, "input folder")
    if holds_views(root):
        return [root]
    found = [p for p in sorted(root.iterdir()) if p.is_dir() and holds_views(p)]
    if not found:
        raise InputError(f"no light-field views (input_CamNNN.* or NAME_RR_CC.*) in '{root}' or its subfolders")
    return found


# ----------------------------------------------------------------------------- refocusing

def shifted(image: np.ndarray, offset, disparity: float) -> np.ndarray:
    """``image`` sampled at p + disparity * offset (offset = (rows, cols) from the centre), bicubic."""
    dy, dx = disparity * offset[0], disparity * offset[1]
    matrix = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(image, matrix, (image.shape[1], image.shape[0]),
                          flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)


def offsets_of(views: dict):
    return [(row - CENTRE[0], col - CENTRE[1]) for row, col in views]


def disagreement(grays, offsets, disparity: float, window: float) -> np.ndarray:
    """Variance across the views shifted to ``disparity``, Gaussian-averaged over ``window`` px (HxW float32)."""
    total = np.zeros_like(grays[0])
    squares = np.zeros_like(grays[0])
    for gray, offset in zip(grays, offsets):
        moved = shifted(gray, offset, disparity)
        total += moved
        squares += moved * moved
    mean = total / len(grays)
    variance = np.maximum(squares / len(grays) - mean * mean, 0)
    return cv2.GaussianBlur(variance, (0, 0), window) if window > 0 else variance


def refocus(views: dict, disparity: float) -> np.ndarray:
    """Shift-and-add: the mean of the views shifted to ``disparity``, in the views' type."""
    images = list(views.values())
    total = np.zeros(images[0].shape, np.float32)
    for image, offset in zip(images, offsets_of(views)):
        total += shifted(image.astype(np.float32), offset, disparity)
    return np.clip(np.rint(total / len(images)), 0, dtype_max(images[0].dtype)).astype(images[0].dtype)


def disparity_range(views: dict, search: float = 4.0, percentiles=(2.0, 98.0), window: float = 2.0,
                    step: float = 0.05):
    """(nearest, farthest) disparity of the scene from the views alone.

    Every pixel takes the candidate in -search..search (``step`` apart) where
    the views agree best; the pixels whose best agreement stands out most
    from their mean over the sweep (the upper half: texture, not flat areas)
    give the ``percentiles``. The border that the largest shift reaches is left out.
    """
    grays = [to_gray_float(im).astype(np.float32) for im in views.values()]
    offsets = offsets_of(views)
    candidates = np.arange(-search, search + step / 2, step)
    best_cost = np.full(grays[0].shape, np.inf, np.float32)
    best = np.zeros(grays[0].shape, np.float32)
    cost_sum = np.zeros(grays[0].shape, np.float32)
    for d in candidates:
        cost = disagreement(grays, offsets, float(d), window)
        better = cost < best_cost
        best[better], best_cost[better] = d, cost[better]
        cost_sum += cost
    margin = int(np.ceil(search * max(max(abs(a), abs(b)) for a, b in offsets)))
    h, w = best.shape
    if 2 * margin >= min(h, w):
        margin = 0                  # a tiny crop: keep every pixel rather than none
    inner = (slice(margin, h - margin), slice(margin, w - margin))
    contrast = (cost_sum / len(candidates) - best_cost)[inner]
    chosen = best[inner][contrast >= np.median(contrast)]
    low, high = np.percentile(chosen, percentiles)
    return float(low), float(high)


def plane_disparities(low: float, high: float, num_slices: int) -> np.ndarray:
    """``num_slices`` planes evenly spaced from the nearest (most negative disparity) to the farthest.

    A camera further along a row sees near points further back along it, so
    disparity grows from near to far in this convention.
    """
    return np.linspace(low, high, num_slices)


def focus_index_of(views: dict, planes, window: float = 2.0) -> np.ndarray:
    """int64 HxW: at every pixel the plane whose shifted views agree best (see the module's doc)."""
    grays = [to_gray_float(im).astype(np.float32) for im in views.values()]
    offsets = offsets_of(views)
    costs = np.stack([disagreement(grays, offsets, float(d), window) for d in planes])
    return costs.argmin(axis=0).astype(np.int64)


def check_stack_settings(num_slices, search, percentiles, window):
    if num_slices < 2:
        raise InputError(f"--num_slices must be at least 2, got {num_slices}")
    if search <= 0:
        raise InputError(f"--search must be positive, got {search}")
    low, high = percentiles
    if not 0 <= low < high <= 100:
        raise InputError(f"--percentiles must satisfy 0 <= LO < HI <= 100, got {low} {high}")
    if window < 0:
        raise InputError(f"--window must be 0 or more, got {window}")


def light_field_stack(folder, num_slices: int = 10, search: float = 4.0, percentiles=(2.0, 98.0),
                      window: float = 2.0, progress=None) -> TruthStack:
    """The focus stack of the light field in ``folder`` (see common.TruthStack; planes: disparity in px per grid step).

    ``progress`` (e.g. tqdm) wraps the loop over slices when given.
    """
    check_stack_settings(num_slices, search, percentiles, window)
    views = read_light_field(folder)
    low, high = disparity_range(views, search, percentiles, window)
    if high - low < 1e-6:
        raise InputError(f"'{folder}': the views show a single disparity ({low:.2f} px); no focus sweep to make")
    planes = plane_disparities(low, high, num_slices)
    loop = progress(planes, desc="refocus", unit="slice", leave=False) if progress else planes
    slices = [refocus(views, float(d)) for d in loop]
    return TruthStack(slices, views[CENTRE], focus_index_of(views, planes, window), planes)


def main(args):
    check_stack_settings(args.num_slices, args.search, args.percentiles, args.window)
    folders = find_light_fields(args.input)
    root = ensure_output_dir(args.output_dir)

    def process(folder):
        result = light_field_stack(folder, args.num_slices, args.search, args.percentiles, args.window)
        write_truth_stack(root, folder.name, result)
        planes = ", ".join(f"{d:.2f}" for d in result.planes)
        print(f"{folder.name}: {len(result.slices)} slices at disparity {planes} px", file=sys.stderr)

    done = run_batch(folders, process, desc="light-field stacks", name_of=lambda p: p.name)
    print(f"wrote {done} stacks to {root}")
    return done


if __name__ == "__main__":
    run_cli(main, get_args_parser())
