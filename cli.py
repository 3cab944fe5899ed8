"""Running a script from the command line: --help with every default, one line for bad input.

Every script builds its parser with ``ArgumentParser`` (each flag's default in
--help, a usage error in one line) and runs its ``main`` under ``run_cli``
(``InputError`` in one line and exit status 2, an interrupt in one line and
130). Nothing here imports torch, so a script whose parser comes from this
module and ``options.py`` answers --help at once (docs/robustness.md).
"""
import argparse
import os
import signal
import sys
import warnings


class InputError(Exception):
    """Bad user input (missing folder, unreadable image, mixed sizes, ...).

    The message is one sentence meant for the user; scripts print it and exit
    non-zero instead of showing a traceback.
    """


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's layout and shows each flag's default (unless unset or already said)."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == []
        if unset or action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with ``HelpFormatter``; a bad flag is one line (the usage of a long command
    line would bury it), exit status 2 as argparse gives."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _close_progress_bars():
    """Close the tqdm bars an error left open, so that the closing message gets a
    line of its own and no bar redraws itself after it."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)   # no bar was opened unless tqdm is loaded
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """A warning as one line ``warning: <message>`` on stderr, above any progress bar."""
    from tqdm import tqdm
    tqdm.write(f"warning: {message}", file=sys.stderr)


def run_cli(main_fn, parser):
    """Parse arguments and run ``main_fn``; the project's own errors become one
    line on stderr and exit status 2, an interrupt exits 130, never a traceback;
    a warning is one line (``warning: ...``)."""
    args = parser.parse_args()
    warnings.showwarning = _show_warning
    # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C, so temporary files are
    # removed and checkpoints stay whole instead of the process dying mid-write.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return main_fn(args)
    except InputError as exc:
        _close_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _close_progress_bars()
        # Straight to the file descriptor: the interrupt may have cut a write of the
        # buffered stderr (a progress bar's), whose later output can then be lost.
        try:
            sys.stderr.flush()
        except (OSError, ValueError, RuntimeError):
            pass
        os.write(2, b"interrupted\n")
        sys.exit(130)
