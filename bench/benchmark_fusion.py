"""Fusion quality of the shipped weights, the official weights and their peers, in one table.

    python bench/benchmark_fusion.py --threads 2

Part 1, ground truth, synthetic: focus stacks are synthesised from
scikit-image's ``stereo_motorcycle`` (left view, with its real disparity; no
training source uses it) for several crops, 8 and 16 slices, and each blur
mode (``released_stack``, ``physical_stack``). For every set one table: SSIM
and PSNR of the fused gray image against the all-in-focus gray image (as the
paper), the mean absolute error of the slice index in slices (fusers that pick
no slice leave it empty), and seconds per stack. Depth: disparity holes (inf)
take the nearest valid value; large disparity = near = 0; each crop's depth is
stretched to 0..255, as a photographer brackets the depth range of the framed scene.

Part 2, ground truth, real optics: the light fields in ../shared/data/lightfields
(validation only: never train or tune on them alone), refocused by
make_datasets/lightfield.py into --lightfield_slices planes spanning each
scene's disparity; the centre view is the all-in-focus image and the sweep's
focus index the true index. Built stacks are cached in --lightfield_cache.

Part 3, no ground truth: the real stacks in ../shared/data/stacks (downscaled
so that the longer side is at most ``--real_max_side``): mean gradient
magnitude and Laplacian variance of the fused gray image (higher = sharper),
and one side-by-side picture per scene in ``--figures_dir``
(middle input slice | official | ours | argmax).

Last, the summary: one row per ground-truth set, one column per fuser, PSNR
and seconds per stack, with the machine.

Fusers: "ours" (``--ours``, with the settings of its model card), "official"
(``--official``, released rule; skipped when the file is absent), and the
peers of bench/peers.py: "argmax" (per-pixel argmax of the Gaussian-smoothed
squared Laplacian), "Laplacian pyramid", "GFF" (guided-filter fusion), "DTCWT"
(needs the dtcwt package) and "StackMFF-V3" (OpenFocus, run as a command
from its own venv: --openfocus). A peer that is not installed says so in its column.
"""
import hashlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tqdm import tqdm  # noqa: E402

from cli import ArgumentParser  # noqa: E402
from bench import peers  # noqa: E402
from inference import DEFAULT_MODEL, fuse_images  # noqa: E402
from make_datasets import lightfield, synthesis  # noqa: E402
from make_datasets.common import fill_invalid, write_truth_stack  # noqa: E402
from make_datasets.make_synthetic import stretch_to_8bit  # noqa: E402
from fusion import INDEX_RULES, TEST_VIEWS, FusionCard  # noqa: E402
from model import load_model  # noqa: E402
from utils import (InputError, ensure_output_dir, natural_sort_key, read_image, read_stack, run_cli,  # noqa: E402
                   stack_to_tensor, to_gray_float, to_integer_image, write_image)

OFFICIAL = REPO.parent / "shared" / "reference" / "official" / "model.pth"
REAL_STACKS = REPO.parent / "shared" / "data" / "stacks"
LIGHT_FIELDS = REPO.parent / "shared" / "data" / "lightfields"
# OpenFocus lives in a venv of its own (see docs/benchmark.md); never in the project's.
OPENFOCUS = os.environ.get("OPENFOCUS", str(REPO.parent / "openfocus-venv" / "bin" / "openfocus"))


