"""The network's working scale (working_scale.py) and the full-size decoding in strips (strips.py).

Known answers: stacks blurred by Gaussians of known sigma for the blur
estimate; an upscaled stack, whose optics are the native stack's with the
blur spread over more pixels, for the shrunk network; the whole-image
decoding for the strips.
"""
import cv2
import numpy as np
import pytest
import skimage.data
import torch

from fusion import FusionCard, fuse
from inference import DEFAULT_MODEL, fuse_images
from make_datasets.synthesis import physical_stack
from model import load_model
from strips import fuse_in_strips, strip_rows
from synthetic_stacks import smooth_depth, textured_image
from tiling import resized_crop
from utils import to_gray, to_gray_float
from working_scale import MIN_SHRINK, estimate_blur, working_factor


def gaussian_stack(image: np.ndarray, far_sigma: float, n: int = 6) -> np.ndarray:
    """Slice k of ``image`` blurred by a Gaussian of far_sigma * k / (n - 1): sharp first, blurred last."""
    return np.stack([image if k == 0 else cv2.GaussianBlur(image, (0, 0), far_sigma * k / (n - 1))
                     for k in range(n)])


def psnr(a, b) -> float:
    return float(10 * np.log10(1.0 / np.mean((np.clip(a, 0, 1).astype(np.float64) - b) ** 2)))


class TestBlurEstimate:
    @pytest.mark.parametrize("sigma", [2.0, 4.0, 8.0])
    def test_follows_the_blur_of_the_far_end(self, sigma):
        image = textured_image(np.random.default_rng(0), 384)
        blur = estimate_blur(gaussian_stack(image, sigma))
        assert 0.7 * sigma <= blur <= 1.4 * sigma, blur

    def test_doubles_when_the_stack_is_upscaled_twice(self):
        stack = gaussian_stack(textured_image(np.random.default_rng(1), 512), 3.0)
        twice = np.stack([cv2.resize(s, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC) for s in stack])
        assert 1.6 <= estimate_blur(twice) / estimate_blur(stack) <= 2.5

    def test_a_blur_too_narrow_for_the_shrunk_copy_is_measured_at_full_size(self):
        # 2304 px: the copy is shrunk 3 times, where a 1.2 px blur is under half a pixel.
        image = textured_image(np.random.default_rng(2), 2304)
        blur = estimate_blur(gaussian_stack(image, 1.2, n=3))
        assert 0.8 <= blur <= 1.8, blur

    def test_identical_or_flat_slices_have_no_blur(self):
        image = textured_image(np.random.default_rng(3), 256)
        assert estimate_blur(np.stack([image] * 4)) == 0.0
        assert estimate_blur(np.full((3, 64, 64), 128, np.uint8)) == 0.0


class TestWorkingFactor:
    def test_the_card_decides(self):
        card = FusionCard("argmax", fusion_temperature=1.0, network_blur=2.5, network_min_side=256)
        assert working_factor(FusionCard(), 30.0, (4000, 6000)) == 1.0          # released: never shrunk
        assert working_factor(card, 10.0, (4000, 6000)) == 4.0                   # blur / network_blur
        assert working_factor(card, 100.0, (768, 1024)) == 4.0                   # long side kept at 256
        assert working_factor(card, 2.5 * (MIN_SHRINK - 0.1), (4000, 6000)) == 1.0   # too small a shrink
        assert working_factor(card.with_overrides(network_min_side=0), 100.0, (768, 1024)) == 40.0

    def test_a_working_scale_needs_the_argmax_index(self):
        with pytest.raises(ValueError, match="network_blur 2.5 needs index_rule argmax"):
            FusionCard(network_blur=2.5)


