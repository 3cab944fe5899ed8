"""Realistic stacks: pillbox and light-field blur, occlusion, measured depth, camera effects, the CLI."""
import cv2
import numpy as np
import pytest

from dataset import FocusStackDataset, find_scenes
from make_datasets import make_realistic as mr
from make_datasets import synthesis
from make_datasets.make_synthetic import depth_map_to_index
from utils import InputError, read_image, write_image

# Six planes at the integer depths 0, 51, ..., 255: a flat scene can lie exactly on one.
N = 6


def texture(size=48, seed=0):
    """Noise smoothed over about 2 px: blur keeps changing it as the blur grows (white noise saturates)."""
    noise = cv2.GaussianBlur(np.random.default_rng(seed).standard_normal((size, size)), (0, 0), 1.5)
    return np.round((noise - noise.min()) / (noise.max() - noise.min()) * 255).astype(np.uint8)


class TestDiscKernel:
    @pytest.mark.parametrize("radius", [1.0, 2.5, 3.0, 5.2])
    def test_sums_to_one_and_has_the_disc_area_and_radius(self, radius):
        kernel = synthesis.disc_kernel(radius)
        assert kernel.sum() == pytest.approx(1.0, abs=1e-6)
        assert kernel.shape[0] == kernel.shape[1] == 2 * int(np.ceil(radius - 0.5)) + 1
        half = kernel.shape[0] // 2
        yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
        distance = np.hypot(yy, xx)
        # A pixel wholly inside the disc has full weight, one wholly outside none.
        assert np.allclose(kernel[distance <= radius - 0.75], kernel.max())
        assert np.all(kernel[distance >= radius + 0.75] == 0)
        # The disc's area, up to the 8 x 8 sub-sampling of the edge pixels (3.5% at radius 1).
        assert 1.0 / kernel.max() == pytest.approx(np.pi * radius ** 2, rel=0.04 / radius)

    def test_below_half_a_pixel_it_is_the_identity(self):
        assert np.array_equal(synthesis.disc_kernel(0.3), np.ones((1, 1), np.float32))


class TestFlatScene:
    @pytest.mark.parametrize("render", ["disc", "lightfield"])
    def test_the_slice_focused_on_the_plane_is_the_image(self, render):
        image, depth = texture(), np.full((48, 48), 102, np.uint8)      # plane 2 of 6
        if render == "disc":
            slices, index = synthesis.physical_stack(image, depth, N, max_sigma=4.0, psf="disc")
        else:
            slices, index = synthesis.lightfield_stack(image, depth, N, max_radius=4.0, grid=5)
        assert np.array_equal(slices[2], image)
        assert np.all(index == 2)
        errors = [np.abs(s.astype(float) - image).mean() for s in slices]
        # Blur grows with the distance from the focal plane on both sides.
        assert errors[1] > 0 and errors[0] > errors[1] and errors[5] > errors[4] > errors[3] > 0

    def test_disc_blur_of_a_point_has_the_lens_radius(self):
        image = np.zeros((41, 41), np.uint16)
        image[20, 20] = 60000
        slices, _ = synthesis.physical_stack(image, np.full((41, 41), 255, np.uint8), N, max_sigma=5.0, psf="disc")
        spread = slices[0] > 0                    # focused at depth 0: radius 5 at depth 255
        rows, cols = np.nonzero(spread)
        assert np.hypot(rows - 20, cols - 20).max() <= 5.0 + 0.75
        assert spread[20, 20 + 4] and spread[20 + 4, 20] and not spread[20, 20 + 6]

    def test_lightfield_blur_of_a_point_is_one_copy_per_view(self):
        image = np.zeros((41, 41), np.uint16)
        image[20, 20] = 13000
        slices, _ = synthesis.lightfield_stack(image, np.full((41, 41), 255, np.uint8), N, max_radius=4.0, grid=5)
        rows, cols = np.nonzero(slices[0])
        views = synthesis.aperture_views(5)
        assert len(rows) == len(views) == 13          # the 5 x 5 grid points within the round aperture
        assert np.all(slices[0][rows, cols] == 1000)  # each view carries 1/13 of the light
        assert np.hypot(rows - 20, cols - 20).max() == pytest.approx(4.0)


