"""The whole core to bytes and back: what a snapshot holds (protos/quotad/internal/snapshot.proto).

A snapshot's body is the magic b"QSNP", the format version (2 bytes, big-endian), and one
`quotad.internal.CoreSnapshot`, zlib'd (level 1: the columns repeat a lot, and 1M users take
7 MB instead of 117 MB for 0.3 s of the child's CPU and 0.2 s of a load). Users and their
counters, the tables that grow with the business, are columns: packed arrays of fixed-size
integers decoded with one call each, text in `repeated string` fields that protobuf's C
runtime turns into a list at once, and small tables (plan ids, time zones, group keys,
window bounds) that the rows index, so each distinct value exists once in memory. Loading
then costs the objects the core is made of and little else; both ways, each kind of object
is made or read in bulk, by loops that run in C. What is small or in memory only until
durable (API keys, idempotency entries, a core alone's forget index) is JSON of the core's
plain form.

A delta snapshot (CoreSnapshot.delta_of_sequence) is the same message with only the users
changed since a whole snapshot (the core's users_changed), and the ids of those removed since;
everything else, small or bounded by what is live, is whole in it too. Read over that whole
snapshot's core (core_with_delta), it is the state at its own sequence.

The expiry indexes are not stored: they are every live hold's (expires_at_ns, sequence, app,
id), rebuilt from the holds, and every credit grant's expiry, rebuilt from the balances.

Keys and finished holds that are in memory only until their records are durable are left
out: a snapshot is stored once those records are, and the log answers for them.

Pure (no I/O). Data directories whose latest snapshot is JSON (snapshot_json.py, from before
this format) load through `core_from_snapshot` too; the next snapshot stored is binary.
"""

from __future__ import annotations

import array
import bisect
import gc
import json
import sys
import zlib
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import accumulate, chain, islice
from operator import attrgetter
from typing import Any

from sortedcontainers import SortedList

from quotad.core import limits
from quotad.core.balances import Balance, Grant
from quotad.core.commands import RESULT_TYPES
from quotad.core.holds import HoldState
from quotad.core.machine import (
    AppState, Core, CounterLayout, CounterSlot, CounterState, HoldRef, IdempotencyEntry,
    KeyState, Reservation, UserState, layout_of, request_fingerprint,
)
from quotad.core.plans import Subscription, Window
from quotad.storage import log_pb2, snapshot_pb2
from quotad.storage.codec import (
    RESERVATION_ID_PREFIX, from_plain, plan_from_message, plan_to_message, reservation_bytes,
    to_plain,
)
from quotad.storage.snapshot_json import core_from_plain
from quotad.storage.wal import CorruptSnapshot, encode_snapshot, snapshot_body, verify_snapshot

MAGIC = b"QSNP"
FORMAT_VERSION = 4
"""1 and 2 were JSON (snapshot_json.py); 3: binary, users and counters in columns; 4: the
counters' window bounds as indexes into tables of the distinct ones."""
READABLE_FORMAT_VERSIONS = (3, 4)
"""What a snapshot may be in: the one written, and the one the release before wrote."""
_PREFIX_BYTES = len(MAGIC) + 2
SNAPSHOT_MESSAGE_BYTES_MAX = 2**31 - 1
"""protobuf's own limit on one message: about 20 million users with two counters each."""
COMPRESSION_LEVEL = 1
NO_WINDOW_END_NS = -1
"""window_end_ns of a counter whose window never ends (lifetime)."""
_HOLD_STATES = tuple(HoldState)
_INT64, _UINT32 = "q", "I"
_INT64_BYTES, _UINT32_BYTES = 8, 4
if (array.array(_INT64).itemsize != _INT64_BYTES
        or array.array(_UINT32).itemsize != _UINT32_BYTES):
    raise AssertionError("array typecodes q and I are 8 and 4 bytes on this platform")


# --- the stored form ------------------------------------------------------------------------


def snapshot_of(core: Core, delta_of_sequence: int = 0) -> bytes:
    """The stored form of a snapshot of the core as it is now: header, prefix, message. With
    delta_of_sequence, a delta of the whole snapshot taken at that sequence (encode_core)."""
    return encode_snapshot(core.sequence, encode_core(core, delta_of_sequence))


