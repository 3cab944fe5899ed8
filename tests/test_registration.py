"""Registration.py on synthetic focus stacks with known motion.

Each stack is made from a bundled scikit-image photograph: a focus stack is
synthesised with the released method (make_datasets/synthesis.py, depth = a
left-to-right ramp, so every frame is sharp in its own band), then frame k is
cut out of it through a known similarity G_k (frame pixel -> photo pixel).
After registration with transforms A_k (input pixel -> output pixel), output
pixel c of the reference frame shows the photo point G_r A_r^-1 c; in frame k
that point lands at A_k G_k^-1 G_r A_r^-1 c. The residual error of frame k is
the mean distance of that point from c over the four image corners.
"""
import os
import subprocess
import sys
import warnings

import cv2
import numpy as np
import pytest
from skimage import data

from make_datasets.synthesis import released_stack
import predict_pair_datasets
from predict_one_stack import get_args_parser as predict_args_parser
from Registration import (RegistrationWarning, align_stack, align_with_report, estimate_transforms, map_points,
                          match_zoom,
                          sift_features, total_zoom, warp_frame)
from utils import InputError, read_image, to_gray_float, write_image

from conftest import REPO  # noqa: E402
OFFICIAL_MODEL = REPO.parent / "shared" / "reference" / "official" / "model.pth"
LIGHT_FIELD = REPO.parent / "shared" / "data" / "lightfields" / "hci_dino"
requires_light_field = pytest.mark.skipif(not LIGHT_FIELD.is_dir(), reason=f"needs the light field {LIGHT_FIELD}")
SIZE = 256           # frame side
PHOTO_SIZE = 320     # the photo the frames are cut from (room for zoom and shake)


def similarity(scale, angle_deg, shift, frame_size=SIZE, photo_size=PHOTO_SIZE):
    """3x3 frame pixel -> photo pixel: zoom out by ``scale`` and turn by ``angle``
    about the centres, then move by ``shift`` (x, y) photo pixels."""
    a = np.deg2rad(angle_deg)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    fc = np.full(2, (frame_size - 1) / 2)
    pc = np.full(2, (photo_size - 1) / 2)
    m = np.eye(3)
    m[:2, :2] = rot
    m[:2, 2] = pc + np.asarray(shift, dtype=float) - rot @ fc
    return m


def photo(name="astronaut"):
    """Bundled photo as a PHOTO_SIZE square BGR uint8 image."""
    rgb = getattr(data, name)()
    side = min(rgb.shape[:2])
    rgb = rgb[:side, :side]
    return cv2.resize(np.ascontiguousarray(rgb[..., ::-1]), (PHOTO_SIZE, PHOTO_SIZE), interpolation=cv2.INTER_AREA)


def make_stack(scales, angles, shifts, name="astronaut", gray=False, bits=8):
    """Frames (list of SIZE x SIZE images) and their known G_k (frame -> photo)."""
    image = photo(name)
    if gray:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if bits == 16:
        image = image.astype(np.uint16) * 257
    depth = np.tile(np.linspace(0, 255, PHOTO_SIZE).astype(np.uint8), (PHOTO_SIZE, 1))
    n = len(scales)
    slices, _ = released_stack(image, depth, n)
    frames, geometry = [], []
    for k in range(n):
        g = similarity(scales[k], angles[k], shifts[k])
        frames.append(cv2.warpAffine(slices[k], g[:2], (SIZE, SIZE),
                                     flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP))
        geometry.append(g)
    return frames, geometry


def write_stack(folder, frames, name="{}.png"):
    """Write frames as a stack folder (numbered from 1) and return the folder."""
    folder.mkdir(exist_ok=True)
    for k, f in enumerate(frames):
        write_image(folder / name.format(k + 1), f)
    return folder


def residuals(transforms, geometry, ref):
    """Mean corner displacement (px) of every frame relative to frame ``ref``."""
    corners = np.array([[0, 0], [SIZE - 1, 0], [SIZE - 1, SIZE - 1], [0, SIZE - 1]], dtype=float)
    to_photo = geometry[ref] @ np.linalg.inv(transforms[ref])
    return np.array([np.linalg.norm(map_points(t @ np.linalg.inv(g) @ to_photo, corners) - corners, axis=1).mean()
                     for t, g in zip(transforms, geometry)])


