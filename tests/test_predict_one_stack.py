"""predict_one_stack.py end to end: outputs, formats, bit depth and clear errors."""
import os
import re
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from conftest import REPO, default_sigint, textured_stack
from utils import write_image

SCRIPT = str(REPO / "predict_one_stack.py")
OUTPUTS = ("fused_gray.png", "depth_map.png", "color_fused.png", "depth_colormap.png",
           "depth_index.npy", "depth_index_vis.png")


# One thread per process: on a busy 2-core machine more threads run many times slower.
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, "--device", "cpu", *map(str, args)],
                          capture_output=True, text=True, env=ONE_THREAD, timeout=300)


def write_stack(folder, slices, ext=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    for k, s in enumerate(slices, start=1):
        write_image(folder / f"{k}{ext}", s)
    return folder


@pytest.mark.parametrize("dtype, channels", [(np.uint8, 3), (np.uint16, 3), (np.uint16, 1)])
def test_six_outputs_keep_bit_depth(tmp_path, random_weights, dtype, channels):
    slices = textured_stack(3, 40, 48, channels=channels, dtype=dtype)
    stack = write_stack(tmp_path / "stack", slices)
    result = run("--input_dir", stack, "--output_dir", tmp_path / "out", "--model_path", random_weights,
                 "--fixed_names")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(OUTPUTS)
    color = cv2.imread(str(tmp_path / "out" / "color_fused.png"), cv2.IMREAD_UNCHANGED)
    assert color.dtype == dtype and color.shape == slices[0].shape
    index = np.load(tmp_path / "out" / "depth_index.npy")
    assert index.shape == (40, 48) and index.min() >= 0 and index.max() <= 2
    # every colour-fused pixel is the pixel of the slice its index names
    expected = np.take_along_axis(np.stack(slices), index.reshape((1, 40, 48) + (1,) * (channels > 1)), 0)[0]
    np.testing.assert_array_equal(color, expected)
    assert cv2.imread(str(tmp_path / "out" / "depth_map.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint8


def test_reverse_flips_depth_and_index(tmp_path, random_weights):
    stack = write_stack(tmp_path / "stack", textured_stack(4, 32, 32))
    for flag, name in (((), "plain"), (("--reverse",), "rev")):
        assert run("--input_dir", stack, "--output_dir", tmp_path / name, "--model_path", random_weights,
                   "--fixed_names", *flag).returncode == 0
    plain, rev = (np.load(tmp_path / n / "depth_index.npy") for n in ("plain", "rev"))
    np.testing.assert_array_equal(rev, 3 - plain)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "plain" / "color_fused.png")),
                                  cv2.imread(str(tmp_path / "rev" / "color_fused.png")))


def test_timestamped_names_by_default(tmp_path, random_weights, monkeypatch):
    import predict_one_stack
    # a fixed clock at 20:03:14, where the hour's "20" looks like the year's
    fixed = time.struct_time((2026, 12, 1, 20, 3, 14, 1, 335, 0))
    real_strftime = time.strftime
    monkeypatch.setattr(predict_one_stack.time, "strftime", lambda fmt: real_strftime(fmt, fixed))
    stack = write_stack(tmp_path / "stack", textured_stack(2, 32, 32), ext=".jpg")
    predict_one_stack.main(predict_one_stack.get_args_parser().parse_args(
        ["--input_dir", str(stack), "--output_dir", str(tmp_path / "out"), "--model_path", str(random_weights),
         "--device", "cpu"]))
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    stems = sorted(name.rsplit(".", 1)[0] for name in OUTPUTS)
    assert [re.fullmatch(r"(.+)_(\d{8}_\d{6})\.(png|npy)", n).groups()[:2] for n in names] == \
        [(stem, "20261201_200314") for stem in stems]


def test_multipage_tiff_input(tmp_path, random_weights):
    assert cv2.imwritemulti(str(tmp_path / "stack.tif"), textured_stack(3, 32, 40))
    result = run("--input_dir", tmp_path / "stack.tif", "--output_dir", tmp_path / "out",
                 "--model_path", random_weights, "--fixed_names")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "color_fused.png").exists()


def assert_clean_failure(result, words, out_dir):
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and words in result.stderr
    assert not out_dir.exists() or not any(out_dir.iterdir())


