"""Train StackMFF-V2 on focus stacks with continuous depth maps.

    python train.py --train_dataset data/NYU/image_stacks data/NYU/depth_maps \\
                    --val_dataset data/NYU_val/image_stacks data/NYU_val/depth_maps

As released: MSE between the network's normalised depth and depth/255, AdamW
(lr 1e-3), learning rate x0.9 per epoch, 50 epochs, batch 12, 384 x 384,
random flips, batches of one stack length. The released flags (--train_stack,
--train_depth_continuous, ..._2 to _5, --use_train_dataset_N True/False, ...)
still work. Multi-GPU / multi-node: torchrun --nproc_per_node=K train.py ...
See docs/training.md.
"""
import argparse
import csv
import io
import json
import math
import os
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import FocusStackDataset, GroupedBatchSampler, dataset_name
from inference import (base_sigma_arg, base_weight_sigma_arg, depth_window_arg, focus_prior_arg,
                       fusion_temperature_arg)
from model import (TEST_VIEWS, StackMFFV2, blend_slices, depth_map_creation, load_model, model_card_path,
                   soft_fusion_weights, write_model_card)
from network_blocks import ConvGRUCell
from utils import (InputError, depth_colormap, ensure_output_dir, run_cli, write_bytes, write_text,
                   select_device, write_image)

RELEASED_SLOTS = 5          # --train_stack, --train_stack_2 ... --train_stack_5
LOSSES = ("mse", "mse+ce")
CE_TARGETS = ("true", "sharpest")
SPOILT_MARGIN = 0.02        # gray levels in [0, 1]: how much worse the true slice must be to be replaced
LR_SCHEDULES = ("exponential", "cosine")
COSINE_FLOOR = 0.05         # the cosine schedule ends at this fraction of --lr
PLAIN_BLEND = (1.0, 0.0, 0.0)  # --fusion_blend default: temperature 1, no focus prior, no depth window
ONE_BAND = (0.0, 0.0)          # --fusion_bands default: base sigma and base weight sigma 0, one band
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "y", "on"), ("false", "0", "no", "n", "off")


def non_negative_values_of(flag: str):
    """An argparse type for the numbers of ``flag``: finite and >= 0, else a message naming the flag."""
    def parse(text) -> float:
        value = float(text)
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(f"the {flag} values must be finite and >= 0, got {text!r}")
        return value
    parse.__name__ = flag  # argparse says "invalid <name> value" for text that is no number
    return parse


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