class TestStrips:
    def setup_method(self):
        rng = np.random.default_rng(4)
        self.n, self.h, self.w = 5, 70, 90
        gray = np.stack([textured_image(rng, 96)[:self.h, :self.w] for _ in range(self.n)])
        self.images = [cv2.merge([g, np.roll(g, 2, axis=1), 255 - g]) for g in gray]
        self.gray = np.stack([to_gray(im) for im in self.images])
        self.logits = torch.from_numpy(rng.normal(0, 3, (self.n, 32, 32)).astype(np.float32))
        self.coarse = torch.from_numpy(rng.random((self.n, 32, 32)).astype(np.float32) * 0.01)
        self.card = FusionCard.beside(DEFAULT_MODEL)

    def test_any_strip_height_gives_the_whole_image(self):
        whole = fuse_in_strips(self.images, self.gray, self.logits, self.card, self.coarse, rows=self.h)
        for rows in (1, 7, 33):
            strips = fuse_in_strips(self.images, self.gray, self.logits, self.card, self.coarse, rows=rows)
            for got, want in zip(strips, whole):
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

    def test_matches_the_whole_image_decoding_of_the_resized_logits(self):
        # Without a depth window or a coarse prior the network's part of the scores is linear in the
        # logits, so resizing the scores is resizing the logits: fusion.fuse on the full size must agree.
        card = self.card.with_overrides(depth_window=0.0, depth_rule="index")
        fused, depth, index, colour = fuse_in_strips(self.images, self.gray, self.logits, card, rows=16)
        logits = resized_crop(lambda a, b, c, d: self.logits[:, a:b, c:d], (32, 32), (self.h, self.w),
                              (0, self.h), (0, self.w))[None]
        x = torch.from_numpy(self.gray.astype(np.float32) / 255)[None]
        whole = fuse(x, logits, card)
        np.testing.assert_allclose(fused, whole.fused[0, 0].numpy(), atol=1e-5)
        np.testing.assert_array_equal(index, whole.index[0].numpy())

    def test_at_the_network_size_the_strips_blend_by_soft_weights(self):
        """With logits and coarse energy at full size nothing is resized: the strips' blend must be
        fusion.blend by fusion.soft_weights with the coarse energy, the prior shared between scales."""
        from fusion import blend, soft_weights
        rng = np.random.default_rng(7)
        logits = torch.from_numpy(rng.normal(0, 3, (self.n, self.h, self.w)).astype(np.float32))
        coarse = torch.from_numpy(rng.random((self.n, self.h, self.w)).astype(np.float32) * 0.01)
        card = self.card.with_overrides(depth_rule="index")
        fused, _, _, _ = fuse_in_strips(self.images, self.gray, logits, card, coarse, rows=9)
        x = torch.from_numpy(self.gray.astype(np.float32) / 255)[None]
        want = blend(x, soft_weights(x, logits[None], card, coarse[None]), card)[0, 0].numpy()
        np.testing.assert_allclose(fused, want, atol=1e-5)
        without = blend(x, soft_weights(x, logits[None], card), card)[0, 0].numpy()
        assert np.abs(fused - without).max() > 1e-3                      # the coarse share does count

    def test_strip_height_follows_the_memory_budget(self):
        assert strip_rows(30, 6000, 8, budget=512 * 1024 ** 2) == 46
        assert strip_rows(1000, 6000, 8, budget=512 * 1024 ** 2) == 16            # never below the floor