def get_args_parser():
    parser = ArgumentParser(description=__doc__)
    models = parser.add_argument_group("fusers")
    models.add_argument("--ours", type=str, default=str(DEFAULT_MODEL), help="the project's weights")
    models.add_argument("--official", type=str, default=str(OFFICIAL),
                        help="the authors' released weights (skipped when absent)")
    models.add_argument("--extra_rules", action="store_true",
                        help="also run each network with the other index rule")
    models.add_argument("--extra_views", type=int, nargs="+", default=[], choices=TEST_VIEWS,
                        help="also run each network (with its own rule) with these numbers of test-time views "
                             "(default: none)")
    models.add_argument("--extra_fusion", type=float, nargs="+", default=[], metavar="T",
                        help="also run each network with these fusion temperatures (0: pick by index; default: none)")
    models.add_argument("--extra_focus_prior", type=float, nargs="+", default=[], metavar="P",
                        help="also run each network with these focus priors (0: none; default: none)")
    models.add_argument("--extra_depth_window", type=float, nargs="+", default=[], metavar="W",
                        help="also run each network with these depth windows (0: none; default: none)")
    models.add_argument("--extra_base_weight_sigma", type=float, nargs="+", default=[], metavar="B",
                        help="also run each network with these base-band weight sigmas (0: one band; default: none)")
    gt = parser.add_argument_group("ground-truth sets")
    gt.add_argument("--slices", type=int, nargs="+", default=[8, 16], help="stack lengths")
    gt.add_argument("--crop", type=int, nargs=2, default=[256, 320], metavar=("H", "W"), help="crop size")
    gt.add_argument("--num_crops", type=int, default=4, help="crops of the motorcycle per set")
    gt.add_argument("--blur", type=str, nargs="+", default=["released", "physical"],
                    choices=["released", "physical"], help="blur modes")
    models.add_argument("--no_peers", action="store_true",
                        help="leave out the classical peers and StackMFF-V3 (the argmax floor stays)")
    models.add_argument("--openfocus", type=str, default=OPENFOCUS,
                        help="the openfocus command of a separate venv, for the StackMFF-V3 column "
                             "(default: $OPENFOCUS, else ../openfocus-venv/bin/openfocus; absent: 'not installed')")
    lf = parser.add_argument_group("light fields (validation only)")
    lf.add_argument("--lightfields", type=str, default=str(LIGHT_FIELDS),
                    help="folder of light-field folders (skipped when absent)")
    lf.add_argument("--lightfield_slices", type=int, default=10, help="planes of each light field's focus stack")
    lf.add_argument("--lightfield_cache", type=str, default=os.path.join(tempfile.gettempdir(), "stackmff_lightfields"),
                    help="where built light-field stacks are kept between runs")
    real = parser.add_argument_group("real stacks")
    real.add_argument("--real_root", type=str, default=str(REAL_STACKS),
                      help="<dataset>/dof_stack/<scene>/ trees (skipped when absent)")
    real.add_argument("--real_max_side", type=int, default=384, help="downscale real slices to this side")
    real.add_argument("--no_real", action="store_true", help="leave out the real stacks without ground truth")
    real.add_argument("--figures_dir", type=str, default="results/bench_figures",
                      help="side-by-side pictures of the real stacks")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser


# ----------------------------------------------------------------------------- ground truth

def motorcycle_image_and_depth():
    """Left motorcycle view (HxWx3 uint8 BGR) and its depth (HxW float, larger = farther)."""
    import skimage.data
    left, _, disparity = skimage.data.stereo_motorcycle()
    disparity = fill_invalid(disparity, np.isfinite(disparity))   # holes take the nearest valid value
    return cv2.cvtColor(left, cv2.COLOR_RGB2BGR), -disparity.astype(np.float64)


def crop_boxes(shape, crop, count):
    """``count`` crop corners spread evenly over the image (deterministic)."""
    h, w = shape
    ch, cw = crop
    ys = np.linspace(0, h - ch, count).round().astype(int)
    xs = np.linspace(0, w - cw, count).round().astype(int)[::-1] if count > 1 else [0]
    return [(int(y), int(x)) for y, x in zip(ys, xs)]