class TestLightFieldOcclusion:
    def scene(self):
        image = texture(32, seed=1).astype(np.float32)[None]
        depth = np.full((32, 32), 255.0, np.float32)
        depth[10:20, 10:20] = 0.0                          # a near square over a far background
        return image, depth

    def test_a_near_square_hides_the_background_it_moves_over(self):
        image, depth = self.scene()
        # Refocused on the background, the right-most view moves the near square right by 4 px.
        views, seen = synthesis.pinhole_views(image, depth, 1.0, 0.0, 4.0, np.array([255.0]))
        view = views[0, 0]
        assert np.allclose(view[10:20, 14:24], image[0, 10:20, 10:20], atol=1e-4)   # square in its new place
        assert not seen[0, 10:20, 10:14].any() and seen[0, :10].all()             # the hole it left
        assert np.array_equal(view[:10], image[0, :10])                            # background untouched

    def test_far_pixels_moving_behind_a_near_square_stay_hidden(self):
        image, depth = self.scene()
        # Refocused on the square, the background moves left by 4 px and passes behind it.
        views, seen = synthesis.pinhole_views(image, depth, 1.0, 0.0, 4.0, np.array([0.0]))
        assert np.array_equal(views[0, 0, 10:20, 10:20], image[0, 10:20, 10:20])
        assert np.allclose(views[0, 0, :10, :28], image[0, :10, 4:], atol=1e-4)
        assert seen[0, 10:20, 10:20].all()

    def test_sub_pixel_shifts_move_the_view_continuously(self):
        image = np.tile(np.arange(32, dtype=np.float32) * 4, (32, 1))[None]      # a ramp along x
        depth = np.full((32, 32), 255.0, np.float32)
        views, seen = synthesis.pinhole_views(image, depth, 1.0, 0.0, 0.6, np.array([0.0]))
        assert seen[0, :, :-1].all() and not seen[0, :, -1].any()   # nothing comes in from beyond the edge
        # The background moves 0.6 px left: the ramp reads 0.6 x 4 higher everywhere inside.
        assert np.allclose(views[0, 0, :, 2:-2], image[0, :, 2:-2] + 2.4, atol=1e-3)

    def test_refocused_on_the_square_it_stays_sharp_over_a_blurred_background(self):
        depth = np.full((48, 48), 255, np.uint8)
        depth[16:32, 16:32] = 0
        image = texture()
        slices, _ = synthesis.lightfield_stack(image, depth, N, max_radius=4.0, grid=5)
        assert np.array_equal(slices[0][16:32, 16:32], image[16:32, 16:32])
        assert np.array_equal(slices[5][:8], image[:8])                   # far plane in focus there
        assert np.abs(slices[0][:8].astype(float) - image[:8]).mean() > 5


class TestMeasuredDepth:
    def test_disparity_is_inverted_to_near_zero_and_holes_are_filled(self):
        raw = np.array([[0, 30, 60, 90]], np.uint8)       # larger disparity = nearer; 0 = unknown
        assert mr.decode_measured_depth(raw, "disparity").tolist() == [[255, 255, 128, 0]]

    def test_sun_rgbd_bits_are_rotated_back(self):
        mm = np.array([[0, 1100, 2000, 8800]], np.uint16)
        stored = ((mm.astype(np.uint32) << 3 | mm.astype(np.uint32) >> 13) & 0xFFFF).astype(np.uint16)
        expected = mr.decode_measured_depth(mm * 5, "tum")     # the same metres in TUM's scale
        assert np.array_equal(mr.decode_measured_depth(stored, "sun"), expected)
        # Linear in 1 / depth: (1/1100 - 1/2000) / (1/1100 - 1/8800) = 0.514; the hole takes 1100 mm.
        assert expected.tolist() == [[0, 0, 131, 255]]

    def test_encoding_follows_the_source(self, tmp_path):
        assert mr.depth_encoding(tmp_path / "TUM_sample.png") == "tum"
        assert mr.depth_encoding(tmp_path / "SUNRGBD_sample.png") == "sun"
        assert mr.depth_encoding(tmp_path / "Aloe.png") == "disparity"


class TestCamera:
    def test_noise_has_the_poisson_gaussian_variance(self):
        rng = np.random.default_rng(0)
        flat = np.full((200, 200), 0.5, np.float32)
        noisy = mr.poisson_gaussian(rng, flat, shot=0.01, read=0.02)
        assert noisy.std() == pytest.approx(np.sqrt(0.01 * 0.5 + 0.02 ** 2), rel=0.03)

    def test_vignetting_is_one_at_the_centre_and_darkest_at_the_far_corner(self):
        gain = mr.vignetting((33, 33), 0.3)
        assert gain[16, 16] == pytest.approx(1.0) and gain.min() == pytest.approx(0.7)
        assert gain[0, 0] == pytest.approx(0.7)

    def test_breathing_scales_about_the_centre(self):
        image = np.zeros((65, 65), np.float32)
        image[32, 52] = 1.0                                # 20 px right of the centre
        assert np.unravel_index(mr.breathing(image, 1.1).argmax(), image.shape) == (32, 54)
        assert np.array_equal(mr.breathing(image, 1.0), image)


