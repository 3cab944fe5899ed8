"""Training stacks with real variety: real photographs, measured depth, lens and light-field blur.

    python make_datasets/make_realistic.py --output_dir data/realistic --num_stacks 2000 \\
        --images_dir ../shared/data/train_images --rgbd_dir ../shared/data/train_rgbd

All-in-focus images are random crops of the photographs under
``--images_dir`` (one folder per source) or of the RGB-D photographs under
``--rgbd_dir`` (``<source>/images/<name>`` with ``<source>/depth/<name>.png``).
Depth is the measured map where there is one (a ``--rgbd_share`` of the
scenes), else ``make_synthetic``'s segment or procedural depth of the crop.
Blur (``--blur``): the pillbox of a real lens, depth-layered with
occlusion (``synthesis.physical_stack(psf="disc")``), or a light field
rendered from image and depth and refocused by shift-and-add
(``synthesis.lightfield_stack``), or a mix. Then what a camera adds
between and within slices: a little focus breathing (scale) and exposure
change per slice, vignetting, Poisson-Gaussian sensor noise and JPEG.

Output, the layout of ``make_synthetic.py`` that ``train.py`` reads::

    <output_dir>/image_stacks/<scene>/<k>.png     k = 1..N, near to far (gray)
    <output_dir>/depth_maps/<scene>.png           the in-focus slice index k as round(k / (N - 1) * 255)
    <output_dir>/all_in_focus/<scene>.png         the sharp crop (vignetted like the slices, no noise)

Slices are written gray (ITU-R 601 luma), the only channel ``train.py``
reads. Scene i depends only on (seed, i) and the input folders.
"""
import sys
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import ArgumentParser  # noqa: E402
from make_datasets import synthesis  # noqa: E402
from make_datasets.common import find_files, normalize_depth, require_dir, run_batch, write_stack  # noqa: E402
from make_datasets.make_synthetic import (add_scene_flags, check_scene_flags, index_to_depth_map,  # noqa: E402
                                          random_box, random_depth, segment_depth, stretch_to_8bit,
                                          texture_energy)
from utils import (InputError, ensure_output_dir, is_image_file, list_images, read_image, run_cli,  # noqa: E402
                   to_gray, write_image)  # noqa: E402

BLUR_MODES = ("disc", "lightfield", "mixed")


# ----------------------------------------------------------------------------- sources

def list_photos(images_dir):
    """Every image under ``images_dir`` (one folder per source), in natural order."""
    photos = [p for p in find_files(images_dir, "**/*", "photograph folder") if is_image_file(p)]
    if not photos:
        raise InputError(f"no images in '{images_dir}' or its source folders")
    return photos


def decode_measured_depth(raw: np.ndarray, encoding: str) -> np.ndarray:
    """A stored depth or disparity map -> uint8 HxW, 0 = near, 255 = far, linear in disparity.

    encoding: ``disparity`` (Middlebury: larger = nearer, 0 = unknown),
    ``tum`` (16-bit, metres x 5000) or ``sun`` (SUN RGB-D's 16 bits rotated
    by 3, millimetres); 0 means no measurement, filled from the nearest
    valid pixel. Disparity is inverse depth, the scale lens blur is linear in.
    """
    raw = raw.astype(np.float64) if encoding != "sun" else raw.astype(np.uint16)
    if encoding == "disparity":
        with np.errstate(divide="ignore"):
            return normalize_depth(1.0 / raw, raw > 0, inverse=True)
    if encoding == "sun":
        raw = ((raw >> 3) | (raw << 13)).astype(np.float64)
    elif encoding != "tum":
        raise ValueError(f"unknown depth encoding {encoding!r}")
    return normalize_depth(raw, raw > 0, inverse=True)


def depth_encoding(depth_path: Path) -> str:
    """The encoding of one measured map of ../shared/data/train_rgbd, from its source folder and name
    (each folder's SOURCE.md gives them)."""
    if depth_path.stem.startswith("TUM"):
        return "tum"
    if depth_path.stem.startswith("SUN"):
        return "sun"
    return "disparity"


def list_rgbd(rgbd_dir):
    """[(image path, depth path)] of every ``<source>/images/<name>`` with ``<source>/depth/<name>.png``."""
    root = require_dir(rgbd_dir, "RGB-D folder")
    pairs = []
    for source in sorted(p for p in root.iterdir() if (p / "images").is_dir() and (p / "depth").is_dir()):
        depths = {p.stem: p for p in list_images(source / "depth")}
        pairs += [(image, depths[image.stem]) for image in list_images(source / "images") if image.stem in depths]
    if not pairs:
        raise InputError(f"no <source>/images + <source>/depth pairs under '{root}'")
    return pairs


