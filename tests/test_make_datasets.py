"""Stack synthesis (released and physical), make_dataset.py and the prepare scripts.

Everything runs on tiny synthetic images and fabricated dataset trees with
the real datasets' layouts, so the answers are known.
"""
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import REPO as ROOT  # noqa: E402

from make_datasets import (make_dataset, prepare_ade20k, prepare_cityscapes, prepare_diode,  # noqa: E402
                           prepare_duts, prepare_nyu)
from make_datasets.common import normalize_depth, read_depth_8bit, run_batch  # noqa: E402
from make_datasets.synthesis import (gaussian_blur_levels, physical_stack, quantize_depth,  # noqa: E402
                                     released_stack)
from utils import InputError, read_image  # noqa: E402

PYTHON = sys.executable


def textured(shape, seed=0, low=20, high=235):
    """Random uint8 texture with no black pixel, so every blur changes it."""
    return np.random.default_rng(seed).integers(low, high, size=shape, dtype=np.uint8)


def two_level_depth(h, w, near=0, far=255):
    """Left half at depth ``near``, right half at ``far``."""
    depth = np.full((h, w), far, dtype=np.uint8)
    depth[:, : w // 2] = near
    return depth


def run(module, *argv):
    return module.main(module.get_args_parser().parse_args([str(a) for a in argv]))


# ============================================================================= released synthesis

class TestReleasedStack:
    def test_each_slice_is_sharp_exactly_in_its_bin(self):
        image = textured((24, 32, 3))
        depth = np.repeat(np.array([0, 70, 140, 255], np.uint8), 8)[None].repeat(24, axis=0)  # 4 bands
        slices, bins = released_stack(image, depth, 4)
        assert bins[0].tolist() == [0] * 8 + [1] * 8 + [2] * 8 + [3] * 8
        for k, sl in enumerate(slices):
            in_bin = bins == k
            assert np.array_equal(sl[in_bin], image[in_bin])
            assert not np.array_equal(sl[~in_bin], image[~in_bin])

    def test_slice_takes_blur_level_by_bin_distance(self):
        image = textured((20, 20))
        depth = two_level_depth(20, 20)
        slices, bins = released_stack(image, depth, 8)
        levels = gaussian_blur_levels(image, 8)
        for k, sl in enumerate(slices):
            assert np.array_equal(sl[:, :10], levels[k][:, :10])          # near half: bin 0
            assert np.array_equal(sl[:, 10:], levels[7 - k][:, 10:])      # far half: bin 7

    def test_depth_255_lands_in_the_last_bin(self):
        assert quantize_depth(np.array([[0, 31, 32, 254, 255]], np.uint8), 8).tolist() == [[0, 0, 1, 7, 7]]
        image = textured((8, 8))
        slices, bins = released_stack(image, np.full((8, 8), 255, np.uint8), 8)
        assert (bins == 7).all()
        assert np.array_equal(slices[7], image)

    def test_no_pixel_is_left_unassigned_so_no_black_refill_is_needed(self):
        # The released code refilled pixels still black after compositing; those
        # were the pixels of depth 255. With closed bins every pixel of every
        # slice is its chosen blur level, so an image without black pixels
        # gives slices without black pixels, and true black stays black.
        image = textured((32, 32), low=1, high=255)
        image[4:8, 4:8] = 0                                   # a truly black patch, in focus in slice 0
        depth = np.random.default_rng(1).integers(0, 256, (32, 32)).astype(np.uint8)
        depth[:, -4:] = 255
        depth[4:8, 4:8] = 0
        slices, bins = released_stack(image, depth, 12)
        levels = np.stack(gaussian_blur_levels(image, 12))
        rows, cols = np.indices(depth.shape)
        for k, sl in enumerate(slices):
            expected = levels[np.minimum(np.abs(bins - k), 11), rows, cols]
            assert np.array_equal(sl, expected)
        assert (slices[0][4:8, 4:8] == 0).all()
        assert all((sl[:, -4:] > 0).all() for sl in slices)   # the depth-255 column is filled


# ============================================================================= physical synthesis

class TestPhysicalStack:
    @pytest.mark.parametrize("shape,dtype", [((16, 20), np.uint8), ((16, 20, 3), np.uint8),
                                             ((16, 20, 3), np.uint16)])
    def test_shapes_dtypes_and_focus_index(self, shape, dtype):
        image = (textured(shape).astype(np.uint32) * (257 if dtype == np.uint16 else 1)).astype(dtype)
        depth = np.linspace(0, 255, 16 * 20).reshape(16, 20).astype(np.uint8)
        slices, focus = physical_stack(image, depth, 6)
        assert len(slices) == 6
        assert all(s.shape == image.shape and s.dtype == image.dtype for s in slices)
        assert focus.dtype == np.int64 and focus.shape == depth.shape
        planes = np.linspace(0, 255, 6)
        expected = np.abs(depth[..., None].astype(float) - planes).argmin(axis=-1)
        assert np.array_equal(focus, expected)

    def test_focus_index_of_planes_and_extremes(self):
        depth = np.array([[0, 51, 102, 153, 204, 255, 25, 26]], np.uint8)  # planes of N=6 are 0, 51, ...
        _, focus = physical_stack(np.zeros((1, 8), np.uint8), depth, 6)
        assert focus.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1]]

    def test_focused_slice_equals_image_on_its_layer_away_from_edges(self):
        image = textured((40, 80, 3))
        slices, _ = physical_stack(image, two_level_depth(40, 80), 5, max_sigma=3.0)
        margin = 11  # 3 sigma + 1 spare: no blurred neighbour reaches further
        assert np.array_equal(slices[0][:, : 40 - margin], image[:, : 40 - margin])
        assert np.array_equal(slices[4][:, 40 + margin:], image[:, 40 + margin:])
        assert not np.array_equal(slices[4][:, : 40 - margin], image[:, : 40 - margin])

    def test_blur_grows_monotonically_with_distance_from_focus(self):
        image = textured((48, 48))
        slices, focus = physical_stack(image, np.zeros((48, 48), np.uint8), 8)
        assert (focus == 0).all()
        errors = [np.abs(s.astype(float) - image).mean() for s in slices]
        assert errors[0] == 0
        assert all(a < b for a, b in zip(errors, errors[1:])), errors
        sharpness = [cv2.Laplacian(s.astype(np.float64), cv2.CV_64F).var() for s in slices]
        assert all(a > b for a, b in zip(sharpness, sharpness[1:])), sharpness

    def test_depth_edge_blurs_across_the_boundary_near_over_far(self):
        image = np.full((30, 60), 50, np.uint8)
        image[:, :30] = 200                                     # near half bright, far half dark
        slices, _ = physical_stack(image, two_level_depth(30, 60), 4, max_sigma=4.0)
        near_focused, far_focused = slices[0][15].astype(int), slices[-1][15].astype(int)
        # Focused on the near object: its edge stays sharp, nothing of the
        # blurred background bleeds over it.
        assert np.array_equal(near_focused, image[15])
        # Focused on the background: the blurred near object spills over the
        # boundary onto it, fading with distance.
        spill = far_focused[30:44]
        assert spill[0] > 100 and spill[-1] == 50
        assert all(a >= b for a, b in zip(spill, spill[1:]))
        assert far_focused[29] < 200                            # the near edge itself is soft

    def test_deterministic_and_single_slice(self):
        image, depth = textured((16, 16, 3)), textured((16, 16))
        a, fa = physical_stack(image, depth, 7)
        b, fb = physical_stack(image, depth, 7)
        assert all(np.array_equal(x, y) for x, y in zip(a, b)) and np.array_equal(fa, fb)
        one, focus = physical_stack(image, depth, 1)
        assert len(one) == 1 and (focus == 0).all()

    def test_bad_input_raises(self):
        with pytest.raises(ValueError, match="depth"):
            physical_stack(textured((8, 8)), textured((8, 9)), 4)
        with pytest.raises(ValueError, match="num_slices"):
            physical_stack(textured((8, 8)), textured((8, 8)), 0)


