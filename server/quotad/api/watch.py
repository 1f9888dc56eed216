"""WatchUsage: a user's counters pushed as they change, in log order, once durable.

A watch starts with the counters now (WATCH_REASON_INITIAL) and the log sequence they include;
asked to resume `after_sequence`, that first message also carries the threshold events after
it, read from the events index. Then the writer's `on_applied` hook hands every record that
changed a watched user's counters to the hub, which reads the counters as of that record (only
for watched users: nobody watching costs one check) and queues a WATCH_REASON_CHANGE message
with the thresholds it crossed. A message leaves only once its record is durable, so nothing
sent is ever undone by a crash. At each window end of the user's groups a timer queues a
WATCH_REASON_WINDOW_RESET message through the same queue, so messages stay in log order.

A watch lasts only as long as the right it was opened with: the writer's hook ends it
UNAUTHENTICATED as soon as a revocation of its key, or of the sk key that signed its user
token, is applied, and its stream ends it at the token's expiry (`exp`).

No one takes more than a share of the watches: at most limits.WATCHERS_PER_USER_MAX per end
user, WATCHERS_PER_KEY_MAX per key, WATCHERS_PER_APP_MAX per app and WATCHERS_MAX in all;
one more is RESOURCE_EXHAUSTED TOO_MANY_WATCHERS naming the cap in its ErrorInfo metadata.

Nothing here makes the writer wait. A watcher's queue holds at most
limits.WATCH_QUEUE_MESSAGES_MAX messages; past that the watch ends RESOURCE_EXHAUSTED
(WATCH_QUEUE_FULL) and the client resumes with after_sequence. When the server drains or its
storage fails, every watch ends UNAVAILABLE so that clients reconnect elsewhere or later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from quotad.api import convert
from quotad.core import limits
from quotad.api import requests
from quotad.api.auth import UsageGrant
from quotad.core.commands import (
    CounterView, Record, RevokeKey, UpsertSubscription, UsageResult, WatchUsage,
)
from quotad.core.machine import Core
from quotad.core.errors import (
    FieldViolation, InvalidArgument, QuotaError, ResourceExhausted, Unauthenticated,
)
from quotad_contract.errors import ErrorReason
from quotad_contract.v1 import quotad_pb2 as pb
from quotad.storage.wal import WriteAheadLog
from quotad.engine.writer import Writer, WriterStopped

log = logging.getLogger("quotad.watch")


@dataclass(frozen=True, slots=True)
class Crossing:
    """A threshold event as a watcher is told it: which record crossed what."""

    limit_group_key: str
    percent: int
    window_start_ns: int
    sequence: int


@dataclass(frozen=True, slots=True)
class Update:
    """One message to a watcher: the counters as of log record `sequence`."""

    reason: int
    """A pb.WatchReason value."""
    sequence: int
    usage: UsageResult
    thresholds: tuple[Crossing, ...] = ()


def next_reset_ns(counters: Iterable[CounterView]) -> int | None:
    """When the first of these counters' windows ends (None: no window ends)."""
    ends = [view.resets_at_ns for view in counters if view.resets_at_ns is not None]
    return min(ends) if ends else None


class Watcher:
    """One watch stream's queue and window timer. Pure bookkeeping: the stream drives it."""

    def __init__(self, app: str, user_id: str,
                 queue_messages_max: int = limits.WATCH_QUEUE_MESSAGES_MAX,
                 grant: UsageGrant | None = None) -> None:
        self.app = app
        self.user_id = user_id
        self.key_id = grant.principal.key_id if grant is not None else ""
        """The caller's key ("" without one: the open mode)."""
        self.key_ids = grant.key_ids if grant is not None else frozenset()
        """Revoking any of these keys ends the watch."""
        expires_at_s = grant.expires_at_s if grant is not None else None
        self.expires_at_ns = None if expires_at_s is None else expires_at_s * limits.NS_PER_S
        """Wall-clock time (time.time_ns()) at which the user token expires, and the watch."""
        self.queue: deque[Update] = deque()
        self.queue_messages_max = queue_messages_max
        self.wake = asyncio.Event()
        self.ended: QuotaError | WriterStopped | None = None
        """Set to end the stream with that status."""
        self.reset_at_ns: int | None = None
        """When the next window reset message is due (None: no window ends)."""

    def push(self, update: Update) -> None:
        """Queues a message, or ends the watch if its reader fell too far behind."""
        if self.ended is not None:
            return
        if len(self.queue) >= self.queue_messages_max:
            self.end(ResourceExhausted(
                ErrorReason.WATCH_QUEUE_FULL, f"the watch fell {self.queue_messages_max} messages "
                "behind; resume with after_sequence"))
            return
        self.queue.append(update)
        reset_at_ns = next_reset_ns(update.usage.counters)
        if update.reason == pb.WATCH_REASON_CHANGE and self.reset_at_ns is not None:
            # a change never postpones a due reset: each window end gets its message
            reset_at_ns = self.reset_at_ns if reset_at_ns is None else min(
                reset_at_ns, self.reset_at_ns)
        self.reset_at_ns = reset_at_ns
        self.wake.set()

    def reset_if_due(self, core: Core, now_ns: int) -> bool:
        """Queues a window reset message if a window of the user's groups ended by now_ns:
        the counters at now_ns, as of the last record the core made."""
        if self.reset_at_ns is None or now_ns < self.reset_at_ns:
            return False
        usage = core.usage(self.app, self.user_id, now_ns)
        self.push(Update(pb.WATCH_REASON_WINDOW_RESET, core.sequence, usage))
        return True

    def expire_if_due(self, now_ns: int) -> None:
        """Ends the watch UNAUTHENTICATED once its user token has expired."""
        if self.expires_at_ns is not None and now_ns >= self.expires_at_ns:
            self.end(Unauthenticated("the user token has expired; reopen the watch with a "
                                     "fresh one"))

    def wake_at_ns(self) -> int | None:
        """When the stream must look again without being woken: the next window reset or
        the token's expiry, whichever is first (None: neither)."""
        times = [at for at in (self.reset_at_ns, self.expires_at_ns) if at is not None]
        return min(times) if times else None

    def end(self, error: QuotaError | WriterStopped) -> None:
        if self.ended is None:
            self.ended = error
            self.queue.clear()
            self.wake.set()


