"""Small builders for tests of the pure core: a real Core, a fake clock, every record kept.

Nothing here is a mock: `Harness` drives `quotad.core.Core` through `apply(command, now_ns)`
exactly as the writer does, with a clock that only moves when a test moves it. Every record the
core makes is kept, so a test can replay the whole run into a fresh Core and compare digests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from quotad.core import limits
from quotad.core.commands import (
    Commit, CommitResult, CounterView, DeletePlan, ExpireHolds, Extend, ExtendResult, GetUsage,
    Record, Release, ReleaseResult, Reserve, ReserveResult, Track, TrackResult, UpsertPlan,
    UpsertSubscription,
)
from quotad.core.machine import Core, Outcome
from quotad.core.plans import LimitGroup, Match, Metadata, MetadataMatch, Plan, Window

S = limits.NS_PER_S
MINUTE = 60 * S
HOUR = 3600 * S
DAY = 86400 * S

T0 = 1_741_003_200 * S
"""2025-03-03 12:00:00 UTC, a Monday, on an exact hour (and minute) boundary."""

APP = "app"


# --- values -------------------------------------------------------------------------------


def rid(n: int) -> str:
    """A well-formed reservation id, as the server would generate it."""
    return f"rsv_{n:024x}"


def md(pairs: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> Metadata:
    """Event metadata in the core's canonical form: (key, value) pairs sorted by key."""
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    return tuple(sorted(items))


def group(key: str, quota: int, window: Window = Window.HOUR, event_types: Iterable[str] = (),
          metadata: Mapping[str, Iterable[str]] | None = None, *, label: str = "",
          unit: str = "") -> LimitGroup:
    match = Match(
        event_types=tuple(event_types),
        metadata=tuple(MetadataMatch(key=k, values=tuple(v)) for k, v in (metadata or {}).items()),
    )
    return LimitGroup(key=key, label=label, unit=unit, quota=quota, window=window, match=match)


def plan(plan_id: str, *groups: LimitGroup, name: str = "") -> Plan:
    return Plan(id=plan_id, name=name, limit_groups=tuple(groups))


def view_tuple(view: CounterView) -> tuple:
    """The numbers of a counter view, for compact comparisons."""
    return (view.key, view.quota, view.used, view.held, view.remaining, view.window_start_ns,
            view.resets_at_ns)


def fields_of(error: Exception) -> set[str]:
    """The field names an InvalidArgument names."""
    return {v.field for v in error.violations}  # type: ignore[attr-defined]


# --- digest and replay --------------------------------------------------------------------


def digest(core: Core) -> str:
    """A structural digest of everything the core holds: equal digests, equal states.

    Dicts are sorted by key so that only content counts, never insertion order; sorted
    containers are listed in their order (which is part of their content)."""
    apps = []
    for app_id in sorted(core.apps):
        app = core.apps[app_id]
        users = []
        for user_id in sorted(app.users):
            user = app.users[user_id]
            counters = sorted((repr(k), repr(c)) for k, c in user.counter_items())
            users.append((user_id, repr(user.subscription), counters, user.live_holds))
        apps.append((
            app_id,
            sorted((k, repr(p)) for k, p in app.plans.items()),
            users,
            sorted((k, repr(r)) for k, r in app.reservations.items()),
            sorted((repr(k), repr(e.fingerprinted())) for k, e in app.idempotency.items()),
            sorted(app.plan_subscribers.items()),
        ))
    return repr((apps, core.sequence, core.last_record_ns, list(core.expiry), list(core.forget)))


def replay_all(records: Iterable[Record]) -> Core:
    """A fresh Core that replayed the records; Core.replay checks each reproduces itself."""
    core = Core()
    for record in records:
        core.replay(record)
    return core


# --- the harness --------------------------------------------------------------------------