# ============================================================================= shared helpers

class TestCommon:
    def test_normalize_depth_fills_invalid_and_orders_near_to_far(self):
        metres = np.array([[1.0, 2.0, 0.0, 4.0]])                # 0 = no measurement
        linear = normalize_depth(metres)
        assert linear.tolist() == [[0, 85, 85, 255]]              # the hole takes its nearest neighbour
        inverse = normalize_depth(metres, valid=np.array([[1, 1, 1, 0]]), inverse=True)
        assert inverse.tolist() == [[0, 255, 255, 255]]           # 4 m masked out: 1..2 m spans the range
        half_way = normalize_depth(np.array([[1.0, 4.0 / 3.0, 2.0]]), inverse=True)
        assert half_way[0, 1] == 128                              # 1 / (4/3) is half-way between 1/1 and 1/2
        assert normalize_depth(np.full((2, 2), 3.0)).max() == 0

    def test_read_depth_8bit(self, tmp_path):
        cv2.imwrite(str(tmp_path / "d16.png"), np.array([[1000, 2000, 3000]], np.uint16))
        assert read_depth_8bit(tmp_path / "d16.png").tolist() == [[0, 128, 255]]
        cv2.imwrite(str(tmp_path / "d8.png"), np.array([[0, 10, 255]], np.uint8))
        assert read_depth_8bit(tmp_path / "d8.png", invert=True).tolist() == [[255, 245, 0]]
        colour = np.zeros((2, 2, 3), np.uint8)
        colour[..., 2] = 255
        cv2.imwrite(str(tmp_path / "c.png"), colour)
        with pytest.raises(InputError, match="colour"):
            read_depth_8bit(tmp_path / "c.png")

    def test_run_batch_goes_on_and_reports(self, capsys):
        seen = []

        def process(item):
            if item == 2:
                raise InputError("bad item")
            seen.append(item)
        with pytest.raises(InputError, match="1 of 4"):
            run_batch([1, 2, 3, 4], process, "test")
        assert seen == [1, 3, 4]
        assert "skipped 2: bad item" in capsys.readouterr().err


    @pytest.mark.parametrize("where", ["creating the staging folder", "linking the copy", "replacing the copy"])
    def test_interrupted_stack_write_leaves_no_staging_folder(self, tmp_path, monkeypatch, where):
        """An interrupt at any step of write_stack leaves no hidden .part folder and
        never a half-written stack folder."""
        from make_datasets import common
        target, copy = tmp_path / "dof_stack" / "a", tmp_path / "image_stacks" / "a"
        slices = [textured((8, 8, 3), seed=k) for k in range(3)]
        def then_interrupt(real, when):
            def wrapper(*args, **kwargs):
                result = real(*args, **kwargs)
                if when(*args):
                    raise KeyboardInterrupt   # the signal lands just after the step
                return result
            return wrapper

        if where == "creating the staging folder":
            monkeypatch.setattr(Path, "mkdir", then_interrupt(Path.mkdir, lambda path, *a: path.suffix == ".part"))
        elif where == "linking the copy":
            monkeypatch.setattr(common.os, "link", then_interrupt(common.os.link, lambda *a: True))
        else:
            monkeypatch.setattr(common.os, "replace", then_interrupt(common.os.replace, lambda a, b: Path(b) == copy))
        with pytest.raises(KeyboardInterrupt):
            common.write_stack(target, slices, "png", copies=[copy])
        monkeypatch.undo()
        leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".part")]
        assert leftovers == []
        for folder in (target, copy):
            assert not folder.exists() or sorted(p.name for p in folder.iterdir()) == ["1.png", "2.png", "3.png"]