def changed_users(record: Record) -> set[tuple[str, str]]:
    """(app, user_id) of every user whose counters (or plan) the record changed."""
    users = {(event.app, event.user_id) for event in record.events
             if event.allowed and event.kind != "extend"}
    if isinstance(record.command, UpsertSubscription):
        users.add((record.command.app, record.command.user_id))
    return users


def crossings(record: Record, app: str, user_id: str) -> list[Crossing]:
    return [Crossing(event.limit_group_key, event.threshold_percent, event.window_start_ns,
                     record.sequence)
            for event in record.events
            if event.kind == "threshold" and event.app == app and event.user_id == user_id]


class WatchHub:
    """Every watcher of one server, fed by the writer's on_applied hook."""

    def __init__(self, open_writer: Callable[[], Writer], serving: Callable[[], bool],
                 watchers_max: int = limits.WATCHERS_MAX,
                 watchers_per_app_max: int = limits.WATCHERS_PER_APP_MAX,
                 watchers_per_key_max: int = limits.WATCHERS_PER_KEY_MAX,
                 watchers_per_user_max: int = limits.WATCHERS_PER_USER_MAX) -> None:
        self._open_writer = open_writer
        self._serving = serving
        self._watchers_max = watchers_max
        self._watchers_per_app_max = watchers_per_app_max
        self._watchers_per_key_max = watchers_per_key_max
        self._watchers_per_user_max = watchers_per_user_max
        self._by_user: dict[tuple[str, str], list[Watcher]] = {}
        self._by_key: dict[str, list[Watcher]] = {}
        """Watchers by each key whose revocation ends them."""
        self._per_app: Counter[str] = Counter()
        self._per_key: Counter[str] = Counter()
        """Watchers by the key that opened them (none counted without a key)."""
        self._count = 0
        self._writer: Writer | None = None
        self._drain_task: asyncio.Task[None] | None = None

    # --- the writer's side (no await, never raises into the writer) ------------------------

    def on_applied(self, records: tuple[Record, ...]) -> None:
        try:
            self._forward(records)
        except Exception as error:  # a bug here must not stop the writer: end the watches
            log.exception("watch hook failed")
            self._end_all(WriterStopped(f"the watch failed: {error!r}"))

    def _forward(self, records: tuple[Record, ...]) -> None:
        touched: dict[tuple[str, str], tuple[int, list[Crossing]]] = {}
        for record in records:
            if isinstance(record.command, RevokeKey):
                self._end_revoked(record.command.key_id)
            for user in changed_users(record):
                if user in self._by_user:
                    _, earlier = touched.get(user, (0, []))
                    touched[user] = (record.sequence, earlier + crossings(record, *user))
        if not touched:
            return
        assert self._writer is not None
        core, now_ns = self._writer.core, records[-1].now_ns
        for (app, user_id), (sequence, thresholds) in touched.items():
            update = Update(pb.WATCH_REASON_CHANGE, sequence, core.usage(app, user_id, now_ns),
                            tuple(thresholds))
            for watcher in list(self._by_user.get((app, user_id), ())):  # revoked: gone
                watcher.push(update)
                if watcher.ended is not None:
                    self._remove(watcher)

    def _end_revoked(self, key_id: str) -> None:
        """Ends at once every watch that rests on this key, now revoked."""
        for watcher in list(self._by_key.get(key_id, ())):
            whose = ("API key" if watcher.key_id == key_id
                     else "the user token's signing key")
            watcher.end(Unauthenticated(f"{whose} {key_id} was revoked"))
            self._remove(watcher)

    # --- watchers come and go -------------------------------------------------------------

    def _refuse_past_a_cap(self, watcher: Watcher) -> None:
        """RESOURCE_EXHAUSTED TOO_MANY_WATCHERS naming the first cap one more watch would pass,
        from the narrowest to the widest."""
        app, user_id, key_id = watcher.app, watcher.user_id, watcher.key_id
        caps = [
            ("WATCHERS_PER_USER_MAX", self._watchers_per_user_max,
             len(self._by_user.get((app, user_id), ())), f"user {user_id!r} of app {app!r}"),
            ("WATCHERS_PER_KEY_MAX", self._watchers_per_key_max,
             self._per_key[key_id] if key_id else 0, f"key {key_id}"),
            ("WATCHERS_PER_APP_MAX", self._watchers_per_app_max, self._per_app[app],
             f"app {app!r}"),
            ("WATCHERS_MAX", self._watchers_max, self._count, "this server"),
        ]
        for name, most, count, whose in caps:
            if count >= most:
                raise ResourceExhausted(
                    ErrorReason.TOO_MANY_WATCHERS,
                    f"{whose} has {count} watches, the most allowed ({name})",
                    metadata={"limit": name, "max": str(most)})

    def _add(self, writer: Writer, watcher: Watcher) -> None:
        self._refuse_past_a_cap(watcher)
        self._by_user.setdefault((watcher.app, watcher.user_id), []).append(watcher)
        for key_id in watcher.key_ids:
            self._by_key.setdefault(key_id, []).append(watcher)
        self._per_app[watcher.app] += 1
        if watcher.key_id:
            self._per_key[watcher.key_id] += 1
        self._count += 1
        self._writer = writer
        writer.on_applied = self.on_applied
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.create_task(self._watch_for_drain(writer),
                                                   name="quotad-watch-drain")

    def _remove(self, watcher: Watcher) -> None:
        key = (watcher.app, watcher.user_id)
        watchers = self._by_user.get(key, [])
        if watcher in watchers:
            watchers.remove(watcher)
            self._count -= 1
            if not watchers:
                del self._by_user[key]
            for key_id in watcher.key_ids:
                resting = self._by_key[key_id]
                resting.remove(watcher)
                if not resting:
                    del self._by_key[key_id]
            _decrement(self._per_app, watcher.app)
            if watcher.key_id:
                _decrement(self._per_key, watcher.key_id)
        if not self._by_user and self._writer is not None:
            self._writer.on_applied = None  # nobody watches: the writer skips the hook

    def _end_all(self, error: QuotaError | WriterStopped) -> None:
        for watchers in list(self._by_user.values()):
            for watcher in list(watchers):
                watcher.end(error)
                self._remove(watcher)

    async def _watch_for_drain(self, writer: Writer) -> None:
        while self._by_user:
            await asyncio.sleep(limits.WATCH_DRAIN_POLL_S)
            if not self._serving() or writer.failed:
                self._end_all(WriterStopped("the server is stopping; reconnect with "
                                            "after_sequence"))

    # --- one stream -----------------------------------------------------------------------

    async def watch(self, request: WatchUsage,
                    grant: UsageGrant | None = None) -> AsyncIterator[pb.WatchUsageResponse]:
        """The messages of one watch; raises the refusal that ends it. `grant` is what the
        caller's right to read rests on (None: nothing, the open mode); it was checked with no
        await since, so a revocation applied later reaches the watch through the hook."""
        app = request.app
        writer = self._open_writer()
        watcher = Watcher(app, request.user_id, grant=grant)
        # A user with no subscription: FailedPrecondition NO_PLAN, as GetUsage answers.
        usage = writer.core.usage(app, request.user_id, writer.clock.now_ns())
        sequence = writer.core.sequence  # no await since usage: the counters as of it
        watcher.reset_at_ns = next_reset_ns(usage.counters)
        self._add(writer, watcher)
        try:
            await writer.wait_durable(sequence)
            replayed: tuple[Crossing, ...] = ()
            if request.after_sequence:
                replayed = await asyncio.get_running_loop().run_in_executor(
                    None, replay_thresholds, writer.wal, app, request.user_id,
                    writer.core.user_number(app, request.user_id), request.after_sequence,
                    sequence)
            watcher.expire_if_due(time.time_ns())
            if watcher.ended is not None:
                raise watcher.ended
            yield response(Update(pb.WATCH_REASON_INITIAL, sequence, usage, replayed))
            while True:
                watcher.expire_if_due(time.time_ns())
                if watcher.ended is not None:
                    raise watcher.ended
                if watcher.queue:
                    await writer.wait_durable(watcher.queue[0].sequence)
                    if watcher.ended is None:
                        yield response(watcher.queue.popleft())
                    continue
                if watcher.reset_if_due(writer.core, writer.clock.now_ns()):
                    continue
                watcher.wake.clear()
                await _wait(watcher.wake, watcher.wake_at_ns())
        finally:
            self._remove(watcher)


