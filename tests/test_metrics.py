"""Every metric on hand-made images whose answers are known."""
import math

import cv2
import numpy as np
import pytest
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import metrics as M


@pytest.fixture(scope="module")
def camera():
    """A natural 8-bit gray photograph (512x512, values 0..255) as float64."""
    return data.camera().astype(np.float64)


@pytest.fixture(scope="module")
def midtones(camera):
    """128x128 crop squeezed into 20..200 so that +-some offsets never clip."""
    crop = camera[200:328, 200:328]
    return 20 + crop * (180 / 255)


def _stripes(height=64, width=64):
    """Columns alternating 0 and 255."""
    image = np.zeros((height, width))
    image[:, 1::2] = 255
    return image


# Q^{AB/F} when every edge is kept exactly: the product of the two sigmoids at 1.
QABF_PERFECT = 0.9994 / (1 + math.exp(-15 * 0.5)) * 0.9879 / (1 + math.exp(-22 * 0.2))


class TestToGray255:
    def test_scales_8_and_16_bit_to_0_255(self):
        assert M.to_gray255(np.array([[0, 255]], np.uint8)).tolist() == [[0.0, 255.0]]
        assert M.to_gray255(np.array([[0, 65535]], np.uint16)).tolist() == [[0.0, 255.0]]

    def test_colour_goes_through_opencv_gray(self):
        bgr = np.zeros((2, 2, 3), np.uint8)
        bgr[..., 2] = 200  # pure red
        expected = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.float64)
        np.testing.assert_array_equal(M.to_gray255(bgr), expected)


class TestIdentical:
    @pytest.mark.parametrize("fn", [M.mse, M.mae, M.rmse, M.log_rms, M.abs_rel, M.sq_rel])
    def test_errors_are_zero(self, fn, midtones):
        assert fn(midtones, midtones.copy()) == 0.0

    def test_psnr_is_infinite(self, midtones):
        assert M.psnr(midtones, midtones.copy()) == math.inf

    def test_ssim_and_vif_are_one(self, midtones):
        assert M.ssim(midtones, midtones.copy()) == pytest.approx(1.0, abs=1e-12)
        assert M.vif(midtones, midtones.copy()) == pytest.approx(1.0, abs=1e-6)

    def test_mutual_information_equals_entropy(self, midtones):
        assert M.mutual_information(midtones, midtones.copy()) == pytest.approx(M.entropy(midtones), abs=1e-9)


class TestConstantOffset:
    OFFSET = 10.0

    def test_error_metrics(self, midtones):
        fused = midtones + self.OFFSET
        assert M.mse(fused, midtones) == pytest.approx(100.0)
        assert M.mae(fused, midtones) == pytest.approx(10.0)
        assert M.rmse(fused, midtones) == pytest.approx(10.0)
        assert M.psnr(fused, midtones) == pytest.approx(10 * math.log10(255 ** 2 / 100))

    def test_relative_metrics_divide_by_the_ground_truth(self, midtones):
        fused = midtones + self.OFFSET
        assert M.abs_rel(fused, midtones) == pytest.approx(np.mean(10 / midtones))
        assert M.sq_rel(fused, midtones) == pytest.approx(np.mean(100 / midtones))
        assert M.log_rms(fused, midtones) == pytest.approx(np.sqrt(np.mean(np.log(fused / midtones) ** 2)))

    def test_shift_invariant_metrics_do_not_move(self, midtones):
        fused = np.round(midtones) + self.OFFSET
        for fn in (M.spatial_frequency, M.average_gradient, M.standard_deviation, M.entropy):
            assert fn(fused) == pytest.approx(fn(np.round(midtones)), abs=1e-9)
        # a shift is a one-to-one map of gray levels: nothing is lost
        assert M.mutual_information(fused, np.round(midtones)) == pytest.approx(M.entropy(midtones), abs=1e-9)


