"""Reading in processes that may die: results in order, a dead reader replaced, never a hang.

``ReadInOrder(read, items, workers)`` yields ``read(item)`` for every item,
in order, computed in ``workers`` reader processes (0: in this one). Each
reader has its own two pipes, whose far ends only it holds: a reader that
dies (the out-of-memory killer's SIGKILL, a crash in a decoder, a signal to
the process group) shows as the end of its pipe, never as half a message to
wait on forever. Its items go to a fresh reader; an item whose reader dies
``TRIES`` times while reading it comes back as a ``ReaderDied``. A reader
that cannot be started raises ``ReaderStartError``. Leaving the ``with``
block (at the end, on an error or on Ctrl-C) stops every reader at once.
Readers ignore Ctrl-C (the main process handles it) and die on SIGTERM
without a traceback.
"""
import multiprocessing
import signal
from collections import deque
from multiprocessing.connection import wait
from typing import Callable, NamedTuple

TRIES = 2     # readers an item may take down before it is given up
AHEAD = 2     # items sent to a reader beyond the one it reads, so that it never waits for the next
STOP_SECONDS = 5     # how long a reader may take to die after SIGTERM before it gets SIGKILL
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class ReaderDied(NamedTuple):
    """In place of read(item): its reader process died TRIES times while reading it."""
    how: str     # 'was killed by SIGKILL', 'exited with status 1', ...


class ReaderStartError(Exception):
    """A reader process died and no new one could be started."""


def _serve(read, tasks, results, foreign):
    """A reader process: read(item) for each item that comes on ``tasks``, the result sent on
    ``results``; ends when ``tasks`` closes. ``foreign``: pipe ends inherited by fork that are not
    its own (they would keep the other readers' pipes open after those die)."""
    for end in foreign:
        end.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)     # blocked by the main process around the start
    try:
        while True:
            results.send(read(tasks.recv()))
    except (EOFError, BrokenPipeError):       # the main process is done or gone
        pass


def how_it_ended(exitcode) -> str:
    """'was killed by SIGKILL' for a negative exit code, else 'exited with status N'."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


class _Reader:
    """One reader process, its two pipes (this process's ends) and the positions sent to it, oldest first."""

    def __init__(self, context, read, others):
        task_end, self.tasks = context.Pipe(duplex=False)
        self.results, result_end = context.Pipe(duplex=False)
        foreign = [end for other in others for end in (other.tasks, other.results)] + [self.tasks, self.results]
        self.process = context.Process(
            target=_serve, args=(read, task_end, result_end, foreign if context.get_start_method() == "fork" else []),
            daemon=True)
        # A signal between the start and the reader's own handlers would give a traceback there.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            self.process.start()
        except OSError as exc:
            self.close()
            raise ReaderStartError(f"no reader process could be started ({exc.strerror or exc})") from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            task_end.close()      # the reader's ends are its own from here on
            result_end.close()
        self.sent = deque()

    def send(self, position, item) -> None:
        self.sent.append(position)
        try:
            self.tasks.send(item)
        except OSError:       # it died: found when its result is awaited, and the item sent again
            pass

    def close(self):
        self.tasks.close()
        self.results.close()


class ReadInOrder:
    """``read(item)`` for each of ``items``, in order, in ``workers`` processes (see the module's
    docstring). ``read`` must return, not raise: a bad item is a result like any other.
    ``on_retry(item, how)`` is told of each item that is read again after its reader died."""

    def __init__(self, read: Callable, items, workers: int, on_retry: Callable = lambda item, how: None,
                 start_method=None):
        self.read, self.items, self.on_retry = read, list(items), on_retry
        self.workers = min(workers, len(self.items))
        if start_method is None:      # fork starts at once; spawn where there is no fork
            start_method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self.context = multiprocessing.get_context(start_method)
        self.readers = []
        self.tries = [0] * len(self.items)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        if not self.workers:
            yield from map(self.read, self.items)
            return
        for _ in range(self.workers):
            self.readers.append(_Reader(self.context, self.read, self.readers))
        unsent = 0
        for position in range(len(self.items)):
            # keep every reader AHEAD items ahead
            while unsent < len(self.items):
                reader = min(self.readers, key=lambda r: len(r.sent))
                if len(reader.sent) > AHEAD:
                    break
                reader.send(unsent, self.items[unsent])
                unsent += 1
            yield self._result(position)

    def _result(self, position):
        """The result of ``position``, the oldest item of the reader it was sent to."""
        while True:
            reader = next(r for r in self.readers if r.sent and r.sent[0] == position)
            if reader.results in wait([reader.results, reader.process.sentinel]):
                try:
                    result = reader.results.recv()
                    reader.sent.popleft()
                    return result
                except (EOFError, OSError):   # it died, maybe halfway through sending
                    pass
            given_up = self._replace(reader)
            if given_up:
                return given_up

    def _replace(self, dead: _Reader):
        """Start a reader in place of ``dead`` and send it dead's items again; the oldest, which
        dead was reading, counts a try: after TRIES of them it is given up (returns ReaderDied)."""
        dead.process.join(STOP_SECONDS)
        how = how_it_ended(dead.process.exitcode)
        dead.close()
        position = dead.sent[0]
        self.tries[position] += 1
        fresh = _Reader(self.context, self.read, [r for r in self.readers if r is not dead])
        self.readers[self.readers.index(dead)] = fresh
        given_up = self.tries[position] >= TRIES
        if given_up:
            dead.sent.popleft()
        else:
            self.on_retry(self.items[position], how)
        for again in dead.sent:
            fresh.send(again, self.items[again])
        return ReaderDied(how) if given_up else None

    def close(self):
        """Stop every reader now (SIGTERM, then SIGKILL after STOP_SECONDS) and close the pipes."""
        for reader in self.readers:
            reader.close()
            if reader.process.is_alive():
                reader.process.terminate()
        for reader in self.readers:
            reader.process.join(STOP_SECONDS)
            if reader.process.is_alive():
                reader.process.kill()
                reader.process.join()
        self.readers = []
