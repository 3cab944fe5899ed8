"""Depth maps: rule E's metrics (metrics.py), the guided depth rule (fusion.py) on every path, its flag."""
import argparse
import json

import numpy as np
import pytest
import torch

from fusion import (DEPTH_RULES, FusionCard, box_mean, card_path, depth_confidence, fuse, guided_filter,
                    refined_depth)
from inference import fuse_gray_batch, model_from_args, render_outputs
from metrics import slice_mae, speckle_share, textured_half
from model import CheckpointError, StackMFFV2
from options import add_model_arguments
from tiling import tiled_fuse


# ----------------------------------------------------------------------------- rule E's metrics


class TestMetrics:
    def test_speckle_counts_isolated_picks_two_slices_off(self):
        depth = np.zeros((20, 30))
        depth[5, 5], depth[10, 20], depth[15, 8] = 2, -3, 7     # three speckles
        depth[2, 25] = 1                                         # one slice off: a step, not a speckle
        depth[18, 2] = 1.4                                       # rounds to 1
        assert speckle_share(depth) == pytest.approx(3 / 600)
        depth[18, 2] = 1.6                                       # rounds to 2: a speckle
        assert speckle_share(depth) == pytest.approx(4 / 600)

    def test_a_depth_edge_and_the_border_are_no_speckle(self):
        depth = np.zeros((16, 16))
        depth[:, 8:] = 5                                         # a straight step of 5 slices
        depth[0, 0] = 5                                          # a corner: its 3 x 3 window repeats the border
        assert speckle_share(depth[:, 1:]) == 0
        assert speckle_share(depth) == pytest.approx(1 / 256)

    def test_textured_half_is_where_the_image_has_detail(self):
        rng = np.random.default_rng(0)
        image = np.full((64, 64), 0.5)
        image[:, :32] = rng.random((64, 32))                     # texture left, flat right
        mask = textured_half(image)
        assert mask.dtype == bool and mask.shape == image.shape
        assert mask[:, :28].mean() > 0.95 and not mask[:, 42:].any()
        assert 0.4 < mask.mean() <= 0.5                          # above the median: at most half

    def test_slice_mae_over_all_pixels_or_a_mask(self):
        depth = np.array([[0.0, 1.5], [3.0, 2.0]])
        true = np.array([[0, 1], [1, 2]])
        assert slice_mae(depth, true) == pytest.approx((0 + 0.5 + 2 + 0) / 4)
        assert slice_mae(depth, true, np.array([[True, True], [False, False]])) == pytest.approx(0.25)


# ----------------------------------------------------------------------------- the filter


class TestGuidedFilter:
    def test_box_mean_is_the_windows_mean_with_repeated_borders(self):
        x = torch.arange(35.0).reshape(1, 1, 5, 7)
        padded = np.pad(x[0, 0].numpy(), 1, mode="edge")
        want = np.mean([padded[dy:dy + 5, dx:dx + 7] for dy in range(3) for dx in range(3)], axis=0)
        np.testing.assert_allclose(box_mean(x, 1)[0, 0].numpy(), want, rtol=1e-6)
        assert torch.equal(box_mean(x, 0), x)

    def test_a_source_linear_in_the_guide_comes_back_and_a_constant_stays(self):
        guide = torch.rand(1, 1, 30, 40, generator=torch.Generator().manual_seed(0))
        source = 3 * guide + 1
        torch.testing.assert_close(guided_filter(guide, source, 3, 1e-8), source, atol=1e-3, rtol=0)
        flat = torch.full_like(guide, 2.5)
        torch.testing.assert_close(guided_filter(guide, flat, 3, 1e-3, torch.rand_like(guide)), flat)

    def test_untrusted_pixels_take_the_trusted_value_around_them(self):
        source = torch.full((1, 1, 40, 40), 3.0)
        # 8 px across: every window of 9 px over it holds trusted pixels
        source[..., 16:24, 16:24] = torch.randint(0, 10, (8, 8), generator=torch.Generator().manual_seed(1)).float()
        trust = torch.ones_like(source)
        trust[..., 16:24, 16:24] = 0
        guide = torch.zeros_like(source)
        out = guided_filter(guide, source, 4, 0.1, trust)
        torch.testing.assert_close(out, torch.full_like(out, 3.0), atol=1e-3, rtol=0)
        plain = guided_filter(guide, source, 4, 0.1)                # no trust: the noise is only averaged
        assert (plain - 3).abs().max() > 0.1