class TestBadInput:
    def test_missing_folder(self, tmp_path, random_weights):
        result = run("--input_dir", tmp_path / "nope", "--output_dir", tmp_path / "out", "--model_path", random_weights)
        assert_clean_failure(result, "does not exist", tmp_path / "out")

    def test_empty_folder(self, tmp_path, random_weights):
        (tmp_path / "empty").mkdir()
        result = run("--input_dir", tmp_path / "empty", "--output_dir", tmp_path / "out", "--model_path", random_weights)
        assert_clean_failure(result, "holds no images", tmp_path / "out")

    def test_one_image(self, tmp_path, random_weights):
        stack = write_stack(tmp_path / "stack", textured_stack(1))
        result = run("--input_dir", stack, "--output_dir", tmp_path / "out", "--model_path", random_weights)
        assert_clean_failure(result, "at least 2", tmp_path / "out")

    def test_mixed_sizes(self, tmp_path, random_weights):
        stack = write_stack(tmp_path / "stack", textured_stack(2, 32, 32) + textured_stack(1, 32, 40))
        result = run("--input_dir", stack, "--output_dir", tmp_path / "out", "--model_path", random_weights)
        assert_clean_failure(result, "mixes image sizes", tmp_path / "out")

    @pytest.mark.parametrize("content, words", [(b"\x89PNG truncated", "3.png' is not a readable image"),
                                                (b"", "3.png' is empty (0 bytes)")])
    def test_unreadable_image(self, tmp_path, random_weights, content, words):
        stack = write_stack(tmp_path / "stack", textured_stack(2))
        (stack / "3.png").write_bytes(content)
        result = run("--input_dir", stack, "--output_dir", tmp_path / "out", "--model_path", random_weights)
        assert_clean_failure(result, words, tmp_path / "out")

    def test_wrong_checkpoint(self, tmp_path):
        stack = write_stack(tmp_path / "stack", textured_stack(2))
        (tmp_path / "bad.pth").write_text("hello")
        result = run("--input_dir", stack, "--output_dir", tmp_path / "out", "--model_path", tmp_path / "bad.pth")
        assert_clean_failure(result, "bad.pth", tmp_path / "out")

    def test_folder_of_non_images(self, tmp_path, random_weights):
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "notes.txt").write_text("not a slice")
        (tmp_path / "docs" / "table.csv").write_text("a,b\n")
        result = run("--input_dir", tmp_path / "docs", "--output_dir", tmp_path / "out", "--model_path", random_weights)
        assert_clean_failure(result, "holds no images", tmp_path / "out")

    def test_mixed_bit_depths(self, tmp_path, random_weights):
        stack = write_stack(tmp_path / "stack", textured_stack(2, 32, 32))
        write_image(stack / "3.png", textured_stack(1, 32, 32, dtype=np.uint16)[0])
        result = run("--input_dir", stack, "--output_dir", tmp_path / "out", "--model_path", random_weights)
        assert_clean_failure(result, "mixes bit depths", tmp_path / "out")

    def test_output_folder_equal_to_input_folder(self, tmp_path, random_weights):
        stack = write_stack(tmp_path / "stack", textured_stack(3, 32, 32))
        before = {p.name: p.read_bytes() for p in stack.iterdir()}
        result = run("--input_dir", stack, "--output_dir", stack, "--model_path", random_weights, "--fixed_names")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().count("\n") == 0 and "is the input folder" in result.stderr
        assert {p.name: p.read_bytes() for p in stack.iterdir()} == before

    def test_checkpoint_of_another_network(self, tmp_path):
        import torch
        stack = write_stack(tmp_path / "stack", textured_stack(2))
        torch.save(torch.nn.Conv2d(1, 1, 3).state_dict(), tmp_path / "other.pth")
        result = run("--input_dir", stack, "--output_dir", tmp_path / "out", "--model_path", tmp_path / "other.pth")
        assert_clean_failure(result, "not a StackMFF-V2 checkpoint", tmp_path / "out")


@pytest.mark.parametrize("num_slices, height, width", [
    (3, 8, 8),        # under 32 px: padded up to 32 by the resize and back
    (3, 1, 1),        # a single pixel
    (3, 4, 600),      # very wide
    (2, 900, 3),      # very tall
    (1000, 8, 8),     # a thousand slices (about 5 s on a 2-core CPU)
])
def test_odd_shapes_fuse_through_the_whole_cli(tmp_path, random_weights, num_slices, height, width):
    base = textured_stack(2, height, width, channels=1)
    stack = tmp_path / "stack"
    stack.mkdir()
    for k in range(num_slices):
        cv2.imwrite(str(stack / f"{k}.png"), base[k % 2])
    result = run("--input_dir", stack, "--output_dir", tmp_path / "out", "--model_path", random_weights,
                 "--fixed_names")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    index = np.load(tmp_path / "out" / "depth_index.npy")
    assert index.shape == (height, width) and 0 <= index.min() and index.max() < num_slices
    for name in OUTPUTS:
        if name.endswith(".png"):
            assert cv2.imread(str(tmp_path / "out" / name), cv2.IMREAD_UNCHANGED).shape[:2] == (height, width)


# A Ctrl-C (a real SIGINT to the process) while the network runs, after the output folder was made.
INTERRUPTED_WHILE_FUSING = """
import os, signal, sys
import inference, predict_one_stack
from cli import run_cli

def fuse_images(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    raise AssertionError("the interrupt did not arrive")

inference.fuse_images = fuse_images
sys.argv[0] = predict_one_stack.__file__
run_cli(predict_one_stack.main, predict_one_stack.get_args_parser())
"""


@pytest.mark.parametrize("existed", [False, True])
def test_ctrl_c_before_any_output_leaves_no_folder_behind(tmp_path, random_weights, existed):
    """A folder the run made for its outputs is removed when it is interrupted before writing any;
    one that was there before stays."""
    stack = write_stack(tmp_path / "stack", textured_stack(3, 32, 32))
    out = tmp_path / "runs" / "today"
    if existed:
        out.mkdir(parents=True)
    result = subprocess.run([sys.executable, "-c", INTERRUPTED_WHILE_FUSING, "-i", stack, "-o", out,
                             "--model_path", random_weights, "--device", "cpu"], cwd=REPO, capture_output=True,
                            text=True, env=ONE_THREAD, timeout=120, preexec_fn=default_sigint)
    assert result.returncode == 130 and result.stderr == "interrupted\n", result.stderr[-2000:]
    assert out.is_dir() == existed and (tmp_path / "runs").is_dir() == existed
    if existed:
        assert not any(out.iterdir())


def test_outputs_writes_only_the_chosen_files(tmp_path, random_weights):
    stack = write_stack(tmp_path / "stack", textured_stack(3, 32, 40))
    result = run("-i", stack, "-o", tmp_path / "out", "--model_path", random_weights, "--fixed_names",
                 "--outputs", "color_fused")
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["color_fused.png"]
    bad = run("-i", stack, "-o", tmp_path / "out2", "--outputs", "fused")
    assert bad.returncode == 2 and "invalid choice: 'fused'" in bad.stderr and bad.stderr.count("\n") == 1
    assert not (tmp_path / "out2").exists()
