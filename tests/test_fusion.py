"""fusion.py: the model card (FusionCard), views, index rules, soft weights, blends, fuse and the colour image.

In the module's order; the last part checks the shipped weights and the CLI flags built from the card.
"""
import argparse
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import OFFICIAL_WEIGHTS, PARITY, REPO, requires_official, requires_parity
from fusion import (TEST_VIEWS, FusionCard, blend, blended_image, card_path, focus_energy, fuse, fuse_colour,
                    gaussian_blur, index_and_depth, soft_weights, view_logits)
from inference import (DEFAULT_MODEL, focus_logits, fuse_gray_batch, fuse_images,
                       model_from_args, render_outputs)
from model import CheckpointError, StackMFFV2, gather_slices, load_model
from options import add_model_arguments
from utils import InputError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


def save_random_weights(path, card=None, seed=0):
    """Random weights at ``path`` and, when given, ``card`` (a dict, written as is) beside them."""
    torch.manual_seed(seed)
    torch.save(StackMFFV2().state_dict(), path)
    if card is not None:
        write_card(path, card)
    return path


def write_card(checkpoint, card: dict):
    """A model card as a file may hold it, valid or not (FusionCard.write_beside writes valid ones only)."""
    with open(card_path(checkpoint), "w", encoding="utf-8") as f:
        json.dump(card, f)


def random_net(seed):
    torch.manual_seed(seed)
    return StackMFFV2().eval()


