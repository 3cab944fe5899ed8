"""Fused PSNR with and without --match_exposure, on stacks with and without an exposure drift.

    python bench/exposure_drift.py --synthetic_dir data/synthetic_physical --max_side 384

Every stack is fused four times with the project's weights and card: as it
is and with a drift of slice k by gains (1 + e k/(N-1)) in exposure and
(-w, 0, +w) k/(N-1) more in blue, green, red (slice 1 keeps gain 1), each
with and without ``exposure.match_exposure``. The colour fused image is
compared (PSNR over the three channels, peak 255) with the stack's
all-in-focus image where it has one (synthetic stacks made by
make_datasets/make_synthetic.py), else with the fusion of the undrifted
stack without matching. Slices are shrunk (area average) to ``--max_side``
first so that a CPU runs the real stacks in minutes. Prints one row per
stack and the means per set; ``--pictures DIR`` writes the four colour
fusions of each stack side by side.
"""
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli import ArgumentParser  # noqa: E402
from exposure import apply_gains, match_exposure  # noqa: E402
from fusion import FusionCard  # noqa: E402
from inference import DEFAULT_MODEL, fuse_images, render_outputs  # noqa: E402
from model import load_model  # noqa: E402
from utils import ensure_output_dir, read_image, read_stack, run_cli, write_image  # noqa: E402

REAL_STACKS = REPO.parent / "shared" / "data" / "stacks"


def get_args_parser():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--synthetic_dir", type=str, default=None,
                        help="make_synthetic.py output (image_stacks/ + all_in_focus/); its first --num_synthetic "
                             "stacks are used (default: none, real stacks only)")
    parser.add_argument("--num_synthetic", type=int, default=6, help="synthetic stacks to use")
    parser.add_argument("--real_dir", type=str, default=str(REAL_STACKS),
                        help="folder of <set>/dof_stack/<scene>/ (skipped when absent)")
    parser.add_argument("--exposure", type=float, default=0.04, help="e: exposure drift over the stack")
    parser.add_argument("--white_balance", type=float, default=0.02, help="w: colour drift over the stack")
    parser.add_argument("--max_side", type=int, default=384, help="slices are shrunk to this long side")
    parser.add_argument("--model_path", type=str, default=str(DEFAULT_MODEL), help="weights with their card")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--pictures", type=str, default=None,
                        help="folder for side-by-side pictures (default: none, not written)")
    return parser


def shrink(image, max_side):
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    return cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)


def colour_psnr(image, reference) -> float:
    a, b = (np.asarray(x, np.float64) * (255.0 / np.iinfo(x.dtype).max) for x in (image, reference))
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def drift_gains(n, exposure, white_balance):
    """(N, 3) BGR gains: slice k gets 1 + e t in exposure and (-w, 0, +w) t in colour, t = k / (N-1)."""
    t = np.arange(n)[:, None] / max(n - 1, 1)
    return (1 + exposure * t) * (1 + white_balance * t * np.array([[-1.0, 0.0, 1.0]]))


def stacks(args):
    """(set, name, slices, all-in-focus or None)."""
    if args.synthetic_dir:
        root = Path(args.synthetic_dir)
        for folder in sorted((root / "image_stacks").iterdir())[:args.num_synthetic]:
            truth = shrink(read_image(root / "all_in_focus" / f"{folder.name}.png"), args.max_side)
            yield "synthetic", folder.name, [shrink(s, args.max_side) for s in read_stack(folder)[0]], truth
    example = read_stack(REPO / "examples" / "coffee_stack")[0]
    yield "example", "coffee_stack", [shrink(s, args.max_side) for s in example], None
    real = Path(args.real_dir)
    if real.is_dir():
        for folder in sorted(real.glob("*/dof_stack/*")):
            yield "real", f"{folder.parent.parent.name}/{folder.name}", \
                [shrink(s, args.max_side) for s in read_stack(folder)[0]], None


def main(args):
    torch.set_num_threads(args.threads)
    model, card = load_model(args.model_path, "cpu"), FusionCard.beside(args.model_path)
    if args.pictures:
        ensure_output_dir(args.pictures)

    def fused(images):
        return render_outputs(fuse_images(model, card, images, "cpu"), images)["color_fused"]

    rows = []
    print(f"{'set':<10} {'stack':<40} {'N':>3} {'as is':>7} {'+match':>7} {'drift':>7} {'+match':>7}  (PSNR dB; "
          f"drift e={args.exposure:.0%}, w={args.white_balance:.0%})")
    for group, name, images, truth in stacks(args):
        if images[0].ndim == 2:
            images = [cv2.cvtColor(s, cv2.COLOR_GRAY2BGR) for s in images]
        drifted = [apply_gains(s, g) for s, g in zip(images, drift_gains(len(images), args.exposure,
                                                                          args.white_balance))]
        outputs = [fused(images), fused(match_exposure(images)[0]), fused(drifted), fused(match_exposure(drifted)[0])]
        reference = truth if truth is not None else outputs[0]
        scores = [colour_psnr(o, reference) for o in outputs]
        rows.append((group, scores))
        print(f"{group:<10} {name:<40} {len(images):>3} " + " ".join(f"{s:7.2f}" for s in scores), flush=True)
        if args.pictures:
            write_image(Path(args.pictures) / f"{name.replace('/', '_')}.png", np.hstack(outputs))
    for group in dict.fromkeys(g for g, _ in rows):
        scores = np.array([s for g, s in rows if g == group])
        # "as is" against itself (no all-in-focus image) is inf: that column is the reference, not a score
        means = [f"{column[np.isfinite(column)].mean():7.2f}" if np.isfinite(column).any() else f"{'ref':>7}"
                 for column in scores.T]
        print(f"{'mean':<10} {group:<40} {len(scores):>3} " + " ".join(means))


if __name__ == "__main__":
    run_cli(main, get_args_parser())
