"""Hostile input: random bytes, random shapes, odd paths, failing disks."""
import errno
import os
import signal

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import utils
from conftest import only_one_process_starts, textured_stack
from utils import InputError, read_image, read_stack, write_image

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.binary(min_size=0, max_size=2048), ext=st.sampled_from(utils.IMAGE_EXTENSIONS))
def test_random_bytes_never_escape_as_other_errors(tmp_path, data, ext):
    path = tmp_path / f"x{ext}"
    path.write_bytes(data)
    try:
        image = read_image(path)
    except InputError:
        return
    assert image.dtype in (np.uint8, np.uint16) and image.ndim in (2, 3)


@FUZZ
@given(prefix=st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"BM", b"RIFF", b"P6\n"]),
       tail=st.binary(min_size=0, max_size=512))
def test_corrupt_files_with_real_magic_numbers(tmp_path, prefix, tail):
    path = tmp_path / "x.png"
    path.write_bytes(prefix + tail)
    try:
        read_image(path)
    except InputError:
        pass


@FUZZ
@given(height=st.integers(1, 40), width=st.integers(1, 40), channels=st.sampled_from([1, 3, 4]),
       dtype=st.sampled_from([np.uint8, np.uint16]), count=st.integers(0, 4),
       ext=st.sampled_from([".png", ".tif", ".bmp", ".jpg", ".webp", ".ppm", ".pgm"]))
def test_random_stacks_read_or_fail_cleanly(tmp_path, height, width, channels, dtype, count, ext):
    folder = tmp_path / f"s{height}_{width}_{channels}_{count}{ext[1:]}{np.dtype(dtype).itemsize}"
    folder.mkdir()
    rng = np.random.default_rng(height * 100 + width)
    shape = (height, width) if channels == 1 else (height, width, channels)
    written = 0
    for k in range(count):
        image = rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)
        try:
            write_image(folder / f"{k}{ext}", image)
            written += 1
        except InputError:
            pass  # the format cannot hold this image (e.g. 16-bit BMP): nothing written
    try:
        images, names = read_stack(folder)
    except InputError:
        return
    assert len(images) == written >= 2
    assert all(im.shape[:2] == (height, width) for im in images)


