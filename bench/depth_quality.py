"""Depth-map quality of each depth rule, by rule E (docs/notes/real-optics-fusion.md), in one table.

    python bench/depth_quality.py --threads 2

For every stack the focus logits of ``--model_path`` (the card's views, or
``--views``) are computed once at the input size, as the whole-image path
decodes a blend, and kept in ``--logits_cache``; each rule then decodes
them with ``fusion.fuse``:

* "argmax pick": the argmax index as depth (index_rule argmax, depth_rule index);
* "minmax_round": the released depth, min-max normalised expected slice;
* "guided": the card's index refined by ``depth_rule guided``.

Columns, depth in slices (depth x (N - 1)): on each light field of
``--lightfields`` (10-slice stacks of bench/benchmark_fusion.py, same cache)
the mean absolute error against the sweep's focus index over the textured
half (``metrics.textured_half`` of the centre view) and over all pixels, and
the speckle share (``metrics.speckle_share``); on the real stacks
``--real_scenes`` of ``--real_root``, at their native size, the speckle
share. The last columns apply rule E: (a) speckle at most 0.5% everywhere,
(b) the light-field mean of the textured-half MAE at most 0.05 slices above
the argmax pick's. ``--synthetic K`` adds a second table on K held-out
synthetic stacks per blur and length (make_synthetic.kept_scenes, seed 7,
segment depth, 256 px) against their true index; ``--figures_dir`` writes
middle slice | argmax depth | guided depth side by side per stack.
"""
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli import ArgumentParser  # noqa: E402
from bench.benchmark_fusion import LIGHT_FIELDS, REAL_STACKS, light_field_sets, print_table, real_scenes  # noqa: E402
from fusion import TEST_VIEWS, FusionCard, fuse  # noqa: E402
from inference import DEFAULT_MODEL, focus_logits  # noqa: E402
from make_datasets.make_synthetic import depth_map_to_index, kept_scenes  # noqa: E402
from metrics import slice_mae, speckle_share, textured_half  # noqa: E402
from model import load_model  # noqa: E402
from utils import (InputError, ensure_output_dir, read_stack, resize_to_multiple, run_cli, stack_to_tensor,  # noqa: E402
                   to_gray_float, to_integer_image, write_image)

SPECKLE_BOUND = 0.5        # %, rule E (a)
MAE_MARGIN = 0.05          # slices above the argmax pick's, rule E (b)
PICK, RELEASED, GUIDED = "argmax pick", "minmax_round", "guided"


