"""inference.py: where each decoding runs (network size or input size)."""
import numpy as np
import pytest

from conftest import textured_stack
from fusion import FusionCard
from inference import fuse_images
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
