"""Score fused images and depth maps as the paper's tables do.

    python evaluate.py --data_root data/test --methods results/StackMFF-V2 IFCNN=results/ifcnn

Each result folder is laid out as the batch predictor writes it:
``<results>/<dataset>/fused_images/<scene>.png`` (gray fused image) and
``<results>/<dataset>/depth_maps/<scene>.png``. Ground truth comes from
``<data_root>/<dataset>/AiF/<scene>.*`` (all-in-focus image) and
``<data_root>/<dataset>/depth/<scene>.*``; two-source pairs for Qabf and SCD
from ``<data_root>/<dataset>/A/`` + ``B/`` or two-slice stacks in
``<data_root>/<dataset>/dof_stack/<scene>/``. Files are matched by scene name
(the file name without extension). A dataset without ground truth gets the
no-reference metrics only.

For every dataset one table (one row per metric, one column per method, the
mean over the scenes every method has, best value in bold) is printed and
saved as <dataset>.md and <dataset>.csv, with the per-scene values in
<dataset>_per_scene.csv.
"""
import csv
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cli import ArgumentParser
from metrics import METRIC_NAMES, METRICS, to_gray255
from options import OUTPUT_KINDS
from utils import (InputError, ensure_output_dir, images_by_stem, list_images, natural_sort_key, read_image,
                   run_cli, write_text)

# the folders the batch predictor writes
FUSED_DIR = next(folder for stem, folder, _ in OUTPUT_KINDS if stem == "fused_gray")
DEPTH_DIR = next(folder for stem, folder, _ in OUTPUT_KINDS if stem == "depth_map")


def get_args_parser():
    parser = ArgumentParser(description=__doc__)
    inputs = parser.add_argument_group("input")
    inputs.add_argument("--methods", type=str, nargs="+", required=True, metavar="[NAME=]FOLDER",
                        help="result folders, one per method; the column name is the folder name unless NAME= is given")
    inputs.add_argument("--data_root", type=str, default=None,
                        help="folder holding <dataset>/AiF/ (and depth/, A/ + B/ or dof_stack/); "
                             "without it (the default) only no-reference metrics are reported")
    inputs.add_argument("--datasets", type=str, nargs="+", default=None,
                        help="datasets to score (default: every dataset found in the result folders)")
    inputs.add_argument("--metrics", type=str, nargs="+", default=None, choices=METRIC_NAMES, metavar="METRIC",
                        help=f"metrics to report (default: all that apply): {', '.join(METRIC_NAMES)}")
    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", type=str, default="./results/evaluation",
                        help="where <dataset>.md, <dataset>.csv and <dataset>_per_scene.csv go")
    output.add_argument("--decimals", type=int, default=4, help="decimals shown in the tables")
    return parser


# ----------------------------------------------------------------------------- finding files

def parse_methods(specs):
    """['name=folder' or 'folder', ...] -> {name: Path}, in the given order."""
    methods = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or Path(spec).is_dir():  # a folder whose name holds '=' is still a folder
            name, folder = Path(spec).resolve().name, spec
        if not name or not folder:
            raise InputError(f"'{spec}' is neither a folder nor NAME=FOLDER")
        if not Path(folder).is_dir():
            raise InputError(f"result folder '{folder}' (method '{name}') does not exist")
        if name in methods:
            raise InputError(f"two methods are named '{name}'; give distinct names with NAME=FOLDER")
        methods[name] = Path(folder)
    return methods


def find_datasets(methods: dict) -> list:
    names = set()
    for folder in methods.values():
        names.update(p.name for p in folder.iterdir()
                     if (p / FUSED_DIR).is_dir() or (p / DEPTH_DIR).is_dir())
    return sorted(names, key=natural_sort_key)


def pair_sources(dataset_dir: Path) -> dict:
    """{scene: (path A, path B)} from A/ + B/ folders or two-slice dof_stack/<scene>/ folders."""
    a, b = images_by_stem(dataset_dir / "A", required=False), images_by_stem(dataset_dir / "B", required=False)
    pairs = {scene: (a[scene], b[scene]) for scene in a if scene in b}
    stacks = dataset_dir / "dof_stack"
    if stacks.is_dir():
        for scene_dir in stacks.iterdir():
            if scene_dir.is_dir() and scene_dir.name not in pairs:
                try:
                    slices = list_images(scene_dir)
                except InputError:
                    continue
                if len(slices) == 2:
                    pairs[scene_dir.name] = tuple(slices)
    return pairs