def core_from_snapshot(encoded: bytes) -> Core:
    """The core a stored snapshot holds, once its checksum holds; CorruptSnapshot (naming
    the sequence and what is wrong) for anything that cannot be read back whole."""
    def decode(body: bytes) -> Core:
        if body[:len(MAGIC)] == MAGIC:
            return decode_core(body)
        return _core_from_json(body)  # written before this format, or by quotad migrate's source
    return _read("snapshot", encoded, decode)


def _read(kind: str, encoded: bytes, decode: Callable[[bytes], Core]) -> Core:
    """The core a stored snapshot's body decodes to, once its checksum holds, at the
    sequence its header names; CorruptSnapshot naming the kind and sequence if not."""
    sequence = verify_snapshot(encoded)
    try:
        core = decode(snapshot_body(encoded))
    except CorruptSnapshot as error:
        raise CorruptSnapshot(f"the {kind} at sequence {sequence}: {error}") from error
    if core.sequence != sequence:
        raise CorruptSnapshot(f"the {kind} at sequence {sequence} holds the state at "
                              f"sequence {core.sequence}")
    return core


def _core_from_json(body: bytes) -> Core:
    try:
        plain = json.loads(zlib.decompress(body))
        return core_from_plain(plain)
    except (zlib.error, ValueError, KeyError, TypeError) as error:
        raise CorruptSnapshot(f"neither binary nor JSON: {error!r}") from error


# --- encoding ---------------------------------------------------------------------------------


def encode_core(core: Core, delta_of_sequence: int = 0) -> bytes:
    """The snapshot body of the core as it is now (call between two commands). With
    delta_of_sequence, a delta of the whole snapshot taken at that sequence, when the core's
    users_changed were cleared: of the users, only those in users_changed (those gone as
    removed ids); all else whole. Its cost then grows with the users changed, not with all
    of them; core_with_delta() reads it over that whole snapshot."""
    assert 0 <= delta_of_sequence <= core.sequence, (delta_of_sequence, core.sequence)
    pending_keys, pending_holds = core.pending_durable()
    message = snapshot_pb2.CoreSnapshot(
        sequence=core.sequence, last_record_ns=core.last_record_ns,
        delta_of_sequence=delta_of_sequence,
        users_numbered=core.users_numbered, catalog_revision=core.catalog_revision,
        keys_json=_json([to_plain(key) for _, key in sorted(core.keys.items())]),
        forget_json=_json(to_plain(core.forget)),
        frozen_slots=sorted(core.frozen_slots), incoming_slots=sorted(core.incoming_slots),
        moved_key_slots_json=_json(sorted([app_id, rpc, key, slot] for (app_id, (rpc, key)), slot
                                          in core.moved_key_slots.items())))
    if core.idempotency_retention_ns != limits.IDEMPOTENCY_RETENTION_NS_MIN:
        message.idempotency_retention_ns = core.idempotency_retention_ns
    for app_id, app in sorted(core.apps.items()):
        app_message = message.apps.add()
        users = app.users
        if delta_of_sequence:
            changed = core.users_changed.get(app_id, set())
            users = {user_id: app.users[user_id] for user_id in changed if user_id in app.users}
            app_message.removed_user_ids.extend(sorted(changed - users.keys()))
        _encode_app(app_message, app_id, app, users, pending_keys, pending_holds)
    body = message.SerializeToString()
    if len(body) > SNAPSHOT_MESSAGE_BYTES_MAX:
        raise ValueError(f"a snapshot of {len(body)} bytes passes the "
                         f"{SNAPSHOT_MESSAGE_BYTES_MAX} a message may hold")
    return MAGIC + FORMAT_VERSION.to_bytes(2, "big") + zlib.compress(body, COMPRESSION_LEVEL)


def _encode_app(message: Any, app_id: str, app: AppState, users: dict[str, UserState],
                pending_keys: frozenset[tuple[str, Any]], pending_holds: frozenset[str]) -> None:
    message.app = app_id
    for _, plan in sorted(app.plans.items()):
        plan_message = log_pb2.Plan()
        plan_to_message(plan, plan_message)
        message.plans.append(plan_message.SerializeToString())
    for plan_id, count in sorted(app.plan_subscribers.items()):
        message.subscriber_plan_ids.append(plan_id)
        message.subscriber_counts.append(count)
    _encode_users(message.users, message.counters, users)
    for reservation in app.reservations.values():
        if reservation.reservation_id not in pending_holds:
            _encode_hold(message.holds.add(), reservation)
    message.idempotency_json = _json([
        [rpc, key, request_fingerprint(entry.request), type(entry.result).__name__,
         to_plain(entry.result), entry.created_at_ns]
        for (rpc, key), entry in app.idempotency.items()
        if (app_id, (rpc, key)) not in pending_keys])
    if app.departed:
        message.departed_json = _json([
            [number, s.user_id, s.plan_id, s.time_zone, s.billing_customer_id]
            for number, s in sorted(app.departed.items())])


