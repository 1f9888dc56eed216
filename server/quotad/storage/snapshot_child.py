"""Snapshots made by a child process, so that serving never stalls while the state is copied.

As Redis's BGSAVE does: os.fork() hands the child the core exactly as it is between two
commands (copy-on-write), the child encodes it into a file in the data directory and exits,
and the parent goes on serving. Once the child is done, the parent stores the encoded
snapshot in the log like any other (WriteAheadLog.append). The parent's pause is the fork itself:
copying the page tables, milliseconds where an in-process copy took seconds at scale.

The child touches nothing but the core and its own file. It first closes every descriptor
it inherited (the data directory's lock, LMDB, gRPC's sockets), so it never holds them once
the parent is gone, restores default signal handling, and leaves by os._exit: no atexit
handlers, no gRPC shutdown, no logging. It never runs the cyclic collector, which would walk
the heap it shares with the parent for garbage it has no time to make: at 1,000,000 users a
whole snapshot's child took 3.1-3.2 s of CPU without it against 3.5-3.9 s with it.

The parent reaps the child on a thread (finish), and learns what it cost from the reap
(os.wait4's rusage): a whole snapshot's CPU grows with the state, not with the records since
the last one, so at a fixed cadence its share per operation grows with the users; a delta's
grows with the users changed since the whole one (see the writer and the README's Limits).
It may kill the child from its event loop (stop). Once reaped, a pid names nothing of ours
and may be given to another process, so the kill goes through a pidfd (Linux 5.3+), which
always names this child; its owner closes it (close) only after the reap, on the thread that
may kill.
"""

from __future__ import annotations

import gc
import os
import signal
import time
import warnings
from pathlib import Path
from typing import NamedTuple

from quotad.core.machine import Core
from quotad.storage.snapshot import snapshot_of
from quotad.storage.wal import CorruptSnapshot, verify_snapshot

PARTIAL_GLOB = "snapshot-*.partial"
_FD_MAX = 1 << 20


class SnapshotChildFailed(Exception):
    pass


class Made(NamedTuple):
    """A child's snapshot, checked, and what the child cost."""
    encoded: bytes
    cpu_s: float
    """The child's CPU time from fork to exit, user + system."""


class Child(NamedTuple):
    """A snapshot child at work."""
    pid: int
    sequence: int
    """The sequence the snapshot covers."""
    path: Path
    """The file it writes."""
    pidfd: int | None
    """A pidfd of the child, to kill it by (None where the system has none: by its pid)."""
    forked_at_s: float
    """When it was forked, on time.monotonic()'s scale."""
    delta_of_sequence: int = 0
    """0: a whole snapshot; else a delta of the whole one at that sequence."""


def start(core: Core, data_dir: Path, delta_of_sequence: int = 0) -> Child:
    """Forks the child that writes a snapshot of the core as it is now (a delta of the whole
    one at delta_of_sequence, if given: snapshot_of). Call only between two commands; close()
    the child once finish() has returned or raised."""
    sequence = core.sequence
    path = data_dir / f"snapshot-{os.getpid()}-{sequence}.partial"  # one writer per file
    with warnings.catch_warnings():  # Python 3.12+ warns of fork() beside threads; the
        warnings.simplefilter("ignore", DeprecationWarning)  # child runs none of them
        forked_at_s = time.monotonic()
        pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            gc.disable()  # it ends within seconds: collecting would only walk the heap
            os.closerange(3, _FD_MAX)
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_DFL)
            encoded = snapshot_of(core, delta_of_sequence)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(encoded)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            code = 0
        finally:
            os._exit(code)
    try:  # not reaped before finish(): the pid still names the child (a zombie at worst)
        pidfd: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux 5.3+
        pidfd = None
    return Child(pid, sequence, path, pidfd, forked_at_s, delta_of_sequence)


def finish(child: Child) -> Made:
    """Waits for the child (blocking: run it in a thread) and returns the encoded snapshot,
    checked, with the child's CPU time; the file is removed either way.
    SnapshotChildFailed if the child failed."""
    pid, sequence, path = child.pid, child.sequence, child.path
    try:
        _, status, usage = os.wait4(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SnapshotChildFailed(
                f"the snapshot child {pid} ended with {os.waitstatus_to_exitcode(status)}")
        encoded = path.read_bytes()
        try:
            covered = verify_snapshot(encoded)
        except CorruptSnapshot as error:
            raise SnapshotChildFailed(f"the snapshot child {pid} wrote {error}") from error
        if covered != sequence:
            raise SnapshotChildFailed(f"the snapshot child {pid} covered {covered}, "
                                      f"not {sequence}")
        return Made(encoded, usage.ru_utime + usage.ru_stime)
    finally:
        path.unlink(missing_ok=True)


def stop(child: Child) -> bool:
    """Kills a child that is no longer wanted (shutdown): whether it was signalled (False once
    it was reaped). finish() still reaps it and removes its file. Never after close()."""
    try:
        if child.pidfd is not None:
            signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
        else:
            os.kill(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def close(child: Child) -> None:
    """Lets go of the child's pidfd, once finish() has reaped it (or failed)."""
    if child.pidfd is not None:
        os.close(child.pidfd)


def remove_leftovers(data_dir: Path) -> int:
    """Files of children whose parent died (kill -9) before storing them: never valid."""
    removed = 0
    for path in data_dir.glob(PARTIAL_GLOB):
        path.unlink(missing_ok=True)
        removed += 1
    return removed