@dataclass
class DatasetInputs:
    """Everything one dataset's table is computed from."""
    name: str
    fused: dict                      # method -> {scene: path}
    depth: dict                      # method -> {scene: path}
    all_in_focus: dict = field(default_factory=dict)   # scene -> path
    depth_truth: dict = field(default_factory=dict)    # scene -> path
    pairs: dict = field(default_factory=dict)          # scene -> (path A, path B)
    scenes: list = field(default_factory=list)         # scenes every method (and the truth) has
    dropped: dict = field(default_factory=dict)        # scene -> why it is left out


def gather_inputs(dataset: str, methods: dict, data_root) -> DatasetInputs:
    def images(folder):
        return images_by_stem(folder, required=False)
    inputs = DatasetInputs(dataset, fused={m: images(f / dataset / FUSED_DIR) for m, f in methods.items()},
                           depth={m: images(f / dataset / DEPTH_DIR) for m, f in methods.items()})
    if data_root is not None:
        dataset_dir = Path(data_root) / dataset
        inputs.all_in_focus = images(dataset_dir / "AiF")
        inputs.depth_truth = images(dataset_dir / "depth")
        inputs.pairs = pair_sources(dataset_dir)
    every = set().union(*(set(s) for s in inputs.fused.values()))
    for scene in sorted(every, key=natural_sort_key):
        missing = [m for m, scenes in inputs.fused.items() if scene not in scenes]
        if missing:
            inputs.dropped[scene] = f"no fused image from {', '.join(missing)}"
        elif inputs.all_in_focus and scene not in inputs.all_in_focus:
            inputs.dropped[scene] = "no all-in-focus ground truth"
        else:
            inputs.scenes.append(scene)
    return inputs


# ----------------------------------------------------------------------------- scoring

def read_gray255(path):
    """Any 8/16-bit picture -> float64 HxW gray on the 0..255 scale."""
    return to_gray255(read_image(path))


def same_size(image, reference, what, path):
    if image.shape != reference.shape:
        raise InputError(f"{what} '{path}' is {image.shape[1]}x{image.shape[0]} but its ground truth is "
                         f"{reference.shape[1]}x{reference.shape[0]}")


def score_scene(inputs: DatasetInputs, method: str, scene: str, metrics) -> dict:
    """{metric name: value} for one method on one scene; InputError for a bad file."""
    values = {}
    fused_path = inputs.fused[method][scene]
    fused = read_gray255(fused_path)
    truth = None
    if scene in inputs.all_in_focus:
        truth = read_gray255(inputs.all_in_focus[scene])
        same_size(fused, truth, "fused image", fused_path)
    sources = None
    if scene in inputs.pairs:
        sources = [read_gray255(p) for p in inputs.pairs[scene]]
        for source in sources:
            same_size(fused, source, "fused image", fused_path)
    depth_path = inputs.depth[method].get(scene)
    depth = depth_truth = None
    if depth_path is not None and scene in inputs.depth_truth:
        depth = read_gray255(depth_path) / 255.0
        depth_truth = read_gray255(inputs.depth_truth[scene]) / 255.0
        same_size(depth, depth_truth, "depth map", depth_path)
    for metric in metrics:
        try:
            if metric.kind == "no_reference":
                values[metric.name] = metric.fn(fused)
            elif metric.kind == "reference" and truth is not None:
                values[metric.name] = metric.fn(fused, truth)
            elif metric.kind == "pair" and sources is not None:
                values[metric.name] = metric.fn(sources[0], sources[1], fused)
            elif metric.kind == "depth" and depth is not None:
                values[metric.name] = metric.fn(depth, depth_truth)
        except ValueError as exc:  # an image too small for NIQE or VIF
            raise InputError(f"{metric.name} of '{fused_path}': {exc}") from None
    return values


def mean_table(per_scene: dict, methods, metrics) -> dict:
    """{metric: {method: mean over scenes}} for the metrics some method has."""
    table = {}
    for metric in metrics:
        row = {}
        for method in methods:
            values = [v[metric.name] for v in per_scene[method].values() if metric.name in v]
            if values:
                row[method] = float(np.mean(values))
        if row:
            table[metric.name] = row
    return table


def best_methods(row: dict, higher_is_better: bool) -> set:
    finite = {m: v for m, v in row.items() if not math.isnan(v)}
    if not finite:
        return set()
    target = max(finite.values()) if higher_is_better else min(finite.values())
    return {m for m, v in finite.items() if v == target}


# ----------------------------------------------------------------------------- tables

