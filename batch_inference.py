"""The engine behind predict_datasets.py and predict_pair_datasets.py (run those: this module has no
command line of its own).

The two scripts differ only in how they find scenes in a dataset folder; this
module does the rest, once: shard the scenes over torchrun ranks, skip scenes
already done, read scenes in reader processes (readers.py: a reader that dies
is replaced), batch stacks of one size and length, run
inference.fuse_stacks, write the released outputs (those of --outputs)
atomically, time the forward pass and report failures.

Output layout, as released::

    <output_dir>/<run folder>/<dataset>/<kind folder>/<scene>.<ext>
    <output_dir>/<run folder>/summary.json

where the kind folders are inference.OUTPUT_KINDS' (fused_images, depth_maps,
...) and the run folder is ``results_<YYYYmmdd_HHMMSS>`` unless --run_name
names it.
"""
import json
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from cli import ArgumentParser
from exposure import match_exposure
from fusion import FusionCard
from inference import (FUSED_KINDS, OUTPUT_KINDS, fuse_gray_batch, fuse_stacks, model_from_args, render_outputs,
                       write_outputs)
from options import OUTPUT_NAMES
from readers import ReaderDied, ReaderStartError, ReadInOrder
from Registration import align_stack
from utils import InputError, ensure_output_dir, output_format_from_args, select_device, write_text

RUN_PREFIX = "results_"
SUMMARY_FILE = "summary.json"
# Ranks that finish early wait at the final gather for the slowest one.
GATHER_TIMEOUT = timedelta(hours=24)
# Stacks waiting for partners of their size: past this many, the oldest group runs anyway.
MAX_PENDING_FACTOR = 4


# ----------------------------------------------------------------------------- scenes

@dataclass
class Scene:
    """One stack to fuse: ``load()`` returns (images, names) as utils.read_stack
    does, or raises InputError; ``error`` marks a scene known bad before reading."""
    name: str
    load: Optional[Callable] = None
    error: Optional[str] = None
    metadata: Optional[Callable] = None    # () -> utils.ImageMetadata of the reference slice


@dataclass
class LoadedScene:
    name: str
    images: Optional[list] = None
    error: Optional[str] = None
    metadata: Optional[object] = None      # utils.ImageMetadata for the colour fused image

    @property
    def key(self):
        """Stacks with one key can share a batch: (N, H, W)."""
        return (len(self.images),) + self.images[0].shape[:2]


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"


class SceneReader:
    """Reads a scene (in a reader process): a bad scene comes back with its error, never raises."""

    def __init__(self, align: str = "none", match_exposure: bool = False):
        self.align = align
        self.match_exposure = match_exposure

    def __call__(self, scene: Scene) -> LoadedScene:
        if scene.error:
            return LoadedScene(scene.name, error=scene.error)
        try:
            images, _ = scene.load()
            if self.align != "none":
                images = align_stack(images, method=self.align)
            if self.match_exposure:
                images = match_exposure(images)[0]
            metadata = scene.metadata() if scene.metadata else None
        except Exception as exc:  # one bad scene must not stop the run
            return LoadedScene(scene.name, error=_describe(exc))
        return LoadedScene(scene.name, images=images, metadata=metadata)


def scene_output_paths(dataset_dir: Path, scene: str, fused_suffix: str = ".png", outputs=OUTPUT_NAMES) -> dict:
    """Stem -> <dataset_dir>/<kind folder>/<scene><ext> for each of ``outputs`` (released
    outputs, OUTPUT_KINDS stems), the two fused images with ``fused_suffix``."""
    return {stem: dataset_dir / folder / f"{scene}{fused_suffix if stem in FUSED_KINDS else ext}"
            for stem, folder, ext in OUTPUT_KINDS if stem in outputs}


def is_done(paths: dict) -> bool:
    # Each file is written atomically, so a file that exists is complete; a
    # scene killed between its files lacks some and is redone.
    return all(p.is_file() for p in paths.values())


# ----------------------------------------------------------------------------- torchrun