def _encode_users(users_message: Any, counters_message: Any,
                  users: dict[str, UserState]) -> None:
    """The users' and counters' columns, each read off the objects by a loop that runs in C
    (attrgetter, map, chain): a snapshot child's time is the server's second core."""
    rows = list(users.values())
    subscriptions = list(map(attrgetter("subscription"), rows))
    plan_ids = _indexed(users_message.plan_ids, map(attrgetter("plan_id"), subscriptions))
    zones = _indexed(users_message.time_zones, map(attrgetter("time_zone"), subscriptions))
    counter_tuples = list(map(attrgetter("counters"), rows))
    users_message.user_ids.extend(users)
    users_message.numbers = _packed(_column(_INT64, map(attrgetter("number"), rows)))
    users_message.plan_index = _packed(plan_ids)
    users_message.zone_index = _packed(zones)
    users_message.live_holds = _packed(_column(_UINT32, map(attrgetter("live_holds"), rows)))
    users_message.counter_counts = _packed(_column(_UINT32, map(len, counter_tuples)))
    customers = list(map(attrgetter("billing_customer_id"), subscriptions))
    if any(customers):
        users_message.billing_customer_ids.extend(customers)
    counters = list(chain.from_iterable(counter_tuples))
    slot_table = _encode_layouts(users_message, counters_message,
                                 list(map(attrgetter("layout"), rows)))
    counters_message.group_keys.extend(key for key, _ in slot_table)
    counters_message.group_windows = _packed(_column(_UINT32, (w for _, w in slot_table)))
    starts: list[int] = []
    counters_message.window_start_index = _packed(
        _indexed(starts, map(attrgetter("window_start_ns"), counters)))
    counters_message.window_starts_ns = _packed(_column(_INT64, starts))
    ends: list[int | None] = []
    counters_message.window_end_index = _packed(
        _indexed(ends, map(attrgetter("window_end_ns"), counters)))
    assert all(end_ns >= 0 for end_ns in ends if end_ns is not None)
    counters_message.window_ends_ns = _packed(_column(
        _INT64, [NO_WINDOW_END_NS if end_ns is None else end_ns for end_ns in ends]))
    counters_message.used = _packed(_column(_INT64, map(attrgetter("used"), counters)))
    counters_message.held = _packed(_column(_INT64, map(attrgetter("held"), counters)))
    counters_message.threshold_percent_fired = _packed(
        _column(_UINT32, map(attrgetter("threshold_percent_fired"), counters)))
    refilled_at = _column(_INT64, map(attrgetter("refilled_at_ns"), counters))
    carries = _column(_INT64, map(attrgetter("refill_carry"), counters))
    if any(refilled_at) or any(carries):  # only rate buckets have them
        counters_message.refilled_at_ns = _packed(refilled_at)
        counters_message.refill_carry = _packed(carries)
    for row, counter in enumerate(counters):
        if counter.balance is not None:  # few: a message each
            _encode_balance(counters_message.balances.add(), row, counter.balance)


def _encode_layouts(users_message: Any, counters_message: Any,
                    layouts: list[CounterLayout]) -> list[CounterSlot]:
    """Each user's layout as an index into a table of the distinct ones (told apart by
    identity: the core shares them), and each of those as its slots' indexes into the
    table of slots, returned; every counter row's slot index (group_index) follows from
    them, with no walk of the rows."""
    layout_ids = list(map(id, layouts))
    by_id = dict(zip(layout_ids, layouts))
    number_of = dict(zip(by_id, range(len(by_id))))
    layout_index = list(map(number_of.__getitem__, layout_ids))
    distinct = list(by_id.values())
    slot_table = list(dict.fromkeys(chain.from_iterable(distinct)))
    slot_number = {slot: number for number, slot in enumerate(slot_table)}
    layout_slots = [_packed(_column(_UINT32, map(slot_number.__getitem__, layout)))
                    for layout in distinct]
    users_message.layout_index = _packed(_column(_UINT32, layout_index))
    users_message.layout_slot_counts = _packed(_column(_UINT32, map(len, distinct)))
    users_message.layout_slots = b"".join(layout_slots)
    counters_message.group_index = b"".join(map(layout_slots.__getitem__, layout_index))
    return slot_table