def slot_suffix(slot: int) -> str:
    return "" if slot == 1 else f"_{slot}"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's layout and shows each flag's default (unless unset or already said)."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == []
        if unset or action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        return text + " (default: %(default)s)"


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    data = parser.add_argument_group("data (image_stacks/<scene>/<k>.<ext> + depth_maps/<scene>.png)")
    data.add_argument("--train_dataset", nargs=2, action="append", default=[], metavar=("STACK_DIR", "DEPTH_DIR"),
                      help="a training set; repeat the flag for more")
    data.add_argument("--val_dataset", nargs=2, action="append", default=[], metavar=("STACK_DIR", "DEPTH_DIR"),
                      help="a validation set, reported on its own; repeat the flag for more")
    released = parser.add_argument_group("released dataset flags (kept for compatibility)")
    for split in ("train", "val"):
        for slot in range(1, RELEASED_SLOTS + 1):
            s = slot_suffix(slot)
            released.add_argument(f"--{split}_stack{s}", type=str, default=None, metavar="DIR",
                                  help=f"{split} set {slot}: image_stacks folder")
            released.add_argument(f"--{split}_depth_continuous{s}", type=str, default=None, metavar="DIR",
                                  help=f"{split} set {slot}: depth_maps folder")
            released.add_argument(f"--use_{split}_dataset_{slot}", type=parse_bool, nargs="?", const=True,
                                  default=True, metavar="BOOL", help=f"use {split} set {slot} (default true)")
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
                       help="weight of an L1 term between the softmax-weighted fused image and the all-in-focus "
                            "image (the slice picked by the ground truth at every pixel); 0: off")
    optim.add_argument("--fusion_blend", type=non_negative_values_of("--fusion_blend"), nargs=3, default=PLAIN_BLEND,
                       metavar=("T", "PRIOR", "WINDOW"),
                       help="temperature, focus prior and depth window of the blend that --fusion_weight's term "
                            "scores (model.soft_fusion_weights). Default 1 0 0: the plain softmax. Give the "
                            "card's values (e.g. 1 4 1.5) to train the very fused image the predict scripts make")
    optim.add_argument("--fusion_bands", type=non_negative_values_of("--fusion_bands"), nargs=2, default=ONE_BAND,
                       metavar=("BASE_SIGMA", "BASE_WEIGHT_SIGMA"),
                       help="two-band blend (model.blend_slices) of the fused image --fusion_weight's term "
                            "scores: the card's base_sigma and base_weight_sigma (e.g. 2 0.7). Default 0 0: one "
                            "band")
    optim.add_argument("--distance_weight", type=float, default=0.0,
                       help="weight of the expected distance, in slices, between the softmax over slices and the "
                            "ground-truth slice (a far miss costs more than a near one); 0: off")
    optim.add_argument("--max_steps_per_epoch", type=int, default=None, help="cut every epoch after this many steps")
    optim.add_argument("--max_val_batches", type=int, default=None, help="validate on this many batches per set")
    optim.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                       help="float16 autocast on CUDA (the softmax over slices stays float32); ignored on CPU")
    optim.add_argument("--pretrained", type=str, default=None,
                       help="start from these weights (e.g. the official model.pth) instead of the released init")

    run = parser.add_argument_group("run")
    run.add_argument("--save_dir", type=str, default="runs", help="parent folder of the run folders")
    run.add_argument("--save_name", type=str, default="stackmff_v2",
                     help="run folder name: checkpoints, CSV, pictures and TensorBoard logs go there")
    run.add_argument("--resume", type=str, default=None,
                     help="checkpoint written by this script: continue after its epoch")
    run.add_argument("--eval_interval", type=int, default=1, help="validate every this many epochs (and at the end)")
    run.add_argument("--keep_epoch_checkpoints", action=argparse.BooleanOptionalAction, default=True,
                     help="keep epoch_XXX.pth for every epoch besides last.pth and best.pth")
    run.add_argument("--export", type=str, default=None,
                     help="at the end, also write the final weights as a bare state dict with a model card "
                          "(the index rule the loss trained: argmax for mse+ce) for the predict scripts")
    run.add_argument("--export_views", type=int, default=1, choices=TEST_VIEWS,
                     help="test-time views the exported model card asks the predict scripts for")
    run.add_argument("--export_fusion_temperature", type=fusion_temperature_arg, default=0.0,
                     help="fusion temperature of the exported model card: 0 picks by index, T > 0 blends "
                          "the slices with softmax(logits / T) (see docs/weights.md for how it was chosen)")
    run.add_argument("--export_focus_prior", type=focus_prior_arg, default=0.0,
                     help="focus prior of the exported model card (0: none; see docs/weights.md)")
    run.add_argument("--export_depth_window", type=depth_window_arg, default=0.0,
                     help="depth window of the exported model card (0: none; see docs/weights.md)")
    run.add_argument("--export_base_sigma", type=base_sigma_arg, default=0.0,
                     help="base band of the exported model card's two-band blend, px (0: one band)")
    run.add_argument("--export_base_weight_sigma", type=base_weight_sigma_arg, default=0.0,
                     help="smoothing of the base band's weights in the exported model card, px")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    run.add_argument("--num_threads", type=int, default=None, help="CPU threads for PyTorch (default: its own)")
    run.add_argument("--dist_backend", choices=("nccl", "gloo"), default=None,
                     help="under torchrun (default: nccl on CUDA, gloo on CPU)")
    return parser


# ----------------------------------------------------------------------------- data

