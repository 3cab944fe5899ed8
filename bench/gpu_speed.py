"""Seconds per stack on a GPU: straightforward vs fast path, fp32 vs fp16/bf16 GRU.

    python bench/gpu_speed.py --model_path ../shared/reference/official/model.pth

Prints one line per (slices, megapixels, path, precision) with the median of
``--repeats`` timed runs after one warm-up, the peak GPU memory, and the
index agreement of half precision with fp32.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fast_inference import fast_forward  # noqa: E402
from model import load_model  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", type=str, default=str(REPO.parent / "shared/reference/official/model.pth"))
    parser.add_argument("--slices", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--megapixels", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", type=str, default="cuda")
    return parser


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


def main(args):
    model = load_model(args.model_path, args.device)
    for n in args.slices:
        for mp in args.megapixels:
            side = int(round((mp * 1e6) ** 0.5 / 32)) * 32
            x = torch.rand(1, n, side, side, device=args.device)
            runs = {"straightforward fp32": lambda: model(x)}
            for precision in ("fp32", "fp16", "bf16"):
                runs[f"fast {precision}"] = lambda p=precision: fast_forward(model, x, p)
            reference_index = None
            for name, fn in runs.items():
                torch.cuda.reset_peak_memory_stats()
                try:
                    with torch.inference_mode():
                        seconds, (_, _, index) = timed(fn, args.repeats)
                except torch.cuda.OutOfMemoryError:
                    print(f"N={n:>3} {mp:>4} MP {name:<22} out of GPU memory", flush=True)
                    torch.cuda.empty_cache()
                    continue
                if name == "fast fp32":
                    reference_index = index
                agree = (index == reference_index).float().mean().item() if reference_index is not None else 1.0
                print(f"N={n:>3} {mp:>4} MP {name:<22} {seconds:8.3f} s/stack  "
                      f"peak {torch.cuda.max_memory_allocated() / 2**30:6.2f} GiB  index agreement {agree:.4f}",
                      flush=True)
            del x
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
