"""bench/camera_scale.py's measures with known answers (the 24 MP runs themselves are a benchmark, not a test)."""
import cv2
import numpy as np
import pytest

from bench import camera_scale
from Registration import estimate_transforms, motion_extent


def test_registered_psnr_forgives_the_geometry_not_the_blur():
    truth = cv2.GaussianBlur(np.random.default_rng(0).random((160, 160)).astype(np.float32), (0, 0), 2)
    moved = cv2.warpAffine(truth, np.float32([[1.01, 0, -1.5], [0, 1.01, 0.8]]), (160, 160),
                           flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    plain, registered = camera_scale.psnr(moved, truth), camera_scale.registered_psnr(moved, truth)
    assert registered > 45 and registered > plain + 10                 # registered first: nearly exact
    doubled = 0.5 * (truth + np.roll(truth, 3, axis=1))               # a double edge stays a loss
    assert camera_scale.registered_psnr(doubled, truth) < registered - 10


def test_psnr_compares_a_cropped_output_on_the_centre_it_kept():
    truth = np.random.default_rng(1).random((40, 50)) * 0.9
    assert camera_scale.psnr(truth[1:-1, 2:-2] + 0.01, truth) == pytest.approx(40.0)   # 0.01 off: 40 dB


def test_the_breathing_stack_grows_by_the_asked_magnification():
    still, _ = camera_scale.breathing_stack(0.0, slices=4, noise=0.0)
    breathing, truth = camera_scale.breathing_stack(0.04, slices=4, noise=0.0)
    assert truth.shape == still[0].shape == (camera_scale.BREATHING_SIDE,) * 2 + (3,)
    for stack, zoom in ((still, 1.0), (breathing, 1.04)):
        transforms = estimate_transforms(stack, method="ecc")
        scales = [np.sqrt(abs(np.linalg.det(t[:2, :2]))) for t in transforms]
        np.testing.assert_allclose(scales[-1], 1 / zoom, atol=2e-3)        # last slice onto the first
    assert max(motion_extent(t, still[0].shape[:2]) for t in estimate_transforms(still, method="ecc")) < 0.1
