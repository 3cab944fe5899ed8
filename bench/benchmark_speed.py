"""Speed and peak memory of the inference paths, each configuration in a fresh process.

    python bench/benchmark_speed.py                      # the shipped weights
    python bench/benchmark_speed.py --model_path ../shared/reference/official/model.pth

For every (slices, megapixels) it runs the straightforward path
(``StackMFFV2.forward``), the fast path and, if asked, the tiled path
(``--max_memory``) on a random gray stack and prints megapixel-frames per
second, peak RSS (``ru_maxrss`` of the child process), the speed ratio to the
straightforward path in wall time and in CPU time (the steadier one on a
loaded machine), and the 1-minute load average before each run. Every
configuration is run ``--repeats`` times back to back; the fastest run is shown.
The default grid takes a few minutes on a 2-core CPU. Missing weights stop it
before any run (exit 2); a configuration that fails shows why in its row, and
the script then exits 1.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli import ArgumentParser  # noqa: E402


def get_args_parser():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model_path", type=str, default=str(REPO / "weights" / "stackmffv2_synthetic.pth"),
                        help="weights to time (default: the shipped ones)")
    parser.add_argument("--slices", type=int, nargs="+", default=[8, 16], help="stack lengths")
    parser.add_argument("--megapixels", type=float, nargs="+", default=[0.25, 1.0, 2.0, 4.0],
                        help="image sizes")
    parser.add_argument("--paths", type=str, nargs="+", default=["straightforward", "fast"],
                        choices=["straightforward", "fast", "tiled"], help="inference paths to time")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every configuration (best shown)")
    parser.add_argument("--max_memory", type=float, default=2.0, help="GiB for the tiled path")
    parser.add_argument("--reference_limit", type=float, default=16.0,
                        help="skip the straightforward path above this many megapixel-frames (memory/time)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    return parser


def child(spec):
    """Run one configuration and print a JSON line (runs in its own process)."""
    import resource
    import time

    import numpy as np
    import torch
    from fusion import FusionCard
    from inference import fuse_gray_batch
    from model import load_model
    torch.set_num_threads(spec["threads"])
    model, card = load_model(spec["model_path"], "cpu"), FusionCard.beside(spec["model_path"])
    side = int(round((spec["megapixels"] * 1e6) ** 0.5 / 32)) * 32
    h, w = side, side
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 256, size=(1, spec["slices"], h, w), dtype=np.uint8)
    path = spec["path"]
    wall, cpu = time.perf_counter(), time.process_time()
    if path == "tiled":
        fuse_gray_batch(model, card, stack, max_memory=spec["max_memory"])
    else:
        gray = torch.from_numpy(stack.astype(np.float32) / 255)
        fuse_gray_batch(model, card, gray, fast=(path == "fast"))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "h": h, "w": w,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_child(spec):
    """One configuration in a fresh process -> its JSON result, or an error line."""
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode:
        last = out.stderr.strip().splitlines()[-1:] or [f"exit status {out.returncode}"]
        return f"failed: {last[0]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(args):
    from utils import InputError
    if not Path(args.model_path).is_file():
        raise InputError(f"weights not found at '{args.model_path}' (pass --model_path)")
    failed = 0
    print(f"{'N':>3} {'MP':>5} {'path':<16} {'wall s':>8} {'cpu s':>8} {'MPF/s':>7} {'peak RSS MB':>11} "
          f"{'x wall':>7} {'x cpu':>6} {'load':>5}")
    for n in args.slices:
        for mp in args.megapixels:
            reference = None
            for path in args.paths:
                if path == "straightforward" and n * mp > args.reference_limit:
                    print(f"{n:>3} {mp:>5} {path:<16} skipped: {n * mp:g} MPF over --reference_limit")
                    continue
                spec = dict(vars(args), slices=n, megapixels=mp, path=path, child=None)
                runs = []
                for _ in range(args.repeats):
                    load = os.getloadavg()[0]
                    r = run_child(spec)
                    if isinstance(r, str):
                        break
                    runs.append(dict(r, load=load))
                if not runs:
                    print(f"{n:>3} {mp:>5} {path:<16} {r}")
                    failed += 1
                    continue
                r = min(runs, key=lambda run: run["wall_s"])
                mpf = n * r["h"] * r["w"] / 1e6
                if path == "straightforward":
                    reference = r
                wall_ratio = f"{reference['wall_s'] / r['wall_s']:.2f}" if reference else "-"
                cpu_ratio = f"{reference['cpu_s'] / r['cpu_s']:.2f}" if reference else "-"
                print(f"{n:>3} {mp:>5} {path:<16} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} "
                      f"{mpf / r['wall_s']:>7.3f} {r['rss_mb']:>11.0f} {wall_ratio:>7} {cpu_ratio:>6} "
                      f"{r['load']:>5.2f}", flush=True)
    if failed:
        print(f"error: {failed} configuration(s) failed (reasons in their rows)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    spec = get_args_parser().parse_args().child
    if spec:
        child(json.loads(spec))
    else:
        from utils import run_cli
        run_cli(main, get_args_parser())
