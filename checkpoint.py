"""Checkpoint files of a training run: save, read, resume, and the export for the predict scripts.

A training checkpoint holds ``{model, optimizer, scheduler, scaler, epoch,
best_metric, args, rng, git_commit, train_seconds}``; ``model`` is the plain
network's state dict (no ``module.``), so ``model.load_model`` takes any
checkpoint as weights. The export is a bare state dict with its model card
beside it. Every file is written to a temporary name and renamed.
"""
import io
import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fusion import FusionCard, card_path
from model import StackMFFV2, load_model
from utils import InputError, ensure_output_dir, write_bytes

NEEDED_TO_RESUME = ("model", "optimizer", "scheduler", "epoch")


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
    """A training checkpoint of train.py, or InputError saying why it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"checkpoint '{path}' does not exist") from None
    except Exception as exc:  # torch.load raises many kinds for a foreign or broken file
        raise InputError(f"checkpoint '{path}' is not a readable PyTorch checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or any(key not in state for key in NEEDED_TO_RESUME):
        raise InputError(f"checkpoint '{path}' holds weights only, not a training state to resume "
                         f"(use --pretrained to start from its weights)")
    return state


def resume(path, model: StackMFFV2, optimizer, scheduler, scaler, rank: int = 0, world_size: int = 1):
    """Restore a run from its checkpoint in place -> (epochs done, best metric, training seconds).

    The weights go through ``load_model`` (strict). This process's random
    states come back when the checkpoint was written by as many processes.
    """
    state = read_checkpoint(path)
    model.load_state_dict(load_model(path).state_dict())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if "scaler" in state and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    rng = state.get("rng")
    if isinstance(rng, list) and len(rng) == world_size:
        set_rng_state(rng[rank])
    return int(state["epoch"]), float(state.get("best_metric", math.inf)), float(state.get("train_seconds", 0.0))


def training_state(model: StackMFFV2, optimizer, scheduler, scaler, epoch: int, best_metric: float, args: dict,
                   rng: list, git_commit: str, train_seconds: float) -> dict:
    """What a checkpoint holds; ``rng`` has one ``rng_state()`` per process."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch, "best_metric": best_metric, "args": args, "rng": rng,
            "git_commit": git_commit, "train_seconds": train_seconds}


def export_weights(model: StackMFFV2, path, card: FusionCard, provenance: dict):
    """The weights as the predict scripts take them: a bare state dict at ``path``, and beside it
    ``card`` with ``provenance`` (how the weights were made)."""
    path = Path(path)
    ensure_output_dir(path.parent)
    save_checkpoint(path, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    card.write_beside(path, **provenance)
    print(f"exported the final weights to {path} (model card {Path(card_path(path)).name})")


def all_rng_states(runtime) -> list:
    """Every process's ``rng_state()``, in rank order (for the main process to save; engine.Runtime)."""
    if not runtime.distributed:
        return [rng_state()]
    states = [None] * runtime.world_size
    dist.all_gather_object(states, rng_state())
    return states


def save_epoch_checkpoints(run_dir: Path, state: dict, keep_epoch: bool, improved: bool):
    """last.pth after every epoch, epoch_XXX.pth when kept, best.pth when the metric improved."""
    save_checkpoint(run_dir / "last.pth", state)
    if keep_epoch:
        save_checkpoint(run_dir / f"epoch_{state['epoch']:03d}.pth", state)
    if improved:
        save_checkpoint(run_dir / "best.pth", state)