_BALANCE_NUMBERS = ("owed", "grants_made", "takes", "forgotten_consumed",
                    "forgotten_consumed_order")
_GRANT_FIELDS = ("grant_id", "amount", "granted_at_ns", "priority", "number", "consumed",
                 "consumed_order", "expired", "kept", "recurring")


def _encode_balance(message: Any, row: int, balance: Balance) -> None:
    message.counter_row = row
    for name in _BALANCE_NUMBERS:
        setattr(message, name, getattr(balance, name))
    if balance.recurring_window_start_ns is not None:
        message.recurring_window_start_ns = balance.recurring_window_start_ns
    if balance.recurring_window_end_ns is not None:
        message.recurring_window_end_ns = balance.recurring_window_end_ns
    for grant in balance.grants:
        part = message.grants.add()
        for name in _GRANT_FIELDS:
            setattr(part, name, getattr(grant, name))
        if grant.expires_at_ns is not None:
            part.expires_at_ns = grant.expires_at_ns


def _balance(message: Any) -> Balance:
    balance = Balance(grants=[
        Grant(**{name: getattr(part, name) for name in _GRANT_FIELDS},
              expires_at_ns=part.expires_at_ns if part.HasField("expires_at_ns") else None)
        for part in message.grants], **{name: getattr(message, name) for name in _BALANCE_NUMBERS})
    if message.HasField("recurring_window_start_ns"):
        balance.recurring_window_start_ns = message.recurring_window_start_ns
    if message.HasField("recurring_window_end_ns"):
        balance.recurring_window_end_ns = message.recurring_window_end_ns
    return balance


def _indexed(table: Any, values: Iterator[Any]) -> array.array:
    """Each value's index in a table of the distinct values (appended to table, in order of
    first appearance)."""
    values = list(values)
    distinct = list(dict.fromkeys(values))
    table.extend(distinct)
    index = {value: number for number, value in enumerate(distinct)}
    return _column(_UINT32, map(index.__getitem__, values))


def _encode_hold(message: Any, reservation: Reservation) -> None:
    message.reservation_id = reservation_bytes(reservation.reservation_id)
    message.user_id = reservation.user_id
    message.event_type = reservation.event_type
    message.amount = reservation.amount
    for key, value in reservation.metadata:
        message.metadata.extend((key, value))
    for ref in reservation.holds:
        message.hold_keys.append(ref.key)
        message.hold_windows.append(int(ref.window))
        message.hold_window_starts_ns.append(ref.window_start_ns)
    if any(ref.rate != 1 for ref in reservation.holds):
        message.hold_rates.extend(ref.rate for ref in reservation.holds)
    message.sequence = reservation.sequence
    message.created_at_ns = reservation.created_at_ns
    message.expires_at_ns = reservation.expires_at_ns
    message.status = _HOLD_STATES.index(reservation.status)
    message.finished_at_ns = reservation.finished_at_ns


def _column(typecode: str, values: Any = ()) -> array.array:
    return array.array(typecode, values)


def _packed(column: array.array) -> bytes:
    """A column's bytes, little-endian whatever the host."""
    if sys.byteorder == "big":
        column = array.array(column.typecode, column)
        column.byteswap()
    return column.tobytes()


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# --- decoding ---------------------------------------------------------------------------------


def decode_core(body: bytes) -> Core:
    """The core a snapshot body holds; CorruptSnapshot if it is not one, whole."""
    return _decoded(body, None)


def core_with_delta(base: Core, encoded: bytes) -> Core:
    """The core a stored delta snapshot holds, read over the core of the whole snapshot it is
    a delta of (whose users it takes over: use only the core returned). Its users_changed are
    the delta's users, so that the next delta holds them too. CorruptSnapshot as for
    core_from_snapshot, and for a delta of another snapshot than base's."""
    return _read("delta snapshot", encoded, lambda body: _decoded(body, base))


