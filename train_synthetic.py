"""Short CPU training of StackMFF-V2 on small synthetic stacks (the shipped weights' recipe).

    python train_synthetic.py --data_root data/synthetic_train --output weights/stackmffv2_synthetic.pth

Reads the training layout that make_datasets/make_synthetic.py writes
(``image_stacks/<scene>/<k>.png`` + ``depth_maps/<scene>.png``, depth =
round(k / (N - 1) * 255) for in-focus slice k) fully into memory as 8-bit
gray, and trains with batches of one stack length at a time.

Objective: the ground truth gives each pixel's in-focus slice, so besides
the released depth MSE (min-max normalised expected slice number against
k / (N - 1)) the focus logits get a per-pixel cross-entropy against k. The
cross-entropy trains exactly what the ``argmax`` index rule reads at
inference; the shipped weights record that rule next to them.

A compact loop for a small CPU budget (no loader processes, no validation, no
resume); train.py is the general trainer (real data, validation, resume,
DDP) and lends its released initialisation here.
"""
import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from make_datasets.make_synthetic import depth_map_to_index
from model import StackMFFV2, depth_map_creation, write_model_card
from train import git_commit, init_weights, save_checkpoint
from utils import InputError, ensure_output_dir, read_image, read_stack, run_cli, to_gray_float


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("data and output")
    io.add_argument("--data_root", type=str, nargs="+", required=True,
                    help="one or more roots holding image_stacks/ and depth_maps/")
    io.add_argument("--output", type=str, default="weights/stackmffv2_synthetic.pth",
                    help="where the final state dict goes (a .json model card is written beside it)")
    io.add_argument("--log_every", type=int, default=50, help="steps between log lines")
    io.add_argument("--save_every", type=int, default=200, help="steps between intermediate saves")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=2000, help="optimiser steps")
    opt.add_argument("--batch_size", type=int, default=4, help="stacks per batch (one length per batch)")
    opt.add_argument("--max_minutes", type=float, default=0,
                     help="wall-time budget; the run stops and saves when it is spent, and the "
                          "learning-rate schedule follows whichever of steps or time is further along (0: none)")
    opt.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (cosine decay to 5%%)")
    opt.add_argument("--weight_decay", type=float, default=1e-2, help="AdamW weight decay")
    opt.add_argument("--ce_weight", type=float, default=1.0, help="weight of the per-pixel slice cross-entropy")
    opt.add_argument("--mse_weight", type=float, default=1.0, help="weight of the released depth MSE")
    opt.add_argument("--crop", type=int, default=0, help="random square crop side (0: whole image)")
    opt.add_argument("--seed", type=int, default=0, help="seed of the init and the batch order")
    opt.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy shared CPU)")
    return parser


def load_training_set(roots):
    """All stacks of the roots, grouped by length.

    Returns {N: (stacks uint8 (S, N, H, W), index int64 (S, H, W))}.
    """
    groups = {}
    for root in roots:
        stack_root, depth_root = Path(root) / "image_stacks", Path(root) / "depth_maps"
        if not stack_root.is_dir() or not depth_root.is_dir():
            raise InputError(f"'{root}' lacks image_stacks/ or depth_maps/ (see make_datasets/make_synthetic.py)")
        scenes = sorted(p for p in stack_root.iterdir() if p.is_dir())
        for scene in tqdm(scenes, desc=f"loading {root}"):
            images, _ = read_stack(scene)
            gray = np.stack([np.round(to_gray_float(im) * 255).astype(np.uint8) for im in images])
            depth = read_image(depth_root / f"{scene.name}.png")
            groups.setdefault(len(images), []).append((gray, depth_map_to_index(depth, len(images))))
    if not groups:
        raise InputError(f"no stacks found under {roots}")
    return {n: (np.stack([s for s, _ in items]), np.stack([i for _, i in items])) for n, items in groups.items()}


def sample_batch(rng, groups, counts, batch_size, crop):
    """Random batch of one stack length with a shared random flip/rotation.

    Returns (x float32 (B, N, S, S) in [0, 1], index int64 (B, S, S)).
    """
    lengths = sorted(groups)
    n = lengths[rng.choice(len(lengths), p=counts / counts.sum())]
    stacks, index = groups[n]
    pick = rng.choice(len(stacks), size=batch_size, replace=len(stacks) < batch_size)
    x, y = stacks[pick], index[pick]
    if crop:
        top, left = rng.integers(0, x.shape[2] - crop + 1), rng.integers(0, x.shape[3] - crop + 1)
        x, y = x[..., top:top + crop, left:left + crop], y[..., top:top + crop, left:left + crop]
    k = int(rng.integers(4))
    x, y = np.rot90(x, k, axes=(2, 3)), np.rot90(y, k, axes=(1, 2))
    if rng.random() < 0.5:
        x, y = x[..., ::-1], y[..., ::-1]
    x = torch.from_numpy(np.ascontiguousarray(x)).float() / 255
    return x, torch.from_numpy(np.ascontiguousarray(y))


def focus_loss(logits, index, ce_weight, mse_weight):
    """logits (B, N, H, W), index (B, H, W) -> (total, ce, mse) scalars."""
    n = logits.shape[1]
    ce = F.cross_entropy(logits.float(), index)
    depth = depth_map_creation(logits)[:, 0]                           # (B, H, W) in [0, 1]
    mse = F.mse_loss(depth, index.float() / (n - 1))
    return ce_weight * ce + mse_weight * mse, ce, mse


def save_weights(model, path, card):
    """Bare state dict (atomic) and the model card beside it."""
    path = Path(path)
    ensure_output_dir(path.parent)
    save_checkpoint(path, {k: v.detach().clone() for k, v in model.state_dict().items()})
    write_model_card(path, card)


def main(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    groups = load_training_set(args.data_root)
    counts = np.array([len(groups[n][0]) for n in sorted(groups)], dtype=np.float64)
    print(f"{int(counts.sum())} stacks, lengths {sorted(groups)}; commit {git_commit()}")
    model = StackMFFV2()
    init_weights(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    card = {"index_rule": "argmax", "trained_by": "train_synthetic.py", "args": vars(args),
            "commit": git_commit()}
    start, running = time.time(), np.zeros(3)
    budget = args.max_minutes * 60
    model.train()
    for step in range(1, args.steps + 1):
        progress = (step - 1) / args.steps
        if budget:
            progress = max(progress, (time.time() - start) / budget)
        if progress >= 1:
            break
        lr = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, index = sample_batch(rng, groups, counts, args.batch_size, args.crop)
        loss, ce, mse = focus_loss(model.focus_logits(x), index, args.ce_weight, args.mse_weight)
        if not torch.isfinite(loss):
            raise InputError(f"loss became {loss.item()} at step {step}; stopping")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += [loss.item(), ce.item(), mse.item()]
        if step % args.log_every == 0:
            mean = running / args.log_every
            running[:] = 0
            print(f"step {step}/{args.steps} loss {mean[0]:.4f} ce {mean[1]:.4f} mse {mean[2]:.5f} "
                  f"lr {lr:.2e} {time.time() - start:.0f}s", flush=True)
        if step % args.save_every == 0:
            save_weights(model, args.output, {**card, "steps_done": step,
                                              "train_seconds": round(time.time() - start)})
    done = step if progress < 1 else step - 1
    save_weights(model, args.output, {**card, "steps_done": done, "train_seconds": round(time.time() - start)})
    print(f"saved {args.output} after {done} steps, {time.time() - start:.0f} s")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