def _decrement(counts: Counter[str], key: str) -> None:
    """One fewer; a count that reaches 0 is dropped, so the counters hold only live keys."""
    assert counts[key] > 0, key
    counts[key] -= 1
    if not counts[key]:
        del counts[key]


async def _wait(wake: asyncio.Event, until_ns: int | None) -> None:
    """Until woken, or until the wall clock reaches until_ns."""
    timeout_s = None if until_ns is None else max(0.0, (until_ns - time.time_ns()) / 1e9)
    try:
        await asyncio.wait_for(wake.wait(), timeout_s)
    except asyncio.TimeoutError:
        pass


def replay_thresholds(wal: WriteAheadLog, app: str, user_id: str, user_number: int | None,
                      after_sequence: int, up_to_sequence: int) -> tuple[Crossing, ...]:
    """The user's threshold events with after_sequence < sequence <= up_to_sequence, oldest
    first, at most limits.WATCH_REPLAY_THRESHOLDS_MAX (the latest). Blocking: run it on a
    thread. The events index is ordered by time, and time grows strictly with sequence, so
    the time of record after_sequence is where to start (the start if it was pruned)."""
    if user_number is None:  # never subscribed: no events
        return ()
    start_ns = (wal.record_now_ns(after_sequence) or 0) if after_sequence else 0
    found: deque[Crossing] = deque(maxlen=limits.WATCH_REPLAY_THRESHOLDS_MAX)
    cursor = b""
    while True:
        page = wal.list_events(app, user_id, user_number, start_ns, limits.END_OF_TIME_NS,
                               cursor, limits.EVENTS_PAGE_SIZE_MAX)
        for stored in page:
            if stored.sequence > up_to_sequence:
                return tuple(found)
            event = stored.event
            if stored.sequence > after_sequence and event.kind == "threshold":
                found.append(Crossing(event.limit_group_key, event.threshold_percent,
                                      event.window_start_ns, stored.sequence))
        if len(page) < limits.EVENTS_PAGE_SIZE_MAX:
            return tuple(found)
        cursor = page[-1].cursor


