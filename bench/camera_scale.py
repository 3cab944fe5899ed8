"""Camera-resolution stacks: speed and memory at 24 MP against focus-stack, quality at 1x, 2x and 4x.

    python bench/camera_scale.py                      # all three parts (about 25 minutes on 2 cores)
    python bench/camera_scale.py --parts speed --focus_stack /path/to/focus-stack

Part ``speed``: builds, once, in ``--work_dir`` two camera brackets from the
real stacks of ../shared/data/stacks: ``pcb`` (7 slices) and ``pcb_depthmap``
(10 slices, with two slices blended between each pair, 30 in all), each
upscaled to 6000 x 4000 (24 MP, bicubic) and saved as JPEG (quality 95), as a
camera would. Then, each in a fresh process and side by side: the default as a
user runs it (``predict_one_stack.py``: aligned, six outputs written) and
focus-stack (aligned, its defaults; build it as docs/performance.md says, or
pass ``--focus_stack``). Wall seconds and peak RSS of each child.

Part ``quality``: the light fields of ../shared/data/lightfields as 10-slice
stacks (make_datasets/lightfield.py), at their own size and upscaled 2x and 4x
(slices and centre view, bicubic): the same optics with the blur spread over
more pixels. PSNR of the fused gray image against the centre view, and
seconds per stack, for the default, the shipped card with the network at the
stack's own size (``network_blur`` 0, the card before the working scale), the
official weights, the classical peers of bench/peers.py, focus-stack (its
fusion alone, ``--no-align``: the stacks are aligned) and StackMFF-V3
(``--openfocus``, when installed).

Part ``breathing``: a stack of 8 slices with the magnification growing by 4 %
over the stack and 1 gray level of sensor noise; the fused gray image is
registered to the all-in-focus view by ECC, both blurred by 1.5 px, and scored
inside a 24 px margin: without breathing, with breathing and ``--align none``,
and with the default ``--align auto``.
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import peers  # noqa: E402
from bench.benchmark_fusion import (LIGHT_FIELDS, OFFICIAL, OPENFOCUS, REAL_STACKS, light_field_sets,  # noqa: E402
                                    machine_name, print_table)
from bench.end_to_end import timed  # noqa: E402
from cli import ArgumentParser  # noqa: E402

FOCUS_STACK = REPO.parent / "focus-stack" / "build" / "focus-stack"
CAMERA_SIZE = (6000, 4000)
PARTS = ("speed", "quality", "breathing")


def get_args_parser():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure")
    parser.add_argument("--work_dir", type=str, default=os.path.join(tempfile.gettempdir(), "stackmff_camera"),
                        help="where the 24 MP brackets and the light-field stacks are built and kept")
    parser.add_argument("--focus_stack", type=str, default=str(FOCUS_STACK),
                        help="the focus-stack command (absent: its columns say so)")
    parser.add_argument("--openfocus", type=str, default=OPENFOCUS,
                        help="the openfocus command of a separate venv, for StackMFF-V3 (absent: left out)")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4], help="light-field upscalings")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the quality part's fusers")
    return parser


# ----------------------------------------------------------------------------- speed

def camera_bracket(folder: Path, scene: str, slices: int) -> Path:
    """``scene`` of FocusStack_PetteriAimonen as a 24 MP JPEG bracket of ``slices`` slices in ``folder``
    (built once): every slice upscaled; with more slices than the scene has, blends of neighbours."""
    from utils import read_stack
    out = folder / f"{scene}_{slices}x24mp"
    if out.is_dir() and len(list(out.glob("*.jpg"))) == slices:
        return out
    source, _ = read_stack(REAL_STACKS / "FocusStack_PetteriAimonen" / "dof_stack" / scene)
    out.mkdir(parents=True, exist_ok=True)
    for k, position in enumerate(np.linspace(0, len(source) - 1, slices)):
        low = int(np.floor(position))
        high, t = min(low + 1, len(source) - 1), position - low
        image = cv2.addWeighted(source[low], 1 - t, source[high], t, 0)
        image = cv2.resize(image, CAMERA_SIZE, interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(out / f"{k + 1:02d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return out


def measure_speed(args):
    work = Path(args.work_dir)
    have_focus_stack = Path(args.focus_stack).is_file()
    rows = []
    for scene, slices in (("pcb", 7), ("pcb_depthmap", 30)):
        bracket = camera_bracket(work, scene, slices)
        files = sorted(str(p) for p in bracket.glob("*.jpg"))
        ours = timed([sys.executable, str(REPO / "predict_one_stack.py"), "-i", str(bracket),
                      "-o", str(work / "out_ours"), "--fixed_names"])
        row = [f"{slices} x 24 MP ({scene})", f"{ours[0]:.1f} s, {ours[2] / 1024:.2f} GB"]
        if have_focus_stack:
            theirs = timed([args.focus_stack, f"--output={work / 'out_focus_stack.jpg'}"] + files)
            row += [f"{theirs[0]:.1f} s, {theirs[2] / 1024:.2f} GB", f"{theirs[0] / ours[0]:.2f}x"]
        else:
            row += [f"not installed ({args.focus_stack})", ""]
        rows.append(row)
    print_table(f"speed: wall seconds and peak RSS, each a fresh process ({machine_name()})",
                ["bracket", "ours (aligned, six outputs)", "focus-stack (aligned)", "focus-stack / ours"], rows)


# ----------------------------------------------------------------------------- quality

def upscaled(images, factor):
    return images if factor == 1 else [cv2.resize(im, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
                                        for im in images]


def quality_fusers(args):
    """[(name, fn(slices) -> fused gray float)], the ones installed."""
    from bench.benchmark_fusion import gray_stack
    from fusion import FusionCard
    from inference import DEFAULT_MODEL, fuse_images
    from model import load_model
    ours = load_model(DEFAULT_MODEL)
    card = FusionCard.beside(DEFAULT_MODEL)
    fusers = [("ours (default)", lambda im: fuse_images(ours, card, im).fused_gray),
              ("ours, network at the stack's size",
               lambda im: fuse_images(ours, card.with_overrides(network_blur=0.0), im).fused_gray)]
    if OFFICIAL.is_file():
        official = load_model(OFFICIAL)
        fusers.append(("official", lambda im: fuse_images(official, FusionCard.beside(OFFICIAL), im).fused_gray))
    fusers += [("argmax", lambda im: peers.argmax_laplacian(gray_stack(im))[0]),
               ("Laplacian pyramid", lambda im: peers.laplacian_pyramid(gray_stack(im))[0]),
               ("GFF", lambda im: peers.guided_filter_fusion(gray_stack(im))[0])]
    if peers.dtcwt_available():
        fusers.append(("DTCWT", lambda im: peers.dtcwt_fusion(gray_stack(im))[0]))
    if Path(args.focus_stack).is_file():
        fusers.append(("focus-stack", lambda im: focus_stack_fusion(args.focus_stack, im)))
    openfocus = peers.OpenFocus(args.openfocus, threads=args.threads)
    if openfocus.available:
        fusers.append(("StackMFF-V3", lambda im: openfocus(im)[0]))
    return fusers


def focus_stack_fusion(command, images):
    """focus-stack's fused gray image of aligned slices (``--no-align``), cropped border and all."""
    from utils import read_image, to_gray_float, write_image
    with tempfile.TemporaryDirectory(prefix="focus_stack_") as folder:
        names = [os.path.join(folder, f"{k:03d}.png") for k in range(len(images))]
        for name, image in zip(names, images):
            write_image(name, image)
        output = os.path.join(folder, "fused.png")
        subprocess.run([command, "--no-align", f"--output={output}"] + names, check=True, capture_output=True)
        return to_gray_float(read_image(output))


