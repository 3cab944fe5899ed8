"""bench/benchmark_speed.py: it times the shipped weights by default, and says why when it cannot."""
import pytest

from bench.benchmark_speed import get_args_parser, main
from conftest import REPO
from utils import InputError

TINY = ["--slices", "2", "--megapixels", "0.01", "--paths", "fast", "--threads", "1"]


def test_default_weights_are_the_shipped_ones_and_a_tiny_grid_runs(capsys):
    args = get_args_parser().parse_args(TINY)
    assert args.model_path == str(REPO / "weights" / "stackmffv2_synthetic.pth")
    main(args)                                             # each configuration runs in a child process
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:3] == ["2", "0.01", "fast"] and float(row[3]) > 0     # N, MP, path, wall seconds


def test_missing_weights_stop_before_any_run(tmp_path, capsys):
    with pytest.raises(InputError, match=r"^weights not found at '.*none\.pth' \(pass --model_path\)$"):
        main(get_args_parser().parse_args(["--model_path", str(tmp_path / "none.pth"), *TINY]))
    assert capsys.readouterr().out == ""


def test_a_failed_configuration_makes_the_exit_status_non_zero(tmp_path, capsys):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as stop:
        main(get_args_parser().parse_args(["--model_path", str(broken), *TINY]))
    assert stop.value.code == 1
    out, err = capsys.readouterr()
    assert "fast             failed: " in out
    assert err.strip() == "error: 1 configuration(s) failed (reasons in their rows)"