@pytest.fixture()
def sources(tmp_path):
    """Two photos in two source folders and one Middlebury-like RGB-D pair, 80 px."""
    rng = np.random.default_rng(0)
    for folder in ("photos/A", "photos/B", "rgbd/M/images", "rgbd/M/depth"):
        (tmp_path / folder).mkdir(parents=True)
    for source in ("A", "B"):
        write_image(tmp_path / "photos" / source / f"{source}1.png", rng.integers(0, 256, (80, 96, 3), np.uint8))
    (tmp_path / "photos" / "A" / "README.md").write_text("not an image")
    write_image(tmp_path / "rgbd" / "M" / "images" / "Aloe.png", rng.integers(0, 256, (80, 90, 3), np.uint8))
    disparity = np.tile(np.linspace(30, 90, 90).astype(np.uint8), (80, 1))
    disparity[:, :5] = 0
    write_image(tmp_path / "rgbd" / "M" / "depth" / "Aloe.png", disparity)
    return tmp_path


class TestGenerator:
    def test_same_seed_same_stack_and_the_depth_convention(self, sources):
        photos, rgbd = mr.list_photos(sources / "photos"), mr.list_rgbd(sources / "rgbd")
        assert [p.name for p in photos] == ["A1.png", "B1.png"] and len(rgbd) == 1
        for scene in range(4):
            a = mr.make_scene(0, scene, photos, rgbd, 48, (6, 9), "mixed", 0.5)
            b = mr.make_scene(0, scene, photos, rgbd, 48, (6, 9), "mixed", 0.5)
            assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0])) and np.array_equal(a[1], b[1])
            slices, depth_map, sharp = a
            n = len(slices)
            assert 6 <= n <= 9 and all(s.shape == sharp.shape == (48, 48) and s.dtype == np.uint8 for s in slices)
            index = depth_map_to_index(depth_map, n)
            assert index.min() == 0 and index.max() == n - 1    # full range, as make_synthetic
            assert np.array_equal(np.round(index / (n - 1) * 255), depth_map)

    def test_cli_writes_what_train_py_reads(self, sources, tmp_path):
        out = tmp_path / "out"
        args = mr.get_args_parser().parse_args(
            ["--output_dir", str(out), "--images_dir", str(sources / "photos"), "--rgbd_dir", str(sources / "rgbd"),
             "--num_stacks", "3", "--size", "48", "--min_slices", "6", "--max_slices", "7", "--seed", "2"])
        mr.main(args)
        scenes = find_scenes(out / "image_stacks", out / "depth_maps")
        assert [s.name for s in scenes] == ["real_000000", "real_000001", "real_000002"]
        data = FocusStackDataset([(out / "image_stacks", out / "depth_maps")], 32, all_in_focus=True)
        stack, target = data[0]
        assert stack.shape[1:] == (32, 32) and 6 <= stack.shape[0] <= 7 and target.shape == (2, 32, 32)
        assert read_image(out / "all_in_focus" / "real_000000.png").shape == (48, 48)

    def test_missing_folder_is_one_clear_error(self, tmp_path):
        args = mr.get_args_parser().parse_args(["--output_dir", str(tmp_path / "o"),
                                                "--images_dir", str(tmp_path / "none")])
        with pytest.raises(InputError, match="photograph folder"):
            mr.main(args)
        assert not (tmp_path / "o").exists()

    def test_an_unreadable_photo_fails_its_scenes_only(self, sources, tmp_path):
        (sources / "photos" / "B" / "B1.png").write_bytes(b"not a png")
        out = tmp_path / "out"
        args = mr.get_args_parser().parse_args(
            ["--output_dir", str(out), "--images_dir", str(sources / "photos"), "--rgbd_dir", str(sources / "rgbd"),
             "--num_stacks", "6", "--size", "48", "--min_slices", "6", "--max_slices", "6", "--rgbd_share", "0.5"])
        with pytest.raises(InputError, match="of 6 item"):
            mr.main(args)
        written = sorted(p.name for p in (out / "image_stacks").iterdir())
        assert 0 < len(written) < 6                       # the good scenes are there, the bad ones not
        assert all((out / "depth_maps" / f"{name}.png").exists() for name in written)