def get_args_parser():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model_path", type=str, default=str(DEFAULT_MODEL), help="weights with their card")
    parser.add_argument("--views", type=int, default=None, choices=TEST_VIEWS, help="default: the card's")
    parser.add_argument("--lightfields", type=str, default=str(LIGHT_FIELDS), help="folder of light-field folders")
    parser.add_argument("--lightfield_slices", type=int, default=10, help="planes of each light field's stack")
    parser.add_argument("--lightfield_cache", type=str,
                        default=os.path.join(tempfile.gettempdir(), "stackmff_lightfields"),
                        help="built light-field stacks (shared with bench/benchmark_fusion.py)")
    parser.add_argument("--real_root", type=str, default=str(REAL_STACKS), help="<dataset>/dof_stack/<scene>/ trees")
    parser.add_argument("--real_scenes", type=str, nargs="*", default=["leaves", "bug", "pcb"],
                        help="scene folder names measured at their native size")
    parser.add_argument("--synthetic", type=int, default=0, metavar="K",
                        help="also K synthetic stacks per blur (released, physical) and length (8, 16)")
    parser.add_argument("--logits_cache", type=str, default=os.path.join(tempfile.gettempdir(), "stackmff_depth_logits"),
                        help="where focus logits are kept between runs")
    parser.add_argument("--figures_dir", type=str, default=None,
                        help="folder for side-by-side depth pictures (default: none, not written)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser


def rule_cards(card: FusionCard) -> dict:
    """{rule name: card}: the model's card at one decoding but for how its depth is read."""
    return {PICK: card.with_overrides(index_rule="argmax", depth_rule="index"),
            RELEASED: card.with_overrides(index_rule="minmax_round", depth_rule="index"),
            GUIDED: card.with_overrides(depth_rule="guided")}


def cached_logits(model, card, images, key, cache):
    """Focus logits (1, N, H, W) of a stack at its own size (the network's resized back bilinearly,
    as the whole-image path does for a blend), kept in ``cache`` under ``key``."""
    path = Path(cache) / f"{key}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path))
    stack = stack_to_tensor(images)
    with torch.inference_mode():
        logits = focus_logits(model, card, resize_to_multiple(stack))
        logits = F.interpolate(logits, size=stack.shape[-2:], mode="bilinear", align_corners=False)
    ensure_output_dir(cache)
    np.save(path, logits.numpy())
    return logits


def depth_in_slices(images, logits, cards) -> dict:
    """{rule: depth HxW in slices (float64)} of one stack under each card."""
    stack = stack_to_tensor(images)
    n = stack.shape[1]
    out = {}
    with torch.inference_mode():
        for name, card in cards.items():
            out[name] = fuse(stack, logits, card).depth[0, 0].double().numpy() * (n - 1)
    return out


def figure(images, depths, n, path, max_width=1800):
    """Middle slice | argmax depth | guided depth, gray (near dark), shrunk to ``max_width`` for viewing."""
    middle = to_integer_image(to_gray_float(images[len(images) // 2]), np.uint8)
    tiles = [middle] + [to_integer_image(depths[k] / max(n - 1, 1), np.uint8) for k in (PICK, GUIDED)]
    picture = np.hstack(tiles)
    if picture.shape[1] > max_width:
        scale = max_width / picture.shape[1]
        picture = cv2.resize(picture, (max_width, round(picture.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    write_image(path, picture)


def stack_key(name, images, model_path, views):
    digest = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()[:10]
    h, w = images[0].shape[:2]
    return f"{name}-{len(images)}x{h}x{w}-{views}v-{digest}"


def verdict(scores, light_fields, reals):
    """Rule E for every rule: (LF mean textured MAE, largest speckle %, 'yes'/'no'); the pick is the baseline."""
    out = {}
    pick_mae = np.mean([scores[PICK][lf][0] for lf in light_fields])
    for rule, by_stack in scores.items():
        mae = float(np.mean([by_stack[lf][0] for lf in light_fields]))
        speckle = max([by_stack[lf][2] for lf in light_fields] + [by_stack[r] for r in reals])
        passes = speckle <= SPECKLE_BOUND and mae <= pick_mae + MAE_MARGIN
        out[rule] = (mae, speckle, "yes" if passes else "no")
    return out


def synthetic_rows(model, model_path, card, cards, count, cache, figures):
    """Rows of the synthetic table: per rule, per set (blur x length), mean textured / all MAE and speckle."""
    sets = [(blur, n) for blur in ("released", "physical") for n in (8, 16)]
    results = {rule: [] for rule in cards}
    for blur, n in sets:
        scores = {rule: [] for rule in cards}
        for scene, (slices, depth_map, image) in kept_scenes(7, 0, count, 256, (n, n), blur, depth_kind="segments"):
            true = depth_map_to_index(depth_map, n)
            key = f"synthetic-{blur}-{n}-{scene}"
            logits = cached_logits(model, card, slices, stack_key(key, slices, model_path, card.views), cache)
            depths = depth_in_slices(slices, logits, cards)
            mask = textured_half(to_gray_float(image))
            for rule, d in depths.items():
                scores[rule].append((slice_mae(d, true, mask), slice_mae(d, true), 100 * speckle_share(d)))
            if figures:
                figure(slices, depths, n, figures / f"{key}.png")
        for rule in cards:
            mean = np.mean(scores[rule], axis=0)
            results[rule].append(f"{mean[0]:.3f} / {mean[1]:.3f} / {mean[2]:.2f}")
    header = ["rule"] + [f"{blur} {n}: tex / all MAE, speckle %" for blur, n in sets]
    return header, [[rule] + cells for rule, cells in results.items()]


def main(args):
    torch.set_num_threads(args.threads)
    if not Path(args.model_path).is_file():
        raise InputError(f"--model_path {args.model_path} does not exist")
    if args.synthetic < 0:
        raise InputError(f"--synthetic must be 0 or more, got {args.synthetic}")
    card = FusionCard.beside(args.model_path).with_overrides(views=args.views)
    model = load_model(args.model_path, "cpu")
    cards = rule_cards(card)
    figures = ensure_output_dir(args.figures_dir) if args.figures_dir else None
    scores = {rule: {} for rule in cards}
    light_fields, reals = [], []
    for title, [(images, centre, true)] in light_field_sets(args.lightfields, args.lightfield_slices,
                                                           args.lightfield_cache).items():
        name = title.split(":")[0].replace("light field ", "")
        logits = cached_logits(model, card, images, stack_key(name, images, args.model_path, card.views),
                               args.logits_cache)
        depths = depth_in_slices(images, logits, cards)
        mask = textured_half(centre)
        for rule, d in depths.items():
            scores[rule][name] = (slice_mae(d, true, mask), slice_mae(d, true), 100 * speckle_share(d))
        light_fields.append(name)
        if figures:
            figure(images, depths, len(images), figures / f"{name}.png")
    wanted = set(args.real_scenes)
    for scene in real_scenes(args.real_root):
        if scene.name not in wanted:
            continue
        images, _ = read_stack(scene)
        logits = cached_logits(model, card, images, stack_key(scene.name, images, args.model_path, card.views),
                               args.logits_cache)
        depths = depth_in_slices(images, logits, cards)
        for rule, d in depths.items():
            scores[rule][scene.name] = 100 * speckle_share(d)
        reals.append(scene.name)
        if figures:
            figure(images, depths, len(images), figures / f"{scene.name}.png")
    missing = wanted - set(reals)
    if not light_fields or missing:
        raise InputError(f"rule E needs the light fields and {sorted(wanted)}; missing: "
                         f"{'light fields' if not light_fields else ''} {sorted(missing)}".strip())
    decided = verdict(scores, light_fields, reals)
    header = (["rule"] + [f"{lf}: tex MAE / all MAE / speckle %" for lf in light_fields]
              + [f"{r}: speckle %" for r in reals] + ["LF mean tex MAE", "max speckle %", "rule E"])
    rows = []
    for rule, by_stack in scores.items():
        rows.append([rule] + [f"{by_stack[lf][0]:.3f} / {by_stack[lf][1]:.3f} / {by_stack[lf][2]:.3f}"
                              for lf in light_fields]
                    + [f"{by_stack[r]:.3f}" for r in reals]
                    + [f"{decided[rule][0]:.3f}", f"{decided[rule][1]:.3f}",
                       "baseline" if rule == PICK else decided[rule][2]])
    print_table(f"depth rules of {Path(args.model_path).name} at {card.views} view(s); depth in slices; rule E: "
                f"speckle <= {SPECKLE_BOUND}% everywhere and LF mean tex MAE <= the pick's + {MAE_MARGIN}",
                header, rows)
    if args.synthetic:
        header, rows = synthetic_rows(model, args.model_path, card, cards, args.synthetic, args.logits_cache, figures)
        print_table(f"synthetic held-out stacks (seed 7, segment depth, 256 px, {args.synthetic} per set) "
                    "against the true index", header, rows)
    return scores, decided


if __name__ == "__main__":
    run_cli(main, get_args_parser())