class Harness:
    """One Core, one fake clock (ns, only moved by the test), one app, all records kept."""

    def __init__(self, now: int = T0, app: str = APP) -> None:
        self.core = Core()
        self.now = now
        self.app = app
        self.records: list[Record] = []
        self._next_rid = 0

    # clock
    def advance(self, ns: int) -> int:
        assert ns >= 0
        self.now += ns
        return self.now

    def at(self, now: int) -> int:
        assert now >= self.now, (now, self.now)
        self.now = now
        return self.now

    # the way in
    def apply(self, command: Any) -> Outcome:
        outcome = self.core.apply(command, self.now)
        self.records.extend(outcome.records)
        return outcome

    def run(self, command: Any) -> Any:
        """Applies the command: its result, or its error raised."""
        outcome = self.apply(command)
        if outcome.error is not None:
            raise outcome.error
        return outcome.result

    def new_rid(self) -> str:
        self._next_rid += 1
        return rid(self._next_rid)

    # administration
    def upsert_plan(self, the_plan: Plan, app: str | None = None) -> Any:
        return self.run(UpsertPlan(app=app or self.app, plan=the_plan))

    def subscribe(self, user_id: str, plan_id: str, time_zone: str = "UTC",
                  app: str | None = None) -> Any:
        return self.run(UpsertSubscription(app=app or self.app, user_id=user_id,
                                           plan_id=plan_id, time_zone=time_zone))

    def setup(self, the_plan: Plan, *users: str, time_zone: str = "UTC") -> Harness:
        """Upserts the plan and subscribes the users to it."""
        self.upsert_plan(the_plan)
        for user in users:
            self.subscribe(user, the_plan.id, time_zone)
        return self

    def delete_plan(self, plan_id: str) -> Any:
        return self.run(DeletePlan(app=self.app, plan_id=plan_id))

    # the hot path
    def reserve_command(self, user: str, amount: int, event_type: str = "openai.chat",
                        metadata: Mapping[str, str] | Metadata = (), *,
                        ttl_ns: int = limits.TTL_NS_DEFAULT, key: str = "",
                        reservation_id: str | None = None, app: str | None = None) -> Reserve:
        return Reserve(app=app or self.app, user_id=user, event_type=event_type, amount=amount,
                       metadata=md(metadata), ttl_ns=ttl_ns, idempotency_key=key,
                       reservation_id=reservation_id or self.new_rid())

    def reserve(self, user: str, amount: int, event_type: str = "openai.chat",
                metadata: Mapping[str, str] | Metadata = (), **kwargs: Any) -> ReserveResult:
        return self.run(self.reserve_command(user, amount, event_type, metadata, **kwargs))

    def commit(self, reservation_id: str, amount: int | None = None, *, key: str = "",
               app: str | None = None) -> CommitResult:
        return self.run(Commit(app=app or self.app, reservation_id=reservation_id,
                               amount=amount, idempotency_key=key))

    def release(self, reservation_id: str, *, key: str = "",
                app: str | None = None) -> ReleaseResult:
        return self.run(Release(app=app or self.app, reservation_id=reservation_id,
                                idempotency_key=key))

    def extend(self, reservation_id: str, ttl_ns: int, *, key: str = "") -> ExtendResult:
        return self.run(Extend(app=self.app, reservation_id=reservation_id, ttl_ns=ttl_ns,
                               idempotency_key=key))

    def track_command(self, user: str, amount: int, event_type: str = "openai.chat",
                      metadata: Mapping[str, str] | Metadata = (), *, key: str = "",
                      enforce: bool = False, app: str | None = None) -> Track:
        return Track(app=app or self.app, user_id=user, event_type=event_type, amount=amount,
                     metadata=md(metadata), idempotency_key=key, enforce=enforce)

    def track(self, user: str, amount: int, event_type: str = "openai.chat",
              metadata: Mapping[str, str] | Metadata = (), **kwargs: Any) -> TrackResult:
        return self.run(self.track_command(user, amount, event_type, metadata, **kwargs))

    def expire(self) -> Outcome:
        return self.apply(ExpireHolds())

    # reads
    def usage(self, user: str, app: str | None = None) -> dict[str, CounterView]:
        result = self.run(GetUsage(app=app or self.app, user_id=user))
        return {view.key: view for view in result.counters}

    def counter(self, user: str, key: str) -> CounterView:
        return self.usage(user)[key]

    # state
    def digest(self) -> str:
        return digest(self.core)

    def replayed(self) -> Core:
        return replay_all(self.records)