def run_predict(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "predict_one_stack.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- the card


class TestCard:
    def test_no_card_is_the_released_decoding(self, tmp_path):
        path = save_random_weights(tmp_path / "w.pth")
        assert card_path(path) == str(tmp_path / "w.json")
        card = FusionCard.beside(path)
        assert card == FusionCard() and (card.index_rule, card.views, card.fusion_temperature) == ("minmax_round", 1, 0)
        assert (card.focus_prior, card.depth_window, card.base_sigma, card.base_weight_sigma) == (0, 0, 0, 0)

    def test_settings_come_from_the_card_and_can_be_overridden(self, tmp_path):
        path = save_random_weights(tmp_path / "w.pth", {"index_rule": "argmax", "fusion_temperature": 0.1})
        assert FusionCard.beside(path) == FusionCard("argmax", 1, 0.1, 0.0, 0.0, 0.0, 0.0)
        assert FusionCard.beside(path).with_overrides(index_rule="minmax_round").index_rule == "minmax_round"
        assert FusionCard.beside(path).with_overrides(fusion_temperature=0).fusion_temperature == 0
        write_card(path, {"index_rule": "argmax", "views": 4})
        card = FusionCard.beside(path)
        assert card.views == 4 and card.with_overrides(views=2).views == 2 and card.with_overrides(views=None) == card
        write_card(path, {"index_rule": "argmax", "fusion_temperature": 0.3, "focus_prior": 8, "depth_window": 1.5,
                          "base_sigma": 2, "base_weight_sigma": 0.7})
        card = FusionCard.beside(path)
        assert (card.focus_prior, card.depth_window, card.base_sigma, card.base_weight_sigma) == (8, 1.5, 2.0, 0.7)
        assert card.with_overrides(focus_prior=0).focus_prior == 0 and card.with_overrides(depth_window=0).depth_window == 0
        assert card.with_overrides(base_sigma=0).base_sigma == 0

    @pytest.mark.parametrize("key, bad", [("fusion_temperature", -0.5), ("fusion_temperature", "warm"),
                                          ("fusion_temperature", True), ("focus_prior", -1), ("focus_prior", "8"),
                                          ("focus_prior", False), ("depth_window", -1), ("base_sigma", -1),
                                          ("base_weight_sigma", -1), ("index_rule", "median"), ("views", 5)])
    def test_a_bad_setting_in_the_card_is_a_checkpoint_error(self, tmp_path, key, bad):
        path = save_random_weights(tmp_path / "w.pth", {"fusion_temperature": 0.3, key: bad})
        with pytest.raises(CheckpointError, match=key):
            FusionCard.beside(path)

    def test_an_unreadable_card_is_a_checkpoint_error(self, tmp_path):
        path = save_random_weights(tmp_path / "w.pth")
        with open(card_path(path), "w") as f:
            f.write("{not json")
        with pytest.raises(CheckpointError, match="not readable JSON"):
            FusionCard.beside(path)

    def test_bad_values_are_refused_when_made(self):
        for name, kwargs in (("fusion_temperature", {"fusion_temperature": -1}),
                             ("focus_prior", {"fusion_temperature": 1, "focus_prior": float("nan")}),
                             ("index_rule", {"index_rule": "median"}), ("views", {"views": 3}),
                             ("views", {"views": True})):
            with pytest.raises(ValueError, match=name):
                FusionCard(**kwargs)

    def test_blend_settings_with_a_pick_have_no_effect_and_say_so(self):
        for name in ("focus_prior", "depth_window", "base_sigma", "base_weight_sigma"):
            with pytest.raises(ValueError, match=f"{name} 2 has no effect with fusion_temperature 0"):
                FusionCard(**{name: 2})
        shipped = FusionCard("argmax", 4, 1.0, 4.0, 1.5, 2.0, 0.7)
        # Asking for the pick drops the card's blend settings; asking for one of them with it is refused.
        assert shipped.with_overrides(fusion_temperature=0) == FusionCard("argmax", 4)
        with pytest.raises(ValueError, match="focus_prior 3 has no effect"):
            shipped.with_overrides(fusion_temperature=0, focus_prior=3)

    def test_written_card_reads_back_with_its_provenance(self, tmp_path):
        card = FusionCard("argmax", 2, 0.5, 4.0, 1.0, 2.0, 0.7)
        card.write_beside(tmp_path / "w.pth", trained_by="train.py", epochs_done=3)
        assert FusionCard.beside(tmp_path / "w.pth") == card
        recorded = json.loads((tmp_path / "w.json").read_text())
        assert recorded["trained_by"] == "train.py" and recorded["epochs_done"] == 3 and recorded["views"] == 2

    def test_halo_covers_what_the_blend_reaches(self):
        assert FusionCard().halo() == 0
        assert FusionCard(fusion_temperature=1).halo() == 0                     # softmax and window are per pixel
        assert FusionCard(fusion_temperature=1, focus_prior=4).halo() == 3      # Laplacian 1 + blur 2
        assert FusionCard(fusion_temperature=1, base_sigma=2, base_weight_sigma=0.7).halo() == 8
        assert FusionCard(fusion_temperature=1, focus_prior=4, base_sigma=1, base_weight_sigma=1.5).halo() == 9

    def test_a_crop_grown_by_the_halo_blends_its_interior_like_the_whole_image(self):
        card = FusionCard("argmax", 1, 1.0, 4.0, 1.5, 2.0, 0.7)
        generator = torch.Generator().manual_seed(7)
        stack = torch.rand(1, 4, 48, 56, generator=generator)
        logits = torch.randn(1, 4, 48, 56, generator=generator) * 3
        whole, _ = blended_image(stack, logits, card)
        h = card.halo()
        box = (16, 32, 20, 36)
        crop = (slice(None), slice(None), slice(box[0] - h, box[1] + h), slice(box[2] - h, box[3] + h))
        part, _ = blended_image(stack[crop], logits[crop], card)
        torch.testing.assert_close(part[..., h:-h, h:-h], whole[..., box[0]:box[1], box[2]:box[3]], atol=1e-6, rtol=0)


class TestCardFlags:
    def parse(self, *flags):
        return add_model_arguments(argparse.ArgumentParser()).parse_args(list(flags))

    def test_flags_override_the_card(self, tmp_path):
        path = save_random_weights(tmp_path / "w.pth", {"index_rule": "argmax", "fusion_temperature": 1.0,
                                                        "base_sigma": 2, "base_weight_sigma": 0.7})
        model, card = model_from_args(self.parse("--model_path", str(path), "--base_weight_sigma", "0"), "cpu")
        assert isinstance(model, StackMFFV2)
        assert (card.base_sigma, card.base_weight_sigma, card.fusion_temperature) == (2.0, 0.0, 1.0)
        _, card = model_from_args(self.parse("--model_path", str(path), "--fusion_temperature", "0"), "cpu")
        assert card == FusionCard("argmax")

    def test_a_blend_flag_with_the_pick_is_one_line(self, tmp_path):
        path = save_random_weights(tmp_path / "w.pth")
        with pytest.raises(InputError, match="^--depth_window 1.5 has no effect with fusion_temperature 0"):
            model_from_args(self.parse("--model_path", str(path), "--depth_window", "1.5"), "cpu")

    def test_every_setting_has_a_flag(self):
        text = add_model_arguments(argparse.ArgumentParser()).format_help()
        assert "--views {1,2,4,8}" in text and "--index_rule {minmax_round,argmax}" in text
        for name in ("fusion_temperature", "focus_prior", "depth_window", "base_sigma", "base_weight_sigma"):
            assert f"--{name} {name.upper()}" in text

    @pytest.mark.slow
    def test_bad_values_are_one_usage_line(self, tmp_path):
        for flag, bad in (("--fusion_temperature", "-1"), ("--fusion_temperature", "nan"),
                          ("--fusion_temperature", "warm"), ("--focus_prior", "-2"), ("--depth_window", "x"),
                          ("--base_sigma", "-2")):
            result = run_predict("--input_dir", str(tmp_path), flag, bad)
            assert result.returncode == 2 and "Traceback" not in result.stderr
            assert f"{flag[2:]} must be a number >= 0" in result.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- views


class TestViews:
    def test_equivariant_function_is_unchanged_by_any_number_of_views(self):
        x = torch.rand(2, 3, 8, 8)
        for views in TEST_VIEWS:
            torch.testing.assert_close(view_logits(lambda t: t * 2, x, views), x * 2)

    def test_views_average_the_mapped_back_passes(self):
        x = torch.rand(1, 2, 5, 5)
        along_rows = lambda t: t.cumsum(-1)          # not mirror-symmetric
        two = view_logits(along_rows, x, 2)
        torch.testing.assert_close(two, (x.cumsum(-1) + x.flip(-1).cumsum(-1).flip(-1)) / 2)
        eight = view_logits(along_rows, x, 8)
        # Half of the eight views run the sum down the columns instead: the mean of both directions.
        rows = (x.cumsum(-1) + x.flip(-1).cumsum(-1).flip(-1)) / 2
        cols = (x.cumsum(-2) + x.flip(-2).cumsum(-2).flip(-2)) / 2
        torch.testing.assert_close(eight, (rows + cols) / 2)
        with pytest.raises(ValueError, match="views"):
            view_logits(along_rows, x, 3)

    def test_fast_path_and_reference_agree_with_views(self):
        net, card = random_net(3), FusionCard("argmax", 4)
        x = torch.rand(1, 3, 64, 64)
        with torch.inference_mode():
            fused, depth, index, _ = fuse(x, focus_logits(net, card, x, fast=False), card)
            one_view = fuse(x, net.focus_logits(x), card).index
            fast_fused, _, fast_index, _ = fuse(x, focus_logits(net, card, x), card)
        same = fast_index == index                   # float rounding may flip a near-tie
        assert same.float().mean() > 0.999
        assert torch.equal(fast_fused[:, 0][same], fused[:, 0][same])
        assert not torch.equal(one_view, index)      # the views really change a random network's answer


# ----------------------------------------------------------------------------- index rules


class TestIndexRules:
    def test_argmax_index_and_depth(self):
        logits = torch.tensor([[[[0.1, 2.0]], [[1.5, -1.0]], [[0.2, 0.3]]]])  # (1, 3, 1, 2)
        index, depth = index_and_depth(logits, "argmax")
        assert index.tolist() == [[[1, 0]]]
        assert torch.allclose(depth, torch.tensor([[[[0.5, 0.0]]]]))

    def test_argmax_card_gathers_the_argmax_slice(self):
        net = random_net(1)
        x = torch.rand(1, 4, 32, 32)
        with torch.inference_mode():
            logits = net.focus_logits(x)
            fused, depth, index, weights = fuse(x, logits, FusionCard("argmax"))
        assert weights is None and torch.equal(index, logits.argmax(1))
        assert torch.equal(fused[:, 0], torch.gather(x, 1, index[:, None])[:, 0])
        assert torch.allclose(depth[:, 0], index.float() / 3)

    def test_the_released_card_is_the_networks_forward(self):
        net = random_net(2)
        x = torch.rand(1, 3, 32, 64)
        with torch.inference_mode():
            released = net(x)
            decoded = fuse(x, net.focus_logits(x), FusionCard())
        for a, b in zip(released, decoded[:3]):
            assert torch.equal(a, b)

    @requires_official
    @requires_parity
    def test_official_weights_keep_the_released_rule_and_parity(self):
        assert FusionCard.beside(OFFICIAL_WEIGHTS) == FusionCard()
        model, cases = load_model(OFFICIAL_WEIGHTS), np.load(PARITY / "network_cases.npz")
        x = torch.from_numpy(cases["random_n3_64x96__x"])
        with torch.inference_mode():
            fused, depth, index, _ = fuse(x, model.focus_logits(x), FusionCard.beside(OFFICIAL_WEIGHTS))
        assert np.array_equal(index.numpy(), cases["random_n3_64x96__index"])
        assert np.allclose(depth.numpy(), cases["random_n3_64x96__depth"], atol=1e-5)
        assert np.allclose(fused.numpy(), cases["random_n3_64x96__fused"], atol=1e-6)

    def test_fast_and_tiled_paths_follow_the_argmax_rule(self):
        from tiling import tiled_fuse
        net, card = random_net(1), FusionCard("argmax")
        x = torch.rand(1, 3, 64, 96)
        with torch.inference_mode():
            want = fuse(x, net.focus_logits(x), card).index
            fast_index = fuse(x, focus_logits(net, card, x), card).index
        assert (fast_index == want).float().mean() >= 0.999
        # one tile covering the whole image: the tiled path must pick the same slices
        tiled = tiled_fuse(net, card, x[0], max_memory=4.0)
        assert (tiled.index == want).float().mean() >= 0.999
        assert torch.allclose(tiled.depth[:, 0], tiled.index.float() / 2)


# ----------------------------------------------------------------------------- soft weights


class TestSoftWeights:
    def test_weights_sum_to_one_and_sharpen_into_the_argmax_pick(self):
        logits = torch.randn(2, 5, 6, 7, generator=torch.Generator().manual_seed(0))
        stack = torch.rand(2, 5, 6, 7)
        warm = soft_weights(stack, logits, FusionCard(fusion_temperature=1.0))
        torch.testing.assert_close(warm.sum(dim=1), torch.ones(2, 6, 7))
        assert warm.max() < 1 and warm.min() > 0
        cold = soft_weights(stack, logits, FusionCard(fusion_temperature=1e-4))
        picked = gather_slices(stack, logits.argmax(dim=1))
        torch.testing.assert_close((cold * stack).sum(dim=1, keepdim=True), picked)
        with pytest.raises(ValueError, match="fusion_temperature"):
            soft_weights(stack, logits, FusionCard())

    def test_focus_energy_is_the_smoothed_squared_laplacian(self):
        rng = np.random.default_rng(4)
        image = rng.random((40, 36)).astype(np.float32)
        energy = focus_energy(torch.from_numpy(image)[None, None])[0, 0].numpy()
        lap = cv2.Laplacian(image, cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REPLICATE)
        expected = cv2.GaussianBlur(lap ** 2, (5, 5), 0.5, borderType=cv2.BORDER_REPLICATE)
        np.testing.assert_allclose(energy, expected, rtol=1e-4, atol=1e-6)
        flat = focus_energy(torch.full((1, 2, 8, 8), 0.3))
        assert flat.abs().max() < 1e-10                                    # no detail, no energy

    def test_focus_prior_takes_the_sharp_slice_where_the_network_hesitates(self):
        # Two slices of one texture, the second blurred; logits that cannot tell
        # them apart. The blend alone averages them; the prior takes the sharp one.
        rng = np.random.default_rng(5)
        sharp = rng.random((64, 64)).astype(np.float32)
        blurred = cv2.GaussianBlur(sharp, (0, 0), 2.0)
        x = torch.from_numpy(np.stack([blurred, sharp]))[None]
        logits = torch.zeros(1, 2, 64, 64)
        plain_card, prior_card = FusionCard(fusion_temperature=0.3), FusionCard(fusion_temperature=0.3, focus_prior=8.0)
        plain = (soft_weights(x, logits, plain_card) * x).sum(dim=1)[0].numpy()
        prior = (soft_weights(x, logits, prior_card) * x).sum(dim=1)[0].numpy()
        error_plain, error_prior = np.abs(plain - sharp).mean(), np.abs(prior - sharp).mean()
        assert error_prior < 0.1 * error_plain
        # The prior only reweighs: with confident logits the network's choice stands.
        confident = torch.stack([torch.full((64, 64), 100.0), torch.zeros(64, 64)])[None]
        kept = (soft_weights(x, confident, prior_card) * x).sum(dim=1)[0].numpy()
        assert np.abs(kept - blurred).mean() < 1e-3
        # Identical slices: the prior has nothing to choose and the weights stay the network's.
        same = x[:, 1:].expand(1, 2, 64, 64)
        torch.testing.assert_close(soft_weights(same, logits, prior_card), torch.full((1, 2, 64, 64), 0.5))

    def test_depth_window_moves_a_torn_blend_to_the_slices_between(self):
        # Logits that see two depths at once (slices 0 and 4 equally, the rest 2
        # lower): the plain blend splits between the two; the window centres it
        # on the expected slice, 2.
        logits = torch.full((1, 5, 4, 4), -2.0)
        logits[:, 0] = logits[:, 4] = 0.0
        stack = torch.rand(1, 5, 4, 4)
        plain_card, window_card = FusionCard(fusion_temperature=1.0), FusionCard(fusion_temperature=1.0, depth_window=0.5)
        torn = soft_weights(stack, logits, plain_card)
        assert (torn[:, 0] + torn[:, 4]).min() > 0.7
        windowed = soft_weights(stack, logits, window_card)
        assert (windowed.argmax(dim=1) == 2).all() and windowed[:, 2].min() > 0.7
        # A confident network is left alone: the window sits on its own slice.
        confident = torch.full((1, 5, 4, 4), -30.0)
        confident[:, 3] = 0.0
        torch.testing.assert_close(soft_weights(stack, confident, window_card), soft_weights(stack, confident, plain_card))


# ----------------------------------------------------------------------------- blends


def seam_scene(offset_left=0.2, offset_right=-0.1, size=(24, 40), edge=20):
    """Two slices that share a texture but differ by a constant offset each (the low-frequency
    spill of physical blur), and weights that switch from slice 0 to slice 1 at column ``edge``."""
    texture = torch.rand(1, 1, *size, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    stack = torch.cat([texture + offset_left, texture + offset_right], dim=1)     # (1, 2, H, W)
    weights = torch.zeros(1, 2, *size)
    weights[..., :edge] = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    weights[..., edge:] = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    return texture, stack, weights, (offset_left, offset_right)


def bands(base_sigma, base_weight_sigma):
    return FusionCard(fusion_temperature=1.0, base_sigma=base_sigma, base_weight_sigma=base_weight_sigma)


class TestBlends:
    @pytest.mark.parametrize("sigma, size", [(0.5, (17, 23)), (0.7, (9, 31)), (2.0, (40, 33)), (2.0, (3, 2))])
    @pytest.mark.parametrize("autograd", [False, True])
    def test_gaussian_blur_is_opencvs_with_replicated_borders(self, sigma, size, autograd):
        # The same Gaussian (radius 4 sigma, at least 1) and border rule as OpenCV, also on images
        # smaller than the kernel, for every plane of a (B, C, H, W) batch; with autograd (training)
        # the torch sum of shifted copies runs, without it OpenCV's filter: both must agree.
        planes = np.random.default_rng(3).random((2, 3, *size), dtype=np.float32)
        radius = max(1, round(4 * sigma))
        expected = np.stack([[cv2.GaussianBlur(p, (2 * radius + 1, 2 * radius + 1), sigma, sigmaY=sigma,
                                               borderType=cv2.BORDER_REPLICATE) for p in batch] for batch in planes])
        x = torch.from_numpy(planes).requires_grad_(autograd)
        blurred = gaussian_blur(x, sigma)
        assert blurred.dtype == torch.float32 and blurred.shape == (2, 3, *size)
        assert blurred.requires_grad == autograd
        np.testing.assert_allclose(blurred.detach().numpy(), expected, atol=2e-6, rtol=0)
        if autograd:
            blurred.sum().backward()                 # the training loss needs the blur's gradient
            assert x.grad is not None and float(x.grad.sum()) == pytest.approx(x.numel(), rel=1e-5)

    def test_gaussian_blur_of_a_non_contiguous_view(self):
        x = torch.rand(1, 4, 20, 30).transpose(-1, -2)             # (1, 4, 30, 20), strided
        with torch.no_grad():
            fast = gaussian_blur(x, 1.0)
        reference = gaussian_blur(x.clone().requires_grad_(True), 1.0).detach()
        torch.testing.assert_close(fast, reference, atol=2e-6, rtol=0)

    def test_the_base_takes_the_smoothed_weights_and_the_detail_the_sharp_ones(self):
        texture, stack, weights, offsets = seam_scene()
        one_band = blend(stack, weights, bands(0, 0))
        step = torch.tensor(offsets).view(1, 2, 1, 1)
        torch.testing.assert_close(one_band, texture + (weights * step).sum(1, keepdim=True))      # a hard seam
        two_band = blend(stack, weights, bands(2.0, 1.5))
        # The texture is shared, so it comes through whole; only the offsets, a base-band difference,
        # follow the smoothed weights: the seam becomes a ramp.
        smooth = gaussian_blur(weights, 1.5)
        torch.testing.assert_close(two_band, texture + (smooth * step).sum(1, keepdim=True), atol=1e-5, rtol=0)
        ramp = (two_band - texture)[0, 0, 0]
        assert 0.2 > ramp[18] > ramp[19] > ramp[20] > ramp[21] > -0.1
        torch.testing.assert_close(ramp[:12], torch.full((12,), 0.2), atol=1e-4, rtol=0)   # far from the edge: exact

    def test_two_bands_reduce_to_one_without_edges_or_without_smoothing(self):
        torch.manual_seed(2)
        stack = torch.rand(2, 4, 16, 20)
        uniform = torch.softmax(torch.randn(2, 4, 1, 1), dim=1).expand(2, 4, 16, 20)   # the same at every pixel
        torch.testing.assert_close(blend(stack, uniform, bands(2.0, 1.0)), blend(stack, uniform, bands(0, 0)),
                                   atol=1e-6, rtol=0)
        weights = torch.softmax(torch.randn(2, 4, 16, 20), dim=1)
        plain = (weights * stack).sum(1, keepdim=True)
        assert torch.equal(blend(stack, weights, bands(0, 0)), plain)
        assert torch.equal(blend(stack, weights, bands(2.0, 0.0)), plain)
        assert torch.equal(blend(stack, weights, bands(0.0, 1.0)), plain)
        # Identical slices fuse to that slice whatever the weights do.
        same = stack[:, :1].expand(2, 4, 16, 20)
        torch.testing.assert_close(blend(same, weights, bands(2.0, 0.7)), stack[:, :1], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- fuse


class TestFuse:
    def test_a_blend_leaves_index_and_depth_alone(self):
        card = FusionCard("argmax", fusion_temperature=0.5)
        x = torch.rand(1, 3, 32, 32)
        logits = torch.randn(1, 3, 32, 32)
        fused, depth, index, weights = fuse(x, logits, card)
        torch.testing.assert_close(fused, (torch.softmax(logits / 0.5, dim=1) * x).sum(dim=1, keepdim=True))
        assert torch.equal(index, logits.argmax(dim=1))
        pick = fuse(x, logits, FusionCard("argmax"))
        assert pick.weights is None and torch.equal(pick.index, index) and torch.equal(pick.depth, depth)
        # Equal slices: any blend of them is the slice itself.
        same = x[:, :1].expand(1, 3, 32, 32)
        torch.testing.assert_close(fuse(same, logits, card).fused, x[:, :1])

    def test_fast_path_and_reference_agree_with_soft_fusion(self):
        net, card = random_net(3), FusionCard("argmax", 2, 0.1)
        x = torch.rand(1, 3, 64, 64)
        with torch.inference_mode():
            fused, _, index, weights = fuse(x, focus_logits(net, card, x, fast=False), card)
            fast_fused, _, fast_index, fast_weights = fuse(x, focus_logits(net, card, x), card)
        assert (fast_index == index).float().mean() > 0.999
        torch.testing.assert_close(fast_weights, weights, atol=1e-4, rtol=0)
        torch.testing.assert_close(fast_fused, fused, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- the colour image


class TestColour:
    def test_colour_blend_matches_the_gray_blend_and_the_pick(self):
        rng = np.random.default_rng(0)
        card = FusionCard(fusion_temperature=1.0)
        gray = [rng.integers(0, 256, (20, 24), dtype=np.uint8) for _ in range(3)]
        colour = [cv2.cvtColor(g, cv2.COLOR_GRAY2BGR) for g in gray]
        weights = rng.random((3, 20, 24)).astype(np.float32)
        weights /= weights.sum(axis=0)
        blended = fuse_colour(colour, None, weights, card)
        expected = np.rint(sum(w * g.astype(np.float32) for w, g in zip(weights, gray)))
        assert blended.dtype == np.uint8 and np.abs(blended[..., 1].astype(int) - expected).max() <= 1
        assert np.array_equal(fuse_colour(gray, None, weights, card)[..., None].repeat(3, axis=2), blended)
        index = rng.integers(0, 3, (20, 24))
        one_hot = np.stack([(index == k) for k in range(3)]).astype(np.float32)
        assert np.array_equal(fuse_colour(colour, None, one_hot, card), fuse_colour(colour, index, None, card))

    def test_colour_blends_in_the_cards_two_bands_like_the_gray_image(self):
        rng = np.random.default_rng(3)
        gray = [cv2.GaussianBlur(rng.integers(0, 256, (40, 50), dtype=np.uint8), (0, 0), s) for s in (0.5, 1.5, 3.0)]
        colour = [cv2.cvtColor(g, cv2.COLOR_GRAY2BGR) for g in gray]
        card = FusionCard("argmax", 1, 0.5, base_sigma=2.0, base_weight_sigma=0.7)
        x = torch.from_numpy(np.stack(gray)).float()[None] / 255
        fused, _, _, weights = fuse(x, torch.randn(1, 3, 40, 50, generator=torch.Generator().manual_seed(0)), card)
        torch.testing.assert_close(fused, blend(x, weights, card))
        assert (fused - (weights * x).sum(1, keepdim=True)).abs().max() > 1e-3     # the second band did something
        # The colour path repeats the gray blend per channel, slice by slice (to a gray level of rounding).
        blended = fuse_colour(colour, None, weights[0].numpy(), card)
        expected = np.clip(fused[0, 0].numpy() * 255, 0, 255)
        assert blended.dtype == np.uint8 and np.abs(blended[..., 2].astype(float) - expected).max() <= 0.51
        assert np.array_equal(fuse_colour(gray, None, weights[0].numpy(), card)[..., None].repeat(3, axis=2), blended)
        # Rendering takes the bands from the result's card.
        result = fuse_gray_batch(random_net(0), card, x)[0]
        assert result.card == card
        rendered = render_outputs(result, colour)["color_fused"]
        assert np.array_equal(rendered, fuse_colour(colour, None, result.weights, card))
        assert not np.array_equal(rendered, fuse_colour(colour, None, result.weights, bands(0, 0)))

    def test_rendered_colour_uses_the_weights_at_the_input_size_on_every_path(self):
        # 40 x 50 runs at 64 x 64 inside: the weights come back at 40 x 50 and still sum to 1.
        rng = np.random.default_rng(1)
        images = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(3)]
        net, card = random_net(0), FusionCard("argmax", fusion_temperature=0.2)
        gray = torch.from_numpy(np.stack([cv2.cvtColor(im, cv2.COLOR_BGR2GRAY) for im in images])).float()[None] / 255
        for result in (fuse_gray_batch(net, card, gray)[0], fuse_gray_batch(net, card, gray, max_memory=2.0)[0]):
            assert result.weights.shape == (3, 40, 50)
            np.testing.assert_allclose(result.weights.sum(axis=0), 1, atol=1e-5)
            colour = render_outputs(result, images)["color_fused"]
            assert np.array_equal(colour, fuse_colour(images, None, result.weights, card))


# ----------------------------------------------------------------------------- the shipped weights


class TestShippedWeights:
    def test_default_model_is_the_shipped_file_with_its_card(self):
        assert DEFAULT_MODEL.is_file(), "weights/stackmffv2_synthetic.pth must ship with the project"
        recorded = json.loads(open(card_path(DEFAULT_MODEL)).read())
        card = FusionCard.beside(DEFAULT_MODEL)
        assert card.index_rule == recorded["index_rule"] == "argmax" and card.fusion_temperature > 0
        assert DEFAULT_MODEL.stat().st_size < 400_000  # a bare state dict, no optimizer state
        # Provenance without the training machine's paths or the released numbered flags.
        text = json.dumps(recorded)
        assert "/tmp/" not in text and "train_stack_2" not in text and "export_views" not in text

    def test_shipped_weights_pick_the_sharp_slice(self):
        # Left half sharp in slice 0, right half sharp in slice 2; slice 1 blurred everywhere.
        rng = np.random.default_rng(0)
        sharp = (rng.random((64, 64)) * 255).astype(np.uint8)
        blurred = cv2.GaussianBlur(sharp, (9, 9), 0)
        first, last = blurred.copy(), blurred.copy()
        first[:, :32], last[:, 32:] = sharp[:, :32], sharp[:, 32:]
        result = fuse_images(load_model(DEFAULT_MODEL), FusionCard.beside(DEFAULT_MODEL), [first, blurred, last])
        inner = result.index[8:-8]
        assert (inner[:, 4:24] == 0).mean() > 0.9 and (inner[:, 40:60] == 2).mean() > 0.9

    @pytest.mark.slow
    def test_the_cli_blends_by_default_and_can_pick(self, tmp_path):
        stack = tmp_path / "stack"
        stack.mkdir()
        rng = np.random.default_rng(2)
        # 64 x 64, the network's own size: a blend of another size is decoded from resized logits,
        # whose argmax may differ from the resized index of the pick.
        base = cv2.GaussianBlur(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), (0, 0), 1)
        for k, sigma in enumerate((0.1, 2.0, 4.0), start=1):
            cv2.imwrite(str(stack / f"{k}.png"), cv2.GaussianBlur(base, (0, 0), sigma) if sigma > 0.5 else base)
        outputs = {}
        for label, extra in (("card", []), ("pick", ["--fusion_temperature", "0"])):
            out = tmp_path / label
            result = run_predict("--input_dir", str(stack), "--output_dir", str(out), "--fixed_names", "--device",
                                 "cpu", *extra, cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            outputs[label] = (cv2.imread(str(out / "color_fused.png")), np.load(out / "depth_index.npy"))
        slices = [cv2.imread(str(stack / f"{k}.png")) for k in (1, 2, 3)]
        picked, index = outputs["pick"]
        assert np.array_equal(picked, fuse_colour(slices, index, None, FusionCard()))   # every pixel from one slice
        blended, card_index = outputs["card"]
        assert np.array_equal(card_index, index)                            # the blend leaves the index alone
        assert not np.array_equal(blended, picked)