def _decoded(body: bytes, base: Core | None) -> Core:
    if len(body) < _PREFIX_BYTES or body[:len(MAGIC)] != MAGIC:
        raise CorruptSnapshot("not a binary snapshot (no magic)")
    version = int.from_bytes(body[len(MAGIC):_PREFIX_BYTES], "big")
    if version not in READABLE_FORMAT_VERSIONS:
        raise CorruptSnapshot(f"binary snapshot format {version}, this server reads "
                              f"{' and '.join(map(str, READABLE_FORMAT_VERSIONS))}")
    try:
        message = snapshot_pb2.CoreSnapshot.FromString(zlib.decompress(body[_PREFIX_BYTES:]))
    except Exception as error:  # whatever a damaged body makes the decoding trip on
        raise CorruptSnapshot(f"unreadable: {error!r}") from error
    _check_bound_columns(message, version)
    if base is None and message.delta_of_sequence:
        raise CorruptSnapshot(f"a delta of the snapshot at sequence "
                              f"{message.delta_of_sequence}, not a whole one")
    if base is not None and message.delta_of_sequence != base.sequence:
        raise CorruptSnapshot(f"a delta of the snapshot at sequence "
                              f"{message.delta_of_sequence}, not of the one at {base.sequence}")
    try:
        with collector_paused():
            return _core(message, base)
    except CorruptSnapshot:
        raise
    except Exception as error:
        raise CorruptSnapshot(f"unreadable: {error!r}") from error


_FORMAT_3_BOUNDS = ("window_start_ns", "window_end_ns")
_FORMAT_4_BOUNDS = ("window_starts_ns", "window_start_index", "window_ends_ns",
                    "window_end_index")


def _check_bound_columns(message: Any, version: int) -> None:
    """The counters hold their window bounds as the snapshot's format says (the reader,
    _window_bounds, goes by the columns present): no column of the other format."""
    other = _FORMAT_4_BOUNDS if version == 3 else _FORMAT_3_BOUNDS
    for app_message in message.apps:
        found = [name for name in other if getattr(app_message.counters, name)]
        if found:
            raise CorruptSnapshot(f"app {app_message.app!r}: a format {version} snapshot with "
                                  f"column {found[0]}")


@contextmanager
def collector_paused() -> Iterator[None]:
    """Millions of objects are made at once: the cyclic collector would walk the growing
    heap again and again meanwhile, for nothing (none of them is garbage). On the way out,
    what was made joins the long-lived objects without a scan: frozen if the process froze
    any (as a serving server does), else in the oldest generation. Re-enabled as it was, the
    collector would otherwise walk all of it at its next young collections (0.63-0.66 s of a
    restart at 1,000,000 users)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            frozen_before = gc.get_freeze_count()
            gc.freeze()  # every generation into the permanent one; the young count to 0
            if frozen_before == 0:
                gc.unfreeze()  # ...and from there into the oldest, still unscanned
            gc.enable()


def _core(message: Any, base: Core | None) -> Core:
    """The core a snapshot message holds; with base, a delta's over base's users."""
    core = Core()
    core.sequence = message.sequence
    core.last_record_ns = message.last_record_ns
    core.users_numbered = message.users_numbered
    core.catalog_revision = message.catalog_revision
    core.idempotency_retention_ns = (message.idempotency_retention_ns
                                     or limits.IDEMPOTENCY_RETENTION_NS_MIN)
    expiry = []
    balances: list[tuple[str, str, str, Balance]] = []
    for app_message in message.apps:
        base_users = None
        if base is not None:
            base_users = base.apps[app_message.app].users if app_message.app in base.apps else {}
            core.users_changed[app_message.app] = set(app_message.users.user_ids).union(
                app_message.removed_user_ids)
        app, owned = _app(app_message, base_users)
        core.apps[app_message.app] = app
        expiry.extend((r.expires_at_ns, r.sequence, app_message.app, r.reservation_id)
                      for r in app.reservations.values() if r.status is HoldState.LIVE)
        balances.extend((app_message.app, user_id, key, balance)
                        for user_id, key, balance in owned)
    core.expiry = SortedList(expiry)
    if base is not None:  # the grants of the users the delta left as the whole one had them
        changed = core.users_changed
        core.grant_expiry = SortedList(
            entry for entry in base.grant_expiry
            if entry[1] in core.apps and entry[2] not in changed[entry[1]])
    core.index_grant_expiry(balances)
    core.forget = SortedList(_forget_entry(entry) for entry in json.loads(message.forget_json))
    for key in json.loads(message.keys_json):
        restored = from_plain(key, KeyState)
        core.keys[restored.key_id] = restored
    core.frozen_slots = set(message.frozen_slots)
    core.incoming_slots = set(message.incoming_slots)
    if message.moved_key_slots_json:
        core.moved_key_slots = {(app_id, (rpc, key)): slot for app_id, rpc, key, slot
                                in json.loads(message.moved_key_slots_json)}
    return core


def _forget_entry(entry: list[Any]) -> tuple[Any, ...]:
    forget_at_ns, sequence, kind, app_id, key = entry
    return (forget_at_ns, sequence, kind, app_id, tuple(key) if kind == "idempotency" else key)


def _app(message: Any, base_users: dict[str, UserState] | None
         ) -> tuple[AppState, list[tuple[str, str, Balance]]]:
    """An app from its message; a delta's (base_users given) with the users of the whole
    snapshot it is a delta of, less those removed, its own put over them. With it, the
    balances of the message's own users: (user id, group key, balance)."""
    app = AppState()
    for encoded in message.plans:
        plan = plan_from_message(log_pb2.Plan.FromString(encoded))
        app.plans[plan.id] = plan
    if len(message.subscriber_plan_ids) != len(message.subscriber_counts):
        raise CorruptSnapshot(f"app {message.app!r}: plan subscribers and counts differ")
    app.plan_subscribers = Tally(dict(zip(message.subscriber_plan_ids,
                                          message.subscriber_counts)))
    app.users, live_holds, owned = _users(message.users, message.counters)
    if base_users is not None:
        for user_id in message.removed_user_ids:
            base_users.pop(user_id, None)
        base_users.update(app.users)
        app.users = base_users
        live_holds = sum(map(attrgetter("live_holds"), base_users.values()))
    elif message.removed_user_ids:
        raise CorruptSnapshot(f"app {message.app!r}: removed users in a whole snapshot")
    app.departed = {number: Subscription(user_id=user_id, plan_id=plan_id, time_zone=zone,
                                         billing_customer_id=customer)
                    for number, user_id, plan_id, zone, customer in json.loads(
                        message.departed_json or "[]")}
    for hold in message.holds:
        reservation = _hold(message.app, hold)
        app.reservations[reservation.reservation_id] = reservation
    live = sum(1 for r in app.reservations.values() if r.status is HoldState.LIVE)
    if live != live_holds:
        raise CorruptSnapshot(f"app {message.app!r}: its users count {live_holds} live holds, "
                              f"the snapshot holds {live}")
    for rpc, key, request, result_type, result, created_at_ns in json.loads(
            message.idempotency_json):
        app.idempotency[(rpc, key)] = IdempotencyEntry(
            request, from_plain(result, RESULT_TYPES[result_type]), created_at_ns)
    return app, owned


