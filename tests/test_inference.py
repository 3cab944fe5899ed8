"""inference.py: where each decoding runs (network size or input size)."""
import numpy as np
import pytest

from conftest import textured_stack
from fusion import FusionCard
from inference import FusionResult, fuse_images, render_outputs
from model import load_model
from utils import to_gray_float

BLEND = FusionCard(index_rule="argmax", fusion_temperature=1.0)


@pytest.fixture(scope="module")
def random_model(random_weights):
    return load_model(random_weights, "cpu")


def test_blend_of_identical_slices_is_that_slice_at_an_odd_size(random_model):
    # 40 x 48 is not a multiple of 32: resampling the fused image back would change it
    slice_ = textured_stack(num_slices=1, height=40, width=48)[0]
    result = fuse_images(random_model, BLEND, [slice_] * 3)
    np.testing.assert_allclose(result.fused_gray, to_gray_float(slice_), atol=1e-6)


def test_blend_is_decoded_with_the_weights_it_reports(random_model):
    slices = textured_stack(num_slices=4, height=40, width=48)
    result = fuse_images(random_model, BLEND, slices)
    gray = np.stack([to_gray_float(s) for s in slices])
    assert result.weights.shape == gray.shape
    np.testing.assert_allclose(result.fused_gray, (result.weights * gray).sum(axis=0), atol=1e-5)


def test_memory_guard_says_nothing_when_the_image_fits():
    from inference import WHOLE_IMAGE_BYTES_PER_SAMPLE, memory_guard
    assert memory_guard(1000, available=1000 * WHOLE_IMAGE_BYTES_PER_SAMPLE * 2) is None


def test_memory_guard_tiles_a_stack_too_big_for_a_fake_budget(random_model, monkeypatch, capsys):
    import inference
    slices = textured_stack(num_slices=3, height=64, width=64)
    whole = fuse_images(random_model, BLEND, slices)
    budget = 1024 ** 3                   # a fake 1 GiB machine, and a per-pixel cost that overflows it
    monkeypatch.setattr(inference, "WHOLE_IMAGE_BYTES_PER_SAMPLE", budget // (3 * 64 * 64))
    calls = []
    real_tiled = inference.tiled_fuse

    def spy(*args, **kwargs):
        calls.append(kwargs["max_memory"])
        return real_tiled(*args, **kwargs)
    monkeypatch.setattr(inference, "available_bytes", lambda: budget)
    monkeypatch.setattr(inference, "tiled_fuse", spy)
    tiled = fuse_images(random_model, BLEND, slices)
    line = capsys.readouterr().out.strip()
    assert calls == [0.8]
    assert line.startswith("memory:") and "tile by tile" in line and "\n" not in line
    assert np.mean(tiled.index == whole.index) >= 0.99


def test_tiled_blend_at_an_odd_size_says_what_it_does_otherwise(random_model, capsys, monkeypatch):
    import tiling
    slices = textured_stack(num_slices=3, height=40, width=48)
    fuse_images(random_model, BLEND, slices, max_memory=2.0)       # the exact path decodes at 48 x 40
    assert "tiled:" not in capsys.readouterr().out
    monkeypatch.setattr(tiling, "plan_half_resolution", lambda *args, **kwargs: None)   # context tiles
    result = fuse_images(random_model, BLEND, slices, max_memory=2.0)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line for line in lines if line.startswith("tiled:") and "64x64" in line and "48x40" in line]
    assert result.fused_gray.shape == (40, 48)
    fuse_images(random_model, BLEND, textured_stack(num_slices=3, height=64, width=64), max_memory=2.0)
    assert "tiled:" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- render_outputs


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_gray_outputs_are_rounded_to_the_nearest_level(random_model, dtype):
    """Truncation left the fused gray image half a level dark on average."""
    slices = textured_stack(num_slices=4, height=48, width=64, dtype=dtype)
    result = fuse_images(random_model, BLEND, slices)
    top = np.iinfo(dtype).max
    exact = np.clip(result.fused_gray, 0, 1).astype(np.float64) * top
    outputs = render_outputs(result, slices, depth_bits=16 if dtype == np.uint16 else 8)
    gray = outputs["fused_gray"].astype(np.float64)
    assert outputs["fused_gray"].dtype == dtype
    assert abs(gray.mean() - exact.mean()) < 0.1
    assert np.abs(gray - exact).max() <= 0.5 + 1e-6 * top
    depth, depth_top = outputs["depth_map"].astype(np.float64), np.iinfo(outputs["depth_map"].dtype).max
    assert np.abs(depth - result.depth.astype(np.float64) * depth_top).max() <= 0.5 + 1e-3


def test_the_released_decoding_keeps_the_released_truncation(random_model):
    """tests/test_parity.py compares the released script's pictures, which truncate; the released card keeps them."""
    slices = textured_stack(num_slices=8, height=40, width=48)
    result = fuse_images(random_model, FusionCard(), slices)
    outputs = render_outputs(result, slices)
    np.testing.assert_array_equal(outputs["fused_gray"], (np.clip(result.fused_gray, 0, 1) * 255).astype(np.uint8))
    np.testing.assert_array_equal(outputs["depth_index_vis"], (result.index * (255 / 7)).astype(np.uint8))
    assert outputs["depth_colormap"].shape == (40, 48, 3)                       # the released picture
    assert render_outputs(result, slices, legend=True)["depth_colormap"].shape[1] > 48


def test_outputs_chooses_what_is_rendered(random_model, monkeypatch):
    import inference
    slices = textured_stack(num_slices=3, height=40, width=48)
    result = fuse_images(random_model, BLEND, slices)
    monkeypatch.setattr(inference, "fuse_colour", lambda *a: pytest.fail("the colour image was not asked for"))
    assert list(render_outputs(result, slices, outputs=("depth_index", "fused_gray"))) == ["depth_index", "fused_gray"]


@pytest.mark.parametrize("slices, dtype", [(2, np.uint8), (256, np.uint8), (257, np.uint16), (70000, np.uint32)])
def test_the_index_is_stored_in_the_smallest_type_that_holds_it(slices, dtype):
    index = np.array([[0, slices - 1]])
    result = FusionResult(np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32), index, slices)
    for reverse in (False, True):
        stored = render_outputs(result, [np.zeros((1, 2), np.uint8)], reverse, outputs=("depth_index",))["depth_index"]
        assert stored.dtype == dtype
        np.testing.assert_array_equal(stored, index[:, ::-1] if reverse else index)


def test_the_colour_scale_is_the_default_beside_a_decoding_of_our_own(random_model):
    slices = textured_stack(num_slices=3, height=40, width=48)
    result = fuse_images(random_model, BLEND, slices)
    with_scale = render_outputs(result, slices)["depth_colormap"]
    plain = render_outputs(result, slices, legend=False)["depth_colormap"]
    assert plain.shape == (40, 48, 3) and with_scale.shape[1] > 48
    np.testing.assert_array_equal(with_scale[:40, :48], plain)
