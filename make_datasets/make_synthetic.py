"""Procedural synthetic focus stacks that need only the installed packages.

    python make_datasets/make_synthetic.py --output_dir data/synthetic --num_stacks 3000

All-in-focus images are random crops of the photographs that ship with
scikit-image (``stereo_motorcycle`` is left out: the benchmark reserves it)
or procedural textures; depth maps are procedural (slanted planes, smooth
blobs, flat objects whose depth edges follow edges of the image) or, with
``--depth segments``, planes over Felzenszwalb segments of the image (depth
steps everywhere along the picture's edges, as in real scenes). Each stack
has between ``--min_slices`` and ``--max_slices`` slices, blurred with the
released synthesis (``make_datasets.synthesis.released_stack``) or the
physical one (``physical_stack``) when it is available. ``--min_step_share``
keeps only scenes with many depth steps (the pixels where physical blur
spills across a depth edge, which smooth scenes hardly have).

Output, the training layout::

    <output_dir>/image_stacks/<scene>/<k>.png     k = 1..N, near to far
    <output_dir>/depth_maps/<scene>.png           8-bit ground-truth depth
    <output_dir>/all_in_focus/<scene>.png         the sharp image the stack was made from
                                                  (train.py --all_in_focus)

Depth convention: the depth map holds the in-focus slice index k (0-based)
of every pixel as round(k / (N - 1) * 255), 0 = near. Every stack uses the
full range (the procedural depth is stretched to 0..255 before it is
quantised, so slices 0 and N - 1 both occur), which is what the network's
per-stack min-max normalised depth can reproduce.

Scene i depends only on (seed, i): the same seed gives the same files, and
a larger ``--num_stacks`` only adds scenes.
"""
import sys
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from skimage.segmentation import felzenszwalb
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import ArgumentParser  # noqa: E402
from make_datasets import synthesis  # noqa: E402
from utils import InputError, ensure_output_dir, run_cli, write_image  # noqa: E402

# scikit-image's bundled photographs used as all-in-focus images. The
# evaluation image stereo_motorcycle must never appear here.
PHOTO_NAMES = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry",
    "hubble_deep_field", "retina", "coins", "horse", "moon", "grass", "gravel",
    "brick", "page", "text", "colorwheel", "clock", "cell", "microaneurysms",
)
RESERVED_FOR_EVALUATION = ("stereo_motorcycle",)
BLUR_MODES = ("released", "physical", "mixed")
DEPTH_KINDS = ("procedural", "segments", "mixed")


def physical_available() -> bool:
    return hasattr(synthesis, "physical_stack")


@lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """One scikit-image photograph as HxWx3 uint8, BGR (OpenCV's order, as utils reads)."""
    if name in RESERVED_FOR_EVALUATION:
        raise ValueError(f"{name} is reserved for evaluation")
    import skimage.data
    image = np.asarray(getattr(skimage.data, name)())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return cv2.cvtColor(np.ascontiguousarray(image[..., :3]).astype(np.uint8), cv2.COLOR_RGB2BGR)


