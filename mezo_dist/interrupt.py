"""Ctrl-C (SIGINT) and a scheduler's SIGTERM: one line, every rank out, outputs consistent.

Every output appears whole or not at all (:mod:`mezo_dist.io`), so stopping at any moment leaves
what a crash would: complete checkpoints, a trajectory whose last line may be cut (resume drops
it). An interrupt adds the user's side: one line that says what a resume would start from, and
the shell's exit code for a signal, 128 + its number (130 for SIGINT, 143 for SIGTERM).

A rank stops by one of two paths:

* the main thread, at its next Python instruction: the handler raises :class:`Interrupted`,
  which unwinds through every ``finally`` (files closed) to the entry point;
* a watchdog thread, when the main thread cannot get there: blocked in a collective whose peers
  are gone, a C++ wait that Python cannot interrupt. ``signal.set_wakeup_fd`` wakes it; after
  ``GRACE_S`` it prints the line and ends the process with ``os._exit``.

One line for the whole job, whether the terminal signalled every rank or a user one rank: the
ranks elect a speaker through the process group's store (the first to add 1 to a counter); a rank
that cannot reach the store speaks only if it is rank 0. A rank whose collective failed because a
peer was interrupted leaves quietly, with the peer's code.

Signals are process-wide, so this state is module-wide; :func:`handling` installs and restores it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator

GRACE_S = 5.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)
_COUNT, _SIGNAL = "mezo_dist/interrupt/count", "mezo_dist/interrupt/signal"


class Interrupted(BaseException):
    """Raised in the main thread by SIGINT or SIGTERM (a BaseException, as KeyboardInterrupt, so
    that ``except Exception`` on the way does not swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _State:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = 0
        self.pending = False
        self.announced = False
        self.describe: Callable[[], str] | None = None
        self.store: Any = None
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.lock = threading.Lock()


_state = _State()


def exit_code(signum: int) -> int:
    return 128 + signum


def received() -> int | None:
    """The signal this process received, if any."""
    return _state.signum


def describe_with(describe: Callable[[], str] | None) -> None:
    """What the line says after "interrupted by SIGINT": for training, the checkpoint a resume
    would start from (evaluated when the signal comes)."""
    _state.describe = describe


def attach(store: Any, rank: int, world: int) -> None:
    """The process group's store and this rank's place, for the election of one speaker."""
    _state.store, _state.rank, _state.world = store, rank, world


def _handler(signum: int, frame: Any) -> None:
    if _state.signum is not None:
        return  # the first signal decides; the launcher echoing it to every rank changes nothing
    _state.signum = signum
    if _state.deferred:
        _state.pending = True
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold an interrupt until the block ends (two renames that must both happen)."""
    _state.deferred += 1
    try:
        yield
    finally:
        _state.deferred -= 1
        if not _state.deferred and _state.pending:
            _state.pending = False
            raise Interrupted(_state.signum)


def _elected() -> bool:
    store = _state.store
    if store is None or _state.world == 1:
        return _state.rank == 0
    try:
        store.set(_SIGNAL, str(_state.signum))
        return store.add(_COUNT, 1) == 1
    except Exception:  # the store's host is gone too: rank 0 speaks
        return _state.rank == 0


def peer_signal() -> int | None:
    """The signal another rank of this job received, if one did (read from the store)."""
    store = _state.store
    if store is None or _state.world == 1:
        return None
    try:
        if store.check([_COUNT]):
            return int(store.get(_SIGNAL))
    except Exception:
        pass
    return None


def announce(signum: int) -> None:
    """Print the one line (on the elected rank only, once per process)."""
    with _state.lock:
        if _state.announced:
            return
        _state.announced = True
    _state.signum = _state.signum or signum
    if not _elected():
        return
    text = f"interrupted by {signal.Signals(signum).name}"
    if _state.world > 1:
        text += f" on rank {_state.rank}"
    if _state.describe is not None:
        try:
            text += f"; {_state.describe()}"
        except Exception:
            pass
    print(f"mezo_dist: error: {text}", file=sys.stderr, flush=True)


def stop(signum: int) -> int:
    """Announce and return the exit code (for an entry point that caught :class:`Interrupted`)."""
    announce(signum)
    return exit_code(signum)


def _watch(sock: socket.socket, done: threading.Event) -> None:
    while True:
        try:
            data = sock.recv(64)
        except OSError:
            return
        if not data or done.is_set():
            return
        signums = [s for s in data if s in SIGNALS]
        if not signums:
            continue
        if done.wait(GRACE_S):
            return  # the main thread got out by itself
        while _state.deferred:
            time.sleep(0.05)
        signum = _state.signum or signums[0]
        announce(signum)
        sys.stderr.flush()
        os._exit(exit_code(signum))


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` (and the watchdog) for the block; the
    previous handlers come back after it. Only the main thread can install signal handlers;
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _state
    _state = _State()
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    done = threading.Event()
    watchdog = threading.Thread(target=_watch, args=(reader, done), name="mezo-interrupt", daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(old_fd)
        for s, h in previous.items():
            signal.signal(s, h)
        with contextlib.suppress(OSError):
            writer.send(b"\0")
        watchdog.join(timeout=1.0)
        reader.close()
        writer.close()
