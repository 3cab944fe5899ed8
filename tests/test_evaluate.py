"""evaluate.py on tiny synthetic result trees whose winners are known."""
import csv
import subprocess
import sys

import cv2
import numpy as np
import pytest

import evaluate
from conftest import REPO
from utils import InputError, write_image

SIZE = 100  # NIQE needs 96x96, VIF 41x41
SCENES = ("scene1", "scene2")


def _textured(seed):
    """8-bit gray 'all-in-focus' image: smooth random texture, 100x100."""
    rng = np.random.default_rng(seed)
    return np.clip(cv2.GaussianBlur(rng.uniform(0, 255, (SIZE, SIZE)), (0, 0), 1.5) * 2 - 128, 0, 255).astype(np.uint8)


def _depth(seed):
    """8-bit depth ramp, a different direction per scene."""
    ramp = np.linspace(0, 255, SIZE)
    return (np.add.outer(ramp, ramp) / 2 if seed % 2 else np.tile(ramp, (SIZE, 1))).astype(np.uint8)


def _write_method(root, dataset, scenes, fused_fn, depth_fn=None):
    for k, scene in enumerate(scenes):
        write_image(_mkdir(root / dataset / "fused_images") / f"{scene}.png", fused_fn(k))
        if depth_fn is not None:
            write_image(_mkdir(root / dataset / "depth_maps") / f"{scene}.png", depth_fn(k))


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def tree(tmp_path):
    """data/synth with AiF + depth; 'good' = truth + light noise and the true
    depth; 'blurry' = blurred truth and an inverted depth."""
    data = tmp_path / "data"
    for k, scene in enumerate(SCENES):
        write_image(_mkdir(data / "synth" / "AiF") / f"{scene}.png", _textured(k))
        write_image(_mkdir(data / "synth" / "depth") / f"{scene}.png", _depth(k))
    rng = np.random.default_rng(10)

    def good(k):
        return np.clip(_textured(k) + rng.normal(0, 2, (SIZE, SIZE)), 0, 255).astype(np.uint8)

    def blurry(k):
        return cv2.GaussianBlur(_textured(k), (0, 0), 2)

    _write_method(tmp_path / "good", "synth", SCENES, good, _depth)
    _write_method(tmp_path / "blurry", "synth", SCENES, blurry, lambda k: 255 - _depth(k))
    return tmp_path


def run(args):
    return evaluate.main(evaluate.get_args_parser().parse_args(args))


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


class TestKnownWinners:
    def test_reference_and_depth_metrics_pick_the_good_method(self, tree):
        out = tree / "eval"
        tables = run(["--data_root", str(tree / "data"), "--methods", str(tree / "good"), str(tree / "blurry"),
                      "--output_dir", str(out)])
        table = tables["synth"]
        for name in ("SSIM", "PSNR", "VIF", "MI", "depth MSE", "depth MAE", "MSE", "MAE", "RMSE",
                     "logRMS", "AbsRel", "SqRel"):
            better, worse = (max, min) if name in ("SSIM", "PSNR", "VIF", "MI") else (min, max)
            assert better(table[name], key=table[name].get) == "good", name
        # blur removes detail: the sharper result wins the no-reference detail metrics
        for name in ("SF", "AG"):
            assert table[name]["good"] > table[name]["blurry"], name
        assert table["depth MSE"]["good"] == 0.0
        assert set(table) == {m.name for m in evaluate.METRICS if m.kind != "pair"}

    def test_files_hold_the_same_numbers_and_mark_the_winner(self, tree):
        out = tree / "eval"
        tables = run(["--data_root", str(tree / "data"), "--methods", f"ours={tree / 'good'}",
                      str(tree / "blurry"), "--output_dir", str(out)])
        rows = _read_csv(out / "synth.csv")
        assert rows[0] == ["metric", "better", "ours", "blurry"]
        psnr = next(r for r in rows if r[0] == "PSNR")
        assert psnr[1] == "higher"
        assert float(psnr[2]) == tables["synth"]["PSNR"]["ours"]
        assert rows[-1] == ["scenes", "", "2", "2"]
        markdown = (out / "synth.md").read_text()
        psnr_line = next(line for line in markdown.splitlines() if line.startswith("| PSNR"))
        cells = [c.strip() for c in psnr_line.split("|")[2:4]]
        assert cells[0].startswith("**") and not cells[1].startswith("**")
        per_scene = _read_csv(out / "synth_per_scene.csv")
        assert per_scene[0][:3] == ["method", "scene", "SSIM"]
        assert sorted((r[0], r[1]) for r in per_scene[1:]) == sorted(
            (m, s) for m in ("ours", "blurry") for s in SCENES)
        # the table's value is the mean of the per-scene values
        column = per_scene[0].index("PSNR")
        values = [float(r[column]) for r in per_scene[1:] if r[0] == "ours"]
        assert np.mean(values) == pytest.approx(tables["synth"]["PSNR"]["ours"])


