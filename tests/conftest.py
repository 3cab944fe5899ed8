"""Shared test fixtures: paths to ../shared, the official model, tiny stacks."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OFFICIAL_WEIGHTS = SHARED / "reference" / "official" / "model.pth"
PARITY = SHARED / "reference" / "parity"
DATA = SHARED / "data"

sys.path.insert(0, str(REPO))
# One thread whatever the machine's core count: float sums (and fast_inference's
# worker count) then run in the same order everywhere, and each test stays lean.
torch.set_num_threads(1)


def requires(path: Path, what: str):
    return pytest.mark.skipif(not path.exists(), reason=f"{what} not found at {path}")


requires_official = requires(OFFICIAL_WEIGHTS, "the official StackMFF-V2 weights")
requires_parity = requires(PARITY, "the parity reference data")


@pytest.fixture(scope="session")
def official_model():
    if not OFFICIAL_WEIGHTS.exists():
        pytest.skip(f"the official StackMFF-V2 weights not found at {OFFICIAL_WEIGHTS}")
    from model import load_model
    return load_model(OFFICIAL_WEIGHTS, "cpu")


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory):
    """A randomly initialised StackMFF-V2 state dict saved to disk (fixed seed)."""
    from model import StackMFFV2
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "random.pth"
    torch.save(StackMFFV2().state_dict(), path)
    return path


def default_sigint():
    """preexec_fn of a child that is to feel Ctrl-C: a test run started in the background (`cmd &`)
    inherits SIGINT ignored, and Python then keeps ignoring it; a user's Ctrl-C finds the default."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def only_one_process_starts(monkeypatch, error: int) -> list:
    """Processes started by fork: the first starts, every later start fails with OSError ``error``
    (as when the process table or memory is full). Returns the list of start attempts."""
    import multiprocessing.context
    real_start, starts = multiprocessing.context.ForkProcess.start, []

    def start_once(process):
        starts.append(process)
        if len(starts) > 1:
            raise OSError(error, os.strerror(error))
        real_start(process)

    monkeypatch.setattr(multiprocessing.context.ForkProcess, "start", start_once)
    return starts


def textured_stack(num_slices=4, height=40, width=48, channels=3, dtype=np.uint8, seed=0):
    """A small random colour stack, each slice a different blur of one texture."""
    import cv2
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    shape = (height, width, channels) if channels > 1 else (height, width)
    base = rng.integers(0, top, size=shape, dtype=np.int64).astype(np.float64)
    slices = []
    for k in range(num_slices):
        blurred = cv2.GaussianBlur(base, (0, 0), 0.5 + k) if k else base
        slices.append(np.clip(blurred, 0, top).astype(dtype))
    return slices