# ----------------------------------------------------------------------------- the guided depth rule


def ramp_case(num_slices=10, height=64, width=160, scale=4.0):
    """A textured stack and focus logits peaked at a depth ramp from slice 0 (left) to N-1 (right):
    (stack (1, N, H, W), logits (1, N, H, W), true depth in slices (H, W))."""
    rng = np.random.default_rng(3)
    true = np.tile(np.linspace(0, num_slices - 1, width), (height, 1))
    slices = torch.arange(num_slices, dtype=torch.float32).view(1, -1, 1, 1)
    logits = -scale * (slices - torch.from_numpy(true).float()) ** 2
    stack = torch.from_numpy(rng.random((1, num_slices, height, width))).float()
    return stack, logits, true


class TestGuidedDepth:
    def test_the_rule_is_a_card_setting_whose_default_is_the_released_depth(self):
        assert FusionCard().depth_rule == "index" and DEPTH_RULES == ("index", "guided")
        with pytest.raises(ValueError, match="depth_rule must be one of"):
            FusionCard(depth_rule="smooth")
        stack, logits, _ = ramp_case()
        released = fuse(stack, logits, FusionCard("argmax"))
        assert torch.equal(released.depth, released.index[:, None].float() / 9)

    def test_a_ramp_comes_back_continuous_and_closer_than_the_index(self):
        stack, logits, true = ramp_case()
        for card in (FusionCard("argmax", depth_rule="guided"),
                     FusionCard("argmax", 1, 1.0, 4.0, 1.5, 2.0, 0.7, "guided")):
            out = fuse(stack, logits, card)
            depth = out.depth[0, 0].double().numpy() * 9
            index = out.index[0].numpy()
            assert np.array_equal(index, np.rint(true))                  # the index stays the integer pick
            assert len(np.unique(np.round(depth, 3))) > 5 * len(np.unique(index))   # sub-slice levels
            inner = (slice(None), slice(12, -12))                        # the replicated border bends the ramp
            assert slice_mae(depth[inner], true[inner]) < 0.6 * slice_mae(index[inner], true[inner])
            assert speckle_share(depth) == 0

    def test_a_flat_region_in_texture_gets_no_speckle(self):
        rng = np.random.default_rng(4)
        n, size = 8, 48
        logits = torch.zeros(1, n, size, size)
        logits[:, 3] = 6.0                                               # sure of slice 3 on the texture
        flat = (slice(None), slice(None), slice(20, 28), slice(20, 28))
        logits[flat] = torch.from_numpy(rng.normal(0, 0.3, (1, n, 8, 8))).float()   # unsure on the flat patch
        stack = torch.from_numpy(rng.random((1, n, size, size))).float()
        stack[flat] = 0.5
        card = FusionCard("argmax", fusion_temperature=1.0)
        pick = fuse(stack, logits, card).depth[0, 0].numpy() * (n - 1)
        guided = fuse(stack, logits, card.with_overrides(depth_rule="guided")).depth[0, 0].numpy() * (n - 1)
        assert speckle_share(pick) > 0.01                                   # a third of the patch
        assert speckle_share(guided) == 0 and np.abs(guided - 3).max() < 0.1

    def test_confidence_is_the_peak_weight_to_a_power(self):
        logits = torch.tensor([[[[0.0]], [[0.0]]]])
        assert depth_confidence(logits, None).item() == pytest.approx(0.5 ** 16)
        weights = torch.tensor([[[[0.9]], [[0.1]]]])
        assert depth_confidence(logits, weights).item() == pytest.approx(0.9 ** 16)

    @pytest.mark.parametrize("card", [FusionCard("argmax", depth_rule="guided"),
                                      FusionCard(depth_rule="guided"),
                                      FusionCard("argmax", 1, 1.0, 4.0, 1.5, 2.0, 0.7, "guided")])
    def test_every_path_refines_alike(self, card):
        torch.manual_seed(0)
        net = StackMFFV2().eval()
        x = torch.rand(1, 4, 64, 96, generator=torch.Generator().manual_seed(5))
        with torch.inference_mode():
            logits = net.focus_logits(x)
            whole = fuse(x, logits, card)
            fast = fuse_gray_batch(net, card, x)[0]
            small_tiles = tiled_fuse(net, card, x[0], tile=32)
            # Tiles: the refinement of the full-size maps, box by box, is that of the whole maps
            # (a pick's trust comes from the logits, which the tiles reproduce to float rounding).
            trust = depth_confidence(logits, small_tiles.weights)
            again = refined_depth(small_tiles.fused, small_tiles.index, trust, 4)
        torch.testing.assert_close(torch.from_numpy(fast.depth), whole.depth[0, 0], atol=1e-4, rtol=0)
        assert (small_tiles.index == whole.index).float().mean() > 0.99
        torch.testing.assert_close(small_tiles.depth, again, atol=1e-6 if card.fusion_temperature else 1e-3, rtol=0)
        assert not torch.equal(small_tiles.depth, small_tiles.index[:, None].float() / 3)

    def test_a_size_off_the_network_grid_refines_on_every_path(self):
        torch.manual_seed(0)
        net = StackMFFV2().eval()
        x = torch.rand(1, 3, 40, 50, generator=torch.Generator().manual_seed(6))
        for card in (FusionCard("argmax", depth_rule="guided"), FusionCard("argmax", 1, 0.5, depth_rule="guided")):
            for result in (fuse_gray_batch(net, card, x)[0], fuse_gray_batch(net, card, x, max_memory=2.0)[0]):
                assert result.depth.shape == (40, 50) and result.depth.dtype == np.float32
                assert 0 <= result.depth.min() and result.depth.max() <= 1
                assert result.index.dtype == np.int64


