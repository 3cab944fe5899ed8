"""Train StackMFF-V2 on focus stacks with continuous depth maps.

    python train.py --train_dataset data/NYU/image_stacks data/NYU/depth_maps \\
                    --val_dataset data/NYU_val/image_stacks data/NYU_val/depth_maps

As released: MSE between the network's normalised depth and depth/255, AdamW
(lr 1e-3), learning rate x0.9 per epoch, 50 epochs, batch 12, 384 x 384,
random flips, batches of one stack length. The released numbered flags
(--train_stack, --train_depth_continuous, ..._2 to _5, --use_train_dataset_N
True/False, ...) still work, unlisted. Multi-GPU / multi-node: torchrun
--nproc_per_node=K train.py ... See docs/training.md.

This script holds the flags and the wiring; the epoch loop is in ``run_training``.
One epoch and validation are engine.py, the loss is losses.py, checkpoint
files are checkpoint.py, the released weight init is model.init_weights.
"""
import argparse
import csv
import io
import json
import math
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

from checkpoint import all_rng_states, export_weights, resume, save_epoch_checkpoints, training_state
from cli import ArgumentParser
from dataset import FocusStackDataset, GroupedBatchSampler, dataset_name
from engine import COSINE_FLOOR, LogitsAndDepth, Runtime, RunClock, evaluate, setup_runtime, steps_per_epoch, \
    train_one_epoch
from fusion import FusionCard, card_from_args
from losses import CE_TARGETS, SPOILT_MARGIN, DepthLoss, LossWeights
from model import StackMFFV2, init_weights, load_model
from options import add_card_arguments
from utils import InputError, depth_colormap, ensure_output_dir, run_cli, write_image, write_text

RELEASED_SLOTS = 5          # --train_stack, --train_stack_2 ... --train_stack_5
LOSSES = ("mse", "mse+ce")
LR_SCHEDULES = ("exponential", "cosine")
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "y", "on"), ("false", "0", "no", "n", "off")
# Flags naming files or folders of the training machine: the exported model card records their last name only.
PATH_FLAGS = ("train_dataset", "val_dataset", "save_dir", "pretrained", "resume", "export")


def parse_bool(text) -> bool:
    """'True'/'false'/'1'/'0'/'yes'/'no' -> bool (the released flags took such strings)."""
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, 1/0, yes/no), got {text!r}")


def training_size(text) -> int:
    size = int(text)
    if size < 32 or size % 32:
        raise argparse.ArgumentTypeError(f"the training size must be a positive multiple of 32, got {size}")
    return size


def crop_size(text) -> int:
    size = int(text)
    if size and (size < 32 or size % 32):
        raise argparse.ArgumentTypeError(f"the crop must be 0 (off) or a positive multiple of 32 (the network "
                                         f"halves the image 5 times), got {size}")
    return size


def fraction(text) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {value}")
    return value


def released_flags():
    """The released numbered flags, one row per split and slot: (split, stack, depth_continuous, use)
    destinations, e.g. ("train", "train_stack_2", "train_depth_continuous_2", "use_train_dataset_2")."""
    for split in ("train", "val"):
        for slot in range(1, RELEASED_SLOTS + 1):
            s = "" if slot == 1 else f"_{slot}"
            yield split, f"{split}_stack{s}", f"{split}_depth_continuous{s}", f"use_{split}_dataset_{slot}"


