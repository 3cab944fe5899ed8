"""The fast and tiled inference paths give the straightforward path's numbers."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import DATA, OFFICIAL_WEIGHTS, PARITY, REPO, requires_official
from fast_inference import fast_forward
from fusion import FusionCard
from inference import DEFAULT_MODEL, fuse_images
from model import load_model
from tiling import tiled_fuse

WEIGHTS = OFFICIAL_WEIGHTS
CASES_FILE = PARITY / "network_cases.npz"
CASES = ("random_n3_64x96", "pair_n2_96x128", "moto_n8_128x160", "moto_n16_64x64")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(official_model):
    return official_model


@pytest.fixture(scope="module")
def cases():
    if not CASES_FILE.exists():
        pytest.skip(f"parity cases not found at {CASES_FILE}")
    return np.load(CASES_FILE)


def tiled_forward(model, stack, **options):
    """The tiled path with the released decoding -> (fused (H', W'), depth (H', W'), index (H', W'))."""
    result = tiled_fuse(model, FusionCard(), stack, **options)
    return result.fused[0, 0], result.depth[0, 0], result.index[0]


def psnr(a, b):
    return 10 * np.log10(1.0 / max(float(np.mean((np.asarray(a) - np.asarray(b)) ** 2)), 1e-20))


@pytest.mark.parametrize("name", CASES)
def test_fast_path_matches_released(model, cases, name):
    x = torch.from_numpy(cases[f"{name}__x"])
    fused, depth, index = fast_forward(model, x)
    assert np.abs(depth.numpy() - cases[f"{name}__depth"]).max() <= 1e-5
    assert (index.numpy() == cases[f"{name}__index"]).mean() >= 0.999
    with torch.inference_mode():
        _, ref_depth, _ = model(x)
    assert torch.allclose(depth, ref_depth, atol=1e-5)


def test_half_precision_gru_agrees(model, cases):
    # fp16 is what a GPU would run; measured >= 99.85% on every parity case.
    for name in CASES:
        x = torch.from_numpy(cases[f"{name}__x"])
        _, _, index = fast_forward(model, x, precision="fp16")
        assert (index.numpy() == cases[f"{name}__index"]).mean() >= 0.995, name


def test_bf16_stays_close(model, cases):
    # bf16 keeps 8 mantissa bits: measured 98.3% on the hardest case (N=16).
    x = torch.from_numpy(cases["moto_n8_128x160__x"])
    _, depth, index = fast_forward(model, x, precision="bf16")
    assert (index.numpy() == cases["moto_n8_128x160__index"]).mean() >= 0.98
    assert psnr(depth.numpy(), cases["moto_n8_128x160__depth"]) >= 35


def test_one_tile_is_the_whole_image(model, cases):
    x = torch.from_numpy(cases["moto_n8_128x160__x"])
    fused, depth, index = tiled_forward(model, x[0], tile=160)
    assert np.abs(depth.numpy() - cases["moto_n8_128x160__depth"][0, 0]).max() <= 1e-5
    assert (index.numpy() == cases["moto_n8_128x160__index"][0]).mean() >= 0.999


def test_small_tiles_stay_close_to_whole(model, cases):
    # 2 x 3 tiles of 64 px with image-wide statistics: drift from the halo only.
    x = torch.from_numpy(cases["moto_n8_128x160__x"])
    fused, depth, index = tiled_forward(model, x[0], tile=64, halo=64)
    ref_fused, ref_depth = cases["moto_n8_128x160__fused"][0, 0], cases["moto_n8_128x160__depth"][0, 0]
    assert (index.numpy() == cases["moto_n8_128x160__index"][0]).mean() >= 0.97
    assert psnr(fused.numpy(), ref_fused) >= 40
    assert psnr(depth.numpy(), ref_depth) >= 35


def test_uint8_stack_not_multiple_of_32_matches_float(model):
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 256, size=(3, 50, 70), dtype=np.uint8)
    gray = torch.from_numpy(stack.astype(np.float32) / 255)
    a = tiled_forward(model, stack, tile=64)
    b = tiled_forward(model, gray, tile=64)
    assert torch.equal(a[2], b[2]) and torch.allclose(a[1], b[1], atol=1e-6)
    from utils import resize_to_multiple
    fused, depth, index = fast_forward(model, resize_to_multiple(gray[None]))
    assert (a[2] == index[0]).float().mean() >= 0.999


def _peak_rss_mb(size):
    code = (f"import sys, resource, numpy as np, torch; sys.path.insert(0, {str(REPO)!r}); "
            "torch.set_num_threads(1); from model import load_model; from tiling import tiled_fuse; "
            "from fusion import FusionCard; "
            f"m = load_model({str(WEIGHTS)!r}); s = np.random.default_rng(0).integers(0, 256, (3, {size}, {size}), "
            "dtype=np.uint8); tiled_fuse(m, FusionCard(), s, tile=64, halo=32, stat_passes=1, stats_tile=128); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


@pytest.mark.slow
@requires_official
def test_tiled_memory_does_not_grow_with_image():
    small, large = _peak_rss_mb(256), _peak_rss_mb(768)
    # 9x the pixels: only the outputs (16 bytes per pixel) and the uint8 stack may grow.
    grown_outputs = (768 ** 2 - 256 ** 2) * (16 + 3) / 2 ** 20
    assert large - small <= grown_outputs + 40, (small, large)


def test_tiled_gru_is_exact(model):
    # Tiles of 24 px on a 40 x 56 image with 7 slices: the step-by-step halo
    # (2 px per step) reaches past neighbouring tiles and the image borders.
    from fast_inference import gru_logits
    bigru = model.layer_interaction.layer_interaction_depth
    features = torch.rand(7, 8, 40, 56, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = bigru(features[None]).amax(dim=2)[0]
        whole = gru_logits(bigru, features, tile=64)
        tiled = gru_logits(bigru, features, tile=24, workers=2)
    assert torch.allclose(whole, reference, atol=1e-5)
    assert torch.allclose(tiled, whole, atol=1e-6)
    assert torch.get_num_threads() == 1          # the worker threads restored the setting


def test_two_workers_match_released(model, cases):
    # One thread per slice in the feature extractor and per GRU tile (128 px: 2 tiles here).
    x = torch.from_numpy(cases["moto_n8_128x160__x"])
    _, depth, index = fast_forward(model, x, workers=2)
    assert np.abs(depth.numpy() - cases["moto_n8_128x160__depth"]).max() <= 1e-5
    assert (index.numpy() == cases["moto_n8_128x160__index"]).mean() >= 0.999
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("chunk", [1, 8])
def test_feature_chunk_does_not_change_the_result(model, cases, chunk):
    # GPUs take every slice in one chunk by default, CPUs two: each slice's
    # statistics are its own, so the chunk must not matter.
    x = torch.from_numpy(cases["moto_n8_128x160__x"])
    _, depth, index = fast_forward(model, x, chunk=chunk, workers=1)
    assert np.abs(depth.numpy() - cases["moto_n8_128x160__depth"]).max() <= 1e-5
    assert (index.numpy() == cases["moto_n8_128x160__index"]).mean() >= 0.999


LEAVES = DATA / "stacks" / "JosephLewis_leaves" / "dof_stack" / "leaves"


@pytest.mark.skipif(not LEAVES.is_dir(), reason=f"real leaves stack not found at {LEAVES}")
def test_default_halo_meets_the_tiled_targets_on_a_real_stack(model):
    """Issue target: tiled against whole-image output, >= 99% index agreement and >= 45 dB."""
    import cv2
    from utils import read_stack, to_gray
    images, _ = read_stack(LEAVES)
    gray = np.stack([cv2.resize(to_gray(im), (320, 256), interpolation=cv2.INTER_AREA) for im in images])
    whole_fused, _, whole_index = fast_forward(model, torch.from_numpy(gray).float()[None] / 255)
    fused, _, index = tiled_forward(model, gray, tile=128)   # 2 x 3 tiles, default halo
    assert (index == whole_index[0]).float().mean().item() >= 0.99
    assert psnr(fused.numpy(), whole_fused[0, 0].numpy()) >= 45


def test_memory_the_caller_holds_counts_against_the_bound(model):
    from memory import GIB
    from utils import InputError
    stack = np.zeros((4, 64, 64), np.uint8)
    tiled_forward(model, stack, max_memory=2.0)                       # fits
    with pytest.raises(InputError):
        tiled_forward(model, stack, max_memory=2.0, reserved_bytes=2 * GIB)


@pytest.mark.slow
@requires_official
def test_peak_memory_stays_within_max_memory():
    """The bound a user gives is the process's peak resident memory, everything included
    (interpreter, torch, the stack, outputs): 24 slices of 640 x 640 under 1.1 GiB,
    two worker threads (each with its own allocator heap)."""
    bound = 1.1
    code = (f"import sys, resource, numpy as np, torch; sys.path.insert(0, {str(REPO)!r}); "
            "torch.set_num_threads(2); from model import load_model; from tiling import tiled_fuse; "
            "from fusion import FusionCard; "
            f"m = load_model({str(WEIGHTS)!r}); s = np.random.default_rng(0).integers(0, 256, (24, 640, 640), "
            f"dtype=np.uint8); tiled_fuse(m, FusionCard(), s, max_memory={bound}); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    peak = float(out.stdout.split()[-1])
    assert peak <= bound * 2 ** 30, f"peak RSS {peak / 2 ** 30:.2f} GiB over --max_memory {bound} GiB"


def test_tile_plan_is_the_largest_that_fits():
    from memory import GIB
    from tiling import _FIXED_BYTES, plan_tiles, tile_bytes
    from utils import InputError
    held = 3 * GIB
    side = plan_tiles((4000, 6016), 30, 8, held, feature_halo=160, gru_halo=64)
    budget = 8 * GIB - held - _FIXED_BYTES
    assert side % 32 == 0
    assert tile_bytes(side, 30, 160, 64) <= budget < tile_bytes(side + 32, 30, 160, 64)
    assert plan_tiles((256, 320), 8, 8, 0, 160, 32) == 320      # the whole image when it fits
    with pytest.raises(InputError, match="too small"):
        plan_tiles((4000, 6016), 30, 3.5, held, 160, 64)


def test_tiles_decode_with_the_shipped_card_like_the_whole_image():
    """The shipped card at 4 views (a blend in two bands with a focus prior) on 2 x 3 tiles of 64 px
    with a 32 px halo: each view with its own statistics, each blend with its halo; targets >= 99%
    index agreement with the whole image and >= 45 dB for the gray and the colour fused image
    (measured 99.4%, 97 and 75 dB; tiles that ignored the card: 91.4%, 48 dB)."""
    import cv2
    from fusion import fuse_colour
    from inference import weights_at_size
    from utils import read_stack
    images, _ = read_stack(REPO / "examples" / "coffee_stack")
    images = [cv2.resize(im, (160, 128), interpolation=cv2.INTER_AREA) for im in images[::2]]
    model, card = load_model(DEFAULT_MODEL), FusionCard.beside(DEFAULT_MODEL).with_overrides(views=4)
    assert card.views > 1 and card.fusion_temperature and card.two_bands and card.halo()
    whole = fuse_images(model, card, images)
    gray = np.stack([cv2.cvtColor(im, cv2.COLOR_BGR2GRAY) for im in images])
    tiled = tiled_fuse(model, card, gray, tile=64, halo=32)
    assert (tiled.index[0].numpy() == whole.index).mean() >= 0.99
    assert psnr(tiled.fused[0, 0].numpy(), whole.fused_gray) >= 45
    colour = fuse_colour(images, None, weights_at_size(tiled.weights[0], (128, 160)), card)
    whole_colour = fuse_colour(images, None, whole.weights, card)
    assert psnr(colour / 255.0, whole_colour / 255.0) >= 45


def test_view_boxes_name_the_same_pixels():
    from fusion import view
    from tiling import unview_box, view_box
    image = torch.arange(6 * 10).reshape(1, 6, 10)
    box = (1, 4, 2, 7)
    for k in range(8):
        seen = view_box(box, k, (6, 10))
        assert torch.equal(view(image, k)[:, seen[0]:seen[1], seen[2]:seen[3]], view(image[:, 1:4, 2:7], k)), k
        assert unview_box(seen, k, (6, 10)) == box


def test_exact_tiles_give_the_whole_image_logits():
    """The exact path (whole-image extractor at half resolution, GRU in tiles grown by its reach) on
    3 x 4 tiles of 64 px and the shipped card at 4 views: the whole image's logits up to float rounding
    (measured 2.0e-4 at most: ebn1's statistics are summed over strips in float64, F.group_norm's in
    float32, and t_1's relative difference of 2e-7 grows through the network)."""
    import cv2
    from inference import focus_logits
    from tiling import exact_logits
    from utils import read_stack
    images, _ = read_stack(REPO / "examples" / "coffee_stack")
    gray = np.stack([cv2.resize(cv2.cvtColor(im, cv2.COLOR_BGR2GRAY), (256, 192), interpolation=cv2.INTER_AREA)
                     for im in images[::2]])
    model, card = load_model(DEFAULT_MODEL), FusionCard.beside(DEFAULT_MODEL).with_overrides(views=4)
    assert card.views == 4
    whole = focus_logits(model, card, torch.from_numpy(gray).float()[None] / 255)[0]
    threads = torch.get_num_threads()
    with torch.inference_mode():
        logits_on, _ = exact_logits(model, card, gray, (192, 256), 64, 2, 2, "fp32", None)
        tiled = logits_on(None, (0, 192, 0, 256))
    assert torch.get_num_threads() == threads                # the one-thread jobs restored it
    assert (tiled - whole).abs().max().item() <= 1e-3
    assert (tiled.argmax(0) == whole.argmax(0)).float().mean().item() >= 0.999


def test_exact_tiles_decode_a_blend_at_the_input_size(monkeypatch):
    """Off the 32 grid (300 x 200, the network at 320 x 224) the exact path decodes the card's blend
    and guided depth at the input size from the logits resized back, tile by tile: the whole
    image's outputs. Decoded at the network's size and resized, the index matched at 94% (step)."""
    import cv2
    import tiling
    from inference import fuse_images
    from utils import read_stack
    images, _ = read_stack(REPO / "examples" / "coffee_stack")
    images = [cv2.resize(im, (300, 200), interpolation=cv2.INTER_AREA) for im in images[::2]]
    model, card = load_model(DEFAULT_MODEL), FusionCard.beside(DEFAULT_MODEL)
    assert card.fusion_temperature and card.refines_depth
    whole = fuse_images(model, card, images)
    monkeypatch.setattr(tiling, "plan_half_resolution", lambda *args, **kwargs: (64, 1))   # 4 x 5 GRU tiles
    tiled = fuse_images(model, card, images, max_memory=4.0)
    assert tiled.fused_gray.shape == whole.fused_gray.shape == (200, 300)
    assert np.mean(tiled.index == whole.index) >= 0.999
    assert np.abs(tiled.fused_gray - whole.fused_gray).max() <= 1e-3
    assert np.abs(tiled.depth - whole.depth).max() <= 1e-3
    assert np.abs(tiled.weights - whole.weights).max() <= 1e-3


def test_exact_path_plan_fits_or_gives_way():
    from memory import GIB
    from fast_inference import GRU_TILE_SIDE
    from tiling import _FIXED_BYTES, half_resolution_bytes, plan_half_resolution, plan_tiles
    size, held = (1152, 1536), 148 * 2 ** 20          # 6 slices of 1521 x 1141 and the blend at --max_memory 1
    side, fe_workers = plan_half_resolution(size, 6, 1.0, held, workers=2, fusion_halo=8, blends=True)
    assert side % 32 == 0 and (side % GRU_TILE_SIDE == 0 or side < GRU_TILE_SIDE) and fe_workers in (1, 2)   # whole GRU tiles
    budget = GIB - held - _FIXED_BYTES
    assert half_resolution_bytes(side, size, 6, fe_workers, 2, 8, True) <= budget
    assert half_resolution_bytes(side + 128, size, 6, 1, 2, 8, True) > budget
    assert plan_half_resolution(size, 6, None, held) == (1536, 1)   # no bound: the whole image, one tile
    # 24 MP x 30 slices under 8 GiB: z and the logits alone (8.7 GB) do not fit; context tiles do.
    assert plan_half_resolution((4000, 6016), 30, 8, 3 * GIB, workers=2) is None
    assert plan_tiles((4000, 6016), 30, 8, 3 * GIB, 160, 64) >= 32
