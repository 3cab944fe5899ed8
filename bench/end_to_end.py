"""The default against the released pipeline, end to end: from a fresh Python process to six outputs on disk.

    python bench/end_to_end.py                          # a 16 x 1 MP stack made from the bundled example
    python bench/end_to_end.py --input_dir path/to/stack --repeats 3

Runs, each in a fresh process and timed from its start (imports included):

* default: ``predict_one_stack.py`` as a user runs it (the shipped weights and their card);
* released: the released pipeline's work with the official weights: the straightforward
  network (``StackMFFV2.focus_logits``, as the authors' code computes it), the pick by
  the min-max rounded index, the same six outputs written.

Prints wall and CPU seconds (user + system of the child, steadier on a loaded
machine), peak RSS, page faults (minor + major: fresh pages, each mapped and
zeroed by the kernel) and the released time over the default's. Exits 2 when the
official weights or the input are missing, 1 when a pipeline fails.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OFFICIAL = REPO.parent / "shared" / "reference" / "official" / "model.pth"

from cli import ArgumentParser  # noqa: E402


def get_args_parser():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--input_dir", type=str, default=None,
                        help="a stack folder (default: 16 slices of 1024 x 1024 made from examples/coffee_stack)")
    parser.add_argument("--official", type=str, default=str(OFFICIAL), help="the authors' released weights")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each pipeline, alternating (best shown)")
    parser.add_argument("--released_child", nargs=2, metavar=("INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    return parser


def released_child(input_dir, output_dir, official):
    """The released pipeline's work in this process (see the module docstring)."""
    from fusion import FusionCard
    from inference import fuse_gray_batch, render_outputs, write_outputs
    from model import load_model
    from predict_one_stack import output_paths
    from utils import read_stack, stack_to_tensor
    images, _ = read_stack(input_dir)
    model = load_model(official, "cpu")
    result = fuse_gray_batch(model, FusionCard(), stack_to_tensor(images), fast=False)[0]
    os.makedirs(output_dir, exist_ok=True)
    write_outputs(render_outputs(result, images), output_paths(Path(output_dir), fixed_names=True))


def make_stack(folder, slices=16, side=1024):
    """``slices`` slices of side x side: the example's first photo, blurred by a focus sweep."""
    import cv2
    from utils import list_images, read_image
    image = cv2.resize(read_image(list_images(REPO / "examples" / "coffee_stack")[0]), (side, side),
                       interpolation=cv2.INTER_CUBIC)
    for k in range(slices):
        sigma = 0.3 + 0.4 * abs(k - (slices - 1) / 2)
        cv2.imwrite(str(Path(folder) / f"{k + 1:02d}.png"), cv2.GaussianBlur(image, (0, 0), sigma))


def timed(command):
    """Run ``command``; (wall s, CPU s, peak RSS MB and page faults of that child alone)."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        lines = stderr.strip().splitlines() or [f"exit status {child.returncode}"]
        sys.exit(f"error: {Path(command[1]).name} failed: {lines[-1]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, usage.ru_minflt + usage.ru_majflt


def main(args):
    from utils import InputError, list_images
    if not Path(args.official).is_file():
        raise InputError(f"official weights not found at '{args.official}' (pass --official)")
    with tempfile.TemporaryDirectory() as scratch:
        stack = args.input_dir
        if stack is None:
            stack = os.path.join(scratch, "stack")
            os.mkdir(stack)
            make_stack(stack)
        names = list_images(stack)          # InputError (one line) for a missing or empty folder
        commands = {
            "default": [sys.executable, str(REPO / "predict_one_stack.py"), "--input_dir", stack,
                        "--output_dir", os.path.join(scratch, "default"), "--fixed_names"],
            "released": [sys.executable, __file__, "--official", args.official,
                         "--released_child", stack, os.path.join(scratch, "released")],
        }
        best = {}
        for _ in range(args.repeats):
            for name, command in commands.items():
                load = os.getloadavg()[0]
                wall, cpu, rss, faults = timed(command)
                if name not in best or wall < best[name][0]:
                    best[name] = (wall, cpu, rss, faults, load)
    print(f"{len(names)} slices from {stack if args.input_dir else 'examples/coffee_stack (1024 x 1024)'}")
    print(f"{'pipeline':<10} {'wall s':>8} {'cpu s':>8} {'peak RSS MB':>12} {'page faults':>12} {'load':>5}")
    for name, (wall, cpu, rss, faults, load) in best.items():
        print(f"{name:<10} {wall:>8.2f} {cpu:>8.2f} {rss:>12.0f} {faults:>12,} {load:>5.2f}")
    (dw, dc, *_), (rw, rc, *_) = best["default"], best["released"]
    print(f"released / default: {rw / dw:.2f}x wall, {rc / dc:.2f}x CPU time")


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()
    if parsed.released_child:
        released_child(*parsed.released_child, parsed.official)
    else:
        from utils import run_cli
        run_cli(main, get_args_parser())