def ground_truth_sets(blurs, slice_counts, crop, num_crops):
    """{title: [(slices list of uint8 BGR, all-in-focus gray HxW [0,1], index HxW int64), ...]}."""
    image, depth = motorcycle_image_and_depth()
    sets = {}
    for blur in blurs:
        if blur == "physical" and not hasattr(synthesis, "physical_stack"):
            print("physical sets skipped: make_datasets.synthesis.physical_stack is not in this checkout yet")
            continue
        for n in slice_counts:
            cases = []
            for y, x in crop_boxes(depth.shape, crop, num_crops):
                aif = image[y:y + crop[0], x:x + crop[1]]
                d8 = stretch_to_8bit(depth[y:y + crop[0], x:x + crop[1]])
                if blur == "physical":
                    slices, index = synthesis.physical_stack(aif, d8, n, max_sigma=4.0)
                else:
                    slices, index = synthesis.released_stack(aif, d8, n)
                cases.append((list(slices), to_gray_float(aif), index))
            sets[f"motorcycle {blur} {n}: stereo_motorcycle, {blur} blur, {n} slices, "
                 f"{num_crops} crops of {crop[1]}x{crop[0]}"] = cases
    return sets


# ----------------------------------------------------------------------------- fusers

def gray_stack(images) -> np.ndarray:
    """Slices (uint8/uint16) -> gray (N, H, W) float32 in [0, 1], as the network sees them."""
    return stack_to_tensor(images)[0].numpy()


def peer_fuser(fuse):
    """A bench.peers fuser of gray stacks as a fuser of slices."""
    return lambda images: fuse(gray_stack(images))


def make_fusers(args):
    """[(name, fn(slices) -> (fused gray HxW, index HxW or None) or None when not installed)]."""
    fusers = []
    networks = [("ours", args.ours), ("official", args.official)]
    for name, path in networks:
        if not Path(path).is_file():
            print(f"{name} skipped: {path} does not exist")
            continue
        card = FusionCard.beside(path)
        variants = [(card, name)]
        if args.extra_rules:
            variants += [(card.with_overrides(index_rule=r), f"{name} ({r})")
                         for r in INDEX_RULES if r != card.index_rule]
        variants += [(card.with_overrides(views=v), f"{name} ({v} view{'s' * (v > 1)})")
                     for v in args.extra_views if v != card.views]
        variants += [(card.with_overrides(fusion_temperature=t),
                      f"{name} ({'pick' if t == 0 else f'soft T={t:g}'})")
                     for t in args.extra_fusion if t != card.fusion_temperature]
        variants += [(card.with_overrides(focus_prior=p), f"{name} (focus prior {p:g})")
                     for p in args.extra_focus_prior if p != card.focus_prior]
        variants += [(card.with_overrides(depth_window=w), f"{name} (depth window {w:g})")
                     for w in args.extra_depth_window if w != card.depth_window]
        variants += [(card.with_overrides(base_weight_sigma=b),
                      f"{name} ({'one band' if b == 0 else f'base weights {b:g} px'})")
                     for b in args.extra_base_weight_sigma if b != card.base_weight_sigma]
        model = load_model(path, "cpu")
        for settings, label in variants:
            fusers.append((label, network_fuser(model, settings)))
    if args.no_peers:
        return fusers + [("argmax", peer_fuser(peers.argmax_laplacian))]
    fusers += [("argmax", peer_fuser(peers.argmax_laplacian)),
               ("Laplacian pyramid", peer_fuser(peers.laplacian_pyramid)),
               ("GFF", peer_fuser(peers.guided_filter_fusion)),
               ("DTCWT", peer_fuser(peers.dtcwt_fusion) if peers.dtcwt_available() else None)]
    openfocus = peers.OpenFocus(args.openfocus, threads=args.threads)
    if not openfocus.available:
        print(f"StackMFF-V3 not installed: no openfocus command at '{args.openfocus}' (--openfocus, $OPENFOCUS)")
    fusers.append(("StackMFF-V3", openfocus if openfocus.available else None))
    return fusers


def network_fuser(model, card):
    def fuse(images):
        result = fuse_images(model, card, images)
        return result.fused_gray, result.index
    return fuse


# ----------------------------------------------------------------------------- tables

def print_table(title, header, rows):
    widths = [max(len(str(r[k])) for r in [header] + rows) for k in range(len(header))]
    print(f"\n{title}")
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")


def pick_true_index(stack: np.ndarray, aif: np.ndarray, index: np.ndarray):
    """Reference: every pixel from the slice of its true depth -> (fused, index)."""
    return np.take_along_axis(stack, index[None], axis=0)[0], index