def response(update: Update) -> pb.WatchUsageResponse:
    return pb.WatchUsageResponse(
        reason=update.reason, sequence=update.sequence, user_id=update.usage.user_id,
        plan_id=update.usage.plan_id, counters=convert.counters(update.usage.counters),
        thresholds=[pb.ThresholdCrossed(
            limit_group_key=crossing.limit_group_key, percent=crossing.percent,
            window_start=convert.timestamp(crossing.window_start_ns),
            sequence=crossing.sequence) for crossing in update.thresholds])


def method_handler(hub: WatchHub, caller: Callable[[Any, Any], UsageGrant],
                   parse: Callable[[bytes], Any],
                   status_of: Callable[[Exception], grpc.Status],
                   refusals: tuple[type[Exception], ...], method: str,
                   caller_of: Callable[[Any, Any], dict[str, str]]) -> grpc.RpcMethodHandler:
    """The WatchUsage gRPC handler: refusals (before or during the stream) end it with the
    status they map to, as every other handler's do. caller(metadata, request) authenticates
    the call first and gives what its read rests on (the app it reads from among it);
    caller_of(metadata, context) names who made a refused call, for its log line."""
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        metadata = context.invocation_metadata() or ()
        await context.send_initial_metadata(
            ((requests.REQUEST_ID_HEADER, requests.begin(metadata)),))
        try:
            grant = caller(metadata, request)
            if not isinstance(request, pb.WatchUsageRequest):  # protobuf could not parse it
                raise InvalidArgument([FieldViolation(
                    "request", f"cannot be parsed: {getattr(request, 'error', request)}")])
            async for message in hub.watch(convert.watch_usage(grant.app, request), grant):
                yield message
        except refusals as error:
            status = status_of(error)
            requests.refused(method, status.code.name, status.details,
                             **caller_of(metadata, context))
            await context.abort(status.code, status.details, status.trailing_metadata)
    return grpc.unary_stream_rpc_method_handler(
        handle, request_deserializer=parse,
        response_serializer=lambda message: message.SerializeToString())