def shaky_breathing(n=8, zoom=0.06, shake=4.0, turn=1.0, seed=0):
    """Focus breathing (magnification grows by ``zoom`` over the stack) plus hand-held shake."""
    rng = np.random.default_rng(seed)
    scales = 1.0 / np.linspace(1.0, 1.0 + zoom, n)          # frame -> photo scale shrinks as the image grows
    angles = rng.uniform(-turn, turn, n)
    shifts = rng.uniform(-shake, shake, (n, 2))
    return scales, angles, shifts


class TestReferenceFrameMethod:
    @pytest.mark.parametrize("motion", ["affine", "homography"])
    def test_breathing_and_shake_registered_within_half_pixel(self, motion):
        frames, geometry = make_stack(*shaky_breathing())
        before = residuals([np.eye(3)] * len(frames), geometry, 0)
        transforms = estimate_transforms(frames, method="ecc", reference="first", motion=motion)
        after = residuals(transforms, geometry, 0)
        assert before.max() > 5                       # the stack really is misaligned
        assert after.max() <= 0.5, after

    @pytest.mark.parametrize("reference, expected", [("last", 5), ("middle", 2), ("sharpest", None)])
    def test_reference_choice(self, reference, expected):
        frames, geometry = make_stack(*shaky_breathing(n=6, seed=1), name="coffee")
        transforms = estimate_transforms(frames, method="ecc", reference=reference)
        identities = [k for k, t in enumerate(transforms) if np.allclose(t, np.eye(3))]
        assert len(identities) == 1
        ref = identities[0]
        if expected is not None:
            assert ref == expected
        assert residuals(transforms, geometry, ref).max() <= 0.5

    def test_sharpest_picks_the_frame_with_most_detail(self):
        frames, _ = make_stack([1.0] * 4, [0.0] * 4, np.zeros((4, 2)))
        # Blur all but frame 2 strongly: it must become the reference.
        frames = [f if k == 2 else cv2.GaussianBlur(f, (0, 0), 3) for k, f in enumerate(frames)]
        transforms = estimate_transforms(frames, method="ecc", reference="sharpest")
        assert np.allclose(transforms[2], np.eye(3))

    def test_aligned_pixels_match_the_reference(self):
        frames, _ = make_stack([1.0, 1 / 1.03], [0.0, 0.5], [(0, 0), (3, -2)], gray=True)
        aligned = align_stack(frames, method="ecc")
        inner = (slice(20, -20), slice(20, -20))
        error_before = np.abs(frames[1][inner].astype(float) - frames[0][inner]).mean()
        error_after = np.abs(aligned[1][inner].astype(float) - frames[0][inner]).mean()
        assert np.array_equal(aligned[0], frames[0])   # the reference is copied exactly
        assert error_after < error_before / 3


class TestReleasedMethod:
    def test_zoom_and_small_shifts_within_one_pixel(self):
        rng = np.random.default_rng(2)
        n = 8
        scales = 1.0 / np.linspace(1.0, 1.05, n)
        frames, geometry = make_stack(scales, np.zeros(n), rng.uniform(-2, 2, (n, 2)))
        transforms = estimate_transforms(frames, method="released")
        assert residuals(transforms, geometry, 0).max() <= 1.0

    def test_zoom_is_chained_when_outer_frames_share_no_detail(self):
        # 12 slices of the coffee photo: the first and last frames are sharp in
        # opposite thirds and do not match directly; neighbours do.
        n = 12
        frames, geometry = make_stack(1.0 / np.linspace(1.0, 1.05, n), np.zeros(n), np.zeros((n, 2)), name="coffee")
        grays = [to_gray_float(f) for f in frames]
        assert match_zoom(sift_features(grays[0]), sift_features(grays[-1])) is None
        assert total_zoom(grays, list(range(n))) == pytest.approx(1.05, abs=0.003)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RegistrationWarning)      # no fallback taken
            transforms = estimate_transforms(frames, method="released")
        assert residuals(transforms, geometry, 0).max() <= 1.0

    def test_zoom_step_crops_to_the_most_magnified_view(self):
        # Pure breathing: the output shows the field of view of the last, most
        # magnified frame, so no frame needs pixels from outside itself.
        n = 5
        frames, geometry = make_stack(1.0 / np.linspace(1.0, 1.05, n), np.zeros(n), np.zeros((n, 2)))
        transforms = estimate_transforms(frames, method="released")
        corners = np.array([[0, 0], [SIZE - 1, 0], [SIZE - 1, SIZE - 1], [0, SIZE - 1]], dtype=float)
        for t in transforms:
            inside = map_points(np.linalg.inv(t), corners)
            assert inside.min() >= -0.5 and inside.max() <= SIZE - 0.5
        assert np.abs(map_points(transforms[-1], corners) - corners).max() < 0.5   # the last frame barely moves

    def test_smoothing_keeps_a_slow_drift(self):
        # A steady pan is the "intended" path of a video: with smoothing it is
        # kept (frames stay apart), without it every frame is locked together.
        n = 7
        shifts = np.stack([np.arange(n) * 2.0, np.zeros(n)], axis=1)
        frames, geometry = make_stack(np.ones(n), np.zeros(n), shifts)
        locked = residuals(estimate_transforms(frames, method="released"), geometry, 0)
        smoothed = residuals(estimate_transforms(frames, method="released", smoothing_radius=2), geometry, 0)
        assert locked.max() <= 1.0
        assert smoothed[-1] > 4


