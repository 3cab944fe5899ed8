"""The predict scripts' flags, defined once and without torch.

predict_one_stack.py, predict_datasets.py and predict_pair_datasets.py build
their parsers with ``predict_parser``: what applies to one stack applies to
a dataset of stacks (``--reverse``, ``--depth_bits``, ``--outputs``, the
model and its card, ...). The model card's settings (``CardSettings``,
which ``fusion.FusionCard`` extends) live here with their help texts, and
``add_card_arguments`` makes one flag of each: a new setting is a new flag.
Nothing here imports torch, so --help answers at once; the scripts import
the heavy modules in ``main``.
"""
import argparse
import math
import numbers
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from cli import ArgumentParser

# The weights every predict script uses unless --model_path says otherwise:
# trained by this project (docs/weights.md); its model card beside it
# (stackmffv2_synthetic.json) says how to decode them (fusion.FusionCard).
DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "stackmffv2_synthetic.pth"

# The six released outputs: file-name stem (predict_one_stack.py and --outputs),
# folder (the dataset scripts) and file extension.
OUTPUT_KINDS = (
    ("fused_gray", "fused_images", ".png"),
    ("depth_map", "depth_maps", ".png"),
    ("color_fused", "color_fused_images", ".png"),
    ("depth_colormap", "depth_colormaps", ".png"),
    ("depth_index", "depth_indices", ".npy"),
    ("depth_index_vis", "depth_indices_vis", ".png"),
)
OUTPUT_NAMES = tuple(stem for stem, _, _ in OUTPUT_KINDS)
# The kinds written in --output_format (OUTPUT_FORMATS); the others stay as above.
FUSED_KINDS = ("fused_gray", "color_fused")
# --output_format: file suffix of the fused pictures (depth pictures and the index stay PNG / .npy)
OUTPUT_FORMATS = {"png": ".png", "tiff": ".tif", "jpeg": ".jpg"}
# --tiff_compression: OpenCV's IMWRITE_TIFF_COMPRESSION values
TIFF_COMPRESSIONS = {"none": 1, "lzw": 5, "deflate": 8, "packbits": 32773}
# Bits of the depth map picture: 8 as released, 16 to keep a continuous depth rule's sub-slice levels.
DEPTH_BITS = (8, 16)
# What the GRU convolutions run in (fast_inference.py).
PRECISIONS = ("fp32", "bf16", "fp16")
# Registration.py's methods, which --align offers before fusing.
ALIGN_METHODS = ("auto", "released", "ecc")


# ----------------------------------------------------------------------------- the model card's settings

# How the slice index is read from the focus logits:
# - "minmax_round" (released): round(min-max normalised expected slice * (N-1));
# - "argmax": the slice of highest focus logit at every pixel; its depth output
#   is index / (N - 1), so depth map and fused image agree.
INDEX_RULES = ("minmax_round", "argmax")

# How the depth output is read:
# - "index" (released): the index rule's depth above;
# - "guided": the index smoothed by a guided filter (guide: the fused gray image) whose fit trusts
#   each pixel by how sure the decoding is there (``fusion.refined_depth``): continuous, sub-slice at
#   depth edges and slopes, and flat regions take their depth from the texture around them, so no speckle.
DEPTH_RULES = ("index", "guided")

# Test-time views: the focus logits of the stack as given (1), also mirrored
# left-right (2), also up-down and both (4), and the same four transposed (8),
# each mapped back and averaged. The network is not equivariant to these
# mirrors, so the views disagree where it is unsure; their mean is steadier.
TEST_VIEWS = (1, 2, 4, 8)

# Settings that refine a blend; a pick by index (temperature 0) has no use for them.
BLEND_SETTINGS = ("focus_prior", "depth_window", "base_sigma", "base_weight_sigma")
# Settings of the scale the network sees a stack at (working_scale.py).
SCALE_SETTINGS = ("network_blur", "network_min_side")


def _number(help_text):
    return field(default=0.0, metadata={"help": help_text})