def get_args_parser():
    parser = ArgumentParser(description=__doc__)
    data = parser.add_argument_group("data (image_stacks/<scene>/<k>.<ext> + depth_maps/<scene>.png)")
    data.add_argument("--train_dataset", nargs=2, action="append", default=[], metavar=("STACK_DIR", "DEPTH_DIR"),
                      help="a training set; repeat the flag for more (default: none)")
    data.add_argument("--val_dataset", nargs=2, action="append", default=[], metavar=("STACK_DIR", "DEPTH_DIR"),
                      help="a validation set, reported on its own; repeat the flag for more (default: none)")
    # The released numbered flags still work, but --help and the saved arguments leave them out:
    # dataset_sources folds them into the train/val sets.
    for _, stack, depth, use in released_flags():
        parser.add_argument(f"--{stack}", type=str, default=None, help=argparse.SUPPRESS)
        parser.add_argument(f"--{depth}", type=str, default=None, help=argparse.SUPPRESS)
        parser.add_argument(f"--{use}", type=parse_bool, nargs="?", const=True, default=True, help=argparse.SUPPRESS)
    data.add_argument("--training_image_size", type=training_size, default=384,
                      help="slices and depth maps are resized to this square size (multiple of 32)")
    data.add_argument("--subset_fraction_train", type=fraction, default=1.0,
                      help="random part of each training set to use")
    data.add_argument("--subset_fraction_val", type=fraction, default=1.0,
                      help="random part of each validation set to use")
    data.add_argument("--num_workers", type=int, default=2, help="data loader processes (0: load in the main one)")
    data.add_argument("--cache_images", action="store_true",
                      help="keep resized images in memory after the first epoch (each worker holds its own copy)")
    data.add_argument("--crop", type=crop_size, default=0,
                      help="train on random crop x crop windows of the resized stacks (0: whole; validation "
                           "always sees whole stacks)")
    data.add_argument("--rotate", action="store_true",
                      help="besides the released random flips, random transposes (all 8 rotations and mirrors)")
    data.add_argument("--zoom", type=float, default=1.0,
                      help="enlarge half of the training windows by a factor drawn from [1, zoom] "
                           "(coarser detail and larger blur than the data has; 1: off)")
    data.add_argument("--all_in_focus", action="store_true",
                      help="read <root>/all_in_focus/<scene>.png beside depth_maps/ (make_synthetic.py writes "
                           "it) and make it the target of --fusion_weight's term instead of the slice the "
                           "ground-truth depth picks, which physical blur contaminates near depth edges")
    data.add_argument("--contrast", type=float, default=1.0,
                      help="scale the contrast of half of the training stacks by a factor drawn log-uniformly "
                           "from [contrast, 1] (weak texture; 1: off)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch_size", type=int, default=12, help="stacks per batch and per process")
    optim.add_argument("--num_epochs", type=int, default=50, help="epochs to train")
    optim.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    optim.add_argument("--lr_decay", type=float, default=0.9,
                       help="learning rate factor after every epoch (--lr_schedule exponential)")
    optim.add_argument("--lr_schedule", choices=LR_SCHEDULES, default="exponential",
                       help="exponential: released, x lr_decay per epoch; cosine: per step from lr down to "
                            f"{COSINE_FLOOR:g} x lr over the run (all epochs, or --max_minutes if that ends sooner)")
    optim.add_argument("--max_minutes", type=float, default=0,
                       help="wall-time budget of the run: it stops, validates and saves once it is spent "
                            "(0: none)")
    optim.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (PyTorch default)")
    optim.add_argument("--loss", choices=LOSSES, default="mse",
                       help="mse: released (normalised depth vs depth/255); mse+ce: plus a cross-entropy of "
                            "the focus logits against the ground-truth slice index")
    optim.add_argument("--ce_weight", type=float, default=0.1, help="weight of the cross-entropy term (mse+ce)")
    optim.add_argument("--ce_target", choices=CE_TARGETS, default="true",
                       help="slice the cross-entropy and the distance term aim at: true = of the ground-truth "
                            "depth; sharpest = the one closest to the all-in-focus image where the true slice "
                            f"is more than {SPOILT_MARGIN:g} further from it (needs --all_in_focus)")
    optim.add_argument("--fusion_weight", type=float, default=0.0,
                       help="weight of an L1 term between the fused image of the model card's blend (below; the "
                            "plain softmax when the card picks by index) and the all-in-focus image (the slice "
                            "picked by the ground truth at every pixel, or --all_in_focus); 0: off")
    optim.add_argument("--distance_weight", type=float, default=0.0,
                       help="weight of the expected distance, in slices, between the softmax over slices and the "
                            "ground-truth slice (a far miss costs more than a near one); 0: off")
    optim.add_argument("--max_steps_per_epoch", type=int, default=None,
                       help="cut every epoch after this many steps (default: none, whole epochs)")
    optim.add_argument("--max_val_batches", type=int, default=None,
                       help="validate on this many batches per set (default: all)")
    optim.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                       help="float16 autocast on CUDA (the softmax over slices stays float32); ignored on CPU")
    optim.add_argument("--pretrained", type=str, default=None,
                       help="start from these weights (e.g. the official model.pth) instead of the released init "
                            "(default: none)")

    run = parser.add_argument_group("run")
    run.add_argument("--save_dir", type=str, default="runs", help="parent folder of the run folders")
    run.add_argument("--save_name", type=str, default="stackmff_v2",
                     help="run folder name: checkpoints, CSV, pictures and TensorBoard logs go there")
    run.add_argument("--resume", type=str, default=None,
                     help="checkpoint written by this script: continue after its epoch (default: none, a new run)")
    run.add_argument("--eval_interval", type=int, default=1, help="validate every this many epochs (and at the end)")
    run.add_argument("--keep_epoch_checkpoints", action=argparse.BooleanOptionalAction, default=True,
                     help="keep epoch_XXX.pth for every epoch besides last.pth and best.pth")
    run.add_argument("--export", type=str, default=None,
                     help="at the end, also write the final weights as a bare state dict with the model card "
                          "below beside it, for the predict scripts (default: none)")
    run.add_argument("--seed", type=int, default=0, help="seed of the weight init, data order, flips and subsets")
    run.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    run.add_argument("--num_threads", type=int, default=None, help="CPU threads for PyTorch (default: its own)")
    run.add_argument("--dist_backend", choices=("nccl", "gloo"), default=None,
                     help="under torchrun (default: nccl on CUDA, gloo on CPU)")
    card = parser.add_argument_group(
        "model card", "how the predict scripts decode the weights (their flags of the same names): --export "
        "writes it, --fusion_weight's term scores its blend. Unless given, index_rule is argmax for --loss "
        "mse+ce, the rule that loss trains")
    add_card_arguments(card, default_note="the released value")
    return parser