def format_value(value, decimals) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{decimals}f}"


def markdown_table(dataset, table, counts, methods, decimals) -> str:
    directions = {m.name: m.higher_is_better for m in METRICS}
    lines = [f"### {dataset}", "", "| metric | " + " | ".join(methods) + " |",
             "|---|" + "---:|" * len(methods)]
    for name, row in table.items():
        best = best_methods(row, directions[name]) if len(row) > 1 else set()
        cells = []
        for method in methods:
            text = format_value(row.get(method), decimals)
            cells.append(f"**{text}**" if method in best else text)
        arrow = "↑" if directions[name] else "↓"
        lines.append(f"| {name} {arrow} | " + " | ".join(cells) + " |")
    lines.append("| scenes | " + " | ".join(str(counts[m]) for m in methods) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def summary_csv(table, counts, methods) -> str:
    directions = {m.name: m.higher_is_better for m in METRICS}
    rows = [["metric", "better"] + list(methods)]
    for name, row in table.items():
        rows.append([name, "higher" if directions[name] else "lower"] + [repr(row[m]) if m in row else "" for m in methods])
    rows.append(["scenes", ""] + [counts[m] for m in methods])
    return csv_text(rows)


def per_scene_csv(per_scene, methods, metric_names) -> str:
    rows = [["method", "scene"] + metric_names]
    for method in methods:
        for scene, values in per_scene[method].items():
            rows.append([method, scene] + [repr(values[n]) if n in values else "" for n in metric_names])
    return csv_text(rows)


# ----------------------------------------------------------------------------- main

def evaluate_dataset(inputs: DatasetInputs, methods, metrics, failures: list) -> dict:
    """{method: {scene: {metric: value}}}; bad scenes go to ``failures``."""
    per_scene = {m: {} for m in methods}
    jobs = [(m, s) for s in inputs.scenes for m in methods]
    for method, scene in tqdm(jobs, desc=inputs.name, unit="image", leave=False):
        try:
            per_scene[method][scene] = score_scene(inputs, method, scene, metrics)
        except InputError as exc:
            failures.append(f"{inputs.name}/{scene} ({method}): {exc}")
    return per_scene


def main(args):
    if args.decimals < 0:
        raise InputError(f"--decimals must be 0 or more, got {args.decimals}")
    methods = parse_methods(args.methods)
    if args.data_root is not None and not Path(args.data_root).is_dir():
        raise InputError(f"data root '{args.data_root}' does not exist")
    found = find_datasets(methods)
    datasets = args.datasets or found
    if not datasets:
        raise InputError(f"no <dataset>/{FUSED_DIR}/ folder in {', '.join(map(str, methods.values()))}")
    unknown = [d for d in datasets if d not in found]
    if unknown:
        raise InputError(f"dataset(s) {', '.join(unknown)} not in any result folder (found: {', '.join(found) or 'none'})")
    metrics = [m for m in METRICS if args.metrics is None or m.name in args.metrics]
    output_dir = ensure_output_dir(args.output_dir)
    names = list(methods)
    failures, tables = [], {}
    for dataset in datasets:
        inputs = gather_inputs(dataset, methods, args.data_root)
        for scene, why in inputs.dropped.items():
            print(f"warning: {dataset}/{scene} left out: {why}", file=sys.stderr)
        if not inputs.scenes:
            failures.append(f"{dataset}: no scene that every method has" +
                            (" and that has ground truth" if inputs.all_in_focus else ""))
            continue
        if args.data_root is not None and not inputs.all_in_focus:
            print(f"note: {dataset} has no AiF/ ground truth; no-reference (and pair) metrics only", file=sys.stderr)
        per_scene = evaluate_dataset(inputs, names, metrics, failures)
        table = mean_table(per_scene, names, metrics)
        counts = {m: len(per_scene[m]) for m in names}
        markdown = markdown_table(dataset, table, counts, names, args.decimals)
        write_text(output_dir / f"{dataset}.md", markdown)
        write_text(output_dir / f"{dataset}.csv", summary_csv(table, counts, names))
        write_text(output_dir / f"{dataset}_per_scene.csv", per_scene_csv(per_scene, names, list(table)))
        print(markdown)
        tables[dataset] = table
    print(f"tables in {output_dir}")
    if failures:
        for failure in failures:
            print(f"failed: {failure}", file=sys.stderr)
        raise InputError(f"{len(failures)} evaluation(s) failed (listed above); the tables leave them out")
    return tables


if __name__ == "__main__":
    run_cli(main, get_args_parser())