def test_truncated_files_are_rejected(tmp_path):
    image = textured_stack(1, 64, 64)[0]
    for ext in (".png", ".jpg", ".tif", ".webp"):
        ok, encoded = cv2.imencode(ext, image)
        data = encoded.tobytes()
        (tmp_path / f"t{ext}").write_bytes(data[: len(data) * 3 // 4])
        with pytest.raises(InputError, match="not a readable image"):
            read_image(tmp_path / f"t{ext}")


def test_wrong_extension_is_read_by_content(tmp_path):
    image = textured_stack(1, 16, 16)[0]
    ok, encoded = cv2.imencode(".png", image)
    (tmp_path / "really_a_png.jpg").write_bytes(encoded.tobytes())
    np.testing.assert_array_equal(read_image(tmp_path / "really_a_png.jpg"), image)


def test_paths_with_spaces_and_non_ascii(tmp_path):
    folder = tmp_path / "photos été" / "pile ü 1"
    folder.mkdir(parents=True)
    for k, s in enumerate(textured_stack(2, 8, 8), start=1):
        write_image(folder / f"slice {k}.png", s)
    images, names = read_stack(folder)
    assert names == ["slice 1.png", "slice 2.png"]


def test_symlink_loop(tmp_path):
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    with pytest.raises(InputError, match="link loop"):
        read_stack(tmp_path / "a")


def test_disk_full_leaves_no_file(tmp_path, monkeypatch):
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fd, mode):
            self.file = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(utils.os, "fdopen", FullDisk)
    with pytest.raises(InputError, match="No space left on device"):
        write_image(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_output_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(InputError, match="not writable|cannot write"):
            utils.ensure_output_dir(locked)
    finally:
        locked.chmod(0o700)


def test_output_path_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(InputError, match="cannot create output folder"):
        utils.ensure_output_dir(tmp_path / "taken" / "out")


def test_output_folder_that_cannot_be_created_even_by_root():
    # /proc accepts no new folders whoever asks, so this also runs as root (CI).
    with pytest.raises(InputError, match="cannot create output folder"):
        utils.ensure_output_dir("/proc/stackmff_output_test/out")


# ----------------------------------------------------------------------------- multi-page TIFF fuzz

PAGE = st.tuples(st.integers(1, 24), st.integers(1, 24), st.sampled_from([1, 2, 3, 4]),
                 st.sampled_from([np.uint8, np.uint16]))


@FUZZ
@given(pages=st.lists(PAGE, min_size=1, max_size=4), cut=st.floats(0.0, 1.0), seed=st.integers(0, 99))
def test_random_multipage_tiffs_read_whole_or_fail_cleanly(tmp_path, pages, cut, seed):
    """Pages of random sizes, 1-4 channels (2 = gray + alpha), 8/16 bit; the file
    whole and cut short at a random byte. Never an error of another type, and a
    cut file never passes as a shorter stack."""
    rng = np.random.default_rng(seed)
    images = []
    for h, w, c, dtype in pages:
        shape = (h, w) if c == 1 else (h, w, c)
        images.append(rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype))
    try:
        ok, encoded = cv2.imencodemulti(".tif", images)
    except cv2.error:
        ok = False   # OpenCV cannot write this page (2 channels): nothing to read back
    if not ok:
        return
    data = encoded.tobytes()
    whole, part = tmp_path / "whole.tif", tmp_path / "part.tif"
    whole.write_bytes(data)
    part.write_bytes(data[: int(len(data) * cut)])
    try:
        read_pages = utils.read_tiff_pages(whole)
    except InputError:
        pytest.fail("a valid multi-page TIFF was refused")
    assert len(read_pages) == len(images)
    for got, want in zip(read_pages, images):
        assert got.dtype == want.dtype and got.shape[:2] == want.shape[:2]
    try:
        assert len(utils.read_tiff_pages(part)) == len(images)
    except InputError:
        pass
    for source in (whole, part):
        try:
            stack, names = read_stack(source, min_slices=1)
        except InputError:
            continue
        assert len(stack) == len(images) and len({im.shape[:2] for im in stack}) == 1


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_gray_plus_alpha_images_read_as_gray(tmp_path, ext):
    from PIL import Image
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(np.dstack([gray, np.full((8, 8), 128, np.uint8)]), mode="LA").save(tmp_path / f"la{ext}")
    image = read_image(tmp_path / f"la{ext}")
    assert image.dtype == np.uint8 and image.shape[:2] == (8, 8)
    np.testing.assert_array_equal(image if image.ndim == 2 else image[:, :, 0], gray)


def test_truncated_multipage_tiff_is_not_a_shorter_stack(tmp_path):
    assert cv2.imwritemulti(str(tmp_path / "s.tif"), textured_stack(3, 32, 32))
    data = (tmp_path / "s.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match="not a readable TIFF"):
        read_stack(tmp_path / "cut.tif")


# ----------------------------------------------------------------------------- native library noise

def test_decoder_messages_do_not_reach_the_terminal(tmp_path, capfd):
    """libpng / libtiff print their own lines for a corrupt file; the user sees only the InputError."""
    image = textured_stack(1, 64, 64)[0]
    (tmp_path / "cut.png").write_bytes(cv2.imencode(".png", image)[1].tobytes()[:300])
    assert cv2.imwritemulti(str(tmp_path / "s.tif"), textured_stack(2, 32, 32))
    data = (tmp_path / "s.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) * 2 // 3])
    capfd.readouterr()
    with pytest.raises(InputError):
        read_image(tmp_path / "cut.png")
    with pytest.raises(InputError):
        utils.read_tiff_pages(tmp_path / "cut.tif")
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    # descriptor 2 works again afterwards
    os.write(2, b"still here\n")
    assert capfd.readouterr().err == "still here\n"


def test_decoding_in_threads_gives_descriptor_2_back(tmp_path, capfd):
    """Slices are decoded in threads, each hiding the decoders' lines: descriptor 2 must come back
    to the terminal whatever order the threads start and finish in, and corrupt files stay quiet."""
    for k, image in enumerate(textured_stack(12, 48, 48), start=1):
        write_image(tmp_path / f"{k}.png", image)
    (tmp_path / "cut").mkdir()
    good = cv2.imencode(".png", textured_stack(1, 64, 64)[0])[1].tobytes()
    for k in range(1, 9):
        (tmp_path / "cut" / f"{k}.png").write_bytes(good if k % 2 else good[:300])
    capfd.readouterr()
    for _ in range(20):
        assert len(utils.parallel_map(read_image, sorted(tmp_path.glob("*.png")), workers=4)) == 12
        with pytest.raises(InputError):
            utils.parallel_map(read_image, sorted((tmp_path / "cut").glob("*.png")), workers=4)
    assert capfd.readouterr().err == ""
    os.write(2, b"still here\n")
    assert capfd.readouterr().err == "still here\n"


# ----------------------------------------------------------------------------- writing

def test_interrupt_just_after_the_temporary_file_is_created(tmp_path, monkeypatch):
    """SIGTERM / Ctrl-C between the creation of the .part file and anything else
    (found by killing predict_datasets.py: tempfile.mkstemp left such files)."""
    real_open = os.open

    def open_then_interrupt(*args, **kwargs):
        os.close(real_open(*args, **kwargs))
        raise KeyboardInterrupt

    monkeypatch.setattr(utils.os, "open", open_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_image(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_written_files_get_the_usual_permissions(tmp_path):
    """The temporary file of an atomic write is private (0600); the result must
    have the mode open() gives (0666 less the umask), like any other output."""
    write_image(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o666 & ~umask


def test_output_folder_equal_to_input_folder_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    os.symlink(tmp_path / "in", tmp_path / "link")
    for same in (tmp_path / "in", tmp_path / "link", tmp_path / "in" / ".." / "in"):
        with pytest.raises(InputError, match="is the input folder"):
            utils.refuse_output_into_input(same, tmp_path / "in")
    utils.refuse_output_into_input(tmp_path / "in" / "out", tmp_path / "in")   # a subfolder is fine
    utils.refuse_output_into_input(tmp_path / "out", None, tmp_path / "in")


# ----------------------------------------------------------------------------- batch reader processes

def _die():
    os.kill(os.getpid(), signal.SIGKILL)      # as the out-of-memory killer ends a process


def _stack_and_a_scene_that_kills_its_reader(folder):
    from batch_inference import Scene
    from functools import partial
    folder.mkdir()
    for k, image in enumerate(textured_stack(2, 32, 32), start=1):
        utils.write_image(folder / f"{k}.png", image)
    return [Scene("killer", load=_die), Scene("good", load=partial(utils.read_stack, folder))]


def test_a_scene_that_kills_its_reader_fails_alone(tmp_path, random_weights, capsys):
    """A reader process killed by SIGKILL while it reads a scene is replaced by a fresh one that
    reads the scene again; killed again, the scene is reported as failed and the batch goes on."""
    import torch
    from batch_inference import Ranks, run_dataset
    from model import load_model
    scenes = _stack_and_a_scene_that_kills_its_reader(tmp_path / "stack")
    report = run_dataset(load_model(random_weights), torch.device("cpu"), "syn", scenes, tmp_path / "syn",
                         batch_size=1, num_workers=1, skip_existing=False, ranks=Ranks())
    assert report.fused == 1 and list(report.failed) == ["killer"]
    assert report.failed["killer"].startswith("its reader process was killed by SIGKILL each time it read")
    said = capsys.readouterr()
    assert "syn/killer: its reader process was killed by SIGKILL; reading it again in a new one" in said.out + said.err


def test_a_reader_that_cannot_be_replaced_is_one_clear_error(tmp_path, random_weights, monkeypatch):
    """No new reader can be started (the process table or memory is full): one InputError that
    says how to resume."""
    import torch
    from batch_inference import Ranks, run_dataset
    from model import load_model
    starts = only_one_process_starts(monkeypatch, errno.EAGAIN)
    scenes = _stack_and_a_scene_that_kills_its_reader(tmp_path / "stack")
    with pytest.raises(InputError, match=r"^cannot go on reading 'syn': no reader process could be started "
                                         r"\(Resource temporarily unavailable\); the outputs written so far are "
                                         r"complete: rerun with --skip_existing"):
        run_dataset(load_model(random_weights), torch.device("cpu"), "syn", scenes, tmp_path / "syn",
                    batch_size=1, num_workers=1, skip_existing=False, ranks=Ranks())
    assert len(starts) == 2
