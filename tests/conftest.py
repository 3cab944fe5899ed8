import sys
from pathlib import Path

# The project's modules live at the repository root; tests import them directly.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long test (seconds to a minute); deselect with -m 'not slow'")