@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_ranks() -> Ranks:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; with several ranks, join a
    gloo group (CPU tensors only: it carries the run folder name and the summaries)."""
    ranks = Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                  int(os.environ.get("LOCAL_RANK", 0)))
    if ranks.distributed and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise InputError("WORLD_SIZE > 1 but MASTER_ADDR / MASTER_PORT are not set: start with torchrun")
        dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size, timeout=GATHER_TIMEOUT)
    return ranks


def rank_device(name, ranks: Ranks) -> torch.device:
    """utils.select_device, then one GPU per rank under torchrun."""
    device = select_device(name)
    if device.type == "cuda" and device.index is None and ranks.distributed:
        device = torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
    return device


def _broadcast(value, ranks: Ranks):
    if not ranks.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value, ranks: Ranks) -> list:
    if not ranks.distributed:
        return [value]
    out = [None] * ranks.world_size
    dist.all_gather_object(out, value)
    return out


# ----------------------------------------------------------------------------- run folder

def is_run_dir(folder: Path) -> bool:
    """Whether ``folder`` holds a run: its summary.json, or a dataset folder with an output folder."""
    kinds = {kind for _, kind, _ in OUTPUT_KINDS}
    return (folder / SUMMARY_FILE).is_file() or any(
        dataset.is_dir() and any((dataset / kind).is_dir() for kind in kinds) for dataset in folder.iterdir())


def last_run_dir(output_dir: Path) -> Optional[Path]:
    """The run folder in ``output_dir`` written to last (a run adds its dataset folders as it goes and
    summary.json at the end), whatever its name; None when there is none."""
    runs = [p for p in output_dir.iterdir() if p.is_dir() and is_run_dir(p)] if output_dir.is_dir() else []
    return max(runs, key=lambda p: (p.stat().st_mtime_ns, p.name), default=None)


def choose_run_dir(output_dir: Path, run_name: Optional[str], skip_existing: bool) -> Path:
    """--run_name if given; else, with --skip_existing, the run folder written to last
    (``last_run_dir``); else (or when there is none) a new results_<timestamp>."""
    if run_name:
        if Path(run_name).name != run_name or run_name in (".", ".."):
            raise InputError(f"--run_name '{run_name}' must be a plain folder name, not a path")
        return output_dir / run_name
    last = last_run_dir(output_dir) if skip_existing else None
    return last or output_dir / time.strftime(f"{RUN_PREFIX}%Y%m%d_%H%M%S")


# ----------------------------------------------------------------------------- one dataset

@dataclass
class DatasetReport:
    """What one rank (or, after merging, all ranks) did on one dataset."""
    dataset: str
    missing: Optional[str] = None      # why the dataset was skipped as a whole
    scenes: int = 0                    # scenes found (all ranks)
    fused: int = 0                     # fused in this run
    skipped: int = 0                   # already done (--skip_existing)
    failed: dict = field(default_factory=dict)   # scene -> reason
    forward_seconds: float = 0.0       # sum over batches of the synchronised fuse time

    @property
    def mean_ms(self) -> Optional[float]:
        return 1000.0 * self.forward_seconds / self.fused if self.fused else None


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _fuse_and_write(model, card, device, batch: List[LoadedScene], dataset_dir: Path, render: dict,
                    report: DatasetReport, fuse_options: dict, fused_format=(".png", {})):
    """Fuse one batch (one key), write every scene's outputs; a failing batch of
    several is retried stack by stack so that only the culprit is reported."""
    try:
        _synchronize(device)
        start = time.perf_counter()
        kept = sum(im.nbytes for scene in batch for im in scene.images)   # held for colour fusion
        results = fuse_stacks(model, card, [s.images for s in batch], device, reserved_bytes=kept, **fuse_options)
        _synchronize(device)
        elapsed = time.perf_counter() - start
    except Exception as exc:
        if len(batch) > 1:
            for scene in batch:
                _fuse_and_write(model, card, device, [scene], dataset_dir, render, report, fuse_options, fused_format)
            return
        report.failed[batch[0].name] = f"inference failed: {_describe(exc)}"
        return
    report.forward_seconds += elapsed
    for scene, result in zip(batch, results):
        try:
            paths = scene_output_paths(dataset_dir, scene.name, fused_format[0], render.get("outputs", OUTPUT_NAMES))
            write_outputs(render_outputs(result, scene.images, **render), paths, scene.metadata, **fused_format[1])
        except Exception as exc:
            report.failed[scene.name] = f"cannot write outputs: {_describe(exc)}"
            continue
        report.fused += 1


def run_dataset(model, device, dataset: str, scenes: List[Scene], dataset_dir: Path, *, batch_size: int,
                num_workers: int, skip_existing: bool, ranks: Ranks, match_exposure: bool = False,
                fused_format=(".png", {}), align: str = "none", fuse_options: Optional[dict] = None,
                render: Optional[dict] = None, card: FusionCard = FusionCard()) -> DatasetReport:
    """Fuse this rank's share of ``scenes`` (every world_size-th, in order), decoded by ``card``
    (default: the released decoding; main passes the checkpoint's), read in ``num_workers``
    reader processes (readers.ReadInOrder).

    fuse_options: keyword arguments for inference.fuse_stacks (max_memory, precision);
    render: for inference.render_outputs (outputs, reverse, depth_bits, legend)."""
    fuse_options, render = fuse_options or {}, render or {}
    outputs = render.get("outputs", OUTPUT_NAMES)
    report = DatasetReport(dataset, scenes=len(scenes))
    mine = scenes[ranks.rank::ranks.world_size]
    todo = []
    for scene in mine:
        if skip_existing and scene.error is None and is_done(
                scene_output_paths(dataset_dir, scene.name, fused_format[0], outputs)):
            report.skipped += 1
        else:
            todo.append(scene)
    for stem, folder, _ in OUTPUT_KINDS:
        if stem in outputs:
            ensure_output_dir(dataset_dir / folder)
    bar = tqdm(total=len(mine), initial=report.skipped, unit="stack",
               desc=dataset if not ranks.distributed else f"{dataset} [rank {ranks.rank}]")
    pending = {}   # key -> stacks waiting for a full batch

    def flush(key):
        batch = pending.pop(key)
        before = len(report.failed)
        _fuse_and_write(model, card, device, batch, dataset_dir, render, report, fuse_options, fused_format)
        for name in list(report.failed)[before:]:
            bar.write(f"{dataset}/{name}: {report.failed[name]}")
        bar.update(len(batch))

    def retry(scene, how):
        bar.write(f"{dataset}/{scene.name}: its reader process {how}; reading it again in a new one")

    try:
        with ReadInOrder(SceneReader(align, match_exposure), todo, num_workers, on_retry=retry) as loaded:
            for scene, read in zip(todo, loaded):
                if isinstance(read, ReaderDied):
                    read = LoadedScene(scene.name, error=f"its reader process {read.how} each time it read the "
                                                         f"scene (--num_workers 0 reads in the main process)")
                if read.error:
                    report.failed[read.name] = read.error
                    bar.write(f"{dataset}/{read.name}: {read.error}")
                    bar.update(1)
                    continue
                pending.setdefault(read.key, []).append(read)
                if len(pending[read.key]) >= batch_size:
                    flush(read.key)
                elif sum(map(len, pending.values())) > MAX_PENDING_FACTOR * batch_size:
                    flush(next(iter(pending)))   # bound memory when sizes keep changing
        for key in list(pending):
            flush(key)
    except ReaderStartError as exc:
        raise InputError(f"cannot go on reading '{dataset}': {exc}; the outputs written so far are complete: "
                         f"rerun with --skip_existing (and --run_name) to continue") from None
    finally:
        bar.close()   # an interrupted bar must not redraw itself after the closing message
    return report


def merge_reports(per_rank: List[List[DatasetReport]]) -> List[DatasetReport]:
    """Sum the ranks' reports dataset by dataset (ranks list datasets in one order)."""
    merged = []
    for parts in zip(*per_rank):
        total = DatasetReport(parts[0].dataset, missing=parts[0].missing, scenes=parts[0].scenes)
        for part in parts:
            total.fused += part.fused
            total.skipped += part.skipped
            total.failed.update(part.failed)
            total.forward_seconds += part.forward_seconds
        total.failed = dict(sorted(total.failed.items()))
        merged.append(total)
    return merged


# ----------------------------------------------------------------------------- summary

@dataclass
class RunSummary:
    run_dir: Path
    device: str
    world_size: int
    batch_size: int
    datasets: List[DatasetReport]

    @property
    def exit_status(self) -> int:
        """0 when every scene of every dataset was fused (or already done), else 1."""
        return int(any(d.missing or d.failed for d in self.datasets))

    def to_dict(self) -> dict:
        return {
            "run_dir": str(self.run_dir), "device": self.device, "world_size": self.world_size,
            "batch_size": self.batch_size,
            "datasets": {d.dataset: {
                "missing": d.missing, "scenes": d.scenes, "fused": d.fused, "skipped_existing": d.skipped,
                "failed": d.failed, "mean_inference_ms_per_stack": d.mean_ms,
                "total_inference_s": d.forward_seconds,
            } for d in self.datasets},
        }

    def text(self) -> str:
        lines = [f"summary ({self.world_size} process(es), device {self.device}, batch {self.batch_size}):",
                 f"{'dataset':<28} {'scenes':>6} {'fused':>6} {'skipped':>7} {'failed':>6} {'ms/stack':>9}"]
        for d in self.datasets:
            if d.missing:
                lines.append(f"{d.dataset:<28} skipped: {d.missing}")
                continue
            mean = f"{d.mean_ms:9.1f}" if d.mean_ms is not None else f"{'-':>9}"
            lines.append(f"{d.dataset:<28} {d.scenes:>6} {d.fused:>6} {d.skipped:>7} {len(d.failed):>6} {mean}")
        failures = [(d.dataset, s, r) for d in self.datasets for s, r in d.failed.items()]
        if failures:
            lines.append(f"{len(failures)} scene(s) failed:")
            lines += [f"  {ds}/{scene}: {reason}" for ds, scene, reason in failures]
        lines.append(f"outputs and {SUMMARY_FILE} in {self.run_dir}")
        return "\n".join(lines)


def write_summary(summary: RunSummary):
    write_text(summary.run_dir / SUMMARY_FILE, json.dumps(summary.to_dict(), indent=2) + "\n")


# ----------------------------------------------------------------------------- the whole run

def run_batch_inference(args, find_scenes: Callable[[Path], List[Scene]]) -> RunSummary:
    """Run every dataset in args.test_datasets; ``find_scenes(dataset_dir)`` lists a
    dataset's scenes or raises InputError when its layout is missing."""
    if args.batch_size < 1:
        raise InputError(f"--batch_size must be at least 1, not {args.batch_size}")
    if args.num_workers < 0:
        raise InputError(f"--num_workers must be 0 or more, not {args.num_workers}")
    fused_format = output_format_from_args(args)      # (suffix, encoder options) of the fused images
    test_root = Path(args.test_root)
    if not test_root.is_dir():
        raise InputError(f"test root '{test_root}' does not exist or is not a folder")
    ranks = init_ranks()
    try:
        device = rank_device(args.device, ranks)
        model, card = model_from_args(args, device)
        # One tiny untimed pass pays the libraries' one-off start-up (kernel
        # selection, allocator), which would otherwise land on the first stack.
        fuse_gray_batch(model, card, torch.zeros(1, 2, 32, 32), device)
        output_dir = Path(args.output_dir)
        run_dir, error = None, None
        if ranks.rank == 0:
            try:
                run_dir = choose_run_dir(output_dir, args.run_name, args.skip_existing)
                existed = run_dir.is_dir()
                ensure_output_dir(run_dir)
                if existed and args.skip_existing:
                    print(f"continuing {run_dir}" if args.run_name else
                          f"continuing {run_dir}, the run folder written to last (--run_name picks another)")
                else:
                    print(f"writing to {run_dir}")
            except InputError as exc:
                error = str(exc)
        # Every rank writes into rank 0's folder (or stops with rank 0's error).
        run_dir, error = _broadcast((str(run_dir), error), ranks)
        if error:
            raise InputError(error)
        run_dir = Path(run_dir)
        reports = []
        for dataset in args.test_datasets:
            try:
                scenes = find_scenes(test_root / dataset)
            except InputError as exc:
                if ranks.rank == 0:
                    print(f"skipping dataset '{dataset}': {exc}")
                reports.append(DatasetReport(dataset, missing=str(exc)))
                continue
            reports.append(run_dataset(model, device, dataset, scenes, run_dir / dataset,
                                       batch_size=args.batch_size, num_workers=args.num_workers,
                                       skip_existing=args.skip_existing, ranks=ranks,
                                       align=args.align, match_exposure=args.match_exposure,
                                       fused_format=fused_format,
                                       fuse_options=dict(max_memory=args.max_memory, precision=args.precision),
                                       render=dict(outputs=args.outputs, reverse=args.reverse,
                                                   depth_bits=args.depth_bits, legend=args.legend),
                                       card=card))
        summary = RunSummary(run_dir, str(device), ranks.world_size, args.batch_size,
                             merge_reports(_gather(reports, ranks)))
        if ranks.rank == 0:
            write_summary(summary)
            print(summary.text())
        return summary
    finally:
        if ranks.distributed and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    # No command line of its own: --help shows what it is, anything else says what to run.
    ArgumentParser(description=__doc__).parse_args()
    ArgumentParser().error("batch_inference.py is the engine of predict_datasets.py and predict_pair_datasets.py: "
                           "run one of those")
