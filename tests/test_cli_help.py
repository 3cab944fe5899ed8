"""--help texts: train.py shows its defaults; the examples in the scripts' help name folders that exist."""
import re

from conftest import REPO


def test_train_help_shows_defaults():
    import train
    text = " ".join(train.get_args_parser().format_help().split("options:", 1)[1].split())
    for flag, default in (("--num_epochs NUM_EPOCHS", "50"), ("--lr LR", "0.001"), ("--batch_size BATCH_SIZE", "12"),
                          ("--save_dir SAVE_DIR", "runs")):
        help_of_flag = text.split(flag, 1)[1].split(" --", 1)[0]
        assert f"(default: {default})" in help_of_flag, (flag, help_of_flag)
    # flags whose help already says the default, or that are unset, do not repeat it
    assert "(default: None)" not in text and "(default: False)" not in text


def test_examples_in_the_help_texts_exist():
    # the scripts' docstrings are their --help descriptions
    named = {(path.relative_to(REPO).as_posix(), match)
             for path in REPO.glob("**/*.py") if ".venv" not in path.parts
             for match in re.findall(r"\bexamples/[\w.-]+", path.read_text(errors="replace"))}
    assert named, "no example is named anywhere: the pattern is wrong"
    missing = sorted((source, name) for source, name in named if not (REPO / name).exists())
    assert missing == []


# ----------------------------------------------------------------------------- every script's --help

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import pytest  # noqa: E402

PYTHON_FILES = sorted(path for path in REPO.glob("**/*.py")
                      if not {".venv", "tests"} & set(path.relative_to(REPO).parts) and path.name != "__init__.py")
SCRIPTS = [path for path in PYTHON_FILES if "def get_args_parser" in path.read_text()]
PREDICT = ("predict_one_stack.py", "predict_datasets.py", "predict_pair_datasets.py")


def run_help(path):
    return subprocess.run([sys.executable, str(path), "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


def check_help(paths):
    """Scripts print their usage; a module run as a file imports without an error."""
    with ThreadPoolExecutor(2) as pool:
        answers = dict(zip(paths, pool.map(run_help, paths)))
    for path, answer in answers.items():
        name = path.relative_to(REPO).as_posix()
        assert answer.returncode == 0 and "Traceback" not in answer.stderr, (name, answer.stderr[-1500:])
        if "__main__" in path.read_text():
            assert answer.stdout.startswith("usage:"), (name, answer.stdout[:200])
    return answers


def test_the_engine_and_the_shared_modules_answer_help():
    """batch_inference.py printed nothing; make_datasets/common.py and bench/peers.py, run as files,
    could not import utils."""
    answers = check_help([REPO / "batch_inference.py", REPO / "make_datasets" / "common.py",
                          REPO / "bench" / "peers.py"])
    assert "run those" in answers[REPO / "batch_inference.py"].stdout


@pytest.mark.slow
def test_every_python_file_answers_help_without_a_traceback():
    check_help(PYTHON_FILES)


def test_the_predict_scripts_answer_help_without_torch():
    """--help builds the parser from cli.py and options.py only: no torch, OpenCV or numpy to load."""
    probe = ("import runpy, sys\n"
             "sys.argv = [sys.argv[1], '--help']\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print('loaded:', sorted(m for m in ('torch', 'cv2', 'numpy') if m in sys.modules), file=sys.stderr)\n")
    for script in PREDICT:
        answer = subprocess.run([sys.executable, "-c", probe, script], cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        assert answer.stdout.startswith("usage:") and answer.stderr.strip() == "loaded: []", (script, answer.stderr)


def parsers():
    """get_args_parser() of every script, imported from its file."""
    for path in SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield path.relative_to(REPO).as_posix(), module.get_args_parser()


def test_every_flag_that_takes_a_value_says_its_default():
    unsaid = []
    for name, parser in parsers():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.option_strings and not action.required and action.nargs != 0 and \
                    action.help != argparse.SUPPRESS and "default" not in formatter._expand_help(action).lower():
                unsaid.append((name, action.option_strings[-1]))
    assert unsaid == []


def option_strings(parser) -> set:
    return {s for action in parser._actions for s in action.option_strings}


def test_the_predict_scripts_share_their_flags():
    """What applies to one stack applies to a dataset of stacks: the three scripts differ only in
    where scenes come from and how a dataset run is organised."""
    import predict_datasets
    import predict_one_stack
    import predict_pair_datasets
    one, stacks, pairs = (option_strings(m.get_args_parser())
                          for m in (predict_one_stack, predict_datasets, predict_pair_datasets))
    per_scene = {"-i", "--input_dir", "--fixed_names"}
    per_dataset = {"--test_root", "--test_datasets", "--run_name", "--skip_existing", "--batch_size", "--num_workers"}
    assert one - per_scene == stacks - per_dataset
    assert pairs == stacks - {"--every"}                     # a pair has no slices to skip
    for flag in ("--reverse", "--depth_bits", "--outputs", "--legend", "-o", "--max_memory", "--views"):
        assert flag in one & stacks & pairs


def test_short_forms_of_input_and_output():
    import predict_datasets
    import predict_one_stack
    args = predict_one_stack.get_args_parser().parse_args(["-i", "stack", "-o", "fused"])
    assert (args.input_dir, args.output_dir) == ("stack", "fused")
    args = predict_datasets.get_args_parser().parse_args(["--test_root", "r", "--test_datasets", "d", "-o", "out"])
    assert args.output_dir == "out"


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "lots"])
def test_max_memory_must_be_a_positive_number_of_gib(value, tmp_path):
    answer = subprocess.run([sys.executable, str(REPO / "predict_one_stack.py"), "-i", str(tmp_path), "--max_memory",
                             value], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert answer.returncode == 2 and answer.stdout == ""
    assert answer.stderr == (f"error: argument --max_memory: must be a number of GiB above 0, got '{value}' "
                             f"(see predict_one_stack.py --help)\n")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("script", ["predict_one_stack.py", "predict_datasets.py"])
@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_every_must_be_a_whole_number_of_one_or_more(script, value, tmp_path):
    """A bad --every is a usage error before anything is read (predict_datasets.py used to fail every scene)."""
    source = ["-i", str(tmp_path)] if script == "predict_one_stack.py" else ["--test_root", str(tmp_path),
                                                                             "--test_datasets", "d"]
    answer = subprocess.run([sys.executable, str(REPO / script), *source, "--every", value, "-o",
                             str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert answer.returncode == 2 and answer.stderr.count("\n") == 1
    assert f"argument --every: must be a whole number of 1 or more, not '{value}'" in answer.stderr
    assert not (tmp_path / "out").exists()
