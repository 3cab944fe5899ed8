"""readers.ReadInOrder: results in order from reader processes that real signals kill."""
import errno
import fcntl
import os
import signal
import termios
import time

import pytest

from conftest import only_one_process_starts
from readers import TRIES, ReaderDied, ReaderStartError, ReadInOrder, how_it_ended


@pytest.fixture(autouse=True)
def no_hang():
    """A hang is the bug these tests look for: fail after 20 s instead of waiting forever."""
    def hung(signum, frame):
        raise TimeoutError("hung for 20 s")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def kill_own_process(item):
    """A read that dies as the out-of-memory killer ends a process, for item 'kill'."""
    if item == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return item * 2


@pytest.mark.parametrize("workers", [0, 1, 3])
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_results_come_in_order(workers, start_method):
    items = list(range(11))
    with ReadInOrder(abs, [-i for i in items], workers, start_method=start_method) as results:
        assert list(results) == items


def test_a_reader_killed_halfway_through_sending_is_replaced():
    """The reader is killed while it is blocked halfway through a result bigger than a pipe holds:
    the half message is dropped, a fresh reader reads the item again, nothing waits forever."""
    sizes = [10, 1 << 22, 20]
    retried = []
    with ReadInOrder(bytes, sizes, 1, on_retry=lambda item, how: retried.append((item, how))) as pool:
        results = iter(pool)
        assert next(results) == bytes(10)
        reader = pool.readers[0]
        waiting = bytearray(4)      # bytes in the pipe: some of 4 MiB, which no pipe holds, is half a message
        while not int.from_bytes(waiting, "little"):
            fcntl.ioctl(reader.results.fileno(), termios.FIONREAD, waiting)
            time.sleep(0.01)
        os.kill(reader.process.pid, signal.SIGKILL)
        assert next(results) == bytes(1 << 22)
        assert next(results) == bytes(20)
        assert pool.readers[0].process.pid != reader.process.pid
    assert retried == [(1 << 22, "was killed by SIGKILL")]


def test_an_item_that_kills_every_reader_is_given_up_alone():
    retried = []
    items = [1, "kill", 3, 4, 5, 6]
    with ReadInOrder(kill_own_process, items, 2, on_retry=lambda item, how: retried.append(item)) as results:
        got = list(results)
    assert got == [2, ReaderDied("was killed by SIGKILL"), 6, 8, 10, 12]
    assert retried == ["kill"] * (TRIES - 1)


def test_a_reader_that_cannot_be_started_is_an_error(monkeypatch):
    only_one_process_starts(monkeypatch, errno.ENOMEM)
    with pytest.raises(ReaderStartError, match=r"no reader process could be started \(Cannot allocate memory\)"):
        with ReadInOrder(kill_own_process, [1, "kill", 3], 1) as results:
            list(results)


def test_leaving_early_stops_every_reader():
    with ReadInOrder(abs, range(-20, 0), 2) as pool:
        results = iter(pool)
        next(results)
        processes = [reader.process for reader in pool.readers]
        assert len(processes) == 2 and all(p.is_alive() for p in processes)
    assert not any(p.is_alive() for p in processes)


def test_how_a_reader_ended():
    assert how_it_ended(-signal.SIGKILL) == "was killed by SIGKILL"
    assert how_it_ended(-signal.SIGTERM) == "was killed by SIGTERM"
    assert how_it_ended(1) == "exited with status 1"