@dataclass(frozen=True)
class CardSettings:
    """The settings of a model card, validated when made (ValueError naming the setting); each
    field is a flag of the predict scripts (``add_card_arguments``) and a key of the card's JSON.
    ``fusion.FusionCard`` adds what the decoding derives from them."""
    index_rule: str = field(default="minmax_round", metadata={
        "help": "how the slice index is read from the focus logits", "choices": INDEX_RULES})
    views: int = field(default=1, metadata={
        "help": "test-time views whose focus logits are averaged: 1 the stack as given, 2 also mirrored, "
                "4 also flipped up-down, 8 also transposed; costs that many passes", "choices": TEST_VIEWS})
    fusion_temperature: float = _number(
        "0 takes each pixel from the slice the index names (released); T > 0 blends the slices with "
        "softmax(focus logits / T) weights")
    focus_prior: float = _number(
        "p > 0 multiplies each slice's blend weight by its local sharpness (squared Laplacian) to the power p, "
        "so that among the slices the network finds likely the sharpest wins")
    depth_window: float = _number(
        "w > 0 keeps the blend within about w slices of the expected slice number, so that at the edge of a "
        "near object it takes the slices between the two depths")
    base_sigma: float = _number(
        "s > 0 blends in two bands: each slice's base (Gaussian blur of sigma s px) takes the blend weights "
        "smoothed by --base_weight_sigma, its detail the weights as they are, so seams at depth edges fade")
    base_weight_sigma: float = _number("px: the Gaussian that smooths the weights of the base band; 0: one band")
    depth_rule: str = field(default="index", metadata={
        "help": "the depth output: 'index' as the index rule reads it (released), 'guided' that index smoothed "
                "by the fused image where the decoding is unsure (continuous, no speckle in flat regions); "
                "the index output stays the index", "choices": DEPTH_RULES})
    network_blur: float = _number(
        "px: a stack whose estimated largest blur is wider than this is shrunk until it is about this wide, "
        "for the network alone (its logits are decoded at full resolution); 0 runs the network on the stack "
        "at its own size (released)")
    network_min_side: float = _number(
        "px: the shrunk stack keeps at least this long side, the context the network needs; 0: no bound")

    def __post_init__(self):
        if self.index_rule not in INDEX_RULES:
            raise ValueError(f"index_rule must be one of {INDEX_RULES}, got {self.index_rule!r}")
        if self.depth_rule not in DEPTH_RULES:
            raise ValueError(f"depth_rule must be one of {DEPTH_RULES}, got {self.depth_rule!r}")
        if isinstance(self.views, bool) or self.views not in TEST_VIEWS:
            raise ValueError(f"views must be one of {TEST_VIEWS}, got {self.views!r}")
        object.__setattr__(self, "views", int(self.views))
        for name in ("fusion_temperature",) + BLEND_SETTINGS + SCALE_SETTINGS:
            value = getattr(self, name)      # a JSON string that parses as a number is still refused
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")   # `not >=`: also NaN
            object.__setattr__(self, name, float(value))
        unused = [name for name in BLEND_SETTINGS if getattr(self, name)]
        if not self.fusion_temperature and unused:
            raise ValueError(f"{unused[0]} {getattr(self, unused[0]):g} has no effect with fusion_temperature 0 "
                             "(the fused image picks by index); give a temperature > 0 or leave it out")
        if self.network_blur and self.index_rule != "argmax":
            raise ValueError(f"network_blur {self.network_blur:g} needs index_rule argmax (the min-max of "
                             f"{self.index_rule} spans the whole image, which is decoded in strips)")

    @property
    def released(self) -> bool:
        """Whether every setting is the released one: the authors' decoding, whose pictures are
        written as their script writes them (truncated levels, the depth colormap without a scale)."""
        return all(getattr(self, f.name) == f.default for f in fields(self))