def _users(users_message: Any, counters_message: Any
           ) -> tuple[dict[str, UserState], int, list[tuple[str, str, Balance]]]:
    """Every user with its counters, from the columns (each kind of object made in bulk, the
    shared strings and counter layouts taken from their tables), their live holds, and the
    balances among the counters: (user id, group key, balance)."""
    user_ids = list(users_message.user_ids)
    rows = len(user_ids)
    numbers = _unpacked(_INT64, users_message.numbers, rows, "numbers")
    plan_ids = [sys.intern(plan_id) for plan_id in users_message.plan_ids]
    zones = [sys.intern(zone) for zone in users_message.time_zones]
    plans = _from_table(plan_ids, users_message.plan_index, rows, "plans")
    zone_of = _from_table(zones, users_message.zone_index, rows, "zones")
    live_holds = _unpacked(_UINT32, users_message.live_holds, rows, "live holds")
    counts = _unpacked(_UINT32, users_message.counter_counts, rows, "counter counts")
    slot_table, counters, balance_rows = _counters(counters_message, sum(counts))
    customers = list(users_message.billing_customer_ids) or [""] * rows
    if len(customers) != rows:
        raise CorruptSnapshot(f"column billing customer ids: {len(customers)} for {rows} rows")
    # built in C, positionally: in Subscription's field order (tests/test_values.py holds it)
    subscriptions = list(map(Subscription, user_ids, plans, zone_of, customers))
    if users_message.layout_index:
        layouts = _tabled_layouts(users_message, slot_table, counts,
                                  counters_message.group_index)
    else:  # written before the layouts' table
        layouts = _layouts(slot_table, _table_rows(
            slot_table, counters_message.group_index, len(counters), "counter slots"), counts)
    counters_of = _runs(counters, counts)
    # in UserState's field order too
    users = dict(zip(user_ids, map(UserState, subscriptions, numbers, layouts, counters_of,
                                   live_holds)))
    if len(users) != rows:
        raise CorruptSnapshot(f"{rows} user rows but {len(users)} distinct users")
    owned = []
    if balance_rows:
        rows_to = list(accumulate(counts))  # a user's counters: the rows up to its entry here
        for row in balance_rows:
            user = bisect.bisect_right(rows_to, row)
            key, _ = list(layouts[user])[row - (rows_to[user - 1] if user else 0)]
            owned.append((user_ids[user], key, counters[row].balance))
    return users, sum(live_holds), owned


