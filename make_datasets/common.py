"""Pieces shared by make_dataset.py and the prepare_*.py scripts.

Listing source files, pairing images with depth maps by stem, turning metric
or 16-bit depth into the 8-bit convention of this project (0 = near,
255 = far), atomic copies and stack folders, and the batch loop that goes on
past a bad item and reports it at the end. Image reading and writing
themselves live in utils.py.
"""
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cli import ArgumentParser  # noqa: E402
from utils import (InputError, ensure_output_dir, images_by_stem, index_picture, natural_sort_key,  # noqa: E402
                   write_bytes, read_image, write_image, write_text)


DEPTH_SCALES = ("inverse", "linear")


# ----------------------------------------------------------------------------- command line

def source_parser(doc, root_help, output_help, splits=(), default_splits=None):
    """The parser every prepare script starts from: --root, --output_dir and, if given, --splits."""
    parser = ArgumentParser(description=doc)
    io = parser.add_argument_group("input and output")
    io.add_argument("--root", type=str, required=True, help=root_help)
    io.add_argument("--output_dir", type=str, required=True, help=output_help)
    if splits:
        io.add_argument("--splits", type=str, nargs="+", default=list(default_splits or splits), choices=splits,
                        help="which splits to take")
    return parser


def add_scale_flag(group):
    group.add_argument("--scale", type=str, default="inverse", choices=DEPTH_SCALES,
                       help="space the 256 depth levels in inverse depth (as lens blur and monocular depth "
                            "models do) or linearly in metres")


# ----------------------------------------------------------------------------- listing

def require_dir(path, what="input folder") -> Path:
    """The folder as a Path; InputError naming ``what`` when it is missing."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{what} '{path}' does not exist or is not a folder")
    return path


def find_files(root, pattern, what):
    """Files under ``root`` matching a glob ``pattern``, in natural order; InputError if none."""
    root = require_dir(root, what)
    files = sorted((p for p in root.glob(pattern) if p.is_file() and not p.name.startswith(".")),
                   key=lambda p: [natural_sort_key(part) for part in p.relative_to(root).parts])
    if not files:
        raise InputError(f"no files matching '{pattern}' under {what} '{root}'")
    return files


def pair_by_stem(image_dir, depth_dir):
    """[(name, image path, depth path or None)] for every image, in natural order.

    The depth map of ``<image_dir>/<name>.<ext>`` is ``<depth_dir>/<name>.<any image ext>``;
    a missing one is reported per scene by the caller.
    """
    require_dir(depth_dir, "depth folder")
    images = images_by_stem(image_dir)
    depths = images_by_stem(depth_dir, required=False)
    return [(name, path, depths.get(name)) for name, path in images.items()]


# ----------------------------------------------------------------------------- depth

def fill_invalid(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Replace invalid pixels by the value of the nearest valid pixel (float HxW)."""
    if valid.all():
        return values
    if not valid.any():
        raise InputError("the depth map has no valid pixel")
    _, (rows, cols) = ndimage.distance_transform_edt(~valid, return_indices=True)
    return values[rows, cols]


def normalize_depth(values: np.ndarray, valid=None, inverse=False) -> np.ndarray:
    """Metric depth (float HxW, larger = farther) -> uint8 HxW, 0 = nearest, 255 = farthest.

    Min-max over the valid pixels (finite, > 0, and ``valid`` where given);
    invalid pixels take the nearest valid value. ``inverse`` spaces the levels
    in inverse depth (dioptres), the scale in which a lens's blur is linear.
    A flat map becomes all zeros.
    """
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values) & (values > 0)
    if valid is not None:
        ok &= np.asarray(valid, dtype=bool)
    values = fill_invalid(np.where(ok, values, 0.0), ok)
    if inverse:
        values = -1.0 / values  # increasing with distance, linear in dioptres
    low, high = values.min(), values.max()
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.floor((values - low) / (high - low) * 255.0 + 0.5).astype(np.uint8)


def read_depth_8bit(path, invert=False) -> np.ndarray:
    """A depth picture -> uint8 HxW, 0 = near.

    8-bit maps are used as they are; 16-bit maps are min-max scaled to 0..255.
    ``invert`` flips a map whose bright pixels are near (relative inverse depth,
    as Depth Anything V2 writes it). A colour picture is refused unless its
    three channels are equal (a colour-mapped depth cannot be read back).
    """
    depth = read_image(path)
    if depth.ndim == 3:
        if not (np.array_equal(depth[..., 0], depth[..., 1]) and np.array_equal(depth[..., 0], depth[..., 2])):
            raise InputError(f"depth map '{path}' is a colour picture; give a gray depth map")
        depth = depth[..., 0]
    if depth.dtype == np.uint16:
        low, high = int(depth.min()), int(depth.max())
        scaled = (depth.astype(np.float64) - low) / max(high - low, 1) * 255.0
        depth = np.floor(scaled + 0.5).astype(np.uint8)
    return 255 - depth if invert else depth


# ----------------------------------------------------------------------------- writing

def copy_file(source, target):
    """Copy a file byte for byte (no re-encoding) to ``target``, atomically."""
    try:
        data = Path(source).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read '{source}': {exc.strerror or exc}") from None
    write_bytes(target, data)