def card_argument_type(name: str):
    """An argparse type for card setting ``name``: its value, or one usage error saying what is wrong."""
    spec = next(f for f in fields(CardSettings) if f.name == name)
    wanted = f"one of {spec.metadata['choices']}" if "choices" in spec.metadata else "a number >= 0"

    def parse(text):
        try:
            value = spec.type(text)
            if "choices" not in spec.metadata:        # argparse checks the choices itself
                replace(CardSettings(fusion_temperature=1.0), **{name: value})   # the card's own checks
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {wanted}, got {text!r}") from None
        return value
    return parse


def add_card_arguments(group, default_note="the model card's, else the released value"):
    """One flag per CardSettings field (``--views``, ``--fusion_temperature``, ...), default None."""
    for f in fields(CardSettings):
        needs = "; needs a fusion temperature > 0" if f.name in BLEND_SETTINGS else ""
        group.add_argument(f"--{f.name}", type=card_argument_type(f.name), default=None,
                           choices=f.metadata.get("choices"),
                           help=f"{f.metadata['help']}{needs} (default: {default_note})")
    return group


# ----------------------------------------------------------------------------- flag groups

def memory_bound(text) -> float:
    """--max_memory: a number of GiB above 0, or one usage error."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of GiB above 0, got {text!r}")
    return value


def slice_step(text) -> int:
    """--every: a whole number of 1 or more, or one usage error (before any stack is read)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, not {text!r}")
    return value


def add_model_arguments(group):
    """Checkpoint, its card's settings, device, memory bound, precision."""
    group.add_argument("--model_path", type=str, default=str(DEFAULT_MODEL),
                       help="StackMFF-V2 checkpoint (default: the project's own weights, "
                            "weights/stackmffv2_synthetic.pth)")
    add_card_arguments(group)
    group.add_argument("--device", type=str, default=None,
                       help="cpu, cuda, cuda:1, mps (default: best available; under torchrun cuda:<LOCAL_RANK>)")
    group.add_argument("--max_memory", type=memory_bound, default=None, metavar="GIB",
                       help="fuse tile by tile so that memory stays within this many GiB (default: the whole "
                            "image at once, except on a CPU whose free memory is short of its estimated peak, "
                            "where it is tiled on its own and one line says so)")
    group.add_argument("--precision", type=str, default="fp32", choices=PRECISIONS,
                       help="fp16/bf16 run the GRU convolutions in half precision (for GPUs)")
    return group


def add_align_argument(group, default: str = "auto"):
    """--align: register the slices before fusing (Registration.align_stack)."""
    group.add_argument("--align", type=str, choices=("none",) + ALIGN_METHODS, default=default,
                       help="register the slices before fusing: auto corrects focus breathing and a moved camera "
                            "and leaves an aligned stack untouched; none fuses the slices as they are (released); "
                            "see docs/registration.md")


def add_exposure_argument(group):
    """--match_exposure (exposure.match_exposure)."""
    group.add_argument("--match_exposure", action="store_true",
                       help="scale every slice, channel by channel, onto the first slice's exposure and white "
                            "balance before fusing (for brackets whose brightness or colour drifts)")


def add_output_format_arguments(group):
    """--output_format, --jpeg_quality, --tiff_compression (read back by ``utils.output_format_from_args``)."""
    group.add_argument("--output_format", choices=tuple(OUTPUT_FORMATS), default="png",
                       help="format of the two fused images (PNG and TIFF keep 16 bits, JPEG is 8-bit); "
                            "they carry the first slice's EXIF and ICC profile (default: png)")
    group.add_argument("--jpeg_quality", type=int, default=None,
                       help="1 to 100, with --output_format jpeg (default: 95)")
    group.add_argument("--tiff_compression", choices=tuple(TIFF_COMPRESSIONS), default=None,
                       help="with --output_format tiff (default: lzw)")


