"""bench/end_to_end.py: the default against the released pipeline, each a fresh process writing six outputs."""
import cv2
import numpy as np
import pytest

from bench import end_to_end
from conftest import SHARED
from utils import InputError

OFFICIAL = SHARED / "reference" / "official" / "model.pth"


def test_missing_official_weights_or_input_stop_with_one_line(tmp_path):
    with pytest.raises(InputError, match=r"^official weights not found at '.*none\.pth' \(pass --official\)$"):
        end_to_end.main(end_to_end.get_args_parser().parse_args(["--official", str(tmp_path / "none.pth")]))
    if OFFICIAL.is_file():
        with pytest.raises(InputError):
            end_to_end.main(end_to_end.get_args_parser().parse_args(["--input_dir", str(tmp_path / "nowhere")]))


def test_made_stack_is_a_focus_sweep_of_the_example(tmp_path):
    end_to_end.make_stack(tmp_path, slices=5, side=64)
    slices = [cv2.imread(str(tmp_path / f"{k:02d}.png")) for k in range(1, 6)]
    assert all(s.shape == (64, 64, 3) for s in slices)
    sharpness = [cv2.Laplacian(cv2.cvtColor(s, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var() for s in slices]
    assert int(np.argmax(sharpness)) == 2 and sharpness[0] < sharpness[1] < sharpness[2] > sharpness[3] > sharpness[4]


@pytest.mark.skipif(not OFFICIAL.is_file(), reason="needs the official weights in ../shared/reference/official")
def test_both_pipelines_run_on_a_small_stack_and_the_ratio_is_printed(tmp_path, capsys):
    end_to_end.make_stack(tmp_path, slices=3, side=96)
    end_to_end.main(end_to_end.get_args_parser().parse_args(["--input_dir", str(tmp_path)]))
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out[2:4]}
    assert set(rows) == {"default", "released"} and all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows.values())
    assert all(int(r[4].replace(",", "")) > 1000 for r in rows.values())      # page faults: a process maps pages
    assert out[-1].startswith("released / default: ") and out[-1].endswith("x CPU time")