class TestWithoutGroundTruth:
    def test_only_no_reference_metrics(self, tree):
        tables = run(["--methods", str(tree / "good"), str(tree / "blurry"), "--output_dir", str(tree / "eval")])
        assert list(tables["synth"]) == ["NIQE", "SF", "AG", "EN", "SD"]

    def test_dataset_missing_from_data_root(self, tree, capsys):
        _write_method(tree / "good", "other", SCENES, _textured)
        _write_method(tree / "blurry", "other", SCENES, _textured)
        tables = run(["--data_root", str(tree / "data"), "--methods", str(tree / "good"), str(tree / "blurry"),
                      "--datasets", "other", "--output_dir", str(tree / "eval")])
        assert list(tables) == ["other"]
        assert list(tables["other"]) == ["NIQE", "SF", "AG", "EN", "SD"]
        assert "no AiF/ ground truth" in capsys.readouterr().err


class TestPairs:
    def test_qabf_and_scd_from_a_b_folders(self, tmp_path):
        left, right = _textured(1), _textured(2)
        flat = np.full((SIZE, SIZE), 128, np.uint8)
        half = SIZE // 2
        source_a = np.hstack([left[:, :half], flat[:, half:]])
        source_b = np.hstack([flat[:, :half], right[:, half:]])
        for name, image in (("A", source_a), ("B", source_b)):
            write_image(_mkdir(tmp_path / "data" / "pairs" / name) / "1.png", image)
        _write_method(tmp_path / "both", "pairs", ["1"], lambda k: np.hstack([left[:, :half], right[:, half:]]))
        _write_method(tmp_path / "only_a", "pairs", ["1"], lambda k: source_a)
        tables = run(["--data_root", str(tmp_path / "data"), "--methods", str(tmp_path / "both"),
                      str(tmp_path / "only_a"), "--metrics", "Qabf", "SCD", "--output_dir", str(tmp_path / "eval")])
        table = tables["pairs"]
        assert list(table) == ["Qabf", "SCD"]
        assert table["Qabf"]["both"] > table["Qabf"]["only_a"]
        assert table["SCD"]["both"] > table["SCD"]["only_a"]


class TestMatchingAndErrors:
    def test_scene_missing_from_one_method_is_left_out_for_all(self, tree, capsys):
        (tree / "blurry" / "synth" / "fused_images" / "scene2.png").unlink()
        tables = run(["--data_root", str(tree / "data"), "--methods", str(tree / "good"), str(tree / "blurry"),
                      "--metrics", "PSNR", "--output_dir", str(tree / "eval")])
        assert "scene2 left out: no fused image from blurry" in capsys.readouterr().err
        assert _read_csv(tree / "eval" / "synth.csv")[-1] == ["scenes", "", "1", "1"]
        assert set(tables["synth"]["PSNR"]) == {"good", "blurry"}

    def test_bad_scene_is_reported_after_the_tables(self, tree):
        (tree / "blurry" / "synth" / "fused_images" / "scene1.png").write_bytes(b"not a png")
        with pytest.raises(InputError, match="1 evaluation"):
            run(["--data_root", str(tree / "data"), "--methods", str(tree / "good"), str(tree / "blurry"),
                 "--metrics", "PSNR", "--output_dir", str(tree / "eval")])
        assert _read_csv(tree / "eval" / "synth.csv")[-1] == ["scenes", "", "2", "1"]

    def test_size_mismatch_names_the_file(self, tree, capsys):
        write_image(tree / "blurry" / "synth" / "fused_images" / "scene1.png", np.zeros((SIZE, SIZE + 4), np.uint8))
        with pytest.raises(InputError):
            run(["--data_root", str(tree / "data"), "--methods", str(tree / "good"), str(tree / "blurry"),
                 "--metrics", "PSNR", "--output_dir", str(tree / "eval")])
        assert "is 104x100 but its ground truth is 100x100" in capsys.readouterr().err

    @pytest.mark.parametrize("args, message", [
        (["--methods", "does/not/exist"], "does not exist"),
        (["--methods", "a={good}", "a={blurry}"], "two methods are named 'a'"),
        (["--methods", "{good}", "--datasets", "nope"], "not in any result folder"),
        (["--methods", "{good}", "--data_root", "no/such/root"], "data root"),
        (["--methods", "{good}", "--decimals", "-1"], "decimals"),
    ])
    def test_bad_arguments(self, tree, args, message):
        args = [a.format(good=tree / "good", blurry=tree / "blurry") for a in args]
        with pytest.raises(InputError, match=message):
            run(args + ["--output_dir", str(tree / "eval")])

    def test_folder_name_with_equals_sign_is_a_folder(self, tree):
        odd = tree / "run=3"
        (tree / "good").rename(odd)
        tables = run(["--methods", str(odd), "--metrics", "SF", "--output_dir", str(tree / "eval")])
        assert list(tables["synth"]["SF"]) == ["run=3"]

    def test_cli_prints_one_line_and_exits_2(self, tmp_path):
        result = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--methods", str(tmp_path / "none")],
                                capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [f"error: result folder '{tmp_path / 'none'}' "
                                                      f"(method 'none') does not exist"]
