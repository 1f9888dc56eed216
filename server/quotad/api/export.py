"""ExportUsage: the committed and tracked amounts of an app, read from the log for billing.

The log is read on the default executor's threads, a bounded number of records at a time,
from the cursor (the sequence of the last record an export covered) through the last record
durable when the export began. Each commit or track makes at most one usage line, with the
id `<sequence>-<index>` (a shard's: `<shard_id>:<sequence>-<index>`), so an export's lines
and cursors never depend on how it was cut into messages, and exporting a range twice gives
the same ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from quotad.api import convert
from quotad.core import commands as c
from quotad.core import limits
from quotad.core.errors import FailedPrecondition, FieldViolation, InvalidArgument
from quotad.core.plans import Subscription
from quotad.engine.writer import Writer
from quotad.storage.wal import LogPruned, UsageEntry
from quotad_contract.errors import ErrorReason
from quotad_contract.v1 import quotad_pb2 as pb

EXPORT_RECORDS_PER_READ = 4096
"""Log records one read transaction of an export goes through (on an executor thread)."""
_KINDS = {"commit": pb.EVENT_KIND_COMMIT, "track": pb.EVENT_KIND_TRACK}


def _pruned(error: LogPruned) -> FailedPrecondition:
    return FailedPrecondition(
        ErrorReason.EXPORT_CURSOR_PRUNED,
        f"the cursor is older than the log: {error}; the log keeps records for the audit "
        "retention (--audit-retention-days); an empty cursor exports from the oldest kept")


async def messages(writer: Writer, query: c.ExportUsage, shard_id: int | None = None
                   ) -> AsyncIterator[pb.ExportUsageResponse]:
    """The export's messages, each with the cursor that resumes right after its lines; the
    last one carries the cursor of the whole range. Refusals come before the first message
    (a bad cursor, or one past the retention) or, if the log is pruned past the export while
    it runs, instead of the next one. shard_id: the shard this server is of a cluster, which
    each line's id names (None: a server alone)."""
    loop = asyncio.get_running_loop()
    wal = writer.wal
    try:
        after, through = await loop.run_in_executor(None, wal.export_range, query.after_sequence)
    except LogPruned as error:
        raise _pruned(error) from None
    if after > through:
        raise InvalidArgument([FieldViolation(
            "cursor", f"names record {after}, past the log's last ({through})")])
    subscriptions = writer.core.subscriptions_by_number(query.app)  # after `through` is fixed
    end_ns = limits.END_OF_TIME_NS if query.end_time_ns is None else query.end_time_ns
    done = False
    while not done:
        try:
            entries, after, done = await loop.run_in_executor(
                None, wal.usage_entries, query.app, after, through, end_ns,
                EXPORT_RECORDS_PER_READ)
        except LogPruned as error:
            raise _pruned(error) from None
        step = limits.EXPORT_LINES_PER_MESSAGE_MAX
        for start in range(0, len(entries), step):
            chunk = entries[start:start + step]
            last = start + step >= len(entries)
            cursor = after if last else chunk[-1].sequence
            yield pb.ExportUsageResponse(
                lines=[usage_line(entry, subscriptions, shard_id) for entry in chunk],
                next_cursor=str(cursor))
        if done and not entries:
            yield pb.ExportUsageResponse(next_cursor=str(after))


def usage_line(entry: UsageEntry, subscriptions: dict[int, Subscription],
               shard_id: int | None = None) -> pb.UsageLine:
    event = entry.event
    subscription = subscriptions[entry.user_number]
    line_id = f"{entry.sequence}-{entry.index}"
    return pb.UsageLine(
        id=line_id if shard_id is None else f"{shard_id}:{line_id}", shard_id=shard_id or 0,
        sequence=entry.sequence, index=entry.index,
        time=convert.timestamp(entry.now_ns), kind=_KINDS[event.kind],
        user_id=subscription.user_id, billing_customer_id=subscription.billing_customer_id,
        event_type=event.event_type, amount=event.amount, metadata=dict(event.metadata),
        reservation_id=event.reservation_id)
