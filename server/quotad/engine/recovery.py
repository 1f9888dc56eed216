"""Start-up: the core as the data directory left it, from the latest snapshot and the log."""

from __future__ import annotations

import logging

from quotad.core.machine import Core, IdempotencyEntry
from quotad.storage.snapshot import collector_paused, core_from_snapshot, core_with_delta
from quotad.storage.wal import CorruptSnapshot, WriteAheadLog, TornTail, recover_records

log = logging.getLogger("quotad.writer")
"""The logger name its lines have always carried."""


def recover(wal: WriteAheadLog, *, repair: bool = True) -> Core:
    """The core as the data directory left it: the latest snapshot, then every record after
    it replayed and checked. A torn tail that was never acknowledged is dropped and logged
    (with repair=False it is raised as TornTail and nothing is changed), and so is a delta
    snapshot that cannot be read (with repair=False, CorruptSnapshot). Every record replayed
    is durable, so replay keeps none of the keys and finished holds the log answers for
    (Core._replaying): its memory is that of the live state."""
    with collector_paused():
        return _recover(wal, repair)


def _recover(wal: WriteAheadLog, repair: bool) -> Core:
    core = loaded_snapshots(wal, repair)
    core.durable_idempotency = durable_idempotency(wal)
    core.durable_hold = wal.finished_hold
    snapshot_sequence = core.sequence
    try:
        with wal.reading():  # one read transaction for the lookups of every record replayed
            for record in recover_records(wal, core.sequence, drop_torn_tail=repair):
                core.replay(record)
    except TornTail as torn:
        if not repair:
            raise
        log.warning("dropped a torn log tail", extra={"from_sequence": torn.sequence,
                                                      "records": torn.dropped,
                                                      "reason": str(torn)})
    assert core.pending_durable() == (frozenset(), frozenset()), "replay kept what is durable"
    log.info("recovered", extra={"snapshot_sequence": snapshot_sequence,
                                 "whole_snapshot_sequence": wal.whole_snapshot_sequence(),
                                 "replayed": core.sequence - snapshot_sequence,
                                 "log_first_sequence": wal.first_sequence()})
    return core


def loaded_snapshots(wal: WriteAheadLog, repair: bool = True) -> Core:
    """The core of the latest whole snapshot with its latest delta over it (an empty core if
    none). A whole snapshot that cannot be read is refused (CorruptSnapshot). A delta that
    cannot be read is logged and left: the log keeps every record after the whole snapshot,
    so a replay from there makes the same state (longer); with repair=False it is refused."""
    snapshot = wal.load_snapshot()
    if snapshot is None:
        return Core()
    core = core_from_snapshot(snapshot.encoded)
    assert core.sequence == snapshot.sequence
    try:
        delta = wal.load_delta()
        if delta is not None:
            return core_with_delta(core, delta.encoded)
    except CorruptSnapshot as error:
        if not repair:
            raise
        log.warning("left out a delta snapshot that cannot be read: replaying the log from "
                    "the whole snapshot instead", extra={"reason": str(error),
                                                         "snapshot_sequence": snapshot.sequence})
        return core_from_snapshot(snapshot.encoded)  # again: the delta took its users
    return core


def durable_idempotency(wal: WriteAheadLog):
    """The core's lookup of idempotency keys that are durable and no longer in memory: the
    record that first used the key, with its first answer, from the log."""
    def lookup(app: str, rpc: str, key: str, as_of_sequence: int) -> IdempotencyEntry | None:
        record = wal.idempotency_record(app, rpc, key, as_of_sequence)
        if record is None:
            return None
        return IdempotencyEntry(record.command, record.answer, record.now_ns)
    return lookup