def random_box(rng, h: int, w: int, size: int):
    """(y, x, side) of a random square window at a random scale in an h x w picture, for a size x size crop."""
    side = int(rng.uniform(0.35, 1.0) * min(h, w))
    side = max(side, min(size // 2, h, w))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    return y, x, side


def random_crop(rng, image: np.ndarray, size: int) -> np.ndarray:
    """A random square crop at a random scale, resized to size x size, maybe flipped."""
    y, x, side = random_box(rng, *image.shape[:2], size)
    crop = cv2.resize(image[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def smooth_noise(rng, size: int, scale: float) -> np.ndarray:
    """Gaussian-filtered white noise, size x size float in [0, 1]; scale = blur sigma in px."""
    noise = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), scale)
    return (noise - noise.min()) / max(float(noise.max() - noise.min()), 1e-6)


def procedural_texture(rng, size: int) -> np.ndarray:
    """A random texture, size x size x 3 uint8: multiscale noise, stripes or shapes."""
    kind = rng.integers(3)
    if kind == 0:  # sum of noise octaves: fine detail everywhere
        tex = sum(smooth_noise(rng, size, s) * rng.uniform(0.3, 1.0) for s in (0.7, 2.0, 6.0))
    elif kind == 1:  # rotated stripes or checks, modulated by noise
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 20)
        u = np.cos(angle) * xx + np.sin(angle) * yy
        tex = np.sin(2 * np.pi * u / period)
        if rng.random() < 0.5:
            v = -np.sin(angle) * xx + np.cos(angle) * yy
            tex = tex * np.sin(2 * np.pi * v / period)
        tex = tex + smooth_noise(rng, size, 3.0)
    else:  # random filled shapes and lines on noise
        tex = smooth_noise(rng, size, 1.5) * 0.5
        for _ in range(rng.integers(10, 40)):
            color = float(rng.uniform(0, 1.5))
            if rng.random() < 0.5:
                center = tuple(int(c) for c in rng.integers(0, size, 2))
                axes = tuple(int(a) for a in rng.integers(2, size // 4, 2))
                cv2.ellipse(tex, center, axes, float(rng.uniform(0, 180)), 0, 360, color, -1)
            else:
                p1, p2 = (tuple(int(c) for c in rng.integers(0, size, 2)) for _ in range(2))
                cv2.line(tex, p1, p2, color, int(rng.integers(1, 4)))
    tex = (tex - tex.min()) / max(float(tex.max() - tex.min()), 1e-6)
    tint = rng.uniform(0.5, 1.0, 3)
    return (np.clip(tex[..., None] * tint, 0, 1) * 255).astype(np.uint8)


def texture_energy(image: np.ndarray) -> float:
    """Mean absolute Laplacian of the gray image: a cheap measure of focus cues."""
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)
    return float(np.abs(cv2.Laplacian(gray, cv2.CV_32F)).mean())


def random_image(rng, size: int) -> np.ndarray:
    """An all-in-focus image, size x size x 3 uint8: a photo crop or a texture."""
    if rng.random() < 0.7:
        # Crops of large flat areas (sky, page margins) carry no focus cue;
        # keep the most textured of a few tries.
        crops = [random_crop(rng, load_photo(PHOTO_NAMES[rng.integers(len(PHOTO_NAMES))]), size)
                 for _ in range(3)]
        image = max(crops, key=texture_energy)
    else:
        image = procedural_texture(rng, size)
    gamma = rng.uniform(0.7, 1.4)  # vary contrast so flat photo areas are not all alike
    return (255 * (image / 255.0) ** gamma).astype(np.uint8)


def slant(rng, size: int, width: int = 0) -> np.ndarray:
    """A plane of random direction over size x size (or size x width) pixels, rising about 1 across."""
    width = width or size
    yy, xx = np.mgrid[0:size, 0:width].astype(np.float32) / max(size, width)
    angle = rng.uniform(0, 2 * np.pi)
    return np.cos(angle) * xx + np.sin(angle) * yy


def image_regions(rng, image: np.ndarray, num_levels: int) -> np.ndarray:
    """Label map (size x size int) from thresholds of the smoothed gray image.

    Region borders are edges of the image, so depth discontinuities built
    from it lie on visible edges, as in real scenes.
    """
    gray = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), (0, 0), 2.0)
    cuts = np.sort(rng.uniform(0.15, 0.85, num_levels - 1))
    return np.digitize(gray, np.quantile(gray, cuts))