def psnr(fused, truth) -> float:
    """PSNR (dB) of a fused gray image against the truth; a fuser that crops its border is
    compared on the centre it kept."""
    dy, dx = (truth.shape[0] - fused.shape[0]) // 2, (truth.shape[1] - fused.shape[1]) // 2
    truth = truth[dy:dy + fused.shape[0], dx:dx + fused.shape[1]]
    error = np.mean((np.clip(fused, 0, 1).astype(np.float64) - truth) ** 2)
    return float(10 * np.log10(1.0 / error))


def measure_quality(args):
    import torch
    torch.set_num_threads(args.threads)
    sets = light_field_sets(LIGHT_FIELDS, 10, Path(args.work_dir) / "lightfields")
    if not sets:
        return
    fusers = quality_fusers(args)
    rows = []
    for title, [(slices, centre, _)] in sets.items():
        name = title.split(":")[0].replace("light field ", "")
        for factor in args.scales:
            images = upscaled(slices, factor)
            truth = centre if factor == 1 else cv2.resize(centre, None, fx=factor, fy=factor,
                                                          interpolation=cv2.INTER_CUBIC)
            row = [f"{name} {factor}x ({truth.shape[1]} x {truth.shape[0]})"]
            for _, fuse in fusers:
                start = time.perf_counter()
                fused = fuse(images)
                row.append(f"{psnr(fused, truth):.2f} ({time.perf_counter() - start:.1f} s)")
            rows.append(row)
    print_table(f"quality: PSNR (dB) of the fused gray against the centre view, seconds per stack ({machine_name()})",
                ["light field"] + [name for name, _ in fusers], rows)