# ----------------------------------------------------------------------------- card file and flag


class TestFlagAndCard:
    def parse(self, *flags):
        return add_model_arguments(argparse.ArgumentParser()).parse_args(list(flags))

    def test_old_cards_keep_the_released_depth_and_a_card_can_choose(self, tmp_path):
        path = tmp_path / "w.pth"
        torch.save(StackMFFV2().state_dict(), path)
        with open(card_path(path), "w", encoding="utf-8") as f:
            json.dump({"index_rule": "argmax"}, f)
        assert FusionCard.beside(path).depth_rule == "index"
        with open(card_path(path), "w", encoding="utf-8") as f:
            json.dump({"index_rule": "argmax", "depth_rule": "guided"}, f)
        assert FusionCard.beside(path).depth_rule == "guided"
        _, card = model_from_args(self.parse("--model_path", str(path), "--depth_rule", "index"), "cpu")
        assert card == FusionCard("argmax")
        with open(card_path(path), "w", encoding="utf-8") as f:
            json.dump({"depth_rule": "median"}, f)
        with pytest.raises(CheckpointError, match="depth_rule must be one of"):
            FusionCard.beside(path)

    def test_the_flag_takes_the_choices_only(self, capsys):
        assert self.parse("--depth_rule", "guided").depth_rule == "guided"
        assert self.parse().depth_rule is None
        with pytest.raises(SystemExit) as stop:
            self.parse("--depth_rule", "smooth")
        assert stop.value.code == 2 and "invalid choice: 'smooth'" in capsys.readouterr().err

    def test_rendered_depth_keeps_sub_slice_levels(self):
        stack, logits, _ = ramp_case()
        card = FusionCard("argmax", depth_rule="guided")
        result = fuse_gray_batch(_LogitsOnly(logits), card, stack, fast=False)[0]
        images = [(s * 255).astype(np.uint8) for s in stack[0].numpy()]
        outputs = render_outputs(result, images)
        assert len(np.unique(outputs["depth_map"])) > 5 * len(np.unique(outputs["depth_index"]))