def random_depth(rng, image: np.ndarray) -> np.ndarray:
    """Procedural depth for image, float32 HxW (any range; stretched later).

    A slanted or blob background, then (most of the time) flat or slanted
    objects with borders that follow the image's edges or pasted shapes.
    """
    size = image.shape[0]
    kind = rng.integers(4)
    if kind == 0:
        depth = slant(rng, size)
    elif kind == 1:
        depth = smooth_noise(rng, size, rng.uniform(size / 12, size / 4))
    elif kind == 2:  # objects from image regions over a slanted plane
        labels = image_regions(rng, image, int(rng.integers(2, 5)))
        depth = 0.3 * slant(rng, size)
        depth = depth + rng.uniform(0, 1, labels.max() + 1)[labels]
    else:  # blob background plus a few flat or slanted shapes
        depth = smooth_noise(rng, size, size / 6) * rng.uniform(0.2, 1.0)
        for _ in range(rng.integers(1, 5)):
            mask = np.zeros((size, size), np.uint8)
            center = tuple(int(c) for c in rng.integers(0, size, 2))
            axes = tuple(int(a) for a in rng.integers(size // 10, size // 3, 2))
            cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
            level = rng.uniform(0, 1) + 0.2 * slant(rng, size)
            depth = np.where(mask > 0, level, depth)
    return depth.astype(np.float32)


def surfaces_over_segments(rng, labels: np.ndarray) -> np.ndarray:
    """Depth (float32 HxW, any range) that is one plane on every segment of labels (HxW ints 0..K-1).

    Each segment takes one of a few object levels plus its own small tilt,
    and a slant is shared by all: neighbouring segments often lie on one
    surface, the rest step from one surface to another.
    """
    size_y, size_x = labels.shape
    count = int(labels.max()) + 1
    levels = rng.uniform(0, 1, int(rng.integers(2, 9)))
    yy, xx = np.mgrid[0:size_y, 0:size_x].astype(np.float32) / max(size_y, size_x)
    tilt_x, tilt_y = rng.normal(0, 0.15, count), rng.normal(0, 0.15, count)
    depth = levels[rng.integers(0, len(levels), count)][labels] + tilt_x[labels] * xx + tilt_y[labels] * yy
    # The slant's direction is drawn last, as in the sets made before this was split out.
    return (depth + 0.3 * slant(rng, size_y, size_x)).astype(np.float32)


def segment_depth(rng, image: np.ndarray) -> np.ndarray:
    """Piecewise-planar depth over Felzenszwalb segments of the image, float32 HxW (any range).

    Real scenes (the benchmark's disparity, say) are made of many surfaces
    whose borders are edges of the picture, so depth steps are everywhere,
    not only around a few pasted shapes.
    """
    labels = felzenszwalb(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), scale=float(rng.uniform(50, 400)),
                          sigma=0.8, min_size=int(rng.integers(30, 200)))
    return surfaces_over_segments(rng, labels)


def stretch_to_8bit(depth: np.ndarray) -> np.ndarray:
    """Full-range 8-bit depth: min -> 0, max -> 255 (a flat map becomes a left-right ramp)."""
    lo, hi = float(depth.min()), float(depth.max())
    if hi - lo < 1e-6:
        depth = np.tile(np.linspace(0, 1, depth.shape[1], dtype=np.float32), (depth.shape[0], 1))
        lo, hi = 0.0, 1.0
    return np.round((depth - lo) / (hi - lo) * 255).astype(np.uint8)


def index_to_depth_map(index: np.ndarray, num_slices: int) -> np.ndarray:
    """Slice index HxW in [0, N-1] -> 8-bit depth map round(index / (N-1) * 255)."""
    return np.round(index.astype(np.float64) / max(num_slices - 1, 1) * 255).astype(np.uint8)


def depth_map_to_index(depth_map: np.ndarray, num_slices: int) -> np.ndarray:
    """Inverse of index_to_depth_map (exact for N <= 256)."""
    return np.round(depth_map.astype(np.float64) / 255 * (num_slices - 1)).astype(np.int64)


def depth_step_share(index: np.ndarray) -> float:
    """Share of pixels within 5 px of a step of 2 slices or more in a focus-index map (HxW ints).

    With physical blur these are the hard pixels: the near side's blur
    spills over the far side, so no slice there is the all-in-focus image.
    """
    index = index.astype(np.uint8)
    window = np.ones((11, 11), np.uint8)
    spread = cv2.dilate(index, window).astype(int) - cv2.erode(index, window)
    return float((spread >= 2).mean())


def make_scene(seed: int, scene: int, size: int, slice_range, blur: str, min_step_share: float = 0.0,
               depth_kind: str = "procedural"):
    """One stack, reproducible from (seed, scene, depth_kind).

    depth_kind: ``random_depth``'s procedural layouts, ``segment_depth``'s
    surfaces over image segments, or a 50/50 mix of the two.

    Returns (slices: list of N size x size x 3 uint8 near to far,
    depth_map: size x size uint8 as documented in the module,
    image: the all-in-focus size x size x 3 uint8), or None when the
    scene's ``depth_step_share`` is below ``min_step_share`` (checked
    before the slices are rendered, so a rejected scene costs little).
    """
    rng = np.random.default_rng([seed, scene])
    num_slices = int(rng.integers(slice_range[0], slice_range[1] + 1))
    image = random_image(rng, size)
    # The procedural kind draws nothing extra, so its scenes stay those of earlier sets.
    use_segments = depth_kind == "segments" or (depth_kind == "mixed" and rng.random() < 0.5)
    depth8 = stretch_to_8bit(segment_depth(rng, image) if use_segments else random_depth(rng, image))
    use_physical = blur == "physical" or (blur == "mixed" and rng.random() < 0.5)
    if min_step_share:     # on the index the chosen blur will use (the two quantise differently)
        index = synthesis.nearest_plane(depth8, num_slices) if use_physical else \
            synthesis.quantize_depth(depth8, num_slices)
        if depth_step_share(index) < min_step_share:
            return None
    if use_physical:
        slices, index = synthesis.physical_stack(image, depth8, num_slices, max_sigma=4.0)
    else:
        slices, index = synthesis.released_stack(image, depth8, num_slices)
    return list(slices), index_to_depth_map(index, num_slices), image


def check_min_step_share(value: float):
    """One clear error for a --min_step_share no scene can pass (1 or more would search forever)."""
    if not 0 <= value < 1:
        raise InputError(f"--min_step_share must be at least 0 and below 1, got {value:g}")


def kept_scenes(seed: int, first: int, count: int, size: int, slice_range, blur: str, min_step_share: float = 0.0,
                depth_kind: str = "procedural"):
    """Yield (scene number, make_scene's result) for the first ``count`` scenes from ``first`` on
    that pass ``min_step_share``."""
    scene, kept = first, 0
    while kept < count:
        result = make_scene(seed, scene, size, slice_range, blur, min_step_share, depth_kind)
        if result is not None:
            yield scene, result
            kept += 1
        scene += 1


def add_scene_flags(group, size: int, min_slices: int, max_slices: int):
    """The flags every stack generator shares: how many scenes, which, their size, slice counts, seed."""
    group.add_argument("--num_stacks", type=int, default=1000, help="number of stacks")
    group.add_argument("--first", type=int, default=0, help="number of the first scene (to extend a set)")
    group.add_argument("--size", type=int, default=size, help="side of the square slices in pixels")
    group.add_argument("--min_slices", type=int, default=min_slices, help="fewest slices per stack (>= 2)")
    group.add_argument("--max_slices", type=int, default=max_slices, help="most slices per stack (<= 32)")
    group.add_argument("--seed", type=int, default=0, help="scene i depends only on (seed, i)")


def check_scene_flags(args):
    """One clear error for slice counts or a size add_scene_flags' generators cannot make."""
    if not 2 <= args.min_slices <= args.max_slices <= 32:
        raise InputError("need 2 <= --min_slices <= --max_slices <= 32")
    if args.size < 32:
        raise InputError("--size must be at least 32")


def get_args_parser():
    parser = ArgumentParser(description=__doc__)
    io = parser.add_argument_group("output")
    io.add_argument("--output_dir", type=str, required=True, help="root of image_stacks/ and depth_maps/")
    io.add_argument("--prefix", type=str, default="syn", help="scene names are <prefix>_<number>")
    gen = parser.add_argument_group("generation")
    add_scene_flags(gen, size=160, min_slices=2, max_slices=32)
    gen.add_argument("--blur", type=str, default="released", choices=BLUR_MODES,
                     help="released Gaussian levels, physical blur, or a 50/50 mix")
    gen.add_argument("--depth", type=str, default="procedural", choices=DEPTH_KINDS,
                     help="depth layouts: procedural (planes, blobs, shapes), segments (surfaces over image "
                          "segments, steps everywhere as in real scenes), or a 50/50 mix")
    gen.add_argument("--min_step_share", type=float, default=0.0,
                     help="skip scenes with fewer pixels than this share near a depth step of 2 slices or "
                          "more (0: keep all); the kept scenes keep their numbers, and --num_stacks counts "
                          "kept scenes. Steps are where physical blur spills across depth edges")
    return parser


def main(args):
    check_scene_flags(args)
    check_min_step_share(args.min_step_share)
    if args.blur != "released" and not physical_available():
        raise InputError(f"--blur {args.blur} needs make_datasets.synthesis.physical_stack, "
                         "which this checkout does not have yet")
    root = ensure_output_dir(args.output_dir)
    ensure_output_dir(root / "depth_maps")
    ensure_output_dir(root / "all_in_focus")
    for scene, (slices, depth_map, sharp) in tqdm(
            kept_scenes(args.seed, args.first, args.num_stacks, args.size, (args.min_slices, args.max_slices),
                        args.blur, args.min_step_share, args.depth), total=args.num_stacks, desc="stacks"):
        name = f"{args.prefix}_{scene:06d}"
        ensure_output_dir(root / "image_stacks" / name)
        for k, image in enumerate(slices, start=1):
            write_image(root / "image_stacks" / name / f"{k}.png", image)
        write_image(root / "depth_maps" / f"{name}.png", depth_map)
        write_image(root / "all_in_focus" / f"{name}.png", sharp)
    print(f"wrote {args.num_stacks} stacks to {root}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
