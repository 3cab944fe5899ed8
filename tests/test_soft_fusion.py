"""Soft fusion: the fused image blends the slices with softmax(logits / T) weights."""
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fast_inference import fast_outputs  # noqa: E402
from inference import color_blend, color_fuse, fuse_gray_batch, render_outputs  # noqa: E402
from model import (CheckpointError, StackMFFV2, focus_energy, gather_slices, load_model, read_inference_settings,  # noqa: E402
                   soft_fusion_weights, write_model_card)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_weights_sum_to_one_and_sharpen_into_the_argmax_pick():
    logits = torch.randn(2, 5, 6, 7, generator=torch.Generator().manual_seed(0))
    stack = torch.rand(2, 5, 6, 7)
    warm = soft_fusion_weights(logits, 1.0)
    torch.testing.assert_close(warm.sum(dim=1), torch.ones(2, 6, 7))
    assert warm.max() < 1 and warm.min() > 0
    cold = soft_fusion_weights(logits, 1e-4)
    picked = gather_slices(stack, logits.argmax(dim=1))
    torch.testing.assert_close((cold * stack).sum(dim=1, keepdim=True), picked)


def test_outputs_blend_the_slices_and_leave_index_and_depth_alone():
    torch.manual_seed(1)
    net = StackMFFV2(index_rule="argmax", fusion_temperature=0.5).eval()
    x = torch.rand(1, 3, 32, 32)
    logits = torch.randn(1, 3, 32, 32)
    fused, depth, index, weights = net.outputs(x, logits)
    torch.testing.assert_close(fused, (torch.softmax(logits / 0.5, dim=1) * x).sum(dim=1, keepdim=True))
    assert torch.equal(index, logits.argmax(dim=1))
    pick = StackMFFV2(index_rule="argmax").eval().outputs(x, logits)
    assert pick[3] is None and torch.equal(pick[2], index) and torch.equal(pick[1], depth)
    # Equal slices: any blend of them is the slice itself.
    same = x[:, :1].expand(1, 3, 32, 32)
    torch.testing.assert_close(net.outputs(same, logits)[0], x[:, :1])
    with pytest.raises(ValueError, match="fusion_temperature"):
        StackMFFV2(fusion_temperature=-1)


def test_fast_path_and_forward_agree_with_soft_fusion():
    torch.manual_seed(3)
    net = StackMFFV2(index_rule="argmax", views=2, fusion_temperature=0.1).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        fused, _, index, weights = net.outputs(x, net.focus_logits_of_views(x))
        assert torch.equal(net(x)[0], fused)
    fast_fused, _, fast_index, fast_weights = fast_outputs(net, x)
    assert (fast_index == index).float().mean() > 0.999
    torch.testing.assert_close(fast_weights, weights, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast_fused, fused, atol=1e-4, rtol=0)


def test_colour_blend_matches_the_gray_blend_and_the_pick():
    rng = np.random.default_rng(0)
    gray = [rng.integers(0, 256, (20, 24), dtype=np.uint8) for _ in range(3)]
    colour = [cv2.cvtColor(g, cv2.COLOR_GRAY2BGR) for g in gray]
    weights = rng.random((3, 20, 24)).astype(np.float32)
    weights /= weights.sum(axis=0)
    blended = color_blend(colour, weights)
    expected = np.rint(sum(w * g.astype(np.float32) for w, g in zip(weights, gray)))
    assert blended.dtype == np.uint8 and np.abs(blended[..., 1].astype(int) - expected).max() <= 1
    assert np.array_equal(color_blend(gray, weights)[..., None].repeat(3, axis=2), blended)
    index = rng.integers(0, 3, (20, 24))
    one_hot = np.stack([(index == k) for k in range(3)]).astype(np.float32)
    assert np.array_equal(color_blend(colour, one_hot), color_fuse(colour, index))