def copy_images(files, output_dir, name_of, desc, min_size=0):
    """Copy source images into one flat folder as ``<output_dir>/<name_of(path)><ext>``.

    Images whose shorter side is below ``min_size`` are left out (a size of 0
    keeps all, without decoding them). Two sources with one name are an error,
    found before anything is written. Returns the number copied.
    """
    targets = {}
    for path in files:
        name = name_of(path) + path.suffix.lower()
        if name in targets:
            raise InputError(f"'{targets[name]}' and '{path}' would both be written as '{name}'")
        targets[name] = path
    output_dir = ensure_output_dir(output_dir)
    skipped = []

    def process(item):
        name, path = item
        if min_size and min(read_image(path).shape[:2]) < min_size:
            skipped.append(name)
            return
        copy_file(path, output_dir / name)

    run_batch(sorted(targets.items()), process, desc, name_of=lambda item: str(item[1]))
    if skipped:
        print(f"left out {len(skipped)} image(s) smaller than {min_size} px", file=sys.stderr)
    return len(targets) - len(skipped)


def write_stack(folder, slices, ext, copies=()):
    """Write slices as ``<folder>/1.<ext> .. N.<ext>`` (1-based, natural order), all or nothing.

    The slices go to a hidden sibling folder first, which then replaces
    ``folder``: an interrupted run never leaves a half-written stack. Each
    folder in ``copies`` gets the same files as hard links where the file
    system allows (no second copy on disk), else as copies.
    """
    folder = Path(folder)
    staging = []   # every staging folder of this call, removed on the way out whatever happens
    try:
        staged = _staging_folder(folder, staging)
        for k, image in enumerate(slices, start=1):
            write_image(staged / f"{k}.{ext}", image)
        for copy in copies:
            linked = _staging_folder(Path(copy), staging)
            for file in sorted(staged.iterdir()):
                try:
                    os.link(file, linked / file.name)
                except OSError:
                    shutil.copyfile(file, linked / file.name)
            _replace_folder(linked, Path(copy))
        _replace_folder(staged, folder)
    finally:
        for path in staging:
            if path.exists():
                shutil.rmtree(path)


def _staging_folder(folder: Path, staging: list) -> Path:
    """A new hidden sibling of ``folder``, listed in ``staging`` before it is created
    (so that an interrupt arriving just after its creation cannot leave it behind)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.parent / f".{folder.name}.{secrets.token_hex(8)}.part"
    staging.append(path)
    path.mkdir()
    return path


def _replace_folder(staged: Path, folder: Path):
    """Put a finished staging folder in place of ``folder`` (replacing an older one)."""
    try:
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staged, folder)
    finally:
        if staged.exists():
            shutil.rmtree(staged)


def make_dirs(root, *names):
    """Create ``root/<name>`` for every name; returns them as Paths in order."""
    paths = [Path(root, name) for name in names]
    for path in paths:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create folder '{path}': {exc.strerror or exc}") from None
    return paths


# ----------------------------------------------------------------------------- batch loop

def run_batch(items, process, desc, name_of=str):
    """Call ``process(item)`` for every item under a progress bar.

    A bad item (InputError, or an OSError / ValueError from the data) is
    skipped and listed at the end; returns the number processed. Raises
    InputError when any item failed, so the script exits non-zero.
    """
    failures = []
    done = 0
    for item in tqdm(items, desc=desc, unit="item", dynamic_ncols=True):
        try:
            process(item)
            done += 1
        except (InputError, OSError, ValueError) as exc:
            failures.append((name_of(item), str(exc)))
    print(f"{desc}: {done} of {len(items)} done", file=sys.stderr)
    if failures:
        for name, reason in failures:
            print(f"  skipped {name}: {reason}", file=sys.stderr)
        raise InputError(f"{len(failures)} of {len(items)} item(s) failed (listed above)")
    return done


# ----------------------------------------------------------------------------- stacks with ground truth

class TruthStack(NamedTuple):
    """A focus stack with an exact all-in-focus image (light fields, thin-lens renders).

    slices: N images (uint8/uint16, HxW or HxWx3), slice 0 focused nearest;
    all_in_focus: like a slice; focus_index: int64 HxW in [0, N-1], the slice
    each pixel is sharpest in; planes: float (N,), where each slice is focused
    (in the maker's own unit).
    """
    slices: list
    all_in_focus: np.ndarray
    focus_index: np.ndarray
    planes: np.ndarray


TRUTH_FOLDERS = ("dof_stack", "AiF", "quantized_depth", "planes")


def write_truth_stack(root, name: str, stack: TruthStack):
    """Write one stack in the released layout under ``root``: dof_stack/<name>/1..N.png,
    AiF/<name>.png, quantized_depth/<name>.png (index k as k / (N-1) x 255), planes/<name>.txt."""
    stack_dir, aif_dir, index_dir, planes_dir = make_dirs(root, *TRUTH_FOLDERS)
    write_stack(stack_dir / name, stack.slices, "png")
    write_image(aif_dir / f"{name}.png", stack.all_in_focus)
    write_image(index_dir / f"{name}.png", index_picture(stack.focus_index, len(stack.slices)))
    write_text(planes_dir / f"{name}.txt", "".join(f"{d:.4f}\n" for d in stack.planes))