# ============================================================================= make_dataset.py

@pytest.fixture
def scene_tree(tmp_path):
    images, depths = tmp_path / "images", tmp_path / "depth"
    images.mkdir()
    depths.mkdir()
    for k, name in enumerate(["a", "b", "c10", "c2"]):
        cv2.imwrite(str(images / f"{name}.png"), textured((24, 28, 3), seed=k))
        cv2.imwrite(str(depths / f"{name}.png"), two_level_depth(24, 28, near=10 * k, far=250))
    return images, depths


class TestMakeDataset:
    @pytest.mark.parametrize("mode", ["released", "physical"])
    def test_end_to_end_both_layouts(self, scene_tree, tmp_path, mode):
        images, depths = scene_tree
        out = tmp_path / "out"
        done = run(make_dataset, "--image_dir", images, "--depth_dir", depths, "--output_dir", out,
                   "--mode", mode, "--slice_counts", "3", "5", "--format", "png", "--train_layout")
        assert done == 4
        for name in ["a", "b", "c10", "c2"]:
            image = read_image(images / f"{name}.png")
            assert np.array_equal(read_image(out / "AiF" / f"{name}.png"), image)
            depth = read_image(out / "depth" / f"{name}.png")
            assert np.array_equal(depth, read_image(depths / f"{name}.png"))
            stack = sorted((out / "dof_stack" / name).iterdir())
            n = len(stack)
            assert n in (3, 5)
            assert [p.name for p in sorted(stack, key=lambda p: int(p.stem))] == [f"{k}.png" for k in range(1, n + 1)]
            quantized = read_image(out / "quantized_depth" / f"{name}.png")
            assert quantized[0, 0] == 0 and quantized[0, -1] == 255      # near half index 0, far half N-1
            # slice 1 is sharp on the near half, slice N on the far half (lossless png)
            first, last = (read_image(out / "dof_stack" / name / f"{k}.png").astype(int) for k in (1, n))
            if mode == "released":
                assert np.array_equal(first[:, :14], image[:, :14]) and np.array_equal(last[:, 14:], image[:, 14:])
            else:  # the near half is not exactly on a focal plane and the far layer's blur reaches it
                near_error = [np.abs(s[:, :4] - image[:, :4]).mean() for s in (first, last)]
                far_error = [np.abs(s[:, -4:] - image[:, -4:]).mean() for s in (first, last)]
                assert near_error[0] < near_error[1] and far_error[1] < far_error[0]
            # the train.py layout holds the same stack (hard-linked here) and the depth
            for k in range(1, n + 1):
                train_slice, slice_k = out / "image_stacks" / name / f"{k}.png", out / "dof_stack" / name / f"{k}.png"
                assert train_slice.samefile(slice_k)
            assert np.array_equal(read_image(out / "depth_maps" / f"{name}.png"), depth)
        assert not list(out.rglob("*.part"))

    def test_draw_of_slice_count_depends_only_on_seed_and_name(self):
        counts = [8, 12, 16, 20, 24]
        draws = [make_dataset.slice_count_for(f"scene{i}", counts, 0) for i in range(40)]
        assert set(draws) <= set(counts) and len(set(draws)) > 1
        assert draws == [make_dataset.slice_count_for(f"scene{i}", counts, 0) for i in range(40)]
        assert draws != [make_dataset.slice_count_for(f"scene{i}", counts, 1) for i in range(40)]

    def test_train_depth_focus_index_and_invert(self, scene_tree, tmp_path):
        images, depths = scene_tree
        out = tmp_path / "out"
        run(make_dataset, "--image_dir", images, "--depth_dir", depths, "--output_dir", out, "--slice_counts", "4",
            "--train_layout", "--train_depth", "focus_index", "--invert_depth")
        depth = read_image(out / "depth" / "a.png")
        assert depth[0, 0] == 255 and depth[0, -1] == 5                  # flipped: 0 -> 255, 250 -> 5
        assert read_image(out / "depth_maps" / "a.png").tolist() == read_image(out / "quantized_depth" / "a.png").tolist()
        assert len(list((out / "dof_stack" / "a").glob("*.jpg"))) == 4
        before = (out / "image_stacks" / "a" / "2.jpg").read_bytes()
        run(make_dataset, "--image_dir", images, "--depth_dir", depths, "--output_dir", out, "--slice_counts", "4",
            "--train_layout", "--train_depth", "focus_index", "--invert_depth")            # re-run replaces
        assert (out / "image_stacks" / "a" / "2.jpg").read_bytes() == before
        assert not [p for p in out.rglob("*") if ".part" in p.name]

    def test_batch_goes_past_a_bad_scene_and_exits_non_zero(self, scene_tree, tmp_path):
        images, depths = scene_tree
        (depths / "b.png").unlink()
        cv2.imwrite(str(depths / "c2.png"), np.zeros((5, 5), np.uint8))    # wrong size
        out = tmp_path / "out"
        result = subprocess.run([PYTHON, str(ROOT / "make_datasets" / "make_dataset.py"), "--image_dir", str(images),
                                 "--depth_dir", str(depths), "--output_dir", str(out), "--slice_counts", "3"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        assert "skipped b: no depth map" in result.stderr and "skipped c2: depth map is 5x5" in result.stderr
        assert "Traceback" not in result.stderr
        assert sorted(p.name for p in (out / "dof_stack").iterdir()) == ["a", "c10"]

    def test_output_folder_holding_the_input_is_refused(self, scene_tree, tmp_path):
        """--image_dir data/AiF with --output_dir data would re-encode the inputs in place."""
        images, depths = scene_tree
        aif = tmp_path / "AiF"
        images.rename(aif)
        before = {p.name: p.read_bytes() for p in aif.iterdir()}
        result = subprocess.run([PYTHON, "-m", "make_datasets.make_dataset", "--image_dir", str(aif),
                                 "--depth_dir", str(depths), "--output_dir", str(tmp_path)],
                                capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "is the input folder" in result.stderr and result.stderr.count("\n") == 1
        assert {p.name: p.read_bytes() for p in aif.iterdir()} == before
        assert not (tmp_path / "dof_stack").exists()

    def test_missing_folder_is_one_clear_error(self, tmp_path):
        result = subprocess.run([PYTHON, "-m", "make_datasets.make_dataset", "--image_dir", str(tmp_path / "nope"),
                                 "--depth_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")],
                                capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert result.returncode == 2 and result.stderr.startswith("error:") and "does not exist" in result.stderr

    def test_sixteen_bit_image_refuses_jpg(self, tmp_path):
        (tmp_path / "i").mkdir()
        (tmp_path / "d").mkdir()
        cv2.imwrite(str(tmp_path / "i" / "x.png"), np.full((8, 8), 4000, np.uint16))
        cv2.imwrite(str(tmp_path / "d" / "x.png"), np.zeros((8, 8), np.uint8))
        with pytest.raises(InputError, match="1 of 1"):
            run(make_dataset, "--image_dir", tmp_path / "i", "--depth_dir", tmp_path / "d",
                "--output_dir", tmp_path / "o", "--slice_counts", "3")
        run(make_dataset, "--image_dir", tmp_path / "i", "--depth_dir", tmp_path / "d",
            "--output_dir", tmp_path / "o", "--slice_counts", "3", "--format", "png", "--mode", "physical")
        assert read_image(tmp_path / "o" / "dof_stack" / "x" / "2.png").dtype == np.uint16


# ============================================================================= prepare scripts

def write_jpg(path, seed=0, shape=(12, 16, 3)):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), textured(shape, seed=seed))
    return path


class TestPrepareADE20K:
    def test_extracts_splits_byte_identical(self, tmp_path):
        root = tmp_path / "ADEChallengeData2016"
        write_jpg(root / "images" / "training" / "ADE_train_00000001.jpg", 0)
        write_jpg(root / "images" / "training" / "ADE_train_00000002.jpg", 1, shape=(6, 16, 3))
        write_jpg(root / "images" / "validation" / "ADE_val_00000001.jpg", 2)
        write_jpg(root / "annotations" / "training" / "ADE_train_00000001.png", 3)
        out = tmp_path / "out"
        assert run(prepare_ade20k, "--root", root, "--output_dir", out) == 3
        assert sorted(p.name for p in out.iterdir()) == ["ADE_train_00000001.jpg", "ADE_train_00000002.jpg",
                                                         "ADE_val_00000001.jpg"]
        assert (out / "ADE_val_00000001.jpg").read_bytes() == \
            (root / "images" / "validation" / "ADE_val_00000001.jpg").read_bytes()
        out2 = tmp_path / "out2"
        assert run(prepare_ade20k, "--root", root, "--output_dir", out2, "--splits", "training",
                   "--min_size", "8") == 1
        assert [p.name for p in out2.iterdir()] == ["ADE_train_00000001.jpg"]

    def test_wrong_root(self, tmp_path):
        with pytest.raises(InputError, match="ADE20K images folder"):
            run(prepare_ade20k, "--root", tmp_path, "--output_dir", tmp_path / "o")


class TestPrepareCityscapes:
    def test_flattens_and_drops_suffix(self, tmp_path):
        left = tmp_path / "cityscapes" / "leftImg8bit"
        write_jpg(left / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png", 0)
        write_jpg(left / "train" / "bochum" / "bochum_000000_000313_leftImg8bit.png", 1)
        write_jpg(left / "val" / "lindau" / "lindau_000001_000019_leftImg8bit.png", 2)
        write_jpg(left / "test" / "berlin" / "berlin_000000_000019_leftImg8bit.png", 3)
        out = tmp_path / "out"
        assert run(prepare_cityscapes, "--root", tmp_path / "cityscapes", "--output_dir", out) == 3
        assert sorted(p.name for p in out.iterdir()) == ["aachen_000000_000019.png", "bochum_000000_000313.png",
                                                         "lindau_000001_000019.png"]
        assert (out / "bochum_000000_000313.png").read_bytes() == \
            (left / "train" / "bochum" / "bochum_000000_000313_leftImg8bit.png").read_bytes()

    def test_name_clash_is_refused_before_writing(self, tmp_path):
        left = tmp_path / "cs" / "leftImg8bit"
        write_jpg(left / "train" / "aachen" / "aachen_0_1_leftImg8bit.png", 0)
        write_jpg(left / "val" / "aachen" / "aachen_0_1_leftImg8bit.png", 1)
        with pytest.raises(InputError, match="both be written"):
            run(prepare_cityscapes, "--root", tmp_path / "cs", "--output_dir", tmp_path / "o")
        assert not (tmp_path / "o").exists()


class TestPrepareDUTS:
    def make_pair(self, root, name, background):
        image = np.full((40, 40, 3), 180, np.uint8) if background == "flat" else textured((40, 40, 3), seed=5)
        image[12:28, 12:28] = textured((16, 16, 3), seed=6)              # the salient object
        mask = np.zeros((40, 40), np.uint8)
        mask[12:28, 12:28] = 255
        (root / "DUTS-TR-Image").mkdir(parents=True, exist_ok=True)
        (root / "DUTS-TR-Mask").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "DUTS-TR-Image" / f"{name}.jpg"), image)
        cv2.imwrite(str(root / "DUTS-TR-Mask" / f"{name}.png"), mask)

    def test_keeps_only_uniform_backgrounds(self, tmp_path):
        root = tmp_path / "DUTS-TR"
        self.make_pair(root, "ILSVRC2012_test_00000003", "flat")
        self.make_pair(root, "ILSVRC2012_test_00000004", "busy")
        out = tmp_path / "out"
        assert run(prepare_duts, "--root", root, "--output_dir", out, "--margin", "3") == 1
        assert [p.name for p in (out / "images").iterdir()] == ["ILSVRC2012_test_00000003.jpg"]
        assert [p.name for p in (out / "masks").iterdir()] == ["ILSVRC2012_test_00000003.png"]
        rows = (out / "duts_filter.csv").read_text().splitlines()
        assert rows[0].startswith("name,") and len(rows) == 3
        assert rows[1].endswith(",1") and rows[2].endswith(",0")
        # a re-run with a stricter rule removes what is no longer kept
        assert run(prepare_duts, "--root", root, "--output_dir", out, "--min_background", "0.95") == 0
        assert not list((out / "images").iterdir())

    def test_missing_mask_folder(self, tmp_path):
        write_jpg(tmp_path / "DUTS-TR" / "DUTS-TR-Image" / "x.jpg")
        with pytest.raises(InputError, match="-Mask"):
            run(prepare_duts, "--root", tmp_path / "DUTS-TR", "--output_dir", tmp_path / "o")