def dataset_sources(args, split: str):
    """[(stack_dir, depth_dir)] from --{split}_dataset and the released numbered flags."""
    sources = [tuple(pair) for pair in getattr(args, f"{split}_dataset")]
    for slot in range(1, RELEASED_SLOTS + 1):
        s = slot_suffix(slot)
        stack, depth = getattr(args, f"{split}_stack{s}"), getattr(args, f"{split}_depth_continuous{s}")
        if not getattr(args, f"use_{split}_dataset_{slot}") or (stack is None and depth is None):
            continue
        if stack is None or depth is None:
            given, missing = ("stack", "depth_continuous") if depth is None else ("depth_continuous", "stack")
            raise InputError(f"--{split}_{given}{s} is given without --{split}_{missing}{s}")
        sources.append((stack, depth))
    return sources


def make_loader(dataset, sampler, num_workers: int, device) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)


# ----------------------------------------------------------------------------- model

def init_weights(model: nn.Module):
    """Released initialisation (ARCHITECTURE.md, "Training as released").

    Convs Kaiming-normal (fan_out, relu) with zero bias, GRU convs orthogonal
    with zero bias, norms weight 1 bias 0, linear layers normal(std 0.001).
    """
    gru_convs = {id(conv) for cell in model.modules() if isinstance(cell, ConvGRUCell)
                 for conv in (cell.conv_gates, cell.conv_can)}
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            if id(module) in gru_convs:
                nn.init.orthogonal_(module.weight)
            else:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.001)
            nn.init.zeros_(module.bias)


class LogitsAndDepth(nn.Module):
    """Training view of StackMFFV2: x (B, N, H, W) -> (logits (B, N, H, W), depth (B, 1, H, W) in [0, 1]).

    DDP must wrap a module whose forward gives everything the loss needs.
    """

    def __init__(self, net: StackMFFV2):
        super().__init__()
        self.net = net

    def forward(self, x):
        logits = self.net.focus_logits(x)
        return logits, depth_map_creation(logits)


def target_slice_index(target: torch.Tensor, n: int) -> torch.Tensor:
    """Ground-truth depth (B, 1, H, W) in [0, 1] -> in-focus slice index floor(target * N), (B, H, W) int64
    (the bins of make_datasets.synthesis)."""
    return (target[:, 0] * n).floor().clamp(0, n - 1).long()


def sharpest_slice_index(stack: torch.Tensor, all_in_focus: torch.Tensor, true_index: torch.Tensor,
                         margin: float = SPOILT_MARGIN) -> torch.Tensor:
    """The true slice index (B, H, W), except where that slice is spoilt (physical blur spills a
    near object's blur over far pixels): there, the slice closest to the all-in-focus image, when
    it is more than ``margin`` closer than the true one. Elsewhere (flat areas, where every slice
    is as close) the true index stays."""
    error = (stack - all_in_focus[:, None]).abs()                                # (B, N, H, W)
    best_error, best = error.min(dim=1)
    true_error = error.gather(1, true_index[:, None])[:, 0]
    return torch.where(true_error > best_error + margin, best, true_index)