def _runs(counters: list[CounterState], counts: list[int]) -> list[tuple[CounterState, ...]]:
    """Each user's counters: the next `count` of them in order. When every user has as many
    (users of one plan), zip cuts the runs in C: 0.07 s at 1,000,000 users of two counters,
    where a tuple of islice per user took 0.25 s."""
    assert len(counters) == sum(counts), (len(counters), sum(counts))
    in_order = iter(counters)
    if counts and counts.count(counts[0]) == len(counts):
        return list(zip(*[in_order] * counts[0])) if counts[0] else [()] * len(counts)
    return [tuple(islice(in_order, count)) for count in counts]


def _tabled_layouts(users_message: Any, slot_table: list[CounterSlot], counts: list[int],
                    group_index: bytes) -> list[CounterLayout]:
    """Each user's counter layout, from the table of the distinct ones; CorruptSnapshot
    unless they place as many counters as the users have, at the slots their rows name."""
    slot_counts = _table_of(_UINT32, users_message.layout_slot_counts, "layout slot counts")
    numbers = _table_rows(slot_table, users_message.layout_slots, sum(slot_counts),
                          "layout slots")
    numbers_in_order = iter(numbers)
    table, table_rows = [], []
    for count in slot_counts:
        layout_numbers = tuple(islice(numbers_in_order, count))
        table.append(_layout(tuple(map(slot_table.__getitem__, layout_numbers))))
        table_rows.append(_packed(_column(_UINT32, layout_numbers)))  # as group_index has it
    users_layout = _table_rows(table, users_message.layout_index, len(counts), "layouts")
    if (list(map(slot_counts.__getitem__, users_layout)) != counts
            or b"".join(map(table_rows.__getitem__, users_layout)) != group_index):
        raise CorruptSnapshot("the users' layouts and their counters' slots differ")
    return list(map(table.__getitem__, users_layout))


def _layouts(slot_table: list[CounterSlot], slot_rows: list[int], counts: list[int]
             ) -> list[CounterLayout]:
    """Each user's counter layout, from the slots of its counter rows (indexes into the
    table), for a snapshot written without the layouts' table: the core's shared layouts,
    one made per distinct run of slots, none per user."""
    rows_in_order = iter(slot_rows)
    runs = [tuple(islice(rows_in_order, count)) for count in counts]
    made = {run: _layout(tuple(map(slot_table.__getitem__, run))) for run in set(runs)}
    return list(map(made.__getitem__, runs))


def _layout(slots: tuple[CounterSlot, ...]) -> CounterLayout:
    if len(set(slots)) != len(slots):
        raise CorruptSnapshot(f"a user with two counters at one slot: {slots!r}")
    return layout_of(slots)


def _counters(message: Any, rows: int
              ) -> tuple[list[CounterSlot], list[CounterState], list[int]]:
    """The table of slots, the counter of every row (in order), and the rows with a
    balance."""
    windows = _unpacked(_UINT32, message.group_windows, len(message.group_keys), "windows")
    table = [(sys.intern(key), Window(window)) for key, window in zip(message.group_keys,
                                                                      windows)]
    starts, ends = _window_bounds(message, rows)
    zeros = bytes(rows * _INT64_BYTES)
    counters = list(map(
        CounterState, starts, ends,
        _unpacked(_INT64, message.used, rows, "used"),
        _unpacked(_INT64, message.held, rows, "held"),
        _unpacked(_UINT32, message.threshold_percent_fired, rows, "thresholds"),
        _unpacked(_INT64, message.refilled_at_ns or zeros, rows, "refilled at"),
        _unpacked(_INT64, message.refill_carry or zeros, rows, "refill carries")))
    balance_rows = []
    for balance_message in message.balances:
        row = balance_message.counter_row
        if row >= rows or (balance_rows and row <= balance_rows[-1]):
            raise CorruptSnapshot(f"a balance of counter row {row}, past the {rows} rows "
                                  f"or not after the row before")
        counters[row].balance = _balance(balance_message)
        balance_rows.append(row)
    return table, counters, balance_rows