# ----------------------------------------------------------------------------- flags to settings

def dataset_sources(args, split: str):
    """[(stack_dir, depth_dir)] from --{split}_dataset and the released numbered flags."""
    sources = [tuple(pair) for pair in getattr(args, f"{split}_dataset")]
    for flag_split, stack_flag, depth_flag, use_flag in released_flags():
        stack, depth = getattr(args, stack_flag), getattr(args, depth_flag)
        if flag_split != split or not getattr(args, use_flag) or (stack is None and depth is None):
            continue
        if stack is None or depth is None:
            given, missing = (stack_flag, depth_flag) if depth is None else (depth_flag, stack_flag)
            raise InputError(f"--{given} is given without --{missing}")
        sources.append((stack, depth))
    return sources


def recorded_args(args) -> dict:
    """The arguments as checkpoints and run_info.json record them: the released numbered flags
    folded into train_dataset / val_dataset, so they do not crowd every file."""
    released = {dest for row in released_flags() for dest in row[1:]}
    kept = {k: v for k, v in vars(args).items() if k not in released}
    for split in ("train", "val"):
        kept[f"{split}_dataset"] = [list(pair) for pair in dataset_sources(args, split)]
    return kept


def card_args(args) -> dict:
    """recorded_args without the training machine's paths: each path flag keeps its last name only."""
    def last_name(value):
        if isinstance(value, (list, tuple)):
            return [last_name(v) for v in value]
        return value if value is None else Path(value).name
    kept = recorded_args(args)
    kept.update({k: last_name(kept[k]) for k in PATH_FLAGS})
    kept["train_dataset"] = [dataset_name(stack) for stack, _ in dataset_sources(args, "train")]
    kept["val_dataset"] = [dataset_name(stack) for stack, _ in dataset_sources(args, "val")]
    return kept