def depth_loss(logits, depth, target, loss: str = "mse", ce_weight: float = 0.1, stack=None,
               fusion_weight: float = 0.0, distance_weight: float = 0.0, ce_target: str = "true",
               fusion_blend=PLAIN_BLEND, fusion_bands=ONE_BAND) -> torch.Tensor:
    """Released MSE of depth (B, 1, H, W) vs target[:, :1] (B, 1, H, W) in [0, 1], plus for
    ``mse+ce`` a cross-entropy of logits (B, N, H, W) against the ground-truth
    slice index, plus with ``fusion_weight`` an L1 between the softmax-weighted
    fusion of ``stack`` (B, N, H, W) and its all-in-focus image (target[:, 1] when the
    target has a second channel, else the slice the ground truth picks), plus with
    ``distance_weight`` the expected distance in slices between the softmax's
    slice and the true one. ``ce_target`` 'sharpest' aims the cross-entropy and
    the distance term at ``sharpest_slice_index`` instead of the true slice.
    ``fusion_blend`` (temperature, focus prior, depth window) makes the fusion
    term score ``soft_fusion_weights`` with those settings instead of the plain
    softmax, so that a card's fused image itself is trained; ``fusion_bands``
    (base sigma, base weight sigma) blends it in two bands as the card does.

    The fusion term weighs each pixel by how much a wrong slice would change
    the fused image, which is what the fused image's PSNR measures: in flat
    regions every slice is right, at edges only the sharp one is. The
    distance term makes a far miss cost more than a near one (cross-entropy
    charges both alike), and a far miss is what shows in the fused image."""
    value = F.mse_loss(depth.float(), target[:, :1])
    n = logits.shape[1]
    if loss == "mse+ce" or fusion_weight or distance_weight:
        slice_index = target_slice_index(target, n)                       # (B, H, W)
        if ce_target == "sharpest":
            if target.shape[1] < 2:
                raise InputError("--ce_target sharpest needs the all-in-focus images (--all_in_focus)")
            aimed_index = sharpest_slice_index(stack.float(), target[:, 1], slice_index)
        else:
            aimed_index = slice_index
    if loss == "mse+ce":
        value = value + ce_weight * F.cross_entropy(logits.float(), aimed_index)
    if fusion_weight:
        temperature, focus_prior, depth_window = fusion_blend
        blend = soft_fusion_weights(logits, temperature, stack, focus_prior, depth_window)  # (B, N, H, W)
        fused = blend_slices(stack.float(), blend, *fusion_bands)[:, 0]          # (B, H, W)
        if target.shape[1] > 1:
            all_in_focus = target[:, 1]                                          # (B, H, W)
        else:
            all_in_focus = stack.gather(1, slice_index[:, None])[:, 0]         # (B, H, W)
        value = value + fusion_weight * (fused - all_in_focus).abs().mean()
    if distance_weight:
        prob = torch.softmax(logits.float(), dim=1)                              # (B, N, H, W)
        slices = torch.arange(n, dtype=torch.float32, device=logits.device).view(1, n, 1, 1)
        distance = (slices - aimed_index[:, None].float()).abs()                 # (B, N, H, W)
        value = value + distance_weight * (prob * distance).sum(dim=1).mean()
    return value


# ----------------------------------------------------------------------------- processes

@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(args) -> Runtime:
    """Device and, under torchrun (WORLD_SIZE > 1), the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Runtime(select_device(args.device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise InputError(f"distributed training runs on CUDA or CPU, not on '{device}'")
    dist.init_process_group(args.dist_backend or ("nccl" if device.type == "cuda" else "gloo"))
    return Runtime(device, rank, world_size)


def all_sum(values, runtime: Runtime) -> torch.Tensor:
    """Sum of a float64 vector over processes (the vector itself when alone)."""
    tensor = torch.as_tensor(values, dtype=torch.float64)
    if runtime.distributed:
        on_device = tensor.to(runtime.device)
        dist.all_reduce(on_device)
        tensor = on_device.cpu()
    return tensor


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


# ----------------------------------------------------------------------------- checkpoints

def rng_state() -> dict:
    """Random states as tensors and plain values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, state: dict):
    """torch.save to memory, then an atomic write: a crash never leaves a half-written file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getvalue())


def read_checkpoint(path) -> dict:
    """A training checkpoint of this script, or InputError saying why it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"checkpoint '{path}' does not exist") from None
    except Exception as exc:  # torch.load raises many kinds for a foreign or broken file
        raise InputError(f"checkpoint '{path}' is not a readable PyTorch checkpoint ({type(exc).__name__})") from None
    needed = ("model", "optimizer", "scheduler", "epoch")
    if not isinstance(state, dict) or any(key not in state for key in needed):
        raise InputError(f"checkpoint '{path}' holds weights only, not a training state to resume "
                         f"(use --pretrained to start from its weights)")
    return state


# ----------------------------------------------------------------------------- one epoch