def pick_best_slice(stack: np.ndarray, aif: np.ndarray, index: np.ndarray):
    """Reference (an oracle): every pixel from the slice closest to the all-in-focus image."""
    best = np.abs(stack - aif[None]).argmin(axis=0)
    return np.take_along_axis(stack, best[None], axis=0)[0], best


# Rows that know the answer: what picking by the true depth gives (near depth
# edges physical blur spills the near object's blur into the far slices, so
# the true slice is not the sharpest there), and the best any per-pixel pick can do.
REFERENCES = [("ref: true index", pick_true_index), ("ref: best slice", pick_best_slice)]


def run_ground_truth(fusers, sets):
    """One table per set; returns {set title: {fuser: (PSNR dB, s / stack) or None}} for the summary."""
    summary = {}
    # Every entry takes (slices, all-in-focus, true index); the fusers see only the slices.
    entries = ([(name, fuse and (lambda slices, aif, index, fuse=fuse: fuse(slices))) for name, fuse in fusers]
               + [(name, lambda slices, aif, index, ref=ref: ref(gray_stack(slices), aif, index))
                  for name, ref in REFERENCES])
    for title, cases in sets.items():
        rows, summary[title] = [], {}
        for name, fuse in entries:
            if fuse is None:
                rows.append([name, "not installed", "", "", ""])
                summary[title][name] = None
                continue
            ssim, psnr, mae, seconds = [], [], [], 0.0
            for slices, aif, index in tqdm(cases, desc=name, leave=False, disable=len(cases) < 2):
                start = time.perf_counter()
                fused, pred = fuse(slices, aif, index)
                seconds += time.perf_counter() - start
                fused = np.clip(fused, 0, 1).astype(np.float64)
                ssim.append(structural_similarity(aif, fused, data_range=1.0))
                with np.errstate(divide="ignore"):      # an exact reference is inf dB, not a warning
                    psnr.append(peak_signal_noise_ratio(aif, fused, data_range=1.0))
                mae.append(np.nan if pred is None else np.abs(pred - index).mean())
            summary[title][name] = (float(np.mean(psnr)), seconds / len(cases))
            rows.append([name, f"{np.mean(ssim):.4f}", f"{np.mean(psnr):.3f}",
                         "" if np.isnan(mae).any() else f"{np.mean(mae):.3f}", f"{seconds / len(cases):.2f}"])
        print_table(title, ["fuser", "SSIM", "PSNR (dB)", "index MAE (slices)", "s / stack"], rows)
    return summary


def print_summary(summary, fusers, machine):
    """The one table: every set a row, every fuser a column, PSNR and seconds per stack."""
    names = [name for name, _ in fusers]
    rows = []
    for title, scores in summary.items():
        row = [title.split(":")[0]]
        for name in names:
            score = scores.get(name)
            row.append("not installed" if score is None else f"{score[0]:.2f} dB, {score[1]:.2f} s")
        rows.append(row)
    print_table(f"summary: PSNR of the fused gray against the all-in-focus gray, seconds per stack ({machine})",
                ["set"] + names, rows)


# ----------------------------------------------------------------------------- light fields

def light_field_sets(root, num_slices, cache):
    """{title: [(slices, centre view gray [0,1], focus index)]} for every light field under ``root``.

    Stacks are built once by make_datasets/lightfield.py and kept under
    ``cache`` (in its released layout), keyed by the views' names, sizes and
    times and the number of planes, so that a rerun reads them back.
    """
    root = Path(root)
    if not root.is_dir():
        print(f"light-field sets skipped: no folder {root}")
        return {}
    sets = {}
    for folder in lightfield.find_light_fields(root):
        views = sorted(p for p in folder.iterdir() if p.is_file())
        key = hashlib.sha256(repr([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in views]
                                  + [num_slices]).encode()).hexdigest()[:12]
        built = Path(cache) / f"{folder.name}-{num_slices}-{key}"
        if not (built / "dof_stack" / folder.name).is_dir() or not (built / "planes" / f"{folder.name}.txt").is_file():
            print(f"building the {num_slices}-slice stack of {folder.name} (cached in {built})")
            result = lightfield.light_field_stack(folder, num_slices, progress=tqdm)
            write_truth_stack(built, folder.name, result)
        slices, _ = read_stack(built / "dof_stack" / folder.name)
        centre = read_image(built / "AiF" / f"{folder.name}.png")
        index = np.rint(read_image(built / "quantized_depth" / f"{folder.name}.png") * ((num_slices - 1) / 255.0))
        h, w = centre.shape[:2]
        title = f"light field {folder.name}: {num_slices} planes, {w}x{h}, centre view as ground truth"
        sets[title] = [(slices, to_gray_float(centre), index.astype(np.int64))]
    return sets


