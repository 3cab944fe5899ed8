"""What comes out of cameras and microscopes: RAW files, videos, exposure drift, metadata.

Every RAW file is a DNG the test writes itself (pidng) and LibRaw (rawpy) develops."""
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms

import utils
from camera_files import grey_card_scene, write_dng, write_video
from conftest import REPO, textured_stack
from exposure import apply_gains, exposure_gains, match_exposure
from utils import InputError, ImageMetadata, read_image, read_metadata, read_stack, write_image

pytest.importorskip("rawpy", reason="camera RAW tests need rawpy (requirements.txt)")
pytest.importorskip("pidng", reason="the tests write their DNG files with pidng (requirements-test.txt)")

INTERIOR = (slice(4, -4), slice(4, -4))      # demosaicing treats the outer pixels differently


# ----------------------------------------------------------------------------- camera RAW

class TestRaw:
    def test_developed_as_16_bit_bgr_with_the_camera_white_balance(self, tmp_path):
        """A grey card seen through a camera whose as-shot neutral is (0.5, 1, 0.8) comes out grey,
        and red in the camera's raw comes out in the third (BGR) channel."""
        neutral = (0.5, 1.0, 0.8)
        write_dng(tmp_path / "grey.dng", grey_card_scene(neutral=neutral), neutral=neutral)
        grey = read_image(tmp_path / "grey.dng")[INTERIOR]
        assert grey.dtype == np.uint16 and grey.shape == (24, 40, 3)
        spread = grey.astype(np.float64).max(axis=2) - grey.min(axis=2)
        assert spread.max() < 0.01 * 65535 and grey.mean() > 0.2 * 65535
        write_dng(tmp_path / "red.dng", np.ones((32, 48, 3)) * [0.4, 0.1, 0.05])      # red, in gamut
        b, g, r = read_image(tmp_path / "red.dng")[INTERIOR].reshape(-1, 3).mean(axis=0)
        assert r > 1.3 * g and r > 1.3 * b

    def test_no_auto_brightening(self, tmp_path):
        """A dark exposure stays dark, and twice the light gives a brighter picture
        (an auto-brightened development stretches both to the same white)."""
        for name, level in (("dark", 0.1), ("bright", 0.2)):
            write_dng(tmp_path / f"{name}.dng", grey_card_scene(level=level))
        dark, bright = (read_image(tmp_path / f"{n}.dng")[INTERIOR].astype(np.float64) for n in ("dark", "bright"))
        assert dark.max() < 0.45 * 65535
        assert 1.2 < bright.mean() / dark.mean() < 2.0          # linear x2 through the output gamma

    def test_one_development_for_the_whole_stack(self, tmp_path):
        """The camera re-measured its white balance for slice 2: the stack still develops every
        slice with slice 1's, so identical raw data gives identical slices."""
        scene = grey_card_scene(neutral=(0.5, 1.0, 0.8))
        write_dng(tmp_path / "1.dng", scene, neutral=(0.5, 1.0, 0.8))
        write_dng(tmp_path / "2.dng", scene, neutral=(0.8, 1.0, 0.5))
        images, names = read_stack(tmp_path)
        assert names == ["1.dng", "2.dng"]
        np.testing.assert_array_equal(images[0], images[1])
        alone = read_image(tmp_path / "2.dng")                  # on its own: its own white balance
        assert np.abs(alone.astype(np.int64) - images[1]).max() > 0.1 * 65535

    def test_mixed_raw_and_other_images_is_a_clear_error(self, tmp_path):
        write_dng(tmp_path / "1.dng", grey_card_scene())
        write_image(tmp_path / "2.png", np.zeros((32, 48, 3), np.uint16))
        with pytest.raises(InputError, match=r"mixes camera RAW files \('1.dng'\) with other images \('2.png'\)"):
            read_stack(tmp_path)

    @pytest.mark.parametrize("content", ["garbage", "truncated", "empty"])
    def test_unreadable_raw(self, tmp_path, content, capfd):
        write_dng(tmp_path / "1.dng", grey_card_scene())
        data = (tmp_path / "1.dng").read_bytes()
        bad = {"garbage": b"not a raw file" * 40, "truncated": data[: len(data) // 2], "empty": b""}[content]
        (tmp_path / "2.dng").write_bytes(bad)
        capfd.readouterr()
        words = "is empty" if content == "empty" else "2.dng' is not a readable camera RAW file"
        with pytest.raises(InputError, match=words):
            read_stack(tmp_path)
        assert capfd.readouterr().err == ""                     # LibRaw's own lines stay off the terminal

    def test_raw_of_another_camera_size(self, tmp_path):
        write_dng(tmp_path / "1.dng", grey_card_scene(32, 48))
        write_dng(tmp_path / "2.dng", grey_card_scene(40, 64), model="Other body")
        with pytest.raises(InputError, match="mixes image sizes: '1.dng' is 48x32 but '2.dng' is 64x40"):
            read_stack(tmp_path)

    def test_without_rawpy_a_raw_stack_says_what_to_install(self, tmp_path, monkeypatch):
        write_dng(tmp_path / "1.dng", grey_card_scene())
        monkeypatch.setitem(sys.modules, "rawpy", None)          # import rawpy now raises ImportError
        with pytest.raises(InputError, match=r"camera RAW files need the rawpy package \(pip install rawpy\)"):
            read_image(tmp_path / "1.dng")

    def test_rawpy_is_imported_only_for_raw_files(self, tmp_path):
        for k, image in enumerate(textured_stack(2, 16, 16), start=1):
            write_image(tmp_path / f"{k}.png", image)
        write_dng(tmp_path / "raw.dng", grey_card_scene())
        (tmp_path / "raw.dng").rename(tmp_path.parent / f"{tmp_path.name}.dng")
        code = ("import sys, utils, predict_one_stack; utils.read_stack(sys.argv[1]); print('rawpy' in sys.modules); "
                "utils.read_image(sys.argv[2]); print('rawpy' in sys.modules)")
        raw = tmp_path.parent / f"{tmp_path.name}.dng"
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(raw)], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
        assert out == ["False", "True"]


# ----------------------------------------------------------------------------- video

def numbered_frames(count, h=48, w=64):
    """Frames whose brightness says their number: 10 + 20 k."""
    return [np.full((h, w, 3), 10 + 20 * k, np.uint8) for k in range(count)]


class TestVideo:
    @pytest.mark.parametrize("ext, fourcc", [(".avi", "FFV1"), (".mkv", "FFV1"), (".mp4", "mp4v"), (".mov", "mp4v")])
    def test_video_is_a_stack_of_its_frames(self, tmp_path, ext, fourcc):
        write_video(tmp_path / f"clip{ext}", numbered_frames(5), fourcc)
        images, names = read_stack(tmp_path / f"clip{ext}")
        assert names == [f"clip{ext}[frame {k}]" for k in range(1, 6)]
        assert all(im.shape == (48, 64, 3) and im.dtype == np.uint8 for im in images)
        np.testing.assert_allclose([im.mean() for im in images], [10, 30, 50, 70, 90], atol=4)

    def test_every_keeps_one_frame_in_k(self, tmp_path):
        write_video(tmp_path / "clip.avi", numbered_frames(7))
        images, names = read_stack(tmp_path / "clip.avi", every=3)
        assert names == ["clip.avi[frame 1]", "clip.avi[frame 4]", "clip.avi[frame 7]"]
        assert [round(im.mean()) for im in images] == [10, 70, 130]

    def test_every_on_a_folder_and_a_multipage_tiff(self, tmp_path):
        slices = [np.full((8, 8), k, np.uint8) for k in range(5)]
        for k, s in enumerate(slices, start=1):
            write_image(tmp_path / f"{k}.png", s)
        images, names = read_stack(tmp_path, every=2)
        assert names == ["1.png", "3.png", "5.png"] and [int(im[0, 0]) for im in images] == [0, 2, 4]
        assert cv2.imwritemulti(str(tmp_path / "s.tif"), slices)
        images, names = read_stack(tmp_path / "s.tif", every=4)
        assert names == ["s.tif[1]", "s.tif[5]"] and [int(im[0, 0]) for im in images] == [0, 4]
        with pytest.raises(InputError, match=r"has 1 image\(s\) \(every 9th of 5 kept\)"):
            read_stack(tmp_path / "s.tif", every=9)

    def test_zero_length_one_frame_and_undecodable_videos(self, tmp_path):
        (tmp_path / "empty.mp4").write_bytes(b"")
        write_video(tmp_path / "no_frames.avi", [])
        write_video(tmp_path / "one.avi", numbered_frames(1))
        (tmp_path / "junk.mkv").write_bytes(b"\x1a\x45\xdf\xa3 not really matroska" * 30)
        for name, words in (("empty.mp4", r"video '.*empty.mp4' is empty \(0 bytes\)"),
                            ("no_frames.avi", "is not a readable video"),
                            ("one.avi", r"has 1 image\(s\); at least 2"), ("junk.mkv", "is not a readable video"),
                            ("gone.mov", "does not exist")):
            with pytest.raises(InputError, match=words):
                read_stack(tmp_path / name)


# ----------------------------------------------------------------------------- exposure matching

def drifting(images, gains):
    return [apply_gains(im, g) for im, g in zip(images, gains)]


class TestExposureMatching:
    def test_gains_undo_a_drift_of_exposure_and_white_balance(self):
        images = textured_stack(5, 96, 128, dtype=np.uint16, seed=3)
        drift = np.array([[1 + 0.02 * k, 1 + 0.01 * k, 1 - 0.015 * k] for k in range(5)])   # per BGR channel
        gains = exposure_gains(drifting(images, drift))
        assert gains.shape == (5, 3)
        np.testing.assert_array_equal(gains[0], 1.0)
        np.testing.assert_allclose(gains * drift, 1.0, atol=0.003)

    def test_no_drift_gives_gains_of_one_and_gray_stacks_one_gain(self):
        images = textured_stack(4, 96, 128, channels=1, seed=5)
        gains = exposure_gains(images)
        assert gains.shape == (4, 1)
        # 8-bit truncation after the blur darkens each blurred slice by half a level on average:
        # the gains see that (and nothing more)
        truth = [images[0].mean() / image.mean() for image in images]
        assert truth[1] > 1.003
        np.testing.assert_allclose(gains[:, 0], truth, atol=0.0015)
        matched, _ = match_exposure(drifting(images, [1.0, 0.95, 1.05, 1.0]))
        for image, back in zip(images, matched):
            assert np.abs(back.astype(int) - image).mean() < 1.5

    def test_reference_is_untouched_and_clipping_stays_in_range(self):
        images = textured_stack(3, 40, 48, seed=1)
        matched, gains = match_exposure(drifting(images, [1.0, 0.8, 0.8]))
        assert matched[0] is not None and np.array_equal(matched[0], images[0])
        assert all(im.dtype == np.uint8 for im in matched) and gains[1].min() > 1.15


# ----------------------------------------------------------------------------- metadata

def camera_exif(orientation=6):
    exif = Image.Exif()
    exif[271], exif[272], exif[274], exif[256] = "Testmaker", "Bench 1", orientation, 4000
    capture = exif.get_ifd(utils.EXIF_IFD)
    capture[36867], capture[42036], capture[33434] = "2024:05:06 07:08:09", "Macro 100 mm", 0.004
    capture[37500] = b"maker note bytes" * 8
    return exif


# Made once: the profile's header holds the time it was made.
SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def parsed(exif_bytes):
    exif = Image.Exif()
    exif.load(exif_bytes)
    return dict(exif), dict(exif.get_ifd(utils.EXIF_IFD))


class TestMetadata:
    def test_camera_tags_kept_and_orientation_and_layout_dropped(self, tmp_path):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.jpg", exif=camera_exif(),
                                                             icc_profile=SRGB_PROFILE)
        metadata = read_metadata(tmp_path / "a.jpg")
        assert metadata.icc_profile == SRGB_PROFILE
        ifd0, capture = parsed(metadata.exif)
        assert (ifd0[271], ifd0[272]) == ("Testmaker", "Bench 1") and 274 not in ifd0 and 256 not in ifd0
        assert capture == {36867: "2024:05:06 07:08:09", 42036: "Macro 100 mm", 33434: 0.004}

    @pytest.mark.parametrize("ext, dtype", [(".jpg", np.uint8), (".png", np.uint8), (".png", np.uint16),
                                            (".tif", np.uint8), (".tif", np.uint16)])
    def test_written_files_carry_exif_and_icc_and_keep_their_pixels(self, tmp_path, ext, dtype):
        exif = utils.camera_exif(camera_exif())
        image = textured_stack(1, 20, 30, dtype=dtype, seed=2)[0]
        write_image(tmp_path / f"out{ext}", image, metadata=ImageMetadata(exif, SRGB_PROFILE))
        back = read_image(tmp_path / f"out{ext}")
        assert back.dtype == dtype
        if ext != ".jpg":
            np.testing.assert_array_equal(back, image)
        again = read_metadata(tmp_path / f"out{ext}")
        assert again.icc_profile == SRGB_PROFILE
        assert parsed(again.exif) == parsed(exif)

    def test_tiff_tags_read_by_tifffile(self, tmp_path):
        """A second, independent TIFF reader sees the same tags."""
        tifffile = pytest.importorskip("tifffile")
        write_image(tmp_path / "out.tif", textured_stack(1, 12, 16, dtype=np.uint16)[0],
                    metadata=ImageMetadata(utils.camera_exif(camera_exif()), SRGB_PROFILE))
        with tifffile.TiffFile(tmp_path / "out.tif") as tif:
            tags = tif.pages[0].tags
            assert tags["Make"].value == "Testmaker" and tags["Model"].value == "Bench 1"
            assert tags["ExifTag"].value["LensModel"] == "Macro 100 mm"
            assert bytes(tags["InterColorProfile"].value) == SRGB_PROFILE
            assert tif.pages[0].dtype == np.uint16 and tif.pages[0].shape == (12, 16, 3)

    def test_icc_only_onto_pixels_of_its_colour_space_and_16_bit_jpeg_scaled(self, tmp_path):
        gray = np.full((8, 8), 40000, np.uint16)
        write_image(tmp_path / "g.png", gray, metadata=ImageMetadata(None, SRGB_PROFILE))
        assert read_metadata(tmp_path / "g.png").icc_profile is None
        write_image(tmp_path / "g.jpg", gray)
        assert abs(int(read_image(tmp_path / "g.jpg")[0, 0]) - round(40000 / 257)) <= 1   # not clipped to 255

    def test_dng_tags_are_read(self, tmp_path):
        write_dng(tmp_path / "a.dng", grey_card_scene(), datetime_original="2023:01:02 03:04:05", lens="Lens X")
        ifd0, capture = parsed(read_metadata(tmp_path / "a.dng").exif)
        assert (ifd0[271], ifd0[272]) == ("Testmaker", "Bench 1")
        assert capture == {36867: "2023:01:02 03:04:05", 42036: "Lens X"}

    def test_no_metadata_and_unparsable_tags_are_empty(self, tmp_path):
        write_image(tmp_path / "plain.png", np.zeros((4, 4), np.uint8))
        (tmp_path / "bad.tif").write_bytes(b"II*\0" + b"\xff" * 40)
        assert read_metadata(tmp_path / "plain.png") == ImageMetadata()
        assert read_metadata(tmp_path / "bad.tif") == ImageMetadata()