class RunClock:
    """Wall time of the run (carried over a resume) and the cosine learning rate at any step.

    The cosine schedule follows whichever is further along, steps or the
    --max_minutes budget, so a run cut by its budget still ends at the low rate.
    """

    def __init__(self, args, steps_per_epoch: int, seconds_done: float = 0.0):
        self.lr = args.lr
        self.total_steps = max(1, args.num_epochs * steps_per_epoch)
        self.budget = args.max_minutes * 60
        self.start = time.perf_counter() - seconds_done

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def out_of_time(self) -> bool:
        return bool(self.budget) and self.seconds >= self.budget

    def progress(self, global_step: int) -> float:
        done = global_step / self.total_steps
        return min(1.0, max(done, self.seconds / self.budget) if self.budget else done)

    def cosine_lr(self, global_step: int) -> float:
        shape = 0.5 * (1 + math.cos(math.pi * self.progress(global_step)))
        return self.lr * (COSINE_FLOOR + (1 - COSINE_FLOOR) * shape)


def steps_per_epoch(loader, args) -> int:
    return len(loader) if args.max_steps_per_epoch is None else min(len(loader), args.max_steps_per_epoch)


def train_one_epoch(net, loader, optimizer, scaler, runtime: Runtime, epoch: int, args, writer=None,
                    clock: RunClock = None):
    """One pass over the loader -> (mean loss over processes and steps, whether the time budget ran out,
    steps taken). The mean is nan when the budget ran out before the first step.

    With the cosine schedule the learning rate is set before every step. A
    non-finite loss stops the run (InputError with the epoch and step).
    """
    net.train()
    device, use_amp = runtime.device, args.amp and runtime.device.type == "cuda"
    steps = steps_per_epoch(loader, args)
    total, count, out_of_time = 0.0, 0, False
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{args.num_epochs}", disable=not runtime.main, leave=False)
    for step, (stack, target) in enumerate(loader):
        if step >= steps:
            break
        if clock is not None:
            out_of_time = clock.out_of_time()
            if runtime.distributed:  # every process must stop at the same step
                flag = torch.tensor([float(out_of_time)], device=device)
                dist.all_reduce(flag)
                out_of_time = flag.item() > 0
            if out_of_time:
                break
            if args.lr_schedule == "cosine":
                for group in optimizer.param_groups:
                    group["lr"] = clock.cosine_lr(epoch * steps + step)
        stack = stack.to(device, non_blocking=True)    # (B, N, S, S)
        target = target.to(device, non_blocking=True)  # (B, 1, S, S)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            logits, depth = net(stack)
        loss = depth_loss(logits, depth, target, args.loss, args.ce_weight, stack, args.fusion_weight,
                          args.distance_weight, args.ce_target, args.fusion_blend, args.fusion_bands)
        value = loss.detach().float()
        if runtime.distributed:  # every process must take the same decision below
            dist.all_reduce(value)
            value /= runtime.world_size
        value = value.item()
        if not math.isfinite(value):
            raise InputError(f"the loss became {value} at epoch {epoch + 1}, step {step + 1} "
                             f"(lr {optimizer.param_groups[0]['lr']:.3g}); stopping. Try a lower --lr, "
                             f"--no-amp, or check the data")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total, count = total + value, count + 1
        if writer is not None:
            writer.add_scalar("train/loss", value, epoch * steps + step)
        bar.set_postfix(loss=f"{value:.4f}")
        bar.update()
    bar.close()
    return (total / count if count else math.nan), out_of_time, count


@torch.no_grad()
def evaluate(net: nn.Module, loader, runtime: Runtime, args):
    """Depth MSE and MAE over all pixels of one validation set (all processes).

    net: the unwrapped LogitsAndDepth. Returns (mse, mae, example) with example
    (predicted, true) depth SxS float arrays of this process's first stack.
    """
    net.eval()
    device, use_amp = runtime.device, args.amp and runtime.device.type == "cuda"
    sums, example = torch.zeros(3, dtype=torch.float64), None
    for batch, (stack, target) in enumerate(loader):
        if args.max_val_batches is not None and batch >= args.max_val_batches:
            break
        stack, target = stack.to(device), target.to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            _, depth = net(stack)
        error = depth.float() - target[:, :1]
        sums += torch.tensor([error.square().sum().item(), error.abs().sum().item(), error.numel()],
                             dtype=torch.float64)
        if example is None:
            example = (depth[0, 0].float().cpu().numpy(), target[0, 0].cpu().numpy())
    sums = all_sum(sums, runtime)
    count = max(sums[2].item(), 1.0)
    return sums[0].item() / count, sums[1].item() / count, example