def card_of(args) -> FusionCard:
    """The model card the flags describe; index_rule, unless given, is the one the loss trains
    (argmax for mse+ce, else the released minmax_round)."""
    rule = "argmax" if args.loss == "mse+ce" else "minmax_round"
    return card_from_args(args, FusionCard(index_rule=rule))


def loss_from_args(args) -> DepthLoss:
    """The DepthLoss the loss flags describe (``--loss mse`` turns the cross-entropy off)."""
    weights = LossWeights(ce=args.ce_weight if args.loss == "mse+ce" else 0.0, fusion=args.fusion_weight,
                          distance=args.distance_weight)
    return DepthLoss(weights, args.ce_target, card_of(args))


def provenance(args, commit: str, seconds: float, epochs: int) -> dict:
    """What the exported model card records besides the decoding: how the weights were trained."""
    return {"trained_by": "train.py", "git_commit": commit, "epochs_done": epochs, "train_seconds": round(seconds),
            "torch": torch.__version__, "args": card_args(args)}


def check_args(args):
    if args.ce_target == "sharpest" and not args.all_in_focus:
        raise InputError("--ce_target sharpest needs --all_in_focus (the sharp images it compares with)")
    card_of(args)                       # a card that makes no sense stops the run before any data is read
    if not dataset_sources(args, "train"):
        raise InputError("no training data: give --train_dataset STACK_DIR DEPTH_DIR "
                         "(or the released --train_stack / --train_depth_continuous)")


# ----------------------------------------------------------------------------- data

def make_loader(dataset, sampler, num_workers: int, device) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)


def unique_names(sources):
    """Log names of the validation sets: folder names, numbered when they repeat."""
    names = []
    for stack_dir, _ in sources:
        base = dataset_name(stack_dir) or "val"
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def build_loaders(args, runtime: Runtime):
    """-> (train set, its sampler, its loader, {validation name: loader})."""
    size, world, rank = args.training_image_size, runtime.world_size, runtime.rank
    train_set = FocusStackDataset(dataset_sources(args, "train"), size, args.subset_fraction_train, args.seed,
                                  args.cache_images, crop=args.crop, all_in_focus=args.all_in_focus)
    train_sampler = GroupedBatchSampler(train_set.num_slices, args.batch_size, shuffle=True, augment=True,
                                        seed=args.seed, num_replicas=world, rank=rank, rotate=args.rotate,
                                        crop=args.crop > 0, zoom=args.zoom, contrast=args.contrast)
    train_loader = make_loader(train_set, train_sampler, args.num_workers, runtime.device)
    val_sources = dataset_sources(args, "val")
    val_loaders = {}
    for name, source in zip(unique_names(val_sources), val_sources):
        val_set = FocusStackDataset([source], size, args.subset_fraction_val, args.seed, args.cache_images)
        sampler = GroupedBatchSampler(val_set.num_slices, args.batch_size, shuffle=False, seed=args.seed,
                                      num_replicas=world, rank=rank, pad=False)
        val_loaders[name] = make_loader(val_set, sampler, args.num_workers, runtime.device)
    return train_set, train_sampler, train_loader, val_loaders


# ----------------------------------------------------------------------------- the run

def git_commit() -> str:
    """HEAD of the repository this script lives in, '+dirty' when edited; 'unknown' without git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def comparison_picture(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Predicted | ground truth | absolute error, colour-mapped: H x (3W + 8) x 3 uint8 BGR."""
    gap = np.full((predicted.shape[0], 4, 3), 255, np.uint8)
    panels = [depth_colormap(predicted), gap, depth_colormap(truth), gap,
              depth_colormap(np.abs(predicted - truth))]
    return np.concatenate(panels, axis=1)


