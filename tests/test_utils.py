"""Image I/O, stack reading and pre/post-processing helpers in utils.py."""
import os

import cv2
import numpy as np
import pytest
import torch

from conftest import textured_stack
from utils import (InputError, _rainbow_lut, colour_scale, depth_colormap, images_by_stem, index_picture, list_images,
                   natural_sort_key, read_image, read_stack, resize_to_multiple, scale_labels, to_gray_float,
                   to_integer_image, write_image, write_npy)


class TestNaturalSort:
    def test_numbers_by_value(self):
        names = ["10.png", "2.png", "1.png", "img_11.jpg", "img_9.jpg"]
        assert sorted(names, key=natural_sort_key) == ["1.png", "2.png", "10.png", "img_9.jpg", "img_11.jpg"]

    def test_list_images_uses_natural_order_and_skips_non_images(self, tmp_path):
        for k in (10, 2, 1):
            write_image(tmp_path / f"{k}.png", np.full((4, 4), k, np.uint8))
        (tmp_path / "notes.txt").write_text("not an image")
        assert [p.name for p in list_images(tmp_path)] == ["1.png", "2.png", "10.png"]

    def test_images_by_stem_refuses_two_images_of_one_name(self, tmp_path):
        for name in ("10.png", "2.jpg", "b.tif"):
            write_image(tmp_path / name, np.zeros((4, 4), np.uint8))
        assert list(images_by_stem(tmp_path)) == ["2", "10", "b"]
        write_image(tmp_path / "2.png", np.zeros((4, 4), np.uint8))
        with pytest.raises(InputError, match="'2.jpg' and '2.png' .* share the name '2'; keep one"):
            images_by_stem(tmp_path)
        assert images_by_stem(tmp_path / "absent", required=False) == {}
        with pytest.raises(InputError, match="does not exist"):
            images_by_stem(tmp_path / "absent")


class TestReadImage:
    @pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".jpg", ".jpeg"])
    def test_colour_8bit_round_trip(self, tmp_path, ext):
        image = textured_stack(1, 24, 32)[0]
        params = (cv2.IMWRITE_WEBP_QUALITY, 101) if ext == ".webp" else ()
        write_image(tmp_path / f"a{ext}", image, params)
        back = read_image(tmp_path / f"a{ext}")
        assert back.shape == (24, 32, 3) and back.dtype == np.uint8
        if ext not in (".jpg", ".jpeg"):
            np.testing.assert_array_equal(back, image)

    @pytest.mark.parametrize("ext", [".png", ".pgm", ".tif"])
    def test_gray_16bit_round_trip(self, tmp_path, ext):
        image = textured_stack(1, 24, 32, channels=1, dtype=np.uint16)[0]
        write_image(tmp_path / f"a{ext}", image)
        back = read_image(tmp_path / f"a{ext}")
        assert back.dtype == np.uint16
        np.testing.assert_array_equal(back, image)

    def test_pbm_is_read_as_8bit_gray(self, tmp_path):
        image = (np.arange(64).reshape(8, 8) % 2 * 255).astype(np.uint8)
        write_image(tmp_path / "a.pbm", image)
        np.testing.assert_array_equal(read_image(tmp_path / "a.pbm"), image)

    def test_alpha_is_dropped(self, tmp_path):
        rgba = np.dstack([textured_stack(1, 8, 8)[0], np.full((8, 8), 7, np.uint8)])
        write_image(tmp_path / "a.png", rgba)
        np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgba[:, :, :3])

    def test_corrupt_and_empty_files_raise_input_error(self, tmp_path):
        (tmp_path / "empty.png").write_bytes(b"")
        (tmp_path / "junk.png").write_bytes(b"this is not a png at all")
        for name, words in (("empty.png", "empty"), ("junk.png", "not a readable image"), ("gone.png", "cannot read")):
            with pytest.raises(InputError, match=words):
                read_image(tmp_path / name)


class TestReadStack:
    def test_folder_in_natural_order(self, tmp_path):
        for k in range(1, 12):
            write_image(tmp_path / f"{k}.png", np.full((4, 5), k, np.uint8))
        images, names = read_stack(tmp_path)
        assert names == [f"{k}.png" for k in range(1, 12)]
        assert [int(im[0, 0]) for im in images] == list(range(1, 12))

    def test_multipage_tiff_is_a_stack(self, tmp_path):
        pages = textured_stack(3, 16, 20, dtype=np.uint16)
        assert cv2.imwritemulti(str(tmp_path / "stack.tif"), pages)
        images, names = read_stack(tmp_path / "stack.tif")
        assert len(images) == 3 and images[0].dtype == np.uint16
        for a, b in zip(images, pages):
            np.testing.assert_array_equal(a, b)

    def test_mixed_sizes_rejected(self, tmp_path):
        write_image(tmp_path / "1.png", np.zeros((8, 8), np.uint8))
        write_image(tmp_path / "2.png", np.zeros((8, 9), np.uint8))
        with pytest.raises(InputError, match="mixes image sizes"):
            read_stack(tmp_path)

    def test_mixed_bit_depths_rejected(self, tmp_path):
        write_image(tmp_path / "1.png", np.zeros((8, 8), np.uint8))
        write_image(tmp_path / "2.png", np.zeros((8, 8), np.uint16))
        with pytest.raises(InputError, match="mixes bit depths"):
            read_stack(tmp_path)

    def test_gray_and_colour_slices_mix_as_colour(self, tmp_path):
        write_image(tmp_path / "1.png", np.full((8, 8), 9, np.uint8))
        write_image(tmp_path / "2.png", np.full((8, 8, 3), 5, np.uint8))
        images, _ = read_stack(tmp_path)
        assert all(im.shape == (8, 8, 3) for im in images) and images[0][0, 0, 0] == 9

    def test_empty_missing_and_single(self, tmp_path):
        with pytest.raises(InputError, match="holds no images"):
            read_stack(tmp_path)
        with pytest.raises(InputError, match="does not exist"):
            read_stack(tmp_path / "nope")
        write_image(tmp_path / "1.png", np.zeros((8, 8), np.uint8))
        with pytest.raises(InputError, match="at least 2"):
            read_stack(tmp_path)