class TestPrepareDIODE:
    def test_extracts_image_and_normalised_depth(self, tmp_path):
        scan = tmp_path / "diode" / "val" / "indoors" / "scene_00019" / "scan_00183"
        image_path = write_jpg(scan / "00019_00183_indoors_000_010.png", 0, shape=(4, 6, 3))
        depth = np.linspace(1.0, 6.0, 24).reshape(4, 6, 1).astype(np.float32)
        mask = np.ones((4, 6), np.float32)
        mask[0, 0] = 0                                                  # no return: filled from its neighbour
        depth[0, 0] = 0
        np.save(scan / "00019_00183_indoors_000_010_depth.npy", depth)
        np.save(scan / "00019_00183_indoors_000_010_depth_mask.npy", mask)
        outdoor = tmp_path / "diode" / "val" / "outdoor" / "scene_00022" / "scan_00193"
        write_jpg(outdoor / "00022_00193_outdoor_000_000.png", 1, shape=(4, 6, 3))
        np.save(outdoor / "00022_00193_outdoor_000_000_depth.npy", np.full((4, 6, 1), 30, np.float32))
        np.save(outdoor / "00022_00193_outdoor_000_000_depth_mask.npy", np.ones((4, 6), np.float32))
        out = tmp_path / "out"
        assert run(prepare_diode, "--root", tmp_path / "diode", "--output_dir", out, "--splits", "val",
                   "--scale", "linear") == 2
        assert (out / "images" / image_path.name).read_bytes() == image_path.read_bytes()
        written = read_image(out / "depth" / "00019_00183_indoors_000_010.png")
        expected = normalize_depth(depth[..., 0], mask > 0)
        assert np.array_equal(written, expected)
        assert written[0, 0] in (written[0, 1], written[1, 0])              # taken from a nearest neighbour
        assert written[0, 1] == 0 and written[-1, -1] == 255
        assert (read_image(out / "depth" / "00022_00193_outdoor_000_000.png") == 0).all()   # flat scene

    def test_missing_image_is_reported(self, tmp_path):
        scan = tmp_path / "diode" / "train" / "outdoor" / "scene_1" / "scan_1"
        scan.mkdir(parents=True)
        np.save(scan / "a_depth.npy", np.ones((2, 2, 1), np.float32))
        with pytest.raises(InputError, match="1 of 1"):
            run(prepare_diode, "--root", tmp_path / "diode", "--output_dir", tmp_path / "o", "--splits", "train")


