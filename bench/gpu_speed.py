"""Seconds per stack on a GPU: straightforward vs fast path, fp32 vs fp16/bf16 GRU.

    python bench/gpu_speed.py --model_path ../shared/reference/official/model.pth \\
        --parity ../shared/reference/parity/network_cases.npz

Prints one line per (slices, megapixels, path, precision): the median of
``--repeats`` timed runs after one warm-up, megapixel-frames per second,
the peak GPU memory, and the index agreement with the straightforward fp32
path. The stacks are real focus stacks synthesised from scikit-image's
astronaut (released blur, depth rising left to right), not noise: on noise
the index is a near-tie almost everywhere and agreement means nothing.
With ``--parity``, also the index agreement of every precision with the
released outputs stored in the parity cases.
"""
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli import ArgumentParser  # noqa: E402
from fast_inference import PRECISIONS, fast_focus_logits, fast_forward  # noqa: E402
from fusion import FusionCard, fuse, view_logits  # noqa: E402
from make_datasets.synthesis import released_stack  # noqa: E402
from model import load_model  # noqa: E402


def get_args_parser():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model_path", type=str, default=str(REPO.parent / "shared/reference/official/model.pth"),
                        help="weights to time")
    parser.add_argument("--slices", type=int, nargs="+", default=[8, 16, 32], help="stack lengths")
    parser.add_argument("--megapixels", type=float, nargs="+", default=[1.0, 4.0], help="image sizes")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every configuration (best shown)")
    parser.add_argument("--parity", type=str, default=None,
                        help="network_cases.npz of the parity data: report index agreement with it (default: none)")
    parser.add_argument("--device", type=str, default="cuda", help="the GPU")
    return parser


def photo_stack(num_slices: int, side: int) -> np.ndarray:
    """(N, side, side) float32 in [0, 1]: the astronaut, blurred as the released synthesis does."""
    from skimage import data
    gray = cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2GRAY), (side, side),
                      interpolation=cv2.INTER_CUBIC)
    depth = np.tile(np.linspace(0, 255, side).astype(np.uint8), (side, 1))
    slices, _ = released_stack(gray, depth, num_slices)
    return np.stack(slices).astype(np.float32) / 255


def timed(fn, repeats):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def speed_table(model, card, args):
    for n in args.slices:
        for mp in args.megapixels:
            side = int(round((mp * 1e6) ** 0.5 / 32)) * 32
            x = torch.from_numpy(photo_stack(n, side))[None].to(args.device)

            def decoded(logits_fn):
                """The card's outputs from one way of computing the logits."""
                return lambda: fuse(x, view_logits(logits_fn, x, card.views), card)[:3]
            runs = {"straightforward fp32": decoded(model.focus_logits)}
            for precision in PRECISIONS:
                # The default on a GPU runs the feature extractor on every slice at once;
                # chunks of 2 (the CPU default) show what that is worth.
                runs[f"fast {precision}"] = decoded(partial(fast_focus_logits, model, precision=precision))
                runs[f"fast {precision} chunk 2"] = decoded(partial(fast_focus_logits, model, precision=precision,
                                                                    chunk=2))
            reference = None
            for name, fn in runs.items():
                torch.cuda.reset_peak_memory_stats()
                try:
                    with torch.inference_mode():
                        seconds, (_, _, index) = timed(fn, args.repeats)
                except torch.cuda.OutOfMemoryError:
                    print(f"N={n:>3} {mp:>4} MP {name:<26} out of GPU memory", flush=True)
                    torch.cuda.empty_cache()
                    continue
                if reference is None:
                    reference = index
                agree = (index == reference).float().mean().item()
                print(f"N={n:>3} {mp:>4} MP {name:<26} {seconds:8.4f} s/stack {n * side * side / 1e6 / seconds:8.1f} "
                      f"MPF/s  peak {torch.cuda.max_memory_allocated() / 2**30:6.2f} GiB  "
                      f"index agreement {agree:.4f}", flush=True)
            del x
            torch.cuda.empty_cache()


def parity_agreement(model, path, device):
    """Index agreement of each precision with the released outputs of the parity cases."""
    cases = np.load(path)
    names = sorted({key[:-len("__x")] for key in cases.files if key.endswith("__x")})
    for name in names:
        x = torch.from_numpy(cases[f"{name}__x"]).float().to(device)
        released = torch.from_numpy(cases[f"{name}__index"]).to(device)
        shown = []
        for precision in PRECISIONS:
            with torch.inference_mode():
                _, _, index = fast_forward(model, x, precision)
            shown.append(f"{precision} {(index.long() == released.long()).float().mean().item():.5f}")
        print(f"parity case {name} {tuple(x.shape)}: index agreement with the released output: "
              + ", ".join(shown), flush=True)


def main(args):
    model, card = load_model(args.model_path, args.device), FusionCard.beside(args.model_path)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.model_path} "
          f"(index rule {card.index_rule}, {card.views} view(s))", flush=True)
    if args.parity:
        parity_agreement(model, args.parity, args.device)
    speed_table(model, card, args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