def _window_bounds(message: Any, rows: int) -> tuple[list[int], list[int | None]]:
    """Each counter row's window start and end. Format 4 names them by index in tables of
    the distinct bounds: a bound that many counters share is then one object, as in the
    core that wrote them (core.windows hands out the bounds it computed last), where a
    column of every row's (format 3) made one per row: 128 bytes per user of two counters.
    The columns present say which (_check_bound_columns held them to the format's version)."""
    if message.window_start_ns or message.window_end_ns:  # format 3
        return (_unpacked(_INT64, message.window_start_ns, rows, "window starts"),
                _ends(_unpacked(_INT64, message.window_end_ns, rows, "window ends")))
    start_table = _table(message.window_starts_ns, "window start table")
    end_table = _ends(_table(message.window_ends_ns, "window end table"))
    return (_from_table(start_table, message.window_start_index, rows, "window starts"),
            _from_table(end_table, message.window_end_index, rows, "window ends"))


def _ends(stored: list[int]) -> list[int | None]:
    """Window ends as stored to the core's: None for a window that never ends."""
    return [None if end_ns == NO_WINDOW_END_NS else end_ns for end_ns in stored]


def _table(packed: bytes, name: str) -> list[int]:
    """A table of int64 values, as many as its bytes hold."""
    return _table_of(_INT64, packed, name)


def _table_of(typecode: str, packed: bytes, name: str) -> list[int]:
    """A table of values of this type code, as many as its bytes hold."""
    return _unpacked(typecode, packed, len(packed) // array.array(typecode).itemsize, name)


def _from_table(table: list[Any], index: bytes, rows: int, name: str) -> list[Any]:
    """A column given as indexes (uint32) into a table of its distinct values: the rows
    refer to the table's objects, none made per row. When every row is the table's first
    (one plan, one time zone, one window), the list is made at once: ~1 ms at 1,000,000
    rows, where a lookup per row took ~25."""
    if rows and table and len(index) == rows * _UINT32_BYTES and _all_zero(index):
        return [table[0]] * rows
    return list(map(table.__getitem__, _table_rows(table, index, rows, name)))


def _table_rows(table: list[Any], index: bytes, rows: int, name: str) -> list[int]:
    """The indexes (uint32) of such a column, each checked to be in the table."""
    rows_index = _unpacked(_UINT32, index, rows, f"{name} index")
    if rows_index and max(rows_index) >= len(table):
        raise CorruptSnapshot(f"column {name} index: {max(rows_index)} past the table's "
                              f"{len(table)} entries")
    return rows_index


def _all_zero(packed: bytes) -> bool:
    """Every byte 0: one comparison in C (~1.4 ms for 16 MB)."""
    return packed == bytes(len(packed))


def _unpacked(typecode: str, packed: bytes, rows: int, name: str) -> list[int]:
    """A column's values. Many columns are 0 in every row (holds held, thresholds fired, live
    holds): their list is made at once, ~10 ms less at 2,000,000 rows than through an array."""
    column = array.array(typecode)
    if len(packed) != rows * column.itemsize:
        raise CorruptSnapshot(f"column {name}: {len(packed)} bytes for {rows} rows of "
                              f"{column.itemsize}")
    if _all_zero(packed):
        return [0] * rows
    column.frombytes(packed)
    if sys.byteorder == "big":
        column.byteswap()
    return column.tolist()


def _hold(app_id: str, message: Any) -> Reservation:
    metadata = list(message.metadata)
    rates = list(message.hold_rates) or [1] * len(message.hold_keys)
    if len(metadata) % 2 or not (len(message.hold_keys) == len(message.hold_windows)
                                 == len(message.hold_window_starts_ns) == len(rates)):
        raise CorruptSnapshot(f"hold {message.reservation_id.hex()}: uneven fields")
    return Reservation(
        app=app_id, reservation_id=RESERVATION_ID_PREFIX + message.reservation_id.hex(),
        user_id=message.user_id, event_type=message.event_type, amount=message.amount,
        metadata=tuple(zip(metadata[0::2], metadata[1::2])),
        holds=tuple(HoldRef(key, Window(window), start_ns, rate)
                    for key, window, start_ns, rate in zip(
                        message.hold_keys, message.hold_windows,
                        message.hold_window_starts_ns, rates)),
        sequence=message.sequence, created_at_ns=message.created_at_ns,
        expires_at_ns=message.expires_at_ns, status=_HOLD_STATES[message.status],
        finished_at_ns=message.finished_at_ns)