class TestRobustness:
    @pytest.mark.parametrize("method", ["released", "ecc"])
    def test_blank_frame_is_left_as_it_is(self, method):
        frames, geometry = make_stack(*shaky_breathing(n=6, zoom=0.03, shake=2.0, turn=0.0, seed=3))
        frames[3] = np.full_like(frames[3], 128)
        with pytest.warns(RegistrationWarning, match="frame 3 is blank"):
            transforms = estimate_transforms(frames, method=method)
        aligned = [warp_frame(f, t) for f, t in zip(frames, transforms)]
        assert np.array_equal(aligned[3], frames[3])
        good = [k for k in range(6) if k != 3]
        errors = residuals(transforms, geometry, 0)[good]
        assert errors.max() <= (0.5 if method == "ecc" else 1.0)

    def test_too_few_features_fall_back_to_identity(self):
        ramp = np.tile(np.linspace(0, 255, SIZE).astype(np.uint8), (SIZE, 1))
        frames = [ramp, np.roll(ramp, 3, axis=1), ramp.copy()]
        with pytest.warns(RegistrationWarning, match="too few features"):
            aligned = align_stack(frames, method="released")
        for a, f in zip(aligned, frames):
            assert np.array_equal(a, f)

    def test_all_blank_stack_is_returned_unchanged(self):
        frames = [np.zeros((32, 32), np.uint8)] * 3
        with pytest.warns(RegistrationWarning, match="blank|nothing is aligned") as caught:
            aligned = align_stack(frames)
        assert any("nothing is aligned" in str(w.message) for w in caught)
        assert all(np.array_equal(a, f) for a, f in zip(aligned, frames))

    def test_blank_reference_is_an_input_error(self):
        frames, _ = make_stack([1.0] * 3, [0.0] * 3, np.zeros((3, 2)))
        frames[0] = np.zeros_like(frames[0])
        with pytest.raises(InputError, match="blank; choose another reference"), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", RegistrationWarning)
            align_stack(frames, method="ecc", reference="first")

    @pytest.mark.parametrize("method", ["released", "ecc"])
    def test_mixed_sizes_are_an_input_error(self, method):
        frames = [np.zeros((64, 64), np.uint8), np.zeros((64, 60), np.uint8)]
        with pytest.raises(InputError, match="mixes image sizes"):
            align_stack(frames, method=method)

    @pytest.mark.parametrize("frames, message", [
        ([], "no images"),
        ([np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint16)], "mixes bit depths"),
        ([np.zeros((8, 8), np.float32)] * 2, "only 8-bit and 16-bit"),
        ([np.zeros((8, 8, 4), np.uint8)] * 2, "unsupported shape"),
    ])
    def test_bad_frames_are_input_errors(self, frames, message):
        with pytest.raises(InputError, match=message):
            align_stack(frames)

    def test_bad_options_are_input_errors(self):
        frames = [np.zeros((8, 8), np.uint8)] * 2
        with pytest.raises(InputError, match="unknown registration method"):
            align_stack(frames, method="sift")
        with pytest.raises(InputError, match="unknown reference"):
            align_stack(frames, reference="best")
        with pytest.raises(InputError, match="unknown ECC motion"):
            align_stack(frames, method="ecc", motion="rigid")

    def test_single_frame_is_returned_unchanged(self):
        frame = np.arange(64, dtype=np.uint8).reshape(8, 8)
        aligned = align_stack([frame], method="ecc")
        assert len(aligned) == 1 and np.array_equal(aligned[0], frame)


