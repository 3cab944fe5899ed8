"""Focus stacks from a thin-lens camera: validation stacks with exact ground truth and wide blur.

    pip install mitsuba     # the renderer; not needed by anything else in the project
    python make_datasets/thinlens.py --image_dir ../shared/data/train_images --output_dir data/thinlens \
        --num_scenes 8 --size 1024 768 --max_blur 8 14 20 28

Each scene is a few photographs on flat cards at different distances, in
front of a photograph that fills the background; cards are turned and tilted,
so depth changes along them, and they hide each other. Mitsuba 3 renders the
scene through a thin lens (its ``thinlens`` camera, path tracing the aperture)
focused at ``--num_slices`` distances spaced evenly in dioptres from the
nearest to the farthest distance of the scene, and through a pinhole for the
all-in-focus image. So the blur is the lens's own: a disc whose radius grows
with the distance from the focused plane, cut at occlusions, a near card's
blur spilling over what is behind it. ``--max_blur`` is the blur radius, in
pixels, of the farthest point when focused nearest (and the other way round);
a list gives each scene the next value in turn. The cards emit their
photograph's colours, so no lighting changes from slice to slice.

Output, in the layout of make_dataset.py and lightfield.py:

    <output_dir>/dof_stack/<scene>/1..N.png     slice k focused at distance k (1 = nearest)
    <output_dir>/AiF/<scene>.png                the pinhole image: the exact all-in-focus image
    <output_dir>/quantized_depth/<scene>.png    the slice each pixel is sharpest in, as k / (N-1) x 255
    <output_dir>/planes/<scene>.txt             the N focus distances, in scene units

Scenes are named ``thinlens_<seed>_<k>_blur<R>``; the same seed gives the
same scenes. Render only from training photographs (never from the light
fields, which are the validation set of real optics).
"""
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np

from cli import ArgumentParser  # noqa: E402
from make_datasets.common import TruthStack, find_files, require_dir, run_batch, write_truth_stack
from utils import InputError, PLAIN_IMAGE_EXTENSIONS, ensure_output_dir, run_cli

NEAREST, FARTHEST = 1.0, 3.0    # scene units: the nearest card and the background
FOV_DEGREES = 40.0              # horizontal field of view


def get_args_parser():
    parser = ArgumentParser(description=__doc__)
    io = parser.add_argument_group("input and output")
    io.add_argument("--image_dir", type=str, required=True,
                    help="photographs to put on the cards (searched recursively; training images only)")
    io.add_argument("--output_dir", type=str, required=True, help="dataset root to write")
    scene = parser.add_argument_group("scenes and camera")
    scene.add_argument("--num_scenes", type=int, default=8, help="scenes to render (default: 8)")
    scene.add_argument("--seed", type=int, default=0, help="scene layout seed (default: 0)")
    scene.add_argument("--size", type=int, nargs=2, default=[1024, 768], metavar=("W", "H"),
                       help="image size in pixels (default: 1024 768)")
    scene.add_argument("--num_slices", type=int, default=8, help="focus distances of each stack (default: 8)")
    scene.add_argument("--max_blur", type=float, nargs="+", default=[20.0], metavar="R",
                       help="px: blur radius of the farthest point focused nearest; a list is used in turn "
                            "(default: 20)")
    scene.add_argument("--cards", type=int, nargs=2, default=[3, 5], metavar=("MIN", "MAX"),
                       help="cards in front of the background (default: 3 5)")
    scene.add_argument("--spp", type=int, default=64,
                       help="samples per pixel of the thin-lens slices (default: 64; the pinhole image takes 16)")
    return parser


# ----------------------------------------------------------------------------- scene layout

def focal_pixels(width: int) -> float:
    """Pixels per unit of image-plane offset at unit distance, for FOV_DEGREES across ``width``."""
    return (width / 2) / math.tan(math.radians(FOV_DEGREES) / 2)


def aperture_radius(max_blur: float, width: int) -> float:
    """Lens radius (scene units) whose blur disc has radius ``max_blur`` px for a point at FARTHEST
    focused at NEAREST: a point at distance d focused at f spreads over a * |1/d - 1/f| * focal_pixels."""
    return max_blur / ((1 / NEAREST - 1 / FARTHEST) * focal_pixels(width))


def focus_distances(num_slices: int) -> np.ndarray:
    """The slices' focus distances, nearest first, evenly spaced in dioptres (as a focus rail in small steps)."""
    return 1.0 / np.linspace(1 / NEAREST, 1 / FARTHEST, num_slices)