def add_render_arguments(group):
    """Which outputs, and how the depth pictures read (inference.render_outputs)."""
    group.add_argument("--outputs", nargs="+", choices=OUTPUT_NAMES, default=list(OUTPUT_NAMES), metavar="NAME",
                       help=f"the outputs to write, any of {', '.join(OUTPUT_NAMES)} (default: all six; "
                            f"'--outputs color_fused' writes the fused colour image alone)")
    group.add_argument("--reverse", action="store_true",
                       help="save 1 - depth and N-1 - index (for stacks ordered far to near)")
    group.add_argument("--depth_bits", type=int, default=8, choices=DEPTH_BITS,
                       help="bits of depth_map: 8 (released) or 16, which keeps the sub-slice levels of "
                            "--depth_rule guided (default: 8)")
    group.add_argument("--legend", action=argparse.BooleanOptionalAction, default=None,
                       help="a colour scale beside the depth colormap: slice numbers, near and far as the stack's "
                            "order says (slice 1 nearest unless --reverse) (default: on, except with the released "
                            "decoding, whose picture stays as released)")


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one (a
    container or taskset may allow fewer than the machine has), else the count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers(cpus: int) -> int:
    """Reader processes beside the main one, which fuses: min(4, cpus - 1), 0 on one CPU."""
    return max(0, min(4, cpus - 1))


# ----------------------------------------------------------------------------- the three parsers

# What each predict script fuses, and where its outputs go unless -o says otherwise.
SCENES = {"stack": "./results", "stacks": "./results", "pairs": "./output_pair"}


def predict_parser(doc: str, scenes: str) -> ArgumentParser:
    """The parser of a predict script; ``scenes`` says what it fuses: 'stack' (predict_one_stack.py),
    'stacks' (predict_datasets.py) or 'pairs' (predict_pair_datasets.py)."""
    parser = ArgumentParser(description=doc)
    source = parser.add_argument_group("input")
    if scenes == "stack":
        source.add_argument("-i", "--input_dir", type=str, required=True,
                            help="folder of slices (natural file-name order; camera RAW files too), a multi-page "
                                 "TIFF or a video file (.mp4, .avi, .mov, .mkv)")
    else:
        source.add_argument("--test_root", type=str, required=True, help="folder holding the dataset folders")
        source.add_argument("--test_datasets", type=str, nargs="+", required=True,
                            help="dataset folder names under --test_root")
    if scenes != "pairs":                       # a pair has no slices to skip
        source.add_argument("--every", type=slice_step, default=1,
                            help="keep slices (video frames) 1, K+1, 2K+1, ... of every stack (default: 1, "
                                 "every slice)")
    add_align_argument(source, "none" if scenes == "pairs" else "auto")    # benchmark pairs come registered
    add_exposure_argument(source)

    out = parser.add_argument_group("output")
    if scenes == "stack":
        out.add_argument("-o", "--output_dir", type=str, default=SCENES[scenes], help="where the outputs go")
        out.add_argument("--fixed_names", action="store_true",
                         help="write fused_gray.png, depth_map.png, ... instead of names with a timestamp")
    else:
        out.add_argument("-o", "--output_dir", type=str, default=SCENES[scenes],
                         help="results go to <output_dir>/<run folder>/<dataset>/<kind>/<scene>.<ext>")
        out.add_argument("--run_name", type=str, default=None,
                         help="name of the run folder (default: results_<timestamp>); "
                              "give the same name again to resume with --skip_existing")
        out.add_argument("--skip_existing", action="store_true",
                         help="skip scenes whose outputs (those of --outputs) already exist; without --run_name, "
                              "continue the run folder of --output_dir written to last (a new one if it has none)")
    add_render_arguments(out)
    add_output_format_arguments(out)

    run = add_model_arguments(parser.add_argument_group("model and speed"))
    if scenes != "stack":
        run.add_argument("--batch_size", type=int, default=1,
                         help="stacks per forward pass (only stacks of one size and length share a batch)")
        cpus = available_cpus()
        run.add_argument("--num_workers", type=int, default=default_workers(cpus),
                         help=f"processes that read images (0: read in the main process); default min(4, CPUs - 1), "
                              f"{default_workers(cpus)} on this machine's {cpus} CPU(s)")
    return parser
