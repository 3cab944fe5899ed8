"""One training epoch and one validation pass, with explicit parameters (train.py wires them).

``train_one_epoch`` takes optimiser steps over a loader with a ``DepthLoss``;
``evaluate`` gives the depth MSE and MAE of one validation set. Both run the
same in one process and under torchrun (``Runtime`` says which process this
is); ``RunClock`` holds the run's wall time and its cosine learning rate.
"""
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from model import StackMFFV2, depth_map_creation
from utils import InputError, select_device

COSINE_FLOOR = 0.05         # the cosine schedule ends at this fraction of the learning rate


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


def setup_runtime(device_name: str = None, backend: str = None) -> Runtime:
    """Device and, under torchrun (WORLD_SIZE > 1), the process group (``backend`` None:
    nccl on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Runtime(select_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise InputError(f"distributed training runs on CUDA or CPU, not on '{device}'")
    dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    return Runtime(device, rank, world_size)


def all_sum(values, runtime: Runtime) -> torch.Tensor:
    """Sum of a float64 vector over processes (the vector itself when alone)."""
    tensor = torch.as_tensor(values, dtype=torch.float64)
    if runtime.distributed:
        on_device = tensor.to(runtime.device)
        dist.all_reduce(on_device)
        tensor = on_device.cpu()
    return tensor


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


class RunClock:
    """Wall time of the run (carried over a resume) and the cosine learning rate at any step.

    The cosine schedule goes from ``lr`` down to COSINE_FLOOR x ``lr`` and
    follows whichever is further along, steps or the ``max_minutes`` budget,
    so a run cut by its budget still ends at the low rate.
    """

    def __init__(self, lr: float, total_steps: int, max_minutes: float = 0.0, seconds_done: float = 0.0):
        self.lr = lr
        self.total_steps = max(1, total_steps)
        self.budget = max_minutes * 60
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


def steps_per_epoch(loader, max_steps: int = None) -> int:
    return len(loader) if max_steps is None else min(len(loader), max_steps)


def uses_amp(amp: bool, runtime: Runtime) -> bool:
    """float16 autocast only on CUDA."""
    return amp and runtime.device.type == "cuda"


def out_of_time_everywhere(clock: RunClock, runtime: Runtime) -> bool:
    """Whether the budget is spent, agreed by every process (they must stop at the same step)."""
    out_of_time = clock.out_of_time()
    if runtime.distributed:
        flag = torch.tensor([float(out_of_time)], device=runtime.device)
        dist.all_reduce(flag)
        out_of_time = flag.item() > 0
    return out_of_time


def train_one_epoch(net, loss_fn, loader, optimizer, scaler, runtime: Runtime, epoch: int, num_epochs: int,
                    max_steps: int = None, clock: RunClock = None, cosine: bool = False, amp: bool = True,
                    writer=None):
    """One pass over the loader -> (mean loss over processes and steps, whether the time budget ran out,
    steps taken). The mean is nan when the budget ran out before the first step.

    net gives (logits, depth) (``LogitsAndDepth``, maybe DDP-wrapped); loss_fn is a
    ``losses.DepthLoss``. With ``cosine`` the learning rate is set from ``clock``
    before every step. A non-finite loss stops the run (InputError with the epoch
    and step). ``writer`` (TensorBoard) gets the loss of every step.
    """
    net.train()
    device, use_amp = runtime.device, uses_amp(amp, runtime)
    steps = steps_per_epoch(loader, max_steps)
    total, count, out_of_time = 0.0, 0, False
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{num_epochs}", disable=not runtime.main, leave=False)
    for step, (stack, target) in enumerate(loader):
        if step >= steps:
            break
        if clock is not None:
            out_of_time = out_of_time_everywhere(clock, runtime)
            if out_of_time:
                break
            if cosine:
                for group in optimizer.param_groups:
                    group["lr"] = clock.cosine_lr(epoch * steps + step)
        stack = stack.to(device, non_blocking=True)    # (B, N, S, S)
        target = target.to(device, non_blocking=True)  # (B, 1 or 2, S, S)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            logits, depth = net(stack)
        loss = loss_fn(logits, depth, target, stack)
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
def evaluate(net: nn.Module, loader, runtime: Runtime, max_batches: int = None, amp: bool = True):
    """Depth MSE and MAE over all pixels of one validation set (all processes).

    net: the unwrapped LogitsAndDepth. Returns (mse, mae, example) with example
    (predicted, true) depth SxS float arrays of this process's first stack.
    """
    net.eval()
    device, use_amp = runtime.device, uses_amp(amp, runtime)
    sums, example = torch.zeros(3, dtype=torch.float64), None
    for batch, (stack, target) in enumerate(loader):
        if max_batches is not None and batch >= max_batches:
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