class TestProcessing:
    def test_gray_conversion_matches_opencv_and_scales_16bit(self):
        image8 = textured_stack(1, 8, 8)[0]
        expected = cv2.cvtColor(image8, cv2.COLOR_BGR2GRAY).astype(np.float32) / 255
        np.testing.assert_array_equal(to_gray_float(image8), expected)
        image16 = image8.astype(np.uint16) * 257
        np.testing.assert_allclose(to_gray_float(image16), expected, atol=1 / 255)

    def test_resize_to_multiple_of_32(self):
        x = torch.rand(1, 3, 200, 300)
        assert resize_to_multiple(x).shape == (1, 3, 224, 320)
        y = torch.rand(1, 3, 64, 96)
        assert resize_to_multiple(y) is y

    def test_colormap_ends_and_index_picture(self):
        colours = depth_colormap(np.array([[0.0, 1.0]]))
        # violet (blue + some red) at 0, red at 1; BGR order
        assert tuple(colours[0, 0]) == (255, 0, 127) and tuple(colours[0, 1]) == (0, 0, 255)
        np.testing.assert_array_equal(index_picture(np.array([[0, 1, 5]]), 6), [[0, 51, 255]])
        np.testing.assert_array_equal(index_picture(np.array([[0]]), 1), [[0]])

    @pytest.mark.parametrize("shape", [(37,), (1, 9), (9, 1), (50, 70)])
    def test_colormap_is_the_palette_at_floor_256_depth_in_any_shape(self, shape):
        depth = np.random.default_rng(0).uniform(-0.2, 1.2, shape)
        depth.flat[0] = np.nan                                     # no depth there: the palette's first colour
        levels = np.clip(np.floor(np.nan_to_num(depth) * 256), 0, 255).astype(int)
        np.testing.assert_array_equal(depth_colormap(depth), _rainbow_lut()[levels])

    def test_levels_are_rounded_unless_truncation_is_asked_for(self):
        steps = np.arange(8)[None]                    # 255 / 7 = 36.43 levels per slice
        np.testing.assert_array_equal(index_picture(steps, 8), [[0, 36, 73, 109, 146, 182, 219, 255]])
        np.testing.assert_array_equal(index_picture(steps, 8, truncate=True), [[0, 36, 72, 109, 145, 182, 218, 255]])
        values = np.array([0.0, 0.2 / 255, 0.6 / 255, 1.0, 1.5, -1.0])
        np.testing.assert_array_equal(to_integer_image(values, np.uint8), [0, 0, 1, 255, 255, 0])
        np.testing.assert_array_equal(to_integer_image(values, np.uint8, truncate=True), [0, 0, 0, 255, 255, 0])
        assert to_integer_image(np.array([0.5]), np.uint16)[0] == 32768


class TestColourScale:
    def test_the_map_is_kept_and_the_palette_runs_down_the_strip(self):
        depth = np.tile(np.linspace(0, 1, 48), (300, 1))
        picture = depth_colormap(depth)
        scaled = colour_scale(picture, 8)
        assert scaled.shape[0] == 300 and scaled.shape[1] > 48 and scaled.dtype == np.uint8
        np.testing.assert_array_equal(scaled[:, :48], picture)
        text = 300 // 30
        bar = scaled[text:300 - text, 48 + text // 2 + text // 2]          # the bar's middle column
        np.testing.assert_array_equal(bar, depth_colormap(np.linspace(0, 1, len(bar))))

    def test_a_short_picture_is_padded_below_in_white(self):
        picture = depth_colormap(np.full((4, 600), 0.5))
        scaled = colour_scale(picture, 3)
        assert scaled.shape[0] == 80
        np.testing.assert_array_equal(scaled[:4, :600], picture)
        assert (scaled[4:, :600] == 255).all()

    def test_labels_name_the_slices_and_the_near_and_far_ends(self):
        assert scale_labels(8, False, 10, 290, 20) == [(10, "1 near"), (50, "2"), (90, "3"), (130, "4"), (170, "5"),
                                                        (210, "6"), (250, "7"), (290, "8 far")]
        assert scale_labels(8, True, 10, 290, 20)[0] == (10, "8 near")
        assert scale_labels(8, True, 10, 290, 20)[-1] == (290, "1 far")
        labels = scale_labels(100, False, 10, 290, 20)             # every 10th slice fits 20 rows apart
        assert [text for _, text in labels] == ["1 near"] + [str(k) for k in range(11, 92, 10)] + ["100 far"]
        assert min(b - a for (a, _), (b, _) in zip(labels, labels[1:])) >= 20


class TestAtomicWrites:
    def test_no_temporary_files_left(self, tmp_path):
        write_image(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
        write_npy(tmp_path / "a.npy", np.arange(3))
        assert sorted(os.listdir(tmp_path)) == ["a.npy", "a.png"]

    def test_failed_encode_leaves_old_file_untouched(self, tmp_path):
        write_image(tmp_path / "a.png", np.full((4, 4), 3, np.uint8))
        with pytest.raises(InputError):
            write_image(tmp_path / "a.png", np.zeros((4, 4, 7), np.uint8))  # 7 channels cannot be PNG
        assert read_image(tmp_path / "a.png")[0, 0] == 3
        assert os.listdir(tmp_path) == ["a.png"]