class TestPrepareNYU:
    @staticmethod
    def write_mat(path, count=5, h=30, w=40, border=(3, 2, 4, 1)):
        """A tiny nyu_depth_v2_labeled.mat: MATLAB v7.3 stores (H, W, 3, N) as (N, 3, W, H)."""
        h5py = pytest.importorskip("h5py")
        rng = np.random.default_rng(0)
        rgb = rng.integers(0, 200, (count, h, w, 3), dtype=np.uint8)
        top, bottom, left, right = border
        rgb[:, :top], rgb[:, h - bottom:], rgb[:, :, :left], rgb[:, :, w - right:] = 255, 255, 255, 255
        rgb[1, :, : left + 3] = 255                                      # a white wall at one image's edge
        depth = rng.uniform(0.5, 10.0, (count, h, w)).astype(np.float32)
        with h5py.File(path, "w") as f:
            f["images"] = rgb.transpose(0, 3, 2, 1)
            f["depths"] = depth.transpose(0, 2, 1)
            f["labels"] = np.zeros((count, w, h), np.uint16)
        return rgb, depth

    def test_crops_border_normalises_and_splits(self, tmp_path):
        rgb, depth = self.write_mat(tmp_path / "nyu.mat")
        from scipy.io import savemat
        savemat(tmp_path / "splits.mat", {"trainNdxs": np.array([[1], [2], [4]]), "testNdxs": np.array([[3], [5]])})
        out = tmp_path / "out"
        assert run(prepare_nyu, "--mat", tmp_path / "nyu.mat", "--output_dir", out,
                   "--split_file", tmp_path / "splits.mat", "--scale", "linear") == 5
        assert sorted(p.name for p in (out / "train" / "images").iterdir()) == ["0001.png", "0002.png", "0004.png"]
        assert sorted(p.name for p in (out / "test" / "depth").iterdir()) == ["0003.png", "0005.png"]
        image = read_image(out / "test" / "images" / "0003.png")
        assert image.shape == (30 - 3 - 2, 40 - 4 - 1, 3)                # the wall did not widen the crop
        assert np.array_equal(image, rgb[2, 3:28, 4:39, ::-1])           # RGB -> BGR, same pixels
        written = read_image(out / "test" / "depth" / "0003.png")
        assert np.array_equal(written, normalize_depth(depth[2, 3:28, 4:39]))

    def test_random_split_without_split_file(self, tmp_path):
        self.write_mat(tmp_path / "nyu.mat", count=10)
        out = tmp_path / "out"
        assert run(prepare_nyu, "--mat", tmp_path / "nyu.mat", "--output_dir", out, "--test_fraction", "0.2",
                   "--crop", "none") == 10
        assert len(list((out / "test" / "images").iterdir())) == 2
        assert read_image(out / "train" / "depth" / next((out / "train" / "depth").iterdir()).name).shape == (30, 40)

    def test_not_an_hdf5_file(self, tmp_path):
        (tmp_path / "x.mat").write_bytes(b"MATLAB 5.0 MAT-file, not HDF5")
        with pytest.raises(InputError, match="HDF5"):
            run(prepare_nyu, "--mat", tmp_path / "x.mat", "--output_dir", tmp_path / "o")