class TestShrunkStacks:
    def test_an_upscaled_stack_fuses_as_well_as_the_original(self):
        """Upscaled 4x, the same optics with the blur over 16x more pixels: the network at its own size
        loses 20 dB; shrunk by the measured blur it comes within 1.5 dB of the original's fusion."""
        torch.manual_seed(0)
        image = cv2.cvtColor(cv2.resize(skimage.data.astronaut(), (128, 128), interpolation=cv2.INTER_AREA),
                             cv2.COLOR_RGB2BGR)
        slices, _ = physical_stack(image, smooth_depth(np.random.default_rng(3), 128), 6, max_sigma=3.0)
        model, card = load_model(DEFAULT_MODEL), FusionCard.beside(DEFAULT_MODEL)
        shrinking = card.with_overrides(network_blur=2.5, network_min_side=96)

        def up(x):
            return cv2.resize(x, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
        native = psnr(fuse_images(model, card, list(slices)).fused_gray, to_gray_float(image))
        truth = to_gray_float(up(image))
        upscaled = [up(s) for s in slices]
        whole = fuse_images(model, card.with_overrides(network_blur=0.0), upscaled)
        shrunk = fuse_images(model, shrinking, upscaled)
        assert shrunk.working_factor > 2 and whole.working_factor == 1
        assert psnr(shrunk.fused_gray, truth) >= native - 1.5
        assert psnr(shrunk.fused_gray, truth) >= psnr(whole.fused_gray, truth) + 10
        assert shrunk.colour.shape == upscaled[0].shape and shrunk.index.shape == truth.shape


def test_a_memory_bound_shrinks_the_network_further():
    """Where the network pass at the blur's scale would not fit, the stack is shrunk until it does."""
    from inference import WHOLE_IMAGE_BYTES_PER_SAMPLE, memory_factor
    from memory import GIB
    n, h, w = 8, 2000, 3000
    assert memory_factor((n, h, w), 0, max_memory=64) == 1.0
    bound = 1.0                                                          # GiB
    factor = memory_factor((n, h, w), 100 * 1024 ** 2, max_memory=bound)
    room = 0.9 * bound * GIB - 100 * 1024 ** 2 - 512 * 1024 ** 2 - 8 * 4 * h * w
    assert factor > 1 and n * (h / factor) * (w / factor) * WHOLE_IMAGE_BYTES_PER_SAMPLE == pytest.approx(room)
    stack = gaussian_stack(textured_image(np.random.default_rng(5), 320), 6.0, n=4)
    model = load_model(DEFAULT_MODEL)
    card = FusionCard.beside(DEFAULT_MODEL).with_overrides(network_min_side=64)
    free = fuse_images(model, card, list(stack))
    bounded = fuse_images(model, card, list(stack), max_memory=0.03)
    assert free.working_factor > 1 and bounded.working_factor > free.working_factor
    assert bounded.fused_gray.shape == (320, 320)


def test_a_batch_shrinks_each_stack_as_its_own_blur_asks():
    """predict_datasets.py's batches (inference.fuse_stacks): a wide-blur and a narrow-blur stack of one
    size come out as each alone would (fuse_images), the one shrunk, the other not."""
    from inference import fuse_stacks
    image = textured_image(np.random.default_rng(6), 256)
    wide, narrow = gaussian_stack(image, 8.0, n=4), gaussian_stack(image, 1.0, n=4)
    model = load_model(DEFAULT_MODEL)
    card = FusionCard.beside(DEFAULT_MODEL).with_overrides(network_min_side=64)
    batch = fuse_stacks(model, card, [list(wide), list(narrow)])
    alone = [fuse_images(model, card, list(wide)), fuse_images(model, card, list(narrow))]
    assert batch[0].working_factor > 1 and batch[1].working_factor == 1
    for got, want in zip(batch, alone):
        np.testing.assert_allclose(got.fused_gray, want.fused_gray, atol=1e-6)
        np.testing.assert_array_equal(got.index, want.index)


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_and_gray_stacks_keep_their_type_when_shrunk(channels):
    image = cv2.resize(textured_image(np.random.default_rng(8), 96), (384, 384), interpolation=cv2.INTER_CUBIC)
    stack = [s.astype(np.uint16) * 257 for s in gaussian_stack(image, 10.0, n=4)]
    if channels == 3:
        stack = [cv2.merge([s, s, s]) for s in stack]
    card = FusionCard.beside(DEFAULT_MODEL).with_overrides(network_min_side=64)
    result = fuse_images(load_model(DEFAULT_MODEL), card, stack)
    assert result.working_factor > 1
    assert result.colour.dtype == np.uint16 and result.colour.shape == stack[0].shape
    sharp = stack[0].astype(np.float64)                                  # slice 0 is the sharp one everywhere
    assert np.abs(result.colour.astype(np.float64) - sharp).mean() < 0.02 * 65535
