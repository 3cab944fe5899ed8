"""make_datasets/thinlens.py: the thin-lens geometry, the scene layout, and a small render when Mitsuba is there."""
import importlib.util
import math
import subprocess
import sys

import cv2
import numpy as np
import pytest

from make_datasets import thinlens
from make_datasets.thinlens import (FARTHEST, NEAREST, aperture_radius, focal_pixels, focus_distances,
                                    scene_layout)
from utils import InputError

from conftest import REPO

has_mitsuba = importlib.util.find_spec("mitsuba") is not None


def test_focus_distances_are_even_in_dioptres_from_nearest_to_farthest():
    distances = focus_distances(5)
    assert distances[0] == pytest.approx(NEAREST) and distances[-1] == pytest.approx(FARTHEST)
    np.testing.assert_allclose(np.diff(1 / distances), (1 / FARTHEST - 1 / NEAREST) / 4)


def test_the_aperture_gives_the_asked_blur_radius():
    # A point at FARTHEST focused at NEAREST spreads over a * |1/d - 1/f| * focal_pixels px.
    for width, blur in ((1024, 20.0), (640, 6.0)):
        a = aperture_radius(blur, width)
        assert a * (1 / NEAREST - 1 / FARTHEST) * focal_pixels(width) == pytest.approx(blur)
    assert focal_pixels(1024) == pytest.approx(512 / math.tan(math.radians(20)))


def test_scenes_are_reproducible_and_the_background_fills_the_view():
    photos = [(f"p{k}.png", (1200 if k == 3 else 480, 320)) for k in range(6)]
    one = scene_layout(photos, np.random.default_rng([7, 0]), (1024, 768), (3, 5))
    assert one == scene_layout(photos, np.random.default_rng([7, 0]), (1024, 768), (3, 5))
    background, *cards = one
    assert background[0] == "p3.png" and background[1] == FARTHEST         # the only photo wide enough
    half_view = math.tan(math.radians(thinlens.FOV_DEGREES) / 2) * FARTHEST
    assert background[4] >= 1.3 * half_view and background[5] >= 1.3 * half_view * 768 / 1024
    assert 3 <= len(cards) <= 5
    for photo, distance, *_ in cards:
        assert NEAREST <= distance <= 0.85 * FARTHEST


def test_without_mitsuba_it_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mitsuba", None)                    # import mitsuba -> ImportError
    with pytest.raises(InputError, match="pip install mitsuba"):
        thinlens._import_mitsuba()


def test_bad_settings_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "make_datasets" / "thinlens.py"), "--image_dir",
                             str(tmp_path), "--output_dir", str(tmp_path / "out"), "--num_slices", "1"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--num_slices" in result.stderr


@pytest.mark.skipif(not has_mitsuba, reason="needs Mitsuba 3 (pip install mitsuba)")
def test_a_small_render_has_the_truth_it_claims(tmp_path):
    """Slices sharp where the index says, blurred elsewhere; the pinhole image is the sharpest of all."""
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        noise = cv2.resize(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), (320, 240),
                           interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(photos / f"{k}.png"), noise)
    layout = scene_layout([(p, (320, 240)) for p in sorted(photos.glob("*.png"))], np.random.default_rng(1),
                          (160, 120), (1, 2))
    stack = thinlens.render_stack(layout, (160, 120), 4, 6.0, spp=16)
    assert len(stack.slices) == 4 and stack.all_in_focus.shape == (120, 160, 3)
    truth = stack.all_in_focus.astype(np.float32)
    errors = np.stack([np.abs(s.astype(np.float32) - truth).mean(axis=2) for s in stack.slices])
    sharpest = errors.argmin(axis=0)
    assert (sharpest == stack.focus_index).mean() > 0.6
