"""The snapshot format before binary snapshots: the whole core as plain JSON-able data and back.

Read, never written, by the server: a data directory whose latest snapshot is of this format
(zlib'd JSON, snapshot formats 1 and 2) loads it once, and the next snapshot it stores is
binary (snapshot.py). `quotad migrate` reads format 3's (format 1) through here too.

Pure (no I/O). `core_to_plain` copies the state; it stays to make such snapshots in tests.
"""

from __future__ import annotations

from collections import Counter as Tally
from typing import Any

from sortedcontainers import SortedList

from quotad.storage.codec import from_plain, to_plain
from quotad.core.balances import Balance, Grant
from quotad.core.commands import RESULT_TYPES
from quotad.core.machine import (
    AppState, Core, CounterState, IdempotencyEntry, KeyState, Reservation, UserState,
    file_counter, request_fingerprint,
)
from quotad.core.plans import Plan, Subscription, Window

FORMAT_VERSION = 2
"""2: users carry their number (the audit index's name for them). The last JSON format."""


def core_to_plain(core: Core) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "sequence": core.sequence,
        "last_record_ns": core.last_record_ns,
        "users_numbered": core.users_numbered,
        "apps": {app_id: _app_to_plain(app_id, app, *core.pending_durable())
                 for app_id, app in sorted(core.apps.items())},
        "expiry": to_plain(core.expiry),
        "forget": to_plain(core.forget),
        "keys": [to_plain(key) for _, key in sorted(core.keys.items())],
    }


def _app_to_plain(app_id: str, app: AppState, pending_keys: frozenset[tuple[str, Any]],
                  pending_holds: frozenset[str]) -> dict[str, Any]:
    """The app's state, less the keys and finished holds that are in memory only until their
    records are durable: a snapshot is stored once those records are, and the log has them."""
    return {
        "plans": [to_plain(plan) for _, plan in sorted(app.plans.items())],
        "users": [
            [user_id, user.number, to_plain(user.subscription), user.live_holds,
             [[key, window.name, to_plain(counter)]
              for (key, window), counter in user.counter_items()]]
            for user_id, user in app.users.items()
        ],
        "reservations": [to_plain(r) for r in app.reservations.values()
                         if r.reservation_id not in pending_holds],
        "idempotency": [
            [rpc, key, request_fingerprint(entry.request), type(entry.result).__name__,
             to_plain(entry.result), entry.created_at_ns]
            for (rpc, key), entry in app.idempotency.items()
            if (app_id, (rpc, key)) not in pending_keys
        ],
        "plan_subscribers": sorted([plan_id, n] for plan_id, n in app.plan_subscribers.items()),
    }


def core_from_plain(plain: dict[str, Any]) -> Core:
    if plain.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"snapshot format {plain.get('format_version')!r}, this server reads "
                         f"{FORMAT_VERSION}")
    core = Core()
    core.sequence = plain["sequence"]
    core.last_record_ns = plain["last_record_ns"]
    core.users_numbered = plain["users_numbered"]
    core.apps = {app_id: _app_from_plain(app) for app_id, app in plain["apps"].items()}
    core.expiry = SortedList(tuple(entry) for entry in plain["expiry"])
    core.rebuild_grant_expiry()
    core.forget = SortedList(_forget_entry(entry) for entry in plain["forget"])
    for key in plain["keys"]:
        restored = from_plain(key, KeyState)
        core.keys[restored.key_id] = restored
    return core


def _forget_entry(entry: list[Any]) -> tuple[Any, ...]:
    forget_at_ns, sequence, kind, app_id, key = entry
    return (forget_at_ns, sequence, kind, app_id, tuple(key) if kind == "idempotency" else key)


def _balance(plain: dict[str, Any]) -> Balance:
    grants = [Grant(**grant) for grant in plain.pop("grants")]
    return Balance(grants=grants, **plain)


def _app_from_plain(plain: dict[str, Any]) -> AppState:
    app = AppState()
    for plan in plain["plans"]:
        app.plans[plan["id"]] = from_plain(plan, Plan)
    for user_id, number, subscription, live_holds, counters in plain["users"]:
        user = UserState(subscription=from_plain(subscription, Subscription), number=number,
                         live_holds=live_holds)
        for key, window, counter in counters:
            balance = counter.pop("balance", None)  # absent before credit balances
            file_counter(user, key, Window[window], CounterState(
                **counter, balance=None if balance is None else _balance(balance)))
        app.users[user_id] = user
    for reservation in plain["reservations"]:
        restored = from_plain(reservation, Reservation)
        app.reservations[restored.reservation_id] = restored
    for rpc, key, request, result_type, result, created_at_ns in plain["idempotency"]:
        app.idempotency[(rpc, key)] = IdempotencyEntry(
            request, from_plain(result, RESULT_TYPES[result_type]), created_at_ns)
    app.plan_subscribers = Tally({plan_id: n for plan_id, n in plain["plan_subscribers"]})
    return app