class TestKnownNoise:
    def test_gaussian_noise_of_sigma_5(self, midtones):
        noise = np.random.default_rng(0).normal(0, 5, midtones.shape)
        fused = midtones + noise
        assert M.mse(fused, midtones) == pytest.approx(25, rel=0.05)
        assert M.rmse(fused, midtones) == pytest.approx(5, rel=0.03)
        assert M.mae(fused, midtones) == pytest.approx(5 * math.sqrt(2 / math.pi), rel=0.03)
        assert M.psnr(fused, midtones) == pytest.approx(20 * math.log10(255 / 5), abs=0.2)
        assert 0 < M.ssim(fused, midtones) < 1
        assert 0 < M.vif(fused, midtones) < 1

    def test_more_noise_scores_worse_everywhere(self, midtones):
        rng = np.random.default_rng(1)
        light = midtones + rng.normal(0, 2, midtones.shape)
        heavy = midtones + rng.normal(0, 20, midtones.shape)
        assert M.psnr(light, midtones) > M.psnr(heavy, midtones)
        assert M.ssim(light, midtones) > M.ssim(heavy, midtones)
        assert M.vif(light, midtones) > M.vif(heavy, midtones)
        assert M.mutual_information(light, midtones) > M.mutual_information(heavy, midtones)


class TestAgainstScikitImage:
    def test_psnr_and_ssim_match_skimage_on_uint8(self, camera):
        truth = camera[:96, :128].astype(np.uint8)
        noisy = np.clip(truth + np.random.default_rng(2).normal(0, 8, truth.shape), 0, 255).astype(np.uint8)
        assert M.psnr(M.to_gray255(noisy), M.to_gray255(truth)) == pytest.approx(
            peak_signal_noise_ratio(truth, noisy), rel=1e-12)
        assert M.ssim(M.to_gray255(noisy), M.to_gray255(truth)) == pytest.approx(
            structural_similarity(truth, noisy, gaussian_weights=True, sigma=1.5, use_sample_covariance=False),
            rel=1e-12)


class TestArgumentOrder:
    def test_relative_errors_use_the_second_argument_as_truth(self):
        fused, truth = np.full((8, 8), 150.0), np.full((8, 8), 100.0)
        assert M.abs_rel(fused, truth) == pytest.approx(0.5)
        assert M.abs_rel(truth, fused) == pytest.approx(50 / 150)
        assert M.sq_rel(fused, truth) == pytest.approx(2500 / 100)

    def test_vif_is_not_symmetric(self, midtones):
        # Raising the contrast of the reference adds visual information (VIF > 1);
        # the same pair the other way round has lost some (VIF < 1).
        stretched = midtones.mean() + 1.3 * (midtones - midtones.mean())
        assert M.vif(midtones, stretched) < 1 < M.vif(stretched, midtones)

    def test_pair_metrics_are_symmetric_in_the_sources(self, midtones):
        other = np.random.default_rng(3).uniform(0, 255, midtones.shape)
        fused = (midtones + other) / 2
        assert M.qabf(midtones, other, fused) == pytest.approx(M.qabf(other, midtones, fused))
        assert M.scd(midtones, other, fused) == pytest.approx(M.scd(other, midtones, fused))

    def test_size_mismatch_is_refused(self):
        with pytest.raises(ValueError, match="one size"):
            M.mse(np.zeros((4, 4)), np.zeros((4, 5)))


class TestNoReference:
    def test_stripes(self):
        stripes = _stripes()
        assert M.spatial_frequency(stripes) == pytest.approx(255.0)  # rows differ by 255, columns by 0
        assert M.average_gradient(stripes) == pytest.approx(255 / math.sqrt(2))
        assert M.entropy(stripes) == pytest.approx(1.0)
        assert M.standard_deviation(stripes) == pytest.approx(127.5)

    def test_flat_image(self):
        flat = np.full((64, 64), 77.0)
        for fn in (M.spatial_frequency, M.average_gradient, M.entropy, M.standard_deviation):
            assert fn(flat) == 0.0

    def test_entropy_of_all_256_levels_is_8_bits(self):
        assert M.entropy(np.arange(256.0).reshape(16, 16)) == pytest.approx(8.0)

    def test_sharper_image_has_more_detail(self, camera):
        blurred = cv2.GaussianBlur(camera, (0, 0), 3)
        assert M.spatial_frequency(camera) > M.spatial_frequency(blurred)
        assert M.average_gradient(camera) > M.average_gradient(blurred)


