"""The single writer: one asyncio task world owns the core; group commit makes it durable.

`execute` applies a command at once (no await between check and update, so no locks), then
waits until the log is durable up to everything the command saw, and only then answers.
Records applied while a flush runs pile up and go to disk together in the next one: one LMDB
transaction and one sync per batch, on one dedicated thread. A failed flush is fail-stop:
the writer refuses everything from then on and reports the failure to its owner.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import limits
from .codec import state_digest
from .commands import Command, ExpireHolds, Record
from .core import Core
from .wal import Log

log = logging.getLogger("quotad.writer")

EXPIRY_POLL_S_MAX = 1.0
"""The expiry task sleeps at most this long; every command expires what is due anyway."""


class WriterStopped(Exception):
    """The writer stopped (a storage failure, a broken invariant, or shutdown): nothing more
    is served from this process."""


class ServerClock:
    """Strictly increasing ns timestamps, above every time already in the log."""

    def __init__(self, floor_ns: int, wall_ns: Callable[[], int] = time.time_ns) -> None:
        self.last_ns = floor_ns
        self._wall_ns = wall_ns

    def now_ns(self) -> int:
        self.last_ns = max(self._wall_ns(), self.last_ns + 1)
        return self.last_ns


def recover(log_: Log) -> Core:
    """The core as the log left it: every record replayed and checked."""
    core = Core()
    for record in log_.records():
        core.replay(record)
    return core


class Writer:
    def __init__(self, core: Core, log_: Log, *, on_failure: Callable[[BaseException], None],
                 batch_records_max: int = limits.BATCH_RECORDS_MAX) -> None:
        self.core = core
        self.clock = ServerClock(core.last_record_ns)
        self.durable_sequence = core.sequence
        self._log = log_
        self._on_failure = on_failure
        self._batch_records_max = batch_records_max
        self._pending: list[Record] = []
        self._has_pending = asyncio.Event()
        self._flushed = asyncio.Event()
        self._failure: BaseException | None = None
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quotad-log")
        self._tasks: list[asyncio.Task[None]] = []
        self.batches = 0
        self.records_written = 0

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._flush_loop(), name="quotad-flush"),
                       asyncio.create_task(self._expiry_loop(), name="quotad-expiry")]

    @property
    def failed(self) -> bool:
        return self._failure is not None

    async def execute(self, command: Command) -> Any:
        """Applies the command and answers once all it saw is durable. Raises the command's
        QuotaError, or WriterStopped."""
        if self._failure is not None or self._closing:
            raise WriterStopped("the server is stopping" if self._closing else
                                f"storage failed: {self._failure!r}")
        try:
            outcome = self.core.apply(command, self.clock.now_ns())
        except Exception as error:  # a broken invariant: the state can no longer be trusted
            self._fail(error)
            raise WriterStopped(f"internal invariant failed: {error!r}") from error
        if outcome.records:
            self._pending.extend(outcome.records)
            self._has_pending.set()
        await self.wait_durable(self.core.sequence)
        if outcome.error is not None:
            raise outcome.error
        return outcome.result

    async def wait_durable(self, sequence: int) -> None:
        while self.durable_sequence < sequence:
            if self._failure is not None:
                raise WriterStopped(f"storage failed: {self._failure!r}")
            await self._flushed.wait()

    async def state_digest(self) -> tuple[str, int]:
        """A digest of the state and its last sequence, once all of it is durable."""
        if self._failure is not None or self._closing:
            raise WriterStopped("the server is stopping or failed")
        sequence = self.core.sequence
        digest = state_digest(self.core)  # no await since reading sequence: consistent
        await self.wait_durable(sequence)
        return digest, sequence

    async def expire_due(self) -> None:
        await self.execute(ExpireHolds())

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._has_pending.wait()
            self._has_pending.clear()
            while self._pending:
                batch = self._pending[: self._batch_records_max]
                del self._pending[: self._batch_records_max]
                try:
                    await loop.run_in_executor(self._executor, self._log.append, batch)
                except BaseException as error:  # fail-stop: memory is ahead of disk
                    self._fail(error)
                    return
                self.durable_sequence = batch[-1].sequence
                self.batches += 1
                self.records_written += len(batch)
                flushed, self._flushed = self._flushed, asyncio.Event()
                flushed.set()

    def _fail(self, error: BaseException) -> None:
        log.critical("stopping: %r", error)
        self._failure = error
        self._flushed.set()  # wakes every waiter, who then sees the failure
        self._on_failure(error)

    async def _expiry_loop(self) -> None:
        while self._failure is None:
            next_ns = self.core.next_expiry_ns()
            delay_s = EXPIRY_POLL_S_MAX
            if next_ns is not None:
                delay_s = min(delay_s, max(0.0, (next_ns - time.time_ns()) / 1e9))
            await asyncio.sleep(delay_s)
            next_ns = self.core.next_expiry_ns()
            if next_ns is not None and next_ns <= time.time_ns() and not self._closing:
                try:
                    await self.expire_due()
                except WriterStopped:
                    return

    async def close(self) -> None:
        """Flushes what is pending, then stops the tasks and the log thread."""
        self._closing = True
        if self._failure is None:
            await self.wait_durable(self.core.sequence)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=True)
