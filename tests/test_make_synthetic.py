"""The procedural synthetic source: layout, determinism, slice counts, depth convention."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO  # noqa: E402

from make_datasets import make_synthetic as ms  # noqa: E402
from utils import read_image, read_stack  # noqa: E402

SCRIPT = REPO / "make_datasets" / "make_synthetic.py"


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


class TestMakeScene:
    def test_same_seed_same_scene_other_seed_other_scene(self):
        a = ms.make_scene(3, 7, 64, (2, 32), "released")
        b = ms.make_scene(3, 7, 64, (2, 32), "released")
        c = ms.make_scene(4, 7, 64, (2, 32), "released")
        assert len(a[0]) == len(b[0])
        assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0]))
        assert np.array_equal(a[1], b[1])
        assert not np.array_equal(a[2], c[2])

    @pytest.mark.parametrize("n", [2, 3, 9, 32])
    def test_slice_count_and_full_depth_range(self, n):
        slices, depth_map, image = ms.make_scene(0, n, 64, (n, n), "released")
        assert len(slices) == n
        assert all(s.shape == image.shape == (64, 64, 3) and s.dtype == np.uint8 for s in slices)
        index = ms.depth_map_to_index(depth_map, n)
        # Both ends of the focus range occur, so min-max normalised depth matches k / (N - 1).
        assert index.min() == 0 and index.max() == n - 1
        assert np.array_equal(ms.index_to_depth_map(index, n), depth_map)

    def test_in_focus_slice_is_the_sharp_image(self):
        slices, depth_map, image = ms.make_scene(1, 0, 64, (8, 8), "released")
        index = ms.depth_map_to_index(depth_map, 8)
        chosen = np.take_along_axis(np.stack(slices), index[None, ..., None], axis=0)[0]
        assert np.array_equal(chosen, image)

    def test_depth_map_round_trip_is_exact_up_to_32(self):
        for n in range(2, 33):
            index = np.arange(n)[None]
            assert np.array_equal(ms.depth_map_to_index(ms.index_to_depth_map(index, n), n), index)


class TestDepthSteps:
    def test_step_share_of_a_half_and_half_map(self):
        # 8 slices, index 0 left of column 32 and 7 from it: the 11 px window of
        # columns 27..36 spans both sides, so 10 of 64 columns count.
        index = np.zeros((64, 64), np.int64)
        index[:, 32:] = 7
        assert ms.depth_step_share(index) == pytest.approx(10 / 64)
        # A ramp of one slice per 16 columns (wider than the window) has steps of 1 only: none count.
        assert ms.depth_step_share(np.tile(np.arange(64) // 16, (64, 1))) == 0.0

    def test_kept_scenes_pass_the_filter_and_keep_their_numbers(self):
        kept = list(ms.kept_scenes(0, 0, 3, 64, (8, 8), "released", min_step_share=0.3))
        numbers = [scene for scene, _ in kept]
        assert len(kept) == 3 and numbers == sorted(set(numbers))
        for scene, (slices, depth_map, image) in kept:
            assert ms.depth_step_share(ms.depth_map_to_index(depth_map, 8)) >= 0.3
            again = ms.make_scene(0, scene, 64, (8, 8), "released")
            assert np.array_equal(again[1], depth_map) and np.array_equal(again[2], image)
        skipped = set(range(numbers[-1])) - set(numbers)
        assert skipped, "seed 0 has scenes with few steps among its first ones; the filter must skip them"
        assert all(ms.make_scene(0, k, 64, (8, 8), "released", min_step_share=0.3) is None for k in skipped)
        for k in skipped:
            depth_map = ms.make_scene(0, k, 64, (8, 8), "released")[1]
            assert ms.depth_step_share(ms.depth_map_to_index(depth_map, 8)) < 0.3


class TestSegmentDepth:
    def test_every_segment_is_one_plane(self):
        # Four quadrant segments: inside each the depth is a plane (zero second
        # differences along both axes), so the steps lie on segment borders only.
        labels = np.zeros((64, 80), np.int64)
        labels[:32, 40:], labels[32:, :40], labels[32:, 40:] = 1, 2, 3
        levels = set()
        for seed in range(8):
            depth = ms.surfaces_over_segments(np.random.default_rng(seed), labels).astype(np.float64)
            assert depth.shape == labels.shape and np.isfinite(depth).all()
            for k in range(4):
                rows, cols = np.nonzero(labels == k)
                quadrant = depth[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
                assert np.abs(np.diff(quadrant, 2, axis=0)).max() < 1e-5
                assert np.abs(np.diff(quadrant, 2, axis=1)).max() < 1e-5
            levels.add(round(float(depth[0, 0] - depth[0, 40]), 3))
        assert len(levels) > 1, "the quadrants' depths must vary between draws"

    def test_segment_scenes_have_more_depth_steps_than_procedural_ones(self):
        def mean_share(kind):
            shares = []
            for scene in range(12):
                _, depth_map, _ = ms.make_scene(5, scene, 128, (8, 8), "released", depth_kind=kind)
                shares.append(ms.depth_step_share(ms.depth_map_to_index(depth_map, 8)))
            return np.mean(shares)
        assert mean_share("segments") > 1.3 * mean_share("procedural")     # 0.36 against 0.23

    def test_the_kind_changes_only_the_depth_and_procedural_is_the_default(self):
        default = ms.make_scene(2, 4, 64, (4, 9), "released")
        scenes = {kind: ms.make_scene(2, 4, 64, (4, 9), "released", depth_kind=kind) for kind in ms.DEPTH_KINDS}
        assert np.array_equal(default[1], scenes["procedural"][1])
        for slices, depth_map, image in scenes.values():
            assert len(slices) == len(default[0]) and np.array_equal(image, default[2])
        assert not np.array_equal(scenes["segments"][1], scenes["procedural"][1])


class TestSources:
    def test_motorcycle_is_never_a_training_source(self):
        assert "stereo_motorcycle" not in ms.PHOTO_NAMES
        with pytest.raises(ValueError):
            ms.load_photo("stereo_motorcycle")

    def test_every_photo_loads_offline_as_bgr_uint8(self):
        for name in ms.PHOTO_NAMES:
            photo = ms.load_photo(name)
            assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3, name


@pytest.mark.skipif(not ms.physical_available(), reason="physical_stack not in this checkout yet")
def test_physical_blur_scene_has_full_range():
    slices, depth_map, _ = ms.make_scene(0, 1, 64, (6, 6), "physical")
    index = ms.depth_map_to_index(depth_map, 6)
    assert len(slices) == 6 and index.min() == 0 and index.max() == 5


class TestCommandLine:
    def test_layout_and_rerun_is_identical(self, tmp_path):
        out = tmp_path / "syn"
        r = run_script("--output_dir", out, "--num_stacks", 3, "--size", 64, "--min_slices", 2,
                       "--max_slices", 5, "--seed", 11)
        assert r.returncode == 0, r.stderr
        scenes = sorted(p.name for p in (out / "image_stacks").iterdir())
        assert scenes == ["syn_000000", "syn_000001", "syn_000002"]
        for scene in scenes:
            images, names = read_stack(out / "image_stacks" / scene)
            assert names == [f"{k}.png" for k in range(1, len(images) + 1)] and 2 <= len(images) <= 5
            depth = read_image(out / "depth_maps" / f"{scene}.png")
            assert depth.shape == (64, 64) and depth.dtype == np.uint8
            assert depth.min() == 0 and depth.max() == 255
            sharp = read_image(out / "all_in_focus" / f"{scene}.png")
            image = ms.make_scene(11, int(scene[-6:]), 64, (2, 5), "released")[2]
            assert np.array_equal(sharp, image)
        first = (out / "depth_maps" / "syn_000001.png").read_bytes()
        r = run_script("--output_dir", tmp_path / "again", "--num_stacks", 1, "--first", 1, "--size", 64,
                       "--min_slices", 2, "--max_slices", 5, "--seed", 11)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "again" / "depth_maps" / "syn_000001.png").read_bytes() == first

    def test_min_step_share_writes_only_step_rich_scenes(self, tmp_path):
        out = tmp_path / "steps"
        r = run_script("--output_dir", out, "--num_stacks", 2, "--size", 64, "--min_slices", 6,
                       "--max_slices", 6, "--seed", 0, "--min_step_share", 0.2)
        assert r.returncode == 0, r.stderr
        expected = [scene for scene, _ in ms.kept_scenes(0, 0, 2, 64, (6, 6), "released", 0.2)]
        assert sorted(p.stem for p in (out / "depth_maps").iterdir()) == [f"syn_{k:06d}" for k in expected]
        for k in expected:
            depth_map = read_image(out / "depth_maps" / f"syn_{k:06d}.png")
            assert ms.depth_step_share(ms.depth_map_to_index(depth_map, 6)) >= 0.2
        r = run_script("--output_dir", tmp_path / "bad", "--num_stacks", 1, "--min_step_share", 1)
        assert r.returncode == 2 and "min_step_share" in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "bad").exists()

    def test_segment_depth_from_the_command_line(self, tmp_path):
        r = run_script("--output_dir", tmp_path / "seg", "--num_stacks", 2, "--size", 64, "--min_slices", 5,
                       "--max_slices", 5, "--blur", "physical", "--depth", "segments", "--seed", 3)
        assert r.returncode == 0, r.stderr
        for k in range(2):
            depth_map = read_image(tmp_path / "seg" / "depth_maps" / f"syn_{k:06d}.png")
            assert np.array_equal(depth_map, ms.make_scene(3, k, 64, (5, 5), "physical", depth_kind="segments")[1])
        r = run_script("--output_dir", tmp_path / "bad", "--num_stacks", 1, "--depth", "stereo")
        assert r.returncode == 2 and "--depth" in r.stderr and "Traceback" not in r.stderr

    def test_bad_slice_range_is_one_clear_error(self, tmp_path):
        r = run_script("--output_dir", tmp_path / "x", "--min_slices", 1, "--num_stacks", 1)
        assert r.returncode == 2
        assert "min_slices" in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "x").exists()