class TestNiqe:
    def test_matches_the_reference_implementation(self, camera):
        # BasicSR's port of the MATLAB code (which it matches to 1e-4) gives
        # 3.09638 on this image in float64; the MATLAB resize is the only
        # step done differently (float64 here).
        assert M.niqe(camera) == pytest.approx(3.0964, abs=1e-3)

    def test_noise_and_blur_look_less_natural(self, camera):
        crop = camera[:256, :256]
        noisy = crop + np.random.default_rng(4).normal(0, 25, crop.shape)
        blurred = cv2.GaussianBlur(crop, (0, 0), 4)
        assert M.niqe(noisy) > M.niqe(crop) + 2
        assert M.niqe(blurred) > M.niqe(crop) + 2

    def test_too_small_is_refused(self):
        with pytest.raises(ValueError, match="96x96"):
            M.niqe(np.zeros((95, 200)))

    def test_pristine_model_is_shipped(self):
        mu, cov = M._niqe_pristine()
        assert mu.shape == (36,) and cov.shape == (36, 36)
        np.testing.assert_allclose(cov, cov.T)


@pytest.fixture(scope="module")
def sources():
    """Two independent smooth random textures, 64x64 on 0..255."""
    rng = np.random.default_rng(5)
    texture_a = cv2.GaussianBlur(rng.uniform(0, 255, (64, 64)), (0, 0), 1)
    texture_b = cv2.GaussianBlur(rng.uniform(0, 255, (64, 64)), (0, 0), 1)
    return texture_a, texture_b


class TestPairMetrics:
    def test_qabf_perfect_when_fused_equals_both_sources(self, sources):
        a, _ = sources
        assert M.qabf(a, a, a) == pytest.approx(QABF_PERFECT, abs=1e-9)

    def test_qabf_reads_each_source_s_own_gradients(self, sources):
        a, b = sources
        flat = np.full_like(a, 100.0)
        # a flat source carries no edge weight: only the textured one counts
        assert M.qabf(a, flat, a) == pytest.approx(QABF_PERFECT, abs=1e-9)
        assert M.qabf(flat, b, b) == pytest.approx(QABF_PERFECT, abs=1e-9)
        assert M.qabf(a, flat, flat) < 0.01

    def test_qabf_prefers_the_fusion_that_keeps_both(self, sources):
        a, b = sources
        half = a.shape[1] // 2
        flat = np.full_like(a, 100.0)
        source_a = np.hstack([a[:, :half], flat[:, half:]])   # sharp left only
        source_b = np.hstack([flat[:, :half], b[:, half:]])   # sharp right only
        good = np.hstack([a[:, :half], b[:, half:]])
        assert M.qabf(source_a, source_b, good) > M.qabf(source_a, source_b, source_a) + 0.2
        assert 0 <= M.qabf(source_a, source_b, source_a) <= 1

    def test_scd_of_sum_is_two(self, sources):
        a, b = sources
        assert M.scd(a, b, a + b) == pytest.approx(2.0)

    def test_scd_of_one_source(self, sources):
        a, b = sources
        # F - A is 0 (no information), F - B = A - B correlates with A as 1/sqrt(2) for equal spreads
        expected = M._correlation(a - b, a)
        assert M.scd(a, b, a) == pytest.approx(expected)
        assert 0.5 < expected < 0.9
        assert -2 <= M.scd(a, b, np.random.default_rng(6).uniform(0, 255, a.shape)) <= 2


class TestDepthAndRegistry:
    def test_depth_errors_in_unit_range(self):
        truth = np.linspace(0, 1, 100).reshape(10, 10)
        depth = {m.name: m for m in M.METRICS if m.kind == "depth"}
        assert depth["depth MSE"].fn(truth + 0.1, truth) == pytest.approx(0.01)
        assert depth["depth MAE"].fn(truth + 0.1, truth) == pytest.approx(0.1)

    def test_every_metric_of_the_issue_is_listed_once(self):
        expected = {"SSIM", "PSNR", "MSE", "MAE", "RMSE", "logRMS", "AbsRel", "SqRel", "VIF", "MI",
                    "NIQE", "SF", "AG", "EN", "SD", "Qabf", "SCD", "depth MSE", "depth MAE"}
        assert set(M.METRIC_NAMES) == expected and len(M.METRIC_NAMES) == len(expected)

    def test_value_ranges_on_random_images(self):
        rng = np.random.default_rng(7)
        a, b = rng.uniform(0, 255, (2, 100, 100))
        assert -1 <= M.ssim(a, b) <= 1
        assert M.vif(a, b) >= 0
        assert M.mutual_information(a, b) >= 0
        assert 0 <= M.entropy(a) <= 8
        assert 0 <= M.qabf(a, b, (a + b) / 2) <= 1
        assert M.niqe(a) > 0