def test_rendered_colour_uses_the_weights_at_the_input_size():
    # 40 x 50 runs at 64 x 64 inside: the weights come back at 40 x 50 and still sum to 1.
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(3)]
    torch.manual_seed(0)
    net = StackMFFV2(index_rule="argmax", fusion_temperature=0.2).eval()
    gray = torch.from_numpy(np.stack([cv2.cvtColor(im, cv2.COLOR_BGR2GRAY) for im in images])).float()[None] / 255
    result = fuse_gray_batch(net, gray)[0]
    assert result.weights.shape == (3, 40, 50)
    np.testing.assert_allclose(result.weights.sum(axis=0), 1, atol=1e-5)
    colour = render_outputs(result, images)["color_fused"]
    assert np.array_equal(colour, color_blend(images, result.weights))
    tiled = fuse_gray_batch(net, gray, max_memory=2.0)[0]        # tiles pick by index
    assert tiled.weights is None


def test_temperature_comes_from_the_model_card_and_can_be_overridden(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(StackMFFV2().state_dict(), path)
    assert load_model(path).fusion_temperature == 0                 # no card: the released pick
    write_model_card(path, {"index_rule": "argmax", "fusion_temperature": 0.1})
    assert read_inference_settings(path) == ("argmax", 1, 0.1, 0.0, 0.0, 0.0, 0.0)
    assert load_model(path).fusion_temperature == 0.1
    assert load_model(path, fusion_temperature=0).fusion_temperature == 0
    for bad in (-0.5, "warm", True):
        write_model_card(path, {"fusion_temperature": bad})
        with pytest.raises(CheckpointError, match="fusion_temperature"):
            load_model(path)


def test_shipped_card_blends_and_the_cli_can_pick(tmp_path):
    stack = tmp_path / "stack"
    stack.mkdir()
    rng = np.random.default_rng(2)
    base = cv2.GaussianBlur(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), (0, 0), 1)
    for k, sigma in enumerate((0.1, 2.0, 4.0), start=1):
        cv2.imwrite(str(stack / f"{k}.png"), cv2.GaussianBlur(base, (0, 0), sigma) if sigma > 0.5 else base)
    outputs = {}
    for label, extra in (("card", []), ("pick", ["--fusion_temperature", "0"])):
        out = tmp_path / label
        subprocess.run([sys.executable, "predict_one_stack.py", "--input_dir", str(stack), "--output_dir", str(out),
                        "--fixed_names", *extra], cwd=REPO, check=True, capture_output=True, text=True)
        outputs[label] = (cv2.imread(str(out / "color_fused.png")), np.load(out / "depth_index.npy"))
    slices = [cv2.imread(str(stack / f"{k}.png")) for k in (1, 2, 3)]
    picked, index = outputs["pick"]
    assert np.array_equal(picked, color_fuse(slices, index))            # released: every pixel from one slice
    blended, card_index = outputs["card"]
    assert np.array_equal(card_index, index)                            # the blend leaves the index alone
    assert not np.array_equal(blended, picked)


