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