class RunLog:
    """The run folder's validation CSV, TensorBoard writer, pictures and run_info.json (main process only)."""

    def __init__(self, run_dir: Path, names, start_epoch: int, info: dict):
        from torch.utils.tensorboard import SummaryWriter
        self.run_dir, self.names = run_dir, names
        self.csv_path = run_dir / "validation.csv"
        self.columns = ["epoch", "train_loss", "lr"] + [f"{n}_{m}" for n in names for m in ("mse", "mae")]
        self.columns += ["mean_val_mse"]
        rows = []
        if start_epoch > 0 and self.csv_path.exists():  # drop rows of epochs that will be redone
            with open(self.csv_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= start_epoch]
        self._write_rows(rows)
        self.pictures = ensure_output_dir(run_dir / "pictures")
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        write_text(run_dir / "run_info.json", json.dumps(info, indent=2))

    def _write_rows(self, rows):
        text = io.StringIO()
        out = csv.DictWriter(text, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        out.writeheader()
        out.writerows(rows)
        write_text(self.csv_path, text.getvalue())

    def add_epoch(self, epoch: int, train_loss: float, lr: float, metrics: dict):
        row = {"epoch": epoch, "train_loss": f"{train_loss:.6g}", "lr": f"{lr:.6g}"}
        self.writer.add_scalar("train/epoch_loss", train_loss, epoch)
        self.writer.add_scalar("train/lr", lr, epoch)
        for name, (mse, mae, example) in metrics.items():
            row[f"{name}_mse"], row[f"{name}_mae"] = f"{mse:.6g}", f"{mae:.6g}"
            self.writer.add_scalar(f"val/{name}/mse", mse, epoch)
            self.writer.add_scalar(f"val/{name}/mae", mae, epoch)
            if example is not None:
                picture = comparison_picture(*example)
                write_image(self.pictures / f"{name}_epoch{epoch:03d}.png", picture)
                self.writer.add_image(f"val/{name}/predicted_truth_error", picture[..., ::-1].copy(), epoch,
                                      dataformats="HWC")
        if metrics:
            row["mean_val_mse"] = f"{np.mean([m[0] for m in metrics.values()]):.6g}"
            self.writer.add_scalar("val/mean_mse", float(row["mean_val_mse"]), epoch)
        with open(self.csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        self._write_rows(rows + [row])
        self.writer.flush()

    def close(self):
        self.writer.close()


def build_network(args, runtime: Runtime):
    """The network on the device (released init, else --pretrained weights, else the --resume state) with
    its AdamW, schedule and gradient scaler -> (model, optimizer, scheduler, scaler, (epochs done, best
    metric, training seconds))."""
    model = StackMFFV2()
    init_weights(model)
    if args.pretrained:
        model.load_state_dict(load_model(args.pretrained).state_dict())
    model.to(runtime.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and runtime.device.type == "cuda")
    start = (0, math.inf, 0.0)
    if args.resume:
        start = resume(args.resume, model, optimizer, scheduler, scaler, runtime.rank, runtime.world_size)
    return model, optimizer, scheduler, scaler, start


def run_training(args, runtime: Runtime) -> dict:
    """Data, network (released init, --pretrained or --resume), optimiser and logs, then the epoch loop.

    Returns {run_dir, best_metric, history}: history has one dict per epoch run here (epoch,
    train_loss, seconds, val: {set name: (mse, mae)})."""
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    seed_everything(args.seed)
    check_args(args)
    train_set, train_sampler, train_loader, val_loaders = build_loaders(args, runtime)

    model, optimizer, scheduler, scaler, (start_epoch, best, seconds_done) = build_network(args, runtime)
    net = LogitsAndDepth(model)
    train_model = net
    if runtime.distributed:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(net, device_ids=device_ids)

    run_dir, log, commit = Path(args.save_dir) / args.save_name, None, git_commit()
    if runtime.main:
        ensure_output_dir(run_dir)
        info = {"args": recorded_args(args), "seed": args.seed, "git_commit": commit, "torch": torch.__version__,
                "device": str(runtime.device), "world_size": runtime.world_size, "train_stacks": len(train_set),
                "start_epoch": start_epoch}
        log = RunLog(run_dir, list(val_loaders), start_epoch, info)
        print(f"seed {args.seed}, git commit {commit}, device {runtime.device} x {runtime.world_size}; "
              f"{len(train_set)} training stacks ({len(train_loader)} batches per process), "
              f"{len(val_loaders)} validation set(s); run folder {run_dir}"
              + (f"; resuming after epoch {start_epoch}" if args.resume else ""))
    clock = RunClock(args.lr, args.num_epochs * steps_per_epoch(train_loader, args.max_steps_per_epoch),
                     args.max_minutes, seconds_done)
    loss_fn, history = loss_from_args(args), []
    done = start_epoch                  # epochs finished, for the export when a resume has none left
    try:
        # The epoch loop: one epoch, the schedule, validation, checkpoints; until --num_epochs or --max_minutes.
        for epoch in range(start_epoch, args.num_epochs):
            train_sampler.set_epoch(epoch)
            start = time.perf_counter()
            train_loss, out_of_time, steps_taken = train_one_epoch(
                train_model, loss_fn, train_loader, optimizer, scaler, runtime, epoch, args.num_epochs,
                max_steps=args.max_steps_per_epoch, clock=clock, cosine=args.lr_schedule == "cosine",
                amp=args.amp, writer=log.writer if log else None)
            if out_of_time and not steps_taken and done > start_epoch:
                # The budget ran out between epochs: the last epoch's row and checkpoint stand.
                if runtime.main:
                    print(f"the --max_minutes budget ran out after epoch {done}; stopping")
                break
            lr = optimizer.param_groups[0]["lr"]
            seconds = time.perf_counter() - start
            if args.lr_schedule == "exponential":
                scheduler.step()
            done = epoch + 1
            metrics = {}
            if val_loaders and (done % args.eval_interval == 0 or done == args.num_epochs or out_of_time):
                metrics = {name: evaluate(net, loader, runtime, args.max_val_batches, args.amp)
                           for name, loader in val_loaders.items()}
            score = float(np.mean([m[0] for m in metrics.values()])) if metrics else (
                train_loss if not val_loaders else None)
            improved = score is not None and score < best
            best = score if improved else best
            rng = all_rng_states(runtime)
            history.append({"epoch": done, "train_loss": train_loss, "seconds": seconds,
                            "val": {n: m[:2] for n, m in metrics.items()}})
            if runtime.main:
                log.add_epoch(done, train_loss, lr, metrics)
                state = training_state(model, optimizer, scheduler, scaler, done, best, recorded_args(args), rng,
                                       commit, clock.seconds)
                save_epoch_checkpoints(run_dir, state, args.keep_epoch_checkpoints, improved)
                shown = ", ".join(f"{n} mse {m[0]:.5f} mae {m[1]:.5f}" for n, m in metrics.items())
                print(f"epoch {done}/{args.num_epochs}: train loss {train_loss:.5f}, lr {lr:.3g}, "
                      f"{seconds:.1f} s" + (f"; {shown}" if shown else "") + (" (best)" if improved else ""),
                      flush=True)
            if out_of_time:
                if runtime.main:
                    print(f"the --max_minutes budget ran out during epoch {done}; stopping")
                break
        if args.export and runtime.main:
            export_weights(model, args.export, card_of(args), provenance(args, commit, clock.seconds, done))
    finally:
        if log:
            log.close()
    return {"run_dir": run_dir, "best_metric": best, "history": history}


def worker_error_message(exc: InputError) -> str:
    """The user's sentence from an InputError re-raised by a DataLoader worker (which wraps the traceback)."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    return text.strip().splitlines()[-1].split("InputError: ", 1)[-1]


def main(args):
    runtime = setup_runtime(args.device, args.dist_backend)
    try:
        return run_training(args, runtime)
    except InputError as exc:
        raise InputError(worker_error_message(exc)) from None
    except RuntimeError as exc:
        # A loader process killed from outside (out of memory, a decoder crash).
        if "DataLoader worker" not in str(exc):
            raise
        raise InputError(f"a data loader process died ({exc}); last.pth holds the last finished epoch: "
                         f"continue with --resume <save_dir>/<save_name>/last.pth") from None
    finally:
        if runtime.distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main, get_args_parser())
