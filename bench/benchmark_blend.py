"""Time the fusion steps after the network on one random stack: the card's weights and the blends.

    python bench/benchmark_blend.py                  # 16 slices of 1 MP, 2 threads

Prints, for ``--slices`` random gray slices of ``--megapixels`` and random
focus logits, the fastest of ``--repeats`` runs of ``fusion.soft_weights``
with the shipped card's temperature, focus prior and depth window, of
``fusion.blend`` with one band and with the card's two bands, and of
``fusion.gaussian_blur`` alone at the base sigma. The network's own time is
in bench/benchmark_speed.py.
"""
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli import ArgumentParser  # noqa: E402
from inference import DEFAULT_MODEL  # noqa: E402
from make_datasets.benchmark_synthesis import best_time  # noqa: E402
from fusion import FusionCard, blend, gaussian_blur, soft_weights  # noqa: E402
from utils import run_cli  # noqa: E402


def get_args_parser():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=16, help="stack length")
    parser.add_argument("--megapixels", type=float, default=1.0, help="slice size (square)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per step; the fastest is printed")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser


def main(args):
    torch.set_num_threads(args.threads)
    card = FusionCard.beside(DEFAULT_MODEL)
    one_band = FusionCard(fusion_temperature=card.fusion_temperature)
    side = int(round((args.megapixels * 1e6) ** 0.5))
    generator = torch.Generator().manual_seed(0)
    stack = torch.rand(1, args.slices, side, side, generator=generator)
    logits = torch.randn(1, args.slices, side, side, generator=generator)
    with torch.inference_mode():
        weights = soft_weights(stack, logits, card)
        steps = {
            "soft_weights (card)": lambda: soft_weights(stack, logits, card),
            "blend, one band": lambda: blend(stack, weights, one_band),
            f"blend, two bands ({card.base_sigma:g} / {card.base_weight_sigma:g} px)": lambda: blend(
                stack, weights, card),
            f"gaussian_blur of the stack, sigma {card.base_sigma:g} px": lambda: gaussian_blur(stack, card.base_sigma),
        }
        print(f"{args.slices} slices of {side} x {side} px, {args.threads} threads, fastest of {args.repeats}")
        for name, step in steps.items():
            print(f"{name:<48} {best_time(step, args.repeats):7.3f} s")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