def photo_size(path):
    """(width, height) of the photograph at ``path``."""
    image = cv2.imread(str(path), cv2.IMREAD_REDUCED_GRAYSCALE_2)
    if image is None:
        raise InputError(f"'{path}' is not a readable image")
    return 2 * image.shape[1], 2 * image.shape[0]


def scene_layout(photos, rng, size, cards):
    """[(photo, distance, centre x, centre y, half width, half height, yaw, pitch)] of one scene, background first.

    ``photos``: [(path, (width, height))]. The background is at FARTHEST, turned
    by up to 15 degrees, wide enough to fill the view (and what the lens's edge sees), from
    the photographs at least 0.75 x the image's width where there are any (so its
    detail reaches the pixel scale); the cards lie between NEAREST and 85% of
    FARTHEST, evenly in dioptres, each 20-45% of the view's width at its distance."""
    width, height = size
    half_view = math.tan(math.radians(FOV_DEGREES) / 2)
    large = [p for p in photos if p[1][0] >= 0.75 * width] or photos
    background, (photo_w, photo_h) = large[rng.integers(len(large))]
    aspect = photo_w / photo_h
    cover = 1.3 * FARTHEST * half_view     # the view, turned up to 15 degrees, and the lens's edge
    half_w = max(cover, cover * (height / width) * aspect)
    layout = [(background, FARTHEST, 0.0, 0.0, half_w, half_w / aspect, rng.uniform(-15, 15), 0.0)]
    for _ in range(rng.integers(cards[0], cards[1] + 1)):
        photo, (photo_w, photo_h) = photos[rng.integers(len(photos))]
        aspect = photo_w / photo_h
        distance = 1.0 / rng.uniform(1 / (0.85 * FARTHEST), 1 / NEAREST)
        view_w = distance * half_view
        half_w = rng.uniform(0.2, 0.45) * view_w
        x = rng.uniform(-0.7, 0.7) * view_w
        y = rng.uniform(-0.7, 0.7) * view_w * height / width
        layout.append((photo, distance, x, y, half_w, half_w / aspect, rng.uniform(-45, 45), rng.uniform(-25, 25)))
    return layout


# ----------------------------------------------------------------------------- rendering

def _import_mitsuba():
    try:
        import mitsuba
    except ImportError:
        raise InputError("thin-lens stacks need the Mitsuba 3 renderer (pip install mitsuba)") from None
    mitsuba.set_variant("scalar_rgb")     # the LLVM variants need a JIT that not every CPU offers
    return mitsuba


def _scene_dict(mi, layout):
    """Mitsuba scene: every card an emitter of its photograph (no lighting), seen from the origin along +z."""
    transform = mi.ScalarTransform4f
    scene = {"type": "scene", "integrator": {"type": "path", "max_depth": 1}}
    for k, (photo, distance, x, y, half_w, half_h, yaw, pitch) in enumerate(layout):
        # The rectangle faces +z; turned by 180 degrees it faces the camera.
        to_world = (transform().translate([x, y, distance]).rotate([0, 1, 0], 180 + yaw)
                    .rotate([1, 0, 0], pitch).scale([half_w, half_h, 1]))
        scene[f"card{k}"] = {"type": "rectangle", "to_world": to_world,
                             "bsdf": {"type": "diffuse", "reflectance": {"type": "rgb", "value": [0, 0, 0]}},
                             "emitter": {"type": "area", "radiance": {"type": "bitmap", "filename": str(photo)}}}
    return scene


def _sensor(mi, size, spp, lens=None):
    """A pinhole (lens None) or thin-lens camera (lens = (aperture radius, focus distance))."""
    width, height = size
    sensor = {"type": "perspective" if lens is None else "thinlens", "fov": FOV_DEGREES, "fov_axis": "x",
              "to_world": mi.ScalarTransform4f().look_at(origin=[0, 0, 0], target=[0, 0, 1], up=[0, 1, 0]),
              "film": {"type": "hdrfilm", "width": width, "height": height, "rfilter": {"type": "box"},
                       "pixel_format": "rgb"},
              "sampler": {"type": "multijitter", "sample_count": spp}}
    if lens is not None:
        sensor["aperture_radius"], sensor["focus_distance"] = lens
    return sensor


