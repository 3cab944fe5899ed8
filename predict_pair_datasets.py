"""Fuse image pairs (two-slice stacks) of one or more datasets.

    python predict_pair_datasets.py --test_root data --test_datasets Lytro MFFW

Reads <test_root>/<dataset>/A/ and <dataset>/B/, pairs A/<k>.<ext> with
B/<k>.<ext> by the number in the file name (A/1.png with B/1.jpg), and
writes, as released, <output_dir>/results_<timestamp>/<dataset>/<kind>/<name>.<ext>
(<name>: the A file's name without extension) plus summary.json. Files
without a partner, or whose number is ambiguous, are reported as failed
scenes. Resume and torchrun work as for predict_datasets.py; see
docs/batch_inference.md.
"""
import re
import sys
from functools import partial
from pathlib import Path

from cli import InputError, run_cli
from options import predict_parser

SIDES = ("A", "B")


def get_args_parser():
    return predict_parser(__doc__, "pairs")


def pair_number(path: Path):
    """The numbers in a file name, as a tuple of ints ('img_07.png' -> (7,)); None without any."""
    numbers = re.findall(r"\d+", Path(path).stem)
    return tuple(int(n) for n in numbers) if numbers else None


def read_pair(a: Path, b: Path):
    """(images, names) of one pair, checked like a stack (same size and bit depth)."""
    from utils import check_stack, read_image     # OpenCV and torch load when a run starts, not for --help
    images = [read_image(a), read_image(b)]
    names = [f"A/{a.name}", f"B/{b.name}"]
    return check_stack(images, names, f"pair {a.name} + {b.name}"), names


def find_pair_scenes(dataset_dir: Path):
    """One Scene per number found in both A/ and B/; every other file becomes a
    Scene with its error (no partner, no number, number used twice)."""
    from batch_inference import Scene             # torch loads when a run starts, not for --help
    from utils import list_images, read_metadata
    if not dataset_dir.is_dir():
        raise InputError(f"dataset folder '{dataset_dir}' does not exist")
    by_number, scenes = {}, []
    for side in SIDES:
        if not (dataset_dir / side).is_dir():
            raise InputError(f"pair dataset '{dataset_dir}' has no '{side}' folder")
        by_number[side] = {}
        for path in list_images(dataset_dir / side):
            number = pair_number(path)
            if number is None:
                scenes.append(Scene(f"{side}/{path.name}", error="no number in the file name to find its partner"))
            else:
                by_number[side].setdefault(number, []).append(path)
    a_side, b_side = by_number["A"], by_number["B"]
    for number in sorted(set(a_side) | set(b_side)):
        label = "-".join(map(str, number))
        files = [f"{side}/{p.name}" for side in SIDES for p in by_number[side].get(number, [])]
        if number not in b_side or number not in a_side:
            other = "B" if number not in b_side else "A"
            scenes.append(Scene(files[0], error=f"no partner numbered {label} in {other}/"))
        elif len(files) > 2:
            scenes.append(Scene(files[0], error=f"number {label} is ambiguous: {', '.join(files)}"))
        else:
            a, b = a_side[number][0], b_side[number][0]
            scenes.append(Scene(a.stem, load=partial(read_pair, a, b), metadata=partial(read_metadata, a)))
    return scenes


def main(args):
    from batch_inference import run_batch_inference
    return run_batch_inference(args, find_pair_scenes)


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()).exit_status)