class TestPixelFormats:
    @pytest.mark.parametrize("method", ["released", "ecc"])
    def test_16_bit_colour_is_preserved(self, method):
        frames, geometry = make_stack(*shaky_breathing(n=4, zoom=0.03, shake=2.0, turn=0.0, seed=4), bits=16)
        aligned = align_stack(frames, method=method)
        assert all(a.dtype == np.uint16 and a.shape == (SIZE, SIZE, 3) for a in aligned)
        assert aligned[0].max() > 255 * 100        # the full 16-bit range survives, not a rescaled 8-bit copy
        # Colour channels are warped together: every channel of every frame agrees with frame 0.
        inner = (slice(30, -30), slice(30, -30))
        for a in aligned[1:]:
            diff = np.abs(a[inner].astype(float) - aligned[0][inner]).mean(axis=(0, 1)) / 65535
            assert np.all(diff < 0.03), diff

    def test_gray_stays_gray(self):
        frames, _ = make_stack(*shaky_breathing(n=3, zoom=0.02, shake=1.0, turn=0.0), gray=True)
        aligned = align_stack(frames, method="released")
        assert all(a.ndim == 2 and a.dtype == np.uint8 for a in aligned)

    def test_folder_input(self, tmp_path):
        frames, geometry = make_stack(*shaky_breathing(n=3, zoom=0.02, shake=2.0, turn=0.0, seed=5))
        from_folder = align_stack(write_stack(tmp_path / "stack", frames), method="ecc")
        from_list = align_stack(frames, method="ecc")
        assert all(np.array_equal(a, b) for a, b in zip(from_folder, from_list))


