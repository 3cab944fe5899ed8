"""bench/peers.py: the classical fusers on two-slice stacks whose answer is known."""
import sys

import cv2
import numpy as np
import pytest

from bench.peers import (OpenFocus, argmax_laplacian, dtcwt_available, dtcwt_fusion, guided_filter,
                         guided_filter_fusion, laplacian_pyramid)


def psnr(a, b):
    return 10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2))


@pytest.fixture(scope="module")
def halves():
    """(stack, sharp): slice 0 sharp on the left half only, slice 1 on the right half only."""
    rng = np.random.default_rng(0)
    sharp = cv2.GaussianBlur(rng.uniform(0, 1, (96, 128)).astype(np.float32), (0, 0), 1.0)
    sharp = np.clip((sharp - sharp.mean()) * 4 + 0.5, 0, 1)
    blurred = cv2.GaussianBlur(sharp, (0, 0), 3.0)
    left = np.zeros(sharp.shape, bool)
    left[:, :64] = True
    stack = np.stack([np.where(left, sharp, blurred), np.where(left, blurred, sharp)])
    return stack, sharp


# Away from the seam at x = 64 (each method's support reaches a few to tens of px across it).
AWAY = (slice(8, -8), np.r_[8:40, 88:120])


def test_argmax_takes_the_sharp_half_exactly(halves):
    stack, sharp = halves
    fused, index = argmax_laplacian(stack)
    np.testing.assert_array_equal(fused[AWAY], sharp[AWAY])
    assert (index[:, 8:56] == 0).all() and (index[:, 72:-1] == 1).all()


@pytest.mark.parametrize("fuse, least_db", [(laplacian_pyramid, 40), (guided_filter_fusion, 50),
                                             (dtcwt_fusion, 33)])
def test_fusers_recover_the_sharp_halves(halves, fuse, least_db):
    if fuse is dtcwt_fusion and not dtcwt_available():
        pytest.skip("the dtcwt package is not installed")
    stack, sharp = halves
    fused, index = fuse(stack)
    assert fused.shape == sharp.shape and index is None
    score = psnr(fused[AWAY], sharp[AWAY])
    # Far above either input slice and their mean, which each keep one blurred half.
    inputs = max(psnr(s[AWAY], sharp[AWAY]) for s in list(stack) + [stack.mean(axis=0)])
    assert score > least_db > inputs + 10


def test_fusers_keep_a_stack_of_equal_slices():
    image = cv2.GaussianBlur(np.random.default_rng(1).uniform(0, 1, (40, 56)).astype(np.float32), (0, 0), 1.0)
    stack = np.stack([image] * 3)
    for fuse in (argmax_laplacian, laplacian_pyramid, guided_filter_fusion):
        np.testing.assert_allclose(fuse(stack)[0], image, atol=1e-4)


def test_guided_filter_keeps_edges_of_its_guide():
    guide = np.zeros((32, 32), np.float32)
    guide[:, 16:] = 1
    out = guided_filter(guide, guide.copy(), radius=4, eps=1e-6)
    np.testing.assert_allclose(out, guide, atol=1e-3)         # a step is its own best linear fit
    smooth = guided_filter(guide, guide.copy(), radius=4, eps=10.0)
    assert np.abs(smooth - guide)[:, 14:18].min() > 0.05      # a large eps smooths like a box filter


def test_openfocus_absent_and_failing(tmp_path):
    assert not OpenFocus(tmp_path / "no_such_openfocus").available
    assert not OpenFocus("").available
    failing = tmp_path / "openfocus"
    failing.write_text(f"#!{sys.executable}\nimport sys\nprint('bad input', file=sys.stderr)\nsys.exit(3)\n")
    failing.chmod(0o755)
    runner = OpenFocus(failing)
    assert runner.available
    from utils import InputError
    with pytest.raises(InputError, match=r"exit 3\): bad input"):
        runner([np.zeros((8, 8, 3), np.uint8)] * 2)
