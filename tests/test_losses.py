"""losses.DepthLoss: the released MSE and each extra term on inputs with known answers."""
import pytest
import torch
import torch.nn.functional as F

from fusion import FusionCard, blend, soft_weights
from losses import DepthLoss, LossWeights, sharpest_slice_index
from utils import InputError


def confident(k, n=4, size=2):
    """Logits that put all mass on slice k at every pixel: (1, n, size, size)."""
    logits = torch.zeros(1, n, size, size)
    logits[:, k] = 60.0
    return logits


class TestWeights:
    def test_released_loss_has_every_term_off(self):
        assert LossWeights() == LossWeights(ce=0.0, fusion=0.0, distance=0.0)

    @pytest.mark.parametrize("term", ["ce", "fusion", "distance"])
    def test_negative_or_nan_weight_is_refused(self, term):
        for bad in (-0.1, float("nan")):
            with pytest.raises(ValueError, match=f"weight of the {term} term"):
                LossWeights(**{term: bad})

    def test_unknown_ce_target_is_refused(self):
        with pytest.raises(ValueError, match="ce_target must be one of"):
            DepthLoss(ce_target="closest")


class TestTerms:
    def test_mse_is_the_released_loss_and_ce_adds_a_term(self):
        torch.manual_seed(0)
        logits = torch.randn(2, 4, 8, 8)
        depth, target = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
        mse = DepthLoss()(logits, depth, target)
        torch.testing.assert_close(mse, ((depth - target) ** 2).mean())
        # Logits that put all mass on the true bin make the cross-entropy vanish.
        index = (target[:, 0] * 4).floor().clamp(0, 3).long()
        perfect = F.one_hot(index, 4).permute(0, 3, 1, 2).float() * 50
        torch.testing.assert_close(DepthLoss(LossWeights(ce=0.1))(perfect, depth, target), mse, atol=1e-6, rtol=0)
        expected = mse + F.cross_entropy(logits, index)
        torch.testing.assert_close(DepthLoss(LossWeights(ce=1.0))(logits, depth, target), expected)
        assert expected > mse + 1.0

    def test_fusion_term_counts_only_where_the_slices_differ(self):
        # Two slices that differ by 0.5 on the left half only; the truth is slice 1 everywhere.
        stack = torch.zeros(1, 2, 4, 4)
        stack[0, 0, :, :2] = 0.5
        target = torch.ones(1, 1, 4, 4)                      # floor(1 * 2) -> last slice
        depth = torch.ones(1, 1, 4, 4)                       # no MSE
        loss = DepthLoss(LossWeights(fusion=2.0))
        wrong = confident(0, n=2, size=4)                    # confidently slice 0 everywhere
        torch.testing.assert_close(loss(wrong, depth, target, stack), torch.tensor(2.0 * 0.5 * 0.5))
        assert loss(wrong.flip(1), depth, target, stack) < 1e-12

    def test_fusion_term_uses_the_all_in_focus_channel_when_given(self):
        # Both slices are 0.5 away from the sharp image: picking either costs 0.5 per pixel, while
        # the gathered-slice target would cost nothing for the ground-truth slice.
        stack = torch.zeros(1, 2, 4, 4)
        stack[0, 1] = 1.0
        target = torch.cat((torch.ones(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.5)), dim=1)
        depth = torch.ones(1, 1, 4, 4)
        loss = DepthLoss(LossWeights(fusion=2.0))
        right = confident(1, n=2, size=4)                    # confidently the ground-truth slice
        assert loss(right, depth, target[:, :1], stack) < 1e-12
        torch.testing.assert_close(loss(right, depth, target, stack), torch.tensor(2.0 * 0.5))
        even = torch.zeros(1, 2, 4, 4)                       # an even blend is the sharp image here
        assert loss(even, depth, target, stack) < 1e-12

    def test_fusion_term_scores_the_cards_blend(self):
        # Flat slices 0.2, 0.5, 1.0 and a torn network: slices 0 and 2 equally likely, slice 1 less.
        # The sharp image is the middle slice. The plain softmax blend is 0.58 there; a narrow
        # depth window around the expected slice (the middle) makes the blend the middle slice.
        stack = torch.tensor([0.2, 0.5, 1.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4).clone()
        target = torch.cat((torch.ones(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.5)), dim=1)
        depth = torch.ones(1, 1, 4, 4)
        torn = torch.tensor([0.0, -1.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
        plain_weights = torch.softmax(torn[0, :, 0, 0], dim=0)
        plain_error = abs(float((plain_weights * torch.tensor([0.2, 0.5, 1.0])).sum()) - 0.5)
        plain = DepthLoss(LossWeights(fusion=1.0))(torn, depth, target, stack)
        assert plain.item() == pytest.approx(plain_error, abs=1e-6) and plain_error > 0.05
        # A card that picks by index is scored by the plain softmax (a pick has no gradient).
        pick = DepthLoss(LossWeights(fusion=1.0), card=FusionCard(index_rule="argmax", views=4))
        torch.testing.assert_close(pick(torn, depth, target, stack), plain)
        windowed = DepthLoss(LossWeights(fusion=1.0), card=FusionCard(fusion_temperature=1.0, depth_window=0.25))
        assert windowed(torn, depth, target, stack).item() < 0.002
        # With a focus prior too, the term is the L1 of exactly fusion.soft_weights' blend.
        logits, textured = torch.randn(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
        sharp = torch.cat((torch.ones(2, 1, 8, 8), torch.rand(2, 1, 8, 8)), dim=1)
        card = FusionCard(fusion_temperature=0.5, focus_prior=4.0, depth_window=1.5)
        weights = soft_weights(textured, logits, card)
        expected = 3.0 * ((weights * textured).sum(dim=1) - sharp[:, 1]).abs().mean()
        loss = DepthLoss(LossWeights(fusion=3.0), card=card)
        torch.testing.assert_close(loss(logits, torch.ones(2, 1, 8, 8), sharp, textured), expected)

    def test_fusion_term_scores_the_two_band_blend(self):
        # Two slices that differ by an offset, picked left | right: one band leaves a step at the
        # seam, two bands smooth it. The term must be the L1 of exactly fusion.blend's image.
        torch.manual_seed(0)
        texture = torch.rand(1, 1, 16, 16)
        stack = torch.cat((texture, texture + 0.3), dim=1)                      # (1, 2, 16, 16)
        logits = torch.zeros(1, 2, 16, 16)
        logits[:, 0, :, :8], logits[:, 1, :, 8:] = 30.0, 30.0
        target = torch.cat((torch.ones(1, 1, 16, 16), texture + 0.15), dim=1)
        depth = torch.ones(1, 1, 16, 16)
        losses = {}
        for bands in ((0.0, 0.0), (2.0, 0.7)):
            card = FusionCard(fusion_temperature=1.0, base_sigma=bands[0], base_weight_sigma=bands[1])
            weights = soft_weights(stack, logits, card)
            expected = 5.0 * (blend(stack, weights, card)[:, 0] - target[:, 1]).abs().mean()
            losses[bands] = DepthLoss(LossWeights(fusion=5.0), card=card)(logits, depth, target, stack)
            torch.testing.assert_close(losses[bands], expected)
        assert losses[(0.0, 0.0)].item() == pytest.approx(5.0 * 0.15, abs=1e-4)   # one band: 0.15 off everywhere
        assert losses[(2.0, 0.7)] != losses[(0.0, 0.0)]

    def test_sharpest_target_replaces_only_spoilt_true_slices(self):
        # 3 slices, 1 x 3 pixels; the truth is slice 2 everywhere. Pixel 0: slice 2 is spoilt
        # (0.3 off), slice 0 is exact -> 0. Pixel 1: every slice is as close (flat) -> stays 2.
        # Pixel 2: slice 1 is closer, but by less than the margin -> stays 2.
        stack = torch.tensor([[[[0.5, 0.2, 0.0]], [[0.9, 0.2, 0.50]], [[0.8, 0.2, 0.51]]]])
        sharp = torch.tensor([[[0.5, 0.2, 0.50]]])
        true_index = torch.full((1, 1, 3), 2)
        assert sharpest_slice_index(stack, sharp, true_index).tolist() == [[[0, 2, 2]]]
        target = torch.cat((torch.ones(1, 1, 1, 3), sharp[:, None]), dim=1)    # depth 1 -> last slice
        logits = torch.randn(1, 3, 1, 3)
        depth = torch.ones(1, 1, 1, 3)
        loss = DepthLoss(LossWeights(ce=1.0), ce_target="sharpest")
        expected = F.cross_entropy(logits, torch.tensor([[[0, 2, 2]]]))
        torch.testing.assert_close(loss(logits, depth, target, stack), expected)
        with pytest.raises(InputError, match="needs the all-in-focus"):
            loss(logits, depth, target[:, :1], stack)

    def test_distance_term_charges_far_misses_more(self):
        target = torch.zeros(1, 1, 2, 2)                     # truth: slice 0 of 4 everywhere
        depth = torch.zeros(1, 1, 2, 2)
        loss = DepthLoss(LossWeights(distance=0.5))
        costs = [loss(confident(k), depth, target).item() for k in range(4)]
        assert costs == pytest.approx([0.0, 0.5, 1.0, 1.5], abs=1e-6)

    def test_terms_add_up(self):
        torch.manual_seed(1)
        logits, stack = torch.randn(2, 4, 8, 8), torch.rand(2, 4, 8, 8)
        depth, target = torch.rand(2, 1, 8, 8), torch.rand(2, 2, 8, 8)
        alone = [DepthLoss(LossWeights(**{k: 1.0}))(logits, depth, target, stack) for k in ("ce", "fusion", "distance")]
        mse = DepthLoss()(logits, depth, target, stack)
        together = DepthLoss(LossWeights(ce=1.0, fusion=1.0, distance=1.0))(logits, depth, target, stack)
        torch.testing.assert_close(together, sum(a - mse for a in alone) + mse)