class TestCommandLine:
    def run(self, *args):
        return subprocess.run([sys.executable, str(REPO / "Registration.py"), *map(str, args)],
                              capture_output=True, text=True, cwd=REPO, timeout=120)

    def test_folder_to_numbered_frames(self, tmp_path):
        frames, _ = make_stack(*shaky_breathing(n=3, zoom=0.02, shake=2.0, turn=0.0, seed=6))
        stack = write_stack(tmp_path / "stack", frames, "slice{}.png")
        out = tmp_path / "aligned"
        result = self.run(stack, "-o", out)
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in out.iterdir()) == ["frame_0000.png", "frame_0001.png", "frame_0002.png"]
        written = read_image(out / "frame_0001.png")
        assert written.shape == frames[1].shape and written.dtype == np.uint8
        assert not np.array_equal(written, frames[1])   # it was moved

    def test_output_equal_to_input_is_refused_and_input_kept(self, tmp_path):
        frames, _ = make_stack(*shaky_breathing(n=3, zoom=0.02, shake=2.0, turn=0.0, seed=6))
        # frames named as the script names its output: writing there would replace them
        stack = write_stack(tmp_path / "stack", frames, "frame_{:04d}.png")
        before = {p.name: p.read_bytes() for p in stack.iterdir()}
        result = self.run(stack, "-o", stack)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "is the input folder" in result.stderr
        assert {p.name: p.read_bytes() for p in stack.iterdir()} == before

    def test_one_pixel_frames_are_one_clear_line(self, tmp_path):
        stack = tmp_path / "dots"
        stack.mkdir()
        for k in range(2):
            cv2.imwrite(str(stack / f"{k}.png"), np.full((1, 1, 3), 40 * k, np.uint8))
        result = self.run(stack, "-o", tmp_path / "out")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "is 1x1 pixels; registration needs at least 2x2" in result.stderr

    def test_non_empty_output_is_refused_without_overwrite(self, tmp_path):
        frames, _ = make_stack(*shaky_breathing(n=3, zoom=0.02, shake=2.0, turn=0.0, seed=6))
        stack = write_stack(tmp_path / "stack", frames)
        out = tmp_path / "aligned"
        out.mkdir()
        (out / "frame_0005.png").write_bytes(b"from an earlier, longer stack")
        result = self.run(stack, "-o", out)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip() == f"error: output folder '{out}' already holds 1 file(s); choose an empty " \
                                        f"or new folder, or pass --overwrite to replace them all"
        assert [p.name for p in out.iterdir()] == ["frame_0005.png"]

    def test_overwrite_replaces_the_whole_folder(self, tmp_path):
        frames, _ = make_stack(*shaky_breathing(n=3, zoom=0.02, shake=2.0, turn=0.0, seed=6))
        stack = write_stack(tmp_path / "stack", frames)
        out = tmp_path / "aligned"
        out.mkdir()
        for name in ("frame_0000.png", "frame_0005.png"):
            write_image(out / name, np.zeros((8, 8), np.uint8))
        result = self.run(stack, "-o", out, "--overwrite")
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in out.iterdir()) == ["frame_0000.png", "frame_0001.png", "frame_0002.png"]
        assert read_image(out / "frame_0000.png").shape == frames[0].shape
        assert sorted(p.name for p in tmp_path.iterdir()) == ["aligned", "stack"]   # no temporary folder left

    def test_a_failed_overwrite_keeps_the_old_files_whole(self, tmp_path, monkeypatch):
        import Registration
        out = tmp_path / "aligned"
        out.mkdir()
        old = {f"frame_{k:04d}.png": bytes([k]) * 10 for k in range(4)}
        for name, data in old.items():
            (out / name).write_bytes(data)
        written = []

        def disk_full_at_the_second_frame(path, image):
            if written:
                raise InputError(f"cannot write '{path}': No space left on device")
            written.append(path)
            write_image(path, image)
        monkeypatch.setattr(Registration, "write_image", disk_full_at_the_second_frame)
        frames = [np.full((8, 8), k, np.uint8) for k in range(3)]
        with pytest.raises(InputError, match="No space left"):
            Registration.write_frames(frames, Registration.check_output_folder(out, overwrite=True))
        assert len(written) == 1                                   # one new frame had been written ...
        assert {p.name: p.read_bytes() for p in out.iterdir()} == old   # ... and none of it shows
        assert [p.name for p in tmp_path.iterdir()] == ["aligned"]

    @pytest.mark.parametrize("flags, message", [
        (("--method", "ecc", "--smoothing_radius", "2"),
         "error: --smoothing_radius applies to --method released only; with --method ecc it has no effect"),
        (("--motion", "homography"),
         "error: --motion applies to --method ecc only; with --method released it has no effect"),
    ])
    def test_a_flag_of_the_other_method_is_a_usage_error(self, tmp_path, flags, message):
        frames, _ = make_stack(*shaky_breathing(n=3, zoom=0.02, shake=2.0, turn=0.0, seed=6))
        stack = write_stack(tmp_path / "stack", frames)
        result = self.run(stack, "-o", tmp_path / "out", *flags)
        assert result.returncode == 2 and result.stderr.strip() == message
        assert not (tmp_path / "out").exists()

    def test_missing_folder_is_one_clear_line(self, tmp_path):
        result = self.run(tmp_path / "nope", "-o", tmp_path / "out")
        assert result.returncode == 2
        assert "does not exist" in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists()