def comparison_picture(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Predicted | ground truth | absolute error, colour-mapped: H x (3W + 8) x 3 uint8 BGR."""
    gap = np.full((predicted.shape[0], 4, 3), 255, np.uint8)
    panels = [depth_colormap(predicted), gap, depth_colormap(truth), gap,
              depth_colormap(np.abs(predicted - truth))]
    return np.concatenate(panels, axis=1)


# ----------------------------------------------------------------------------- the run

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


def run_training(args, runtime: Runtime) -> dict:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    seed_everything(args.seed)
    train_sources, val_sources = dataset_sources(args, "train"), dataset_sources(args, "val")
    if args.ce_target == "sharpest" and not args.all_in_focus:
        raise InputError("--ce_target sharpest needs --all_in_focus (the sharp images it compares with)")
    if args.fusion_blend[0] <= 0:
        raise InputError("the temperature of --fusion_blend must be above 0 (the fusion term scores a blend)")
    if not train_sources:
        raise InputError("no training data: give --train_dataset STACK_DIR DEPTH_DIR "
                         "(or the released --train_stack / --train_depth_continuous)")
    size, world, rank = args.training_image_size, runtime.world_size, runtime.rank
    train_set = FocusStackDataset(train_sources, size, args.subset_fraction_train, args.seed, args.cache_images,
                                  crop=args.crop, all_in_focus=args.all_in_focus)
    train_sampler = GroupedBatchSampler(train_set.num_slices, args.batch_size, shuffle=True, augment=True,
                                        seed=args.seed, num_replicas=world, rank=rank, rotate=args.rotate,
                                        crop=args.crop > 0, zoom=args.zoom, contrast=args.contrast)
    train_loader = make_loader(train_set, train_sampler, args.num_workers, runtime.device)
    val_names = unique_names(val_sources)
    val_loaders = {}
    for name, source in zip(val_names, val_sources):
        val_set = FocusStackDataset([source], size, args.subset_fraction_val, args.seed, args.cache_images)
        sampler = GroupedBatchSampler(val_set.num_slices, args.batch_size, shuffle=False, seed=args.seed,
                                      num_replicas=world, rank=rank, pad=False)
        val_loaders[name] = make_loader(val_set, sampler, args.num_workers, runtime.device)

    model = StackMFFV2()
    init_weights(model)
    if args.pretrained:
        model.load_state_dict(load_model(args.pretrained).state_dict())
    net = LogitsAndDepth(model).to(runtime.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and runtime.device.type == "cuda")

    start_epoch, best, seconds_done = 0, math.inf, 0.0
    if args.resume:
        state = read_checkpoint(args.resume)
        model.load_state_dict(load_model(args.resume).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        start_epoch, best = int(state["epoch"]), float(state.get("best_metric", math.inf))
        seconds_done = float(state.get("train_seconds", 0.0))
        rng = state.get("rng")
        if isinstance(rng, list) and len(rng) == world:
            set_rng_state(rng[rank])
    train_model = net
    if runtime.distributed:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(net, device_ids=device_ids)

    run_dir, log = Path(args.save_dir) / args.save_name, None
    commit = git_commit()
    if runtime.main:
        ensure_output_dir(run_dir)
        info = {"args": vars(args), "seed": args.seed, "git_commit": commit, "torch": torch.__version__,
                "device": str(runtime.device), "world_size": world, "train_stacks": len(train_set),
                "start_epoch": start_epoch}
        log = RunLog(run_dir, val_names, start_epoch, info)
        print(f"seed {args.seed}, git commit {commit}, device {runtime.device} x {world}; "
              f"{len(train_set)} training stacks ({len(train_loader)} batches per process), "
              f"{len(val_loaders)} validation set(s); run folder {run_dir}"
              + (f"; resuming after epoch {start_epoch}" if args.resume else ""))

    history, clock = [], RunClock(args, steps_per_epoch(train_loader, args), seconds_done)
    done = start_epoch                  # epochs finished, for the export when a resume has none left
    try:
        for epoch in range(start_epoch, args.num_epochs):
            train_sampler.set_epoch(epoch)
            start = time.perf_counter()
            train_loss, out_of_time, steps_taken = train_one_epoch(train_model, train_loader, optimizer, scaler,
                                                                   runtime, epoch, args,
                                                                   log.writer if log else None, clock)
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
            last = done == args.num_epochs or out_of_time
            metrics = {}
            if val_loaders and (done % args.eval_interval == 0 or last):
                metrics = {name: evaluate(net, loader, runtime, args) for name, loader in val_loaders.items()}
            score = float(np.mean([m[0] for m in metrics.values()])) if metrics else (
                train_loss if not val_loaders else None)
            improved = score is not None and score < best
            best = score if improved else best
            rng = rng_state()
            if runtime.distributed:
                states = [None] * world
                dist.all_gather_object(states, rng)
            else:
                states = [rng]
            history.append({"epoch": done, "train_loss": train_loss, "val": {n: m[:2] for n, m in metrics.items()},
                            "seconds": seconds})
            if runtime.main:
                log.add_epoch(done, train_loss, lr, metrics)
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": done,
                         "best_metric": best, "args": vars(args), "rng": states, "git_commit": commit,
                         "train_seconds": clock.seconds}
                save_checkpoint(run_dir / "last.pth", state)
                if args.keep_epoch_checkpoints:
                    save_checkpoint(run_dir / f"epoch_{done:03d}.pth", state)
                if improved:
                    save_checkpoint(run_dir / "best.pth", state)
                shown = ", ".join(f"{n} mse {m[0]:.5f} mae {m[1]:.5f}" for n, m in metrics.items())
                print(f"epoch {done}/{args.num_epochs}: train loss {train_loss:.5f}, lr {lr:.3g}, "
                      f"{seconds:.1f} s" + (f"; {shown}" if shown else "") + (" (best)" if improved else ""),
                      flush=True)
            if out_of_time:
                if runtime.main:
                    print(f"the --max_minutes budget ran out during epoch {done}; stopping")
                break
        if args.export and runtime.main:
            export_weights(model, args, commit, clock.seconds, done)
    finally:
        if log:
            log.close()
    return {"run_dir": run_dir, "best_metric": best, "history": history}


def export_weights(model: StackMFFV2, args, commit: str, seconds: float, epochs: int):
    """The final weights as the predict scripts take them: a bare state dict and its model card."""
    path = Path(args.export)
    ensure_output_dir(path.parent)
    save_checkpoint(path, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    write_model_card(path, {"index_rule": "argmax" if args.loss == "mse+ce" else "minmax_round",
                            "views": args.export_views, "fusion_temperature": args.export_fusion_temperature,
                            "focus_prior": args.export_focus_prior, "depth_window": args.export_depth_window,
                            "base_sigma": args.export_base_sigma, "base_weight_sigma": args.export_base_weight_sigma,
                            "trained_by": "train.py", "git_commit": commit, "epochs_done": epochs,
                            "train_seconds": round(seconds), "torch": torch.__version__, "args": vars(args)})
    print(f"exported the final weights to {path} (model card {Path(model_card_path(path)).name})")


def worker_error_message(exc: InputError) -> str:
    """The user's sentence from an InputError re-raised by a DataLoader worker (which wraps the traceback)."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    return text.strip().splitlines()[-1].split("InputError: ", 1)[-1]


def main(args):
    runtime = setup_runtime(args)
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