# ----------------------------------------------------------------------------- real stacks

def sharpness(gray: np.ndarray):
    """(mean gradient magnitude, Laplacian variance) of a gray image in [0, 1], on the 0..255 scale."""
    g = gray.astype(np.float32) * 255
    gx, gy = cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1)
    return float(np.sqrt(gx ** 2 + gy ** 2).mean()), float(cv2.Laplacian(g, cv2.CV_32F).var())


def real_scenes(root):
    root = Path(root)
    return sorted((p for p in root.glob("*/dof_stack/*") if p.is_dir()), key=lambda p: natural_sort_key(str(p)))


def downscale(images, max_side):
    h, w = images[0].shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return images
    size = (max(32, round(w * scale)), max(32, round(h * scale)))
    return [cv2.resize(im, size, interpolation=cv2.INTER_AREA) for im in images]


def labelled(gray, label):
    tile = cv2.cvtColor(to_integer_image(gray, np.uint8), cv2.COLOR_GRAY2BGR)
    cv2.putText(tile, label, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(tile, label, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def run_real(fusers, args):
    scenes = real_scenes(args.real_root)
    if not scenes:
        print(f"\nreal stacks skipped: none under {args.real_root}")
        return
    figures = ensure_output_dir(args.figures_dir)
    rows = []
    order = {"official": 1, "ours": 2, "argmax": 3}
    for scene in scenes:
        try:
            images, _ = read_stack(scene)
        except InputError as exc:
            print(f"skipping {scene}: {exc}")
            continue
        images = downscale(images, args.real_max_side)
        tiles = {0: labelled(to_gray_float(images[len(images) // 2]), "input (middle slice)")}
        row = [f"{scene.parents[1].name}/{scene.name}", str(len(images))]
        for name, fuse in fusers:
            if fuse is None:
                row.append("not installed")
                continue
            fused, _ = fuse(images)
            grad, lap = sharpness(fused)
            row.append(f"{grad:.2f} / {lap:.0f}")
            if name in order:
                tiles[order[name]] = labelled(fused, name)
        rows.append(row)
        picture = np.hstack([tiles[k] for k in sorted(tiles)])
        write_image(figures / f"{scene.parents[1].name}__{scene.name}.png", picture)
    print_table(f"real stacks (longer side <= {args.real_max_side} px): mean gradient / Laplacian variance "
                "of the fused gray, higher = sharper; pictures in " + str(figures),
                ["scene", "N"] + [name for name, _ in fusers], rows)


def machine_name():
    """CPU model and thread count, for the summary's title."""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {torch.get_num_threads()} torch thread(s)"


def main(args):
    if args.lightfield_slices < 2:
        raise InputError(f"--lightfield_slices must be at least 2, got {args.lightfield_slices}")
    torch.set_num_threads(args.threads)
    fusers = make_fusers(args)
    print("fusers: " + ", ".join(name for name, _ in fusers))
    sets = ground_truth_sets(args.blur, args.slices, tuple(args.crop), args.num_crops)
    sets.update(light_field_sets(args.lightfields, args.lightfield_slices, args.lightfield_cache))
    summary = run_ground_truth(fusers, sets)
    if not args.no_real:
        run_real(fusers, args)
    print_summary(summary, fusers, machine_name())
    return summary


if __name__ == "__main__":
    run_cli(main, get_args_parser())
