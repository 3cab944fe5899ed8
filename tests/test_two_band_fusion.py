"""Two-band blend (model.blend_slices): detail by the fusion weights, base by the weights smoothed."""
import argparse
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from inference import add_model_arguments, color_blend, fuse_gray_batch, model_from_args, render_outputs
from model import (CheckpointError, StackMFFV2, blend_slices, gaussian_blur, load_model, read_inference_settings,
                   write_model_card)

REPO = Path(__file__).resolve().parents[1]


def seam_scene(offset_left=0.2, offset_right=-0.1, size=(24, 40), edge=20):
    """Two slices that share a texture but differ by a constant offset each (the low-frequency
    spill of physical blur), and weights that switch from slice 0 to slice 1 at column ``edge``."""
    texture = torch.rand(1, 1, *size, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    stack = torch.cat([texture + offset_left, texture + offset_right], dim=1)     # (1, 2, H, W)
    weights = torch.zeros(1, 2, *size)
    weights[..., :edge] = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    weights[..., edge:] = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    return texture, stack, weights, (offset_left, offset_right)


@pytest.mark.parametrize("sigma, size", [(0.5, (17, 23)), (0.7, (9, 31)), (2.0, (40, 33)), (2.0, (3, 2))])
def test_gaussian_blur_is_opencvs_with_replicated_borders(sigma, size):
    # The same Gaussian (radius 4 sigma, at least 1) and border rule as OpenCV, also on images
    # smaller than the kernel, for every plane of a (B, C, H, W) batch.
    planes = np.random.default_rng(3).random((2, 3, *size), dtype=np.float32)
    radius = max(1, round(4 * sigma))
    expected = np.stack([[cv2.GaussianBlur(p, (2 * radius + 1, 2 * radius + 1), sigma, sigmaY=sigma,
                                           borderType=cv2.BORDER_REPLICATE) for p in batch] for batch in planes])
    blurred = gaussian_blur(torch.from_numpy(planes), sigma)
    assert blurred.dtype == torch.float32 and blurred.shape == (2, 3, *size)
    np.testing.assert_allclose(blurred.numpy(), expected, atol=2e-6, rtol=0)


def test_the_base_takes_the_smoothed_weights_and_the_detail_the_sharp_ones():
    texture, stack, weights, offsets = seam_scene()
    one_band = blend_slices(stack, weights)
    step = torch.tensor(offsets).view(1, 2, 1, 1)
    torch.testing.assert_close(one_band, texture + (weights * step).sum(1, keepdim=True))      # a hard seam
    two_band = blend_slices(stack, weights, base_sigma=2.0, base_weight_sigma=1.5)
    # The texture is shared, so it comes through whole; only the offsets, a base-band difference,
    # follow the smoothed weights: the seam becomes a ramp.
    smooth = gaussian_blur(weights, 1.5)
    torch.testing.assert_close(two_band, texture + (smooth * step).sum(1, keepdim=True), atol=1e-5, rtol=0)
    ramp = (two_band - texture)[0, 0, 0]
    assert 0.2 > ramp[18] > ramp[19] > ramp[20] > ramp[21] > -0.1
    torch.testing.assert_close(ramp[:12], torch.full((12,), 0.2), atol=1e-4, rtol=0)   # far from the edge: exact


def test_two_bands_reduce_to_one_without_edges_or_without_smoothing():
    torch.manual_seed(2)
    stack = torch.rand(2, 4, 16, 20)
    uniform = torch.softmax(torch.randn(2, 4, 1, 1), dim=1).expand(2, 4, 16, 20)   # the same at every pixel
    torch.testing.assert_close(blend_slices(stack, uniform, 2.0, 1.0), blend_slices(stack, uniform), atol=1e-6, rtol=0)
    weights = torch.softmax(torch.randn(2, 4, 16, 20), dim=1)
    plain = (weights * stack).sum(1, keepdim=True)
    assert torch.equal(blend_slices(stack, weights), plain)
    assert torch.equal(blend_slices(stack, weights, 2.0, 0.0), plain)
    assert torch.equal(blend_slices(stack, weights, 0.0, 1.0), plain)
    # Identical slices fuse to that slice whatever the weights do.
    same = stack[:, :1].expand(2, 4, 16, 20)
    torch.testing.assert_close(blend_slices(same, weights, 2.0, 0.7), stack[:, :1], atol=1e-6, rtol=0)


def test_the_model_blends_in_two_bands_and_the_colour_blend_matches_the_gray_one():
    rng = np.random.default_rng(3)
    gray = [cv2.GaussianBlur(rng.integers(0, 256, (40, 50), dtype=np.uint8), (0, 0), s) for s in (0.5, 1.5, 3.0)]
    colour = [cv2.cvtColor(g, cv2.COLOR_GRAY2BGR) for g in gray]
    torch.manual_seed(0)
    net = StackMFFV2(index_rule="argmax", fusion_temperature=0.5, base_sigma=2.0, base_weight_sigma=0.7).eval()
    x = torch.from_numpy(np.stack(gray)).float()[None] / 255
    logits = torch.randn(1, 3, 40, 50)
    fused, _, _, weights = net.outputs(x, logits)
    torch.testing.assert_close(fused, blend_slices(x, weights, 2.0, 0.7))
    assert (fused - (weights * x).sum(1, keepdim=True)).abs().max() > 1e-3     # the second band did something
    # The colour path repeats the gray blend per channel, slice by slice (to a gray level of rounding).
    blended = color_blend(colour, weights[0].numpy(), 2.0, 0.7)
    expected = np.clip(fused[0, 0].numpy() * 255, 0, 255)
    assert blended.dtype == np.uint8 and np.abs(blended[..., 2].astype(float) - expected).max() <= 0.51
    assert np.array_equal(color_blend(gray, weights[0].numpy(), 2.0, 0.7)[..., None].repeat(3, axis=2), blended)
    # Rendering takes the bands from the result, which takes them from the model.
    result = fuse_gray_batch(net, x)[0]
    assert (result.base_sigma, result.base_weight_sigma) == (2.0, 0.7)
    rendered = render_outputs(result, colour)["color_fused"]
    assert np.array_equal(rendered, color_blend(colour, result.weights, 2.0, 0.7))
    assert not np.array_equal(rendered, color_blend(colour, result.weights))


def test_bands_come_from_the_model_card_and_the_flags(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(StackMFFV2().state_dict(), path)
    assert read_inference_settings(path).base_sigma == 0                      # no card: one band (released pick)
    write_model_card(path, {"index_rule": "argmax", "fusion_temperature": 1.0, "base_sigma": 2, "base_weight_sigma": 0.7})
    settings = read_inference_settings(path)
    assert (settings.base_sigma, settings.base_weight_sigma) == (2.0, 0.7)
    assert load_model(path).base_weight_sigma == 0.7 and load_model(path, base_sigma=0).base_sigma == 0
    parser = add_model_arguments(argparse.ArgumentParser())
    model = model_from_args(parser.parse_args(["--model_path", str(path), "--base_weight_sigma", "0"]), "cpu")
    assert (model.base_sigma, model.base_weight_sigma, model.fusion_temperature) == (2.0, 0.0, 1.0)
    for key in ("base_sigma", "base_weight_sigma"):
        write_model_card(path, {"fusion_temperature": 1.0, key: -1})
        with pytest.raises(CheckpointError, match=key):
            load_model(path)
    result = subprocess.run([sys.executable, "predict_one_stack.py", "--input_dir", str(tmp_path),
                             "--base_sigma", "-2"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "base_sigma must be a number >= 0" in result.stderr.strip().splitlines()[-1]