def test_a_bad_temperature_is_one_usage_line(tmp_path):
    for bad in ("-1", "nan", "warm"):
        result = subprocess.run([sys.executable, "predict_one_stack.py", "--input_dir", str(tmp_path),
                                 "--fusion_temperature", bad], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "fusion_temperature must be a number >= 0" in result.stderr.strip().splitlines()[-1]


def test_focus_energy_is_the_smoothed_squared_laplacian():
    rng = np.random.default_rng(4)
    image = rng.random((40, 36)).astype(np.float32)
    energy = focus_energy(torch.from_numpy(image)[None, None])[0, 0].numpy()
    lap = cv2.Laplacian(image, cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REPLICATE)
    expected = cv2.GaussianBlur(lap ** 2, (5, 5), 0.5, borderType=cv2.BORDER_REPLICATE)
    np.testing.assert_allclose(energy, expected, rtol=1e-4, atol=1e-6)
    flat = focus_energy(torch.full((1, 2, 8, 8), 0.3))
    assert flat.abs().max() < 1e-10                                    # no detail, no energy


def test_focus_prior_takes_the_sharp_slice_where_the_network_hesitates():
    # Two slices of one texture, the second blurred; logits that cannot tell
    # them apart. The blend alone averages them; the prior takes the sharp one.
    rng = np.random.default_rng(5)
    sharp = rng.random((64, 64)).astype(np.float32)
    blurred = cv2.GaussianBlur(sharp, (0, 0), 2.0)
    x = torch.from_numpy(np.stack([blurred, sharp]))[None]
    logits = torch.zeros(1, 2, 64, 64)
    plain = (soft_fusion_weights(logits, 0.3) * x).sum(dim=1)[0].numpy()
    prior = (soft_fusion_weights(logits, 0.3, x, 8.0) * x).sum(dim=1)[0].numpy()
    error_plain, error_prior = np.abs(plain - sharp).mean(), np.abs(prior - sharp).mean()
    assert error_prior < 0.1 * error_plain
    # The prior only reweighs: with confident logits the network's choice stands.
    confident = torch.stack([torch.full((64, 64), 100.0), torch.zeros(64, 64)])[None]
    kept = (soft_fusion_weights(confident, 0.3, x, 8.0) * x).sum(dim=1)[0].numpy()
    assert np.abs(kept - blurred).mean() < 1e-3
    # Identical slices: the prior has nothing to choose and the weights stay the network's.
    same = x[:, 1:].expand(1, 2, 64, 64)
    torch.testing.assert_close(soft_fusion_weights(logits, 0.3, same, 8.0), torch.full((1, 2, 64, 64), 0.5))


def test_focus_prior_comes_from_the_model_card_and_can_be_overridden(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(StackMFFV2().state_dict(), path)
    assert load_model(path).focus_prior == 0                        # no card: none
    write_model_card(path, {"index_rule": "argmax", "fusion_temperature": 0.3, "focus_prior": 8})
    assert read_inference_settings(path).focus_prior == 8
    assert load_model(path).focus_prior == 8 and load_model(path, focus_prior=0).focus_prior == 0
    for bad in (-1, "8", False):
        write_model_card(path, {"fusion_temperature": 0.3, "focus_prior": bad})
        with pytest.raises(CheckpointError, match="focus_prior"):
            load_model(path)
    with pytest.raises(ValueError, match="focus_prior"):
        StackMFFV2(focus_prior=float("nan"))


def test_a_bad_focus_prior_is_one_usage_line(tmp_path):
    result = subprocess.run([sys.executable, "predict_one_stack.py", "--input_dir", str(tmp_path),
                             "--focus_prior", "-2"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "focus_prior must be a number >= 0" in result.stderr.strip().splitlines()[-1]


def test_depth_window_moves_a_torn_blend_to_the_slices_between():
    # Logits that see two depths at once (slices 0 and 4 equally, the rest 2
    # lower): the plain blend splits between the two; the window centres it
    # on the expected slice, 2.
    logits = torch.full((1, 5, 4, 4), -2.0)
    logits[:, 0] = logits[:, 4] = 0.0
    torn = soft_fusion_weights(logits, 1.0)
    assert (torn[:, 0] + torn[:, 4]).min() > 0.7
    windowed = soft_fusion_weights(logits, 1.0, depth_window=0.5)
    assert (windowed.argmax(dim=1) == 2).all() and windowed[:, 2].min() > 0.7
    # A confident network is left alone: the window sits on its own slice.
    confident = torch.full((1, 5, 4, 4), -30.0)
    confident[:, 3] = 0.0
    torch.testing.assert_close(soft_fusion_weights(confident, 1.0, depth_window=0.5), soft_fusion_weights(confident, 1.0))


def test_depth_window_comes_from_the_model_card_and_can_be_overridden(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(StackMFFV2().state_dict(), path)
    write_model_card(path, {"index_rule": "argmax", "fusion_temperature": 1.0, "depth_window": 1.5})
    assert read_inference_settings(path).depth_window == 1.5
    assert load_model(path).depth_window == 1.5 and load_model(path, depth_window=0).depth_window == 0
    write_model_card(path, {"fusion_temperature": 1.0, "depth_window": -1})
    with pytest.raises(CheckpointError, match="depth_window"):
        load_model(path)
    result = subprocess.run([sys.executable, "predict_one_stack.py", "--input_dir", str(tmp_path),
                             "--depth_window", "x"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "depth_window must be a number >= 0" in result.stderr.strip().splitlines()[-1]