# ----------------------------------------------------------------------------- the command line

def textured_scene(h=64, w=96, seed=0):
    """Linear camera RGB in [0.05, 0.8] with fine texture, for DNG brackets."""
    return 0.05 + 0.75 * textured_stack(1, h, w, dtype=np.uint16, seed=seed)[0][:, :, ::-1] / 65535.0


def predict(monkeypatch, capsys, *argv):
    """predict_one_stack.py under utils.run_cli, in this process: (exit status, stderr)."""
    import signal
    import predict_one_stack
    monkeypatch.setattr(sys, "argv", ["predict_one_stack.py", "--device", "cpu", *map(str, argv)])
    handler = signal.getsignal(signal.SIGTERM)
    try:
        utils.run_cli(predict_one_stack.main, predict_one_stack.get_args_parser())
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        signal.signal(signal.SIGTERM, handler)
    return code, capsys.readouterr().err


class TestCommandLine:
    def test_raw_bracket_to_16_bit_tiff_with_exif(self, tmp_path, random_weights, monkeypatch, capsys):
        bracket = tmp_path / "bracket"
        bracket.mkdir()
        for k in range(3):
            write_dng(bracket / f"IMG_{k + 1:04d}.dng", textured_scene() * (1 + 0.03 * k), lens="Macro 60 mm",
                      datetime_original=f"2025:06:01 10:00:0{k}")
        code, err = predict(monkeypatch, capsys, "--input_dir", bracket, "--output_dir", tmp_path / "out",
                            "--model_path", random_weights, "--fixed_names", "--align", "ecc", "--match_exposure",
                            "--output_format", "tiff", "--tiff_compression", "deflate")
        assert code == 0, err
        names = sorted(p.name for p in (tmp_path / "out").iterdir())
        assert names == ["color_fused.tif", "depth_colormap.png", "depth_index.npy", "depth_index_vis.png",
                         "depth_map.png", "fused_gray.tif"]
        colour = read_image(tmp_path / "out" / "color_fused.tif")
        assert colour.dtype == np.uint16 and colour.shape == (64, 96, 3)
        assert read_image(tmp_path / "out" / "fused_gray.tif").dtype == np.uint16
        ifd0, capture = parsed(read_metadata(tmp_path / "out" / "color_fused.tif").exif)
        assert ifd0[271] == "Testmaker" and capture == {36867: "2025:06:01 10:00:00", 42036: "Macro 60 mm"}
        assert read_metadata(tmp_path / "out" / "fused_gray.tif").exif is None

    def test_jpeg_quality_and_video_every(self, tmp_path, random_weights, monkeypatch, capsys):
        frames = [np.clip(textured_stack(1, 48, 64, seed=k)[0], 0, 255) for k in range(6)]
        write_video(tmp_path / "clip.avi", frames)
        sizes = {}
        for quality in (20, 95):
            out = tmp_path / f"q{quality}"
            code, err = predict(monkeypatch, capsys, "--input_dir", tmp_path / "clip.avi", "--output_dir", out,
                                "--model_path", random_weights, "--fixed_names", "--every", "2",
                                "--output_format", "jpeg", "--jpeg_quality", quality)
            assert code == 0, err
            sizes[quality] = (out / "color_fused.jpg").stat().st_size
            index = np.load(out / "depth_index.npy")
            assert index.max() <= 2                     # frames 1, 3, 5: three slices
        assert sizes[20] < 0.7 * sizes[95]

    @pytest.mark.parametrize("case, words", [
        ("unreadable_raw", "2.dng' is not a readable camera RAW file"),
        ("raw_of_another_size", "mixes image sizes: '1.dng' is 48x32 but '2.dng' is 64x40"),
        ("mixed_raw_and_png", "mixes camera RAW files ('1.dng') with other images ('2.png')"),
        ("zero_length_video", "clip.mp4' is empty (0 bytes)"),
        ("video_without_frames", "clip.mp4' is not a readable video"),
        ("one_frame_video", "has 1 image(s); at least 2 are needed"),
        ("jpeg_quality_without_jpeg", "--jpeg_quality applies to --output_format jpeg only"),
        ("tiff_compression_without_tiff", "--tiff_compression applies to --output_format tiff only"),
        ("every_zero", "--every: must be a whole number of 1 or more, not '0'"),
    ])
    def test_bad_camera_input_is_one_line_and_exit_2(self, tmp_path, random_weights, monkeypatch, capsys, case,
                                                       words):
        source, extra = tmp_path / "stack", []
        source.mkdir()
        write_dng(source / "1.dng", grey_card_scene(32, 48))
        if case == "unreadable_raw":
            (source / "2.dng").write_bytes((source / "1.dng").read_bytes()[:300])
        elif case == "raw_of_another_size":
            write_dng(source / "2.dng", grey_card_scene(40, 64))
        elif case == "mixed_raw_and_png":
            write_image(source / "2.png", np.zeros((32, 48, 3), np.uint16))
        elif "video" in case:
            source = tmp_path / "clip.mp4"
            if case == "zero_length_video":
                source.write_bytes(b"")
            else:
                write_video(source, numbered_frames(0 if case == "video_without_frames" else 1), "mp4v")
        else:
            write_dng(source / "2.dng", grey_card_scene(32, 48))
            extra = {"jpeg_quality_without_jpeg": ["--jpeg_quality", "80"],
                     "tiff_compression_without_tiff": ["--output_format", "jpeg", "--tiff_compression", "lzw"],
                     "every_zero": ["--every", "0"]}[case]
        code, err = predict(monkeypatch, capsys, "--input_dir", source, "--output_dir", tmp_path / "out",
                            "--model_path", random_weights, *extra)
        assert code == 2 and err.count("\n") == 1 and words in err and "Traceback" not in err
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_batch_outputs_carry_metadata_in_the_chosen_format(tmp_path, random_weights):
    """predict_datasets.py: each scene's colour fused image takes its first slice's EXIF, written as TIFF."""
    import predict_datasets
    for scene, model in (("a", "Body A"), ("b", "Body B")):
        folder = tmp_path / "data" / "set" / "dof_stack" / scene
        folder.mkdir(parents=True)
        exif = camera_exif(orientation=1)                 # 6 would turn slice 1 on its side
        exif[272] = model
        for k, image in enumerate(textured_stack(3, 32, 40, seed=len(model)), start=1):
            Image.fromarray(image[:, :, ::-1]).save(folder / f"{k}.jpg", exif=exif if k == 1 else Image.Exif())
    args = predict_datasets.get_args_parser().parse_args([
        "--test_root", str(tmp_path / "data"), "--test_datasets", "set", "--output_dir", str(tmp_path / "out"),
        "--run_name", "r", "--model_path", str(random_weights), "--device", "cpu", "--num_workers", "0",
        "--output_format", "tiff", "--match_exposure"])
    assert predict_datasets.main(args).exit_status == 0
    for scene, model in (("a", "Body A"), ("b", "Body B")):
        out = tmp_path / "out" / "r" / "set"
        assert parsed(read_metadata(out / "color_fused_images" / f"{scene}.tif").exif)[0][272] == model
        assert (out / "fused_images" / f"{scene}.tif").is_file() and (out / "depth_maps" / f"{scene}.png").is_file()