def _render_bgr(mi, scene, sensor) -> np.ndarray:
    """One 8-bit sRGB BGR image of ``scene`` through ``sensor``."""
    image = mi.render(mi.load_dict({**scene, "sensor": sensor}))
    bitmap = mi.Bitmap(image).convert(mi.Bitmap.PixelFormat.RGB, mi.Struct.Type.UInt8, srgb_gamma=True)
    return np.ascontiguousarray(np.array(bitmap)[..., ::-1])


def _distance_map(mi, scene, size) -> np.ndarray:
    """Distance along the optical axis (z) of the surface seen at every pixel centre of the pinhole image."""
    width, height = size
    sensor = _sensor(mi, size, 1)
    sensor["sampler"] = {"type": "stratified", "sample_count": 1, "jitter": False}
    aov = mi.render(mi.load_dict({**scene, "integrator": {"type": "aov", "aovs": "dd.y:depth"}, "sensor": sensor}))
    ray_length = np.array(aov)[..., -1].astype(np.float64)
    # Ray length to z: divide by the length of the pixel's direction at unit depth.
    scale = math.tan(math.radians(FOV_DEGREES) / 2)
    xs = ((np.arange(width) + 0.5) / width * 2 - 1) * scale
    ys = ((np.arange(height) + 0.5) / height * 2 - 1) * scale * height / width
    return ray_length / np.sqrt(1 + xs[None, :] ** 2 + ys[:, None] ** 2)


def render_stack(layout, size, num_slices, max_blur, spp, progress=None) -> TruthStack:
    """The thin-lens focus stack of one scene layout (see ``scene_layout``), with its ground truth."""
    mi = _import_mitsuba()
    scene = _scene_dict(mi, layout)
    distances = focus_distances(num_slices)
    radius = aperture_radius(max_blur, size[0])
    loop = progress(distances, desc="render", unit="slice", leave=False) if progress else distances
    slices = [_render_bgr(mi, scene, _sensor(mi, size, spp, (radius, float(d)))) for d in loop]
    all_in_focus = _render_bgr(mi, scene, _sensor(mi, size, 16))
    dioptres = 1.0 / np.clip(_distance_map(mi, scene, size), NEAREST / 2, None)
    index = np.abs(dioptres[..., None] - 1.0 / distances).argmin(axis=-1)
    return TruthStack(slices, all_in_focus, index.astype(np.int64), distances)


# ----------------------------------------------------------------------------- command line

def check_settings(args):
    if args.num_scenes < 1 or args.num_slices < 2 or args.spp < 1:
        raise InputError("--num_scenes and --spp must be at least 1 and --num_slices at least 2")
    if min(args.size) < 16:
        raise InputError(f"--size must be at least 16 x 16 pixels, got {args.size[0]} x {args.size[1]}")
    if min(args.max_blur) <= 0:
        raise InputError(f"--max_blur must be above 0 px, got {min(args.max_blur):g}")
    if not 0 <= args.cards[0] <= args.cards[1]:
        raise InputError(f"--cards needs 0 <= MIN <= MAX, got {args.cards[0]} {args.cards[1]}")


def main(args):
    check_settings(args)
    _import_mitsuba()                       # say what to install before anything is read
    root_dir = require_dir(args.image_dir, "--image_dir")
    files = [p for p in find_files(root_dir, "**/*", "--image_dir") if p.suffix.lower() in PLAIN_IMAGE_EXTENSIONS]
    if not files:
        raise InputError(f"--image_dir '{args.image_dir}' holds no photographs")
    photos = [(path, photo_size(path)) for path in files]
    root = ensure_output_dir(args.output_dir)
    size = tuple(args.size)
    scenes = [(k, args.max_blur[k % len(args.max_blur)]) for k in range(args.num_scenes)]

    def process(item):
        k, max_blur = item
        layout = scene_layout(photos, np.random.default_rng([args.seed, k]), size, args.cards)
        stack = render_stack(layout, size, args.num_slices, max_blur, args.spp)
        write_truth_stack(root, scene_name(args.seed, k, max_blur), stack)

    done = run_batch(scenes, process, desc="thin-lens stacks", name_of=lambda item: scene_name(args.seed, *item))
    print(f"wrote {done} stacks to {root}")
    return done


def scene_name(seed: int, k: int, max_blur: float) -> str:
    return f"thinlens_{seed}_{k}_blur{max_blur:g}"


if __name__ == "__main__":
    run_cli(main, get_args_parser())