@lru_cache(maxsize=64)
def load_photo(path: Path) -> np.ndarray:
    return to_gray(read_image(path))


@lru_cache(maxsize=None)
def load_rgbd(image_path: Path, depth_path: Path):
    """(gray image, uint8 depth 0 = near) of one RGB-D pair; InputError when the sizes differ."""
    image, raw = to_gray(read_image(image_path)), read_image(depth_path)
    if raw.shape[:2] != image.shape[:2]:
        raise InputError(f"depth '{depth_path}' is not the size of its image '{image_path}'")
    return image, decode_measured_depth(raw if raw.ndim == 2 else raw[..., 0], depth_encoding(depth_path))


def crop_pair(rng, image: np.ndarray, depth, size: int):
    """The same random square window of image (area-resized) and depth (nearest: no invented depths)."""
    y, x, side = random_box(rng, *image.shape[:2], size)
    image = cv2.resize(image[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_AREA)
    if depth is not None:
        depth = cv2.resize(depth[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_NEAREST)
    if rng.random() < 0.5:
        image, depth = image[:, ::-1], None if depth is None else depth[:, ::-1]
    return np.ascontiguousarray(image), None if depth is None else np.ascontiguousarray(depth)


# ----------------------------------------------------------------------------- camera

def breathing(image: np.ndarray, scale: float) -> np.ndarray:
    """The image magnified by ``scale`` about its centre (focus breathing), float32."""
    h, w = image.shape
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), 0.0, scale)
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def vignetting(shape, strength: float, centre=(0.5, 0.5)) -> np.ndarray:
    """Gain map HxW float32: 1 at ``centre`` (fractions of the size), 1 - strength at the farthest corner."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = centre[0] * (h - 1), centre[1] * (w - 1)
    r2 = (yy - cy) ** 2 + (xx - cx) ** 2
    return (1.0 - strength * r2 / r2.max()).astype(np.float32)


def poisson_gaussian(rng, image: np.ndarray, shot: float, read: float) -> np.ndarray:
    """Sensor noise on an image in [0, 1]: variance shot * signal + read ** 2."""
    return image + np.sqrt(shot * np.clip(image, 0, None) + read ** 2) * rng.standard_normal(image.shape)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    return cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)


def camera(rng, slices, sharp: np.ndarray):
    """What a real camera adds to rendered uint8 slices; returns (slices, all-in-focus), uint8.

    Per stack, each with a chance: focus breathing (the scale drifts by up
    to 1% from the first slice to the last, centred on the middle one),
    exposure jitter per slice (1.5%), vignetting (up to 35% at the corner,
    the all-in-focus image gets it too: it is the same lens), Poisson-Gaussian
    noise and JPEG (quality 70..95). The all-in-focus image stays noise-free.
    """
    n = len(slices)
    drift = rng.uniform(-0.01, 0.01) if rng.random() < 0.5 else 0.0
    gains = 1.0 + rng.normal(0.0, 0.015, n) if rng.random() < 0.5 else np.ones(n)
    gain_map = vignetting(sharp.shape, rng.uniform(0.05, 0.35), rng.uniform(0.35, 0.65, 2)) \
        if rng.random() < 0.5 else np.ones(sharp.shape, np.float32)
    noisy = rng.random() < 0.7
    shot, read = 10 ** rng.uniform(-4.5, -3.0), 10 ** rng.uniform(-3.3, -2.3)
    quality = int(rng.integers(70, 96)) if rng.random() < 0.4 else 0
    out = []
    for k, image in enumerate(slices):
        value = image.astype(np.float32) / 255.0
        if drift:
            value = breathing(value, 1.0 + drift * (k / max(n - 1, 1) - 0.5))
        value = value * gains[k] * gain_map
        if noisy:
            value = poisson_gaussian(rng, value, shot, read)
        value = np.clip(np.rint(value * 255.0), 0, 255).astype(np.uint8)
        out.append(jpeg(value, quality) if quality else value)
    sharp = np.clip(np.rint(sharp.astype(np.float32) * gain_map), 0, 255).astype(np.uint8)
    return out, sharp


# ----------------------------------------------------------------------------- scenes

def scene_depth(rng, image: np.ndarray, measured) -> np.ndarray:
    """Full-range uint8 depth (0 = near) of a crop: the measured crop, else segment or procedural depth."""
    if measured is not None:
        return stretch_to_8bit(measured.astype(np.float32))
    colour = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return stretch_to_8bit(segment_depth(rng, colour) if rng.random() < 0.6 else random_depth(rng, colour))


def render(rng, image: np.ndarray, depth: np.ndarray, num_slices: int, blur: str, max_radius: float):
    """Slices of one scene with the pillbox or light-field blur (``blur`` mixed: half each)."""
    if blur == "disc" or (blur == "mixed" and rng.random() < 0.5):
        return synthesis.physical_stack(image, depth, num_slices, max_sigma=max_radius, psf="disc")
    grid = 7 if rng.random() < 0.25 else 5
    return synthesis.lightfield_stack(image, depth, num_slices, max_radius=max_radius, grid=grid)


def make_scene(seed: int, scene: int, photos, rgbd, size: int, slice_range, blur: str, rgbd_share: float,
               radius_range=(1.5, 6.0)):
    """One stack, reproducible from (seed, scene) and the source lists.

    Returns (slices: N uint8 size x size gray near to far, depth map: uint8
    as in the module doc, all-in-focus: uint8 size x size).
    """
    rng = np.random.default_rng([seed, scene])
    num_slices = int(rng.integers(slice_range[0], slice_range[1] + 1))
    if rgbd and rng.random() < rgbd_share:
        image, measured = crop_pair(rng, *load_rgbd(*rgbd[rng.integers(len(rgbd))]), size)
    else:
        # Crops of sky or plain walls carry no focus cue: keep the more textured of two.
        crops = [crop_pair(rng, load_photo(photos[rng.integers(len(photos))]), None, size)[0] for _ in range(2)]
        image, measured = max(crops, key=lambda c: texture_energy(cv2.cvtColor(c, cv2.COLOR_GRAY2BGR))), None
    depth = scene_depth(rng, image, measured)
    max_radius = float(rng.uniform(*radius_range))
    slices, index = render(rng, image, depth, num_slices, blur, max_radius)
    slices, sharp = camera(rng, slices, image)
    return slices, index_to_depth_map(index, num_slices), sharp


def get_args_parser():
    parser = ArgumentParser(description=__doc__)
    io = parser.add_argument_group("input and output")
    io.add_argument("--output_dir", type=str, required=True, help="root of image_stacks/, depth_maps/, all_in_focus/")
    io.add_argument("--images_dir", type=str, default="../shared/data/train_images",
                    help="all-in-focus photographs, one folder per source")
    io.add_argument("--rgbd_dir", type=str, default="../shared/data/train_rgbd",
                    help="<source>/images/<name> + <source>/depth/<name>.png pairs ('' : none)")
    io.add_argument("--prefix", type=str, default="real", help="scene names are <prefix>_<number>")
    gen = parser.add_argument_group("generation")
    add_scene_flags(gen, size=256, min_slices=6, max_slices=16)
    gen.add_argument("--blur", type=str, default="mixed", choices=BLUR_MODES,
                     help="pillbox lens blur, refocused light field, or a 50/50 mix")
    gen.add_argument("--rgbd_share", type=float, default=0.2,
                     help="share of scenes cropped from the RGB-D photographs with their measured depth")
    gen.add_argument("--min_radius", type=float, default=1.5,
                     help="smallest blur radius (px) between the nearest and the farthest depth")
    gen.add_argument("--max_radius", type=float, default=6.0, help="largest such radius (px), drawn per stack")
    return parser


def main(args):
    check_scene_flags(args)
    if not 0 <= args.rgbd_share <= 1:
        raise InputError(f"--rgbd_share must be in [0, 1], got {args.rgbd_share:g}")
    if not 0 < args.min_radius <= args.max_radius:
        raise InputError("need 0 < --min_radius <= --max_radius")
    photos = list_photos(args.images_dir)
    rgbd = list_rgbd(args.rgbd_dir) if args.rgbd_dir and args.rgbd_share > 0 else []
    root = ensure_output_dir(args.output_dir)
    ensure_output_dir(root / "depth_maps")
    ensure_output_dir(root / "all_in_focus")
    slice_range, radius_range = (args.min_slices, args.max_slices), (args.min_radius, args.max_radius)

    def process(scene):
        slices, depth_map, sharp = make_scene(args.seed, scene, photos, rgbd, args.size, slice_range, args.blur,
                                              args.rgbd_share, radius_range)
        name = f"{args.prefix}_{scene:06d}"
        # The stack folder last: training lists stacks, so a stopped run leaves no stack without its maps.
        write_image(root / "depth_maps" / f"{name}.png", depth_map)
        write_image(root / "all_in_focus" / f"{name}.png", sharp)
        write_stack(root / "image_stacks" / name, slices, "png")

    run_batch(range(args.first, args.first + args.num_stacks), process, "stacks", name_of=lambda i: f"scene {i}")
    print(f"wrote {args.num_stacks} stacks from {len(photos)} photographs and {len(rgbd)} RGB-D pairs to {root}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