class TestPredictOption:
    def test_align_flag_defaults_to_auto_for_stacks_and_none_for_pairs(self):
        args = predict_args_parser().parse_args(["--input_dir", "x"])
        assert args.align == "auto"
        assert predict_args_parser().parse_args(["--input_dir", "x", "--align", "none"]).align == "none"
        pairs = predict_pair_datasets.get_args_parser().parse_args(["--test_root", "r", "--test_datasets", "d"])
        assert pairs.align == "none"

    @pytest.mark.slow
    @pytest.mark.skipif(not OFFICIAL_MODEL.exists(), reason="needs ../shared/reference/official/model.pth")
    def test_predict_one_stack_aligns_before_fusing(self, tmp_path):
        frames, _ = make_stack(*shaky_breathing(n=3, zoom=0.02, shake=2.0, turn=0.0, seed=7))
        stack = write_stack(tmp_path / "stack", frames)
        result = subprocess.run([sys.executable, str(REPO / "predict_one_stack.py"), "--input_dir", str(stack),
                                 "--output_dir", str(tmp_path / "out"), "--model_path", str(OFFICIAL_MODEL),
                                 "--device", "cpu", "--fixed_names", "--align", "ecc"],
                                capture_output=True, text=True, cwd=REPO, timeout=300,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert result.returncode == 0, result.stderr
        fused = read_image(tmp_path / "out" / "color_fused.png")
        # The colour fused image is built from the aligned slices: with the first
        # slice as reference, its pixels come from frames registered onto frame 0.
        aligned = align_stack(frames, method="ecc")
        index = np.load(tmp_path / "out" / "depth_index.npy")
        expected = np.take_along_axis(np.stack(aligned), index[None, :, :, None].astype(np.int64), axis=0)[0]
        assert np.array_equal(fused, expected)


class TestAutomaticMethod:
    """--align auto, the predict scripts' default: registered when the stack moved, untouched when not."""

    @pytest.mark.parametrize("blur", ["released", "physical"])
    def test_an_aligned_stack_comes_out_bit_identical(self, blur):
        from make_datasets.synthesis import physical_stack
        frames, _ = make_stack([1.0] * 6, [0.0] * 6, [(0.0, 0.0)] * 6)       # released blur, no motion
        if blur == "physical":
            depth = np.tile(np.linspace(0, 255, SIZE).astype(np.uint8), (SIZE, 1))
            frames = list(physical_stack(frames[0], depth, 6, max_sigma=4.0)[0])
        aligned, found = align_with_report(frames, "auto")
        assert all(np.array_equal(a, f) for a, f in zip(aligned, frames))
        assert found.startswith("align: no slice moved")

    @requires_light_field
    def test_a_light_field_stack_comes_out_bit_identical(self):
        from make_datasets.lightfield import light_field_stack
        stack = light_field_stack(LIGHT_FIELD, 6)
        aligned, _ = align_with_report(stack.slices, "auto")
        assert all(np.array_equal(a, f) for a, f in zip(aligned, stack.slices))

    def test_breathing_and_shake_are_registered_onto_the_middle_frame(self):
        frames, geometry = make_stack(*shaky_breathing(n=6, zoom=0.04, shake=3.0, turn=0.5, seed=3))
        transforms = estimate_transforms(frames, method="auto")
        assert np.allclose(transforms[2], np.eye(3))                       # the middle frame is the reference
        assert residuals([np.eye(3)] * 6, geometry, 2).max() > 3
        assert residuals(transforms, geometry, 2).max() <= 0.5
        aligned, found = align_with_report(frames, "auto")
        assert found.startswith("align: 5 of 6 slices moved") and "scale 0.9" in found

    def test_the_border_a_frame_leaves_is_filled_from_its_neighbour_not_smeared(self):
        frames, _ = make_stack(*shaky_breathing(n=5, zoom=0.08, shake=0.0, turn=0.0, seed=0))
        transforms = estimate_transforms(frames, method="auto")
        aligned = align_with_report(frames, "auto")[0]
        # The last frame is the most magnified: shrunk onto the middle one, it leaves a border,
        # which holds its neighbour's (registered) pixels rather than copies of its own edge.
        ones = np.ones(frames[0].shape[:2], np.uint8)
        uncovered = cv2.warpAffine(ones, transforms[4][:2], ones.shape[::-1], flags=cv2.INTER_NEAREST) == 0
        assert uncovered.mean() > 0.02
        assert np.array_equal(aligned[4][uncovered], aligned[3][uncovered])

    @pytest.mark.parametrize("side", [1, 8, 40])
    def test_frames_too_small_to_measure_are_left_as_they_are(self, side):
        frames = [np.full((side, side, 3), 40 * k, np.uint8) for k in range(3)]
        aligned, found = align_with_report(frames, "auto")
        assert all(np.array_equal(a, f) for a, f in zip(aligned, frames)) and "no slice moved" in found

    def test_frames_that_cannot_be_measured_are_counted_not_warned(self):
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 256, (96, 96), dtype=np.uint8) for _ in range(4)]
        with warnings.catch_warnings():
            warnings.simplefilter("error")                         # any warning fails the test
            aligned, found = align_with_report(frames, "auto")
        assert all(np.array_equal(a, f) for a, f in zip(aligned, frames))
        assert "could not be measured" in found or "no slice moved" in found