class _LogitsOnly(torch.nn.Module):
    """A stand-in network whose focus logits are given (at the network's size)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def focus_logits(self, x):
        return self.logits


# ----------------------------------------------------------------------------- 16-bit depth and the CLI


def test_the_depth_map_can_keep_16_bits():
    stack, logits, _ = ramp_case()
    result = fuse_gray_batch(_LogitsOnly(logits), FusionCard("argmax", depth_rule="guided"), stack, fast=False)[0]
    images = [(s * 255).astype(np.uint8) for s in stack[0].numpy()]
    eight, sixteen = render_outputs(result, images)["depth_map"], render_outputs(result, images, depth_bits=16)["depth_map"]
    assert eight.dtype == np.uint8 and sixteen.dtype == np.uint16
    assert np.array_equal(sixteen, np.rint(np.clip(result.depth, 0, 1) * 65535).astype(np.uint16))   # rounded
    assert np.abs(sixteen / 257 - eight).max() <= 0.5 + 1e-9                      # the same depth, 256 x finer
    with pytest.raises(ValueError, match="depth_bits must be one of"):
        render_outputs(result, images, depth_bits=12)


@pytest.mark.slow
def test_the_cli_writes_a_guided_16_bit_depth_and_keeps_the_index(tmp_path):
    import subprocess
    import sys

    import cv2

    from conftest import REPO, textured_stack
    stack = tmp_path / "stack"
    stack.mkdir()
    for k, image in enumerate(textured_stack(num_slices=4, height=64, width=64), start=1):
        cv2.imwrite(str(stack / f"{k}.png"), image)
    runs = {}
    for label, extra in (("card", []), ("guided", ["--depth_rule", "guided", "--depth_bits", "16"])):
        out = tmp_path / label
        result = subprocess.run([sys.executable, str(REPO / "predict_one_stack.py"), "--input_dir", str(stack),
                                 "--output_dir", str(out), "--fixed_names", "--device", "cpu", *extra],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        runs[label] = (cv2.imread(str(out / "depth_map.png"), cv2.IMREAD_UNCHANGED), np.load(out / "depth_index.npy"))
    assert runs["guided"][0].dtype == np.uint16 and runs["card"][0].dtype == np.uint8
    assert np.array_equal(runs["guided"][1], runs["card"][1])            # the index output stays the index
    bad = subprocess.run([sys.executable, str(REPO / "predict_one_stack.py"), "--input_dir", str(stack),
                          "--depth_rule", "smooth"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "invalid choice: 'smooth'" in bad.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- bench/depth_quality.py


def test_rule_e_verdict_holds_both_bounds():
    from bench.depth_quality import GUIDED, PICK, RELEASED, rule_cards, verdict
    lf, real = ["a", "b"], ["r"]
    scores = {PICK: {"a": (0.40, 1.0, 0.3), "b": (0.20, 1.0, 0.1), "r": 3.0},       # the baseline: mean 0.30
              GUIDED: {"a": (0.44, 1.0, 0.0), "b": (0.21, 1.0, 0.5), "r": 0.2},     # mean 0.325, speckle 0.5
              RELEASED: {"a": (0.50, 1.0, 0.0), "b": (0.20, 1.0, 0.0), "r": 0.0}}   # mean 0.35: 0.05 above
    decided = verdict(scores, lf, real)
    assert decided[GUIDED] == (pytest.approx(0.325), 0.5, "yes")
    assert decided[RELEASED][2] == "yes"
    scores[RELEASED]["a"] = (0.52, 1.0, 0.0)                                        # 0.36: beyond the margin
    scores[GUIDED]["r"] = 0.51                                                      # speckle beyond 0.5%
    decided = verdict(scores, lf, real)
    assert decided[RELEASED][2] == "no" and decided[GUIDED][2] == "no"
    cards = rule_cards(FusionCard("argmax", fusion_temperature=1.0, depth_rule="guided"))
    assert cards[PICK].depth_rule == "index" and cards[PICK].index_rule == "argmax"
    assert cards[RELEASED].index_rule == "minmax_round" and cards[GUIDED].depth_rule == "guided"