# ----------------------------------------------------------------------------- breathing

BREATHING_SIDE = 384


def breathing_stack(zoom: float, slices: int = 8, noise: float = 1.0, seed: int = 0):
    """A stack whose magnification grows by ``zoom`` over the slices, and the all-in-focus view of its
    middle slice: each slice a view of a 2x photograph area-averaged to the frame (resampled once),
    blurred by the released synthesis along a ramp of depth, with Gaussian noise of ``noise`` levels."""
    import skimage.data
    from make_datasets.synthesis import released_stack
    photo = cv2.cvtColor(cv2.resize(skimage.data.astronaut(), (1024, 1024), interpolation=cv2.INTER_AREA),
                         cv2.COLOR_RGB2BGR)
    ramp = np.tile(np.linspace(0, 255, 1024).astype(np.float32), (1024, 1))
    rng = np.random.default_rng(seed)

    def view(image, scale, interpolation):
        """The frame at ``scale`` (1: 2 photo px per frame px), rendered at 2x and area-averaged."""
        step = 1.0 / scale                     # photo px per 2x-frame px
        centre, frame_centre = (1024 - 1) / 2, (2 * BREATHING_SIDE - 1) / 2
        warp = np.array([[step, 0, centre - step * frame_centre], [0, step, centre - step * frame_centre]])
        big = cv2.warpAffine(image, warp, (2 * BREATHING_SIDE,) * 2, flags=interpolation | cv2.WARP_INVERSE_MAP)
        return cv2.resize(big, (BREATHING_SIDE,) * 2, interpolation=cv2.INTER_AREA)

    scales = np.linspace(1.0, 1.0 + zoom, slices)
    stack = []
    for k, scale in enumerate(scales):
        depth = np.round(view(ramp, scale, cv2.INTER_LINEAR)).astype(np.uint8)
        blurred = released_stack(view(photo, scale, cv2.INTER_CUBIC), depth, slices)[0][k]
        stack.append(np.clip(blurred + rng.normal(0, noise, blurred.shape), 0, 255).astype(np.uint8))
    return stack, view(photo, scales[(slices - 1) // 2], cv2.INTER_CUBIC)


def registered_psnr(fused, all_in_focus, blur=1.5, margin=24) -> float:
    """PSNR of ``fused`` against ``all_in_focus`` (gray [0, 1]) after ECC registers the one onto the other,
    both blurred by ``blur`` px, inside ``margin``: the geometry of the output does not count, double
    edges do."""
    from Registration import _pyramid, ecc_register
    truth, fused = (cv2.GaussianBlur(x.astype(np.float32), (0, 0), blur) for x in (all_in_focus, fused))
    warp, _ = ecc_register(_pyramid(truth, 3), _pyramid(fused, 3), np.eye(3))
    moved = cv2.warpAffine(fused, warp[:2], truth.shape[::-1], flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    inside = (slice(margin, -margin),) * 2
    return psnr(moved[inside], truth[inside])


def measure_breathing(args):
    from fusion import FusionCard
    from inference import DEFAULT_MODEL, fuse_images
    from model import load_model
    from Registration import align_with_report
    from utils import to_gray_float
    model, card = load_model(DEFAULT_MODEL), FusionCard.beside(DEFAULT_MODEL)
    rows = []
    for zoom in (0.0, 0.04):
        stack, truth = breathing_stack(zoom)
        for align in ("none", "auto"):
            images = stack if align == "none" else align_with_report(stack, "auto")[0]
            score = registered_psnr(fuse_images(model, card, images).fused_gray, to_gray_float(truth))
            rows.append([f"{zoom:.0%}", align, f"{score:.2f}"])
    print_table("breathing: PSNR (dB) of the fused gray registered to the all-in-focus view, both blurred 1.5 px",
                ["magnification change", "--align", "PSNR"], rows)


def main(args):
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    measures = {"speed": measure_speed, "quality": measure_quality, "breathing": measure_breathing}
    for part in args.parts:
        measures[part](args)


if __name__ == "__main__":
    from cli import run_cli
    run_cli(main, get_args_parser())
