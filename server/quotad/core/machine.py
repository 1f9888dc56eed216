"""The quota state machine: pure, synchronous, deterministic.

It imports nothing from asyncio, grpc or lmdb and owns no clock: `apply(command, now_ns)` is
the only way in, for a live command and for one replayed from the log alike. A command is
checked completely before anything changes, so a refused one leaves the state as it was.
Every change yields a log record; replaying the records rebuilds the same state.

Expiry is a command too: before applying anything at `now_ns`, the core expires every hold
with `expires_at_ns <= now_ns` and records that as an ExpireHolds record of its own.
"""

from __future__ import annotations

import hashlib
import marshal
from functools import cache
from operator import attrgetter
from collections import Counter as Tally
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from sortedcontainers import SortedList

from quotad.core import balances, buckets, limits
from quotad.core.balances import Balance, Grant
from quotad.core.commands import (
    CATALOG_COMMANDS, AdoptSlots, ForgetSlots, FreezeSlots, MovedKey, MovedUser, SlotsResult,
    ThawSlots, AuditEvent, Command, Commit, CommitResult, CounterView, CreateKey, DeletePlan,
    DeletePlanResult, ExpiredGrant, ExpiredHold, GrantCredits, GrantResult, GrantsResult,
    GrantView, KeyResult, KeysResult, KeyView, ListGrants, ListKeys, RevokeKey,
    ExpireHolds, ExpireResult, Extend, ExtendResult, GetPlan, GetSubscription, GetUsage,
    ListPlans, ListSubscriptions, PlanResult, PlansResult, Record, Release, ReleaseResult,
    Reserve, ReserveResult, RetentionResult, SetIdempotencyRetention, SubscriptionResult,
    SubscriptionsResult, Track, TrackResult, UpsertPlan, UpsertSubscription, UsageResult,
)
from quotad.core.errors import (
    AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, NotFound,
    PermissionDenied, QuotaError, ResourceExhausted, SlotsMoving,
)
from quotad.core.holds import HoldEvent, HoldState, next_state
from quotad.core.memo import remember
from quotad.core.values import replace, state_type, value_fields, value_type
from quotad.core.plans import (
    Kind, LimitGroup, Metadata, Plan, Subscription, Window, load_time_zone,
)
from quotad.core.windows import latest_window_bounds
from quotad_contract.errors import ErrorReason
from quotad_contract.shards import slot_of, slot_of_reservation


@state_type
class CounterState:
    """Usage of one limit group in one window. Only the latest window is kept."""

    window_start_ns: int
    window_end_ns: int | None
    used: int = 0
    held: int = 0
    threshold_percent_fired: int = 0
    """The highest of limits.WATCH_THRESHOLDS_PERCENT already recorded for this window (0:
    none); a new window starts a new CounterState, so each threshold fires once per window."""
    refilled_at_ns: int = 0
    """A RATE group's bucket: the time `used` was last refilled to (see core.buckets)."""
    refill_carry: int = 0
    """A RATE group's bucket: quota x ns refilled past the last whole token, below period_ns."""
    balance: Balance | None = None
    """A BALANCE group's grants (core.balances); `used` is then balance.used(), kept in step,
    and `held` what live holds reserved on the balance."""


@value_type
class HoldRef:
    """Which counter (group and window) a hold counts in, for as long as it lives."""

    key: str
    window: Window
    window_start_ns: int
    rate: int = 1
    """What one unit of the hold's amount counts in this group: fixed when the hold is
    taken, so that its commit counts at the same rate whatever the plan says by then."""

    def counted(self, amount: int) -> int:
        return amount * self.rate


@state_type
class Reservation:
    app: str
    reservation_id: str
    user_id: str
    event_type: str
    amount: int
    metadata: Metadata
    holds: tuple[HoldRef, ...]
    sequence: int
    created_at_ns: int
    expires_at_ns: int
    status: HoldState = HoldState.LIVE
    finished_at_ns: int = 0

    def copy(self) -> Reservation:
        """The hold as it is now (its fields are values: a shallow copy is whole)."""
        return self.__copy__()  # type: ignore[attr-defined,no-any-return]


CounterSlot = tuple[str, Window]
"""Where a user's counter is filed: (limit group key, window)."""
CounterLayout = dict[CounterSlot, int]
"""Each slot a user has a counter in -> the counter's place in the user's tuple of them, in
the order they came. One layout is shared by every user whose counters came in that order,
and is never changed: a user's new slot gives it another (file_counter)."""
_NO_COUNTERS: CounterLayout = {}


@state_type
class UserState:
    subscription: Subscription
    number: int
    """Given at the first subscription, once per (app, user) and never again: the audit
    index's short name for the user."""
    layout: CounterLayout = field(default_factory=lambda: _NO_COUNTERS)
    """Where each of `counters` is: shared, never changed (see CounterLayout)."""
    counters: tuple[CounterState, ...] = ()
    """The user's counters, in the layout's order. A tuple and a shared layout, where a dict
    of its own would cost each user of two counters ~170 bytes more."""
    live_holds: int = 0

    def counter(self, key: str, window: Window) -> CounterState | None:
        """The counter filed at (key, window); None if the user has none there."""
        index = self.layout.get((key, window))
        return None if index is None else self.counters[index]

    def counter_items(self) -> Iterator[tuple[CounterSlot, CounterState]]:
        """((key, window), counter) of every counter, in the order they came."""
        return zip(self.layout, self.counters, strict=True)


def file_counter(user: UserState, key: str, window: Window, counter: CounterState) -> None:
    """Files the counter at (key, window): in the place of the one there, else after the
    user's others (the user then takes the layout with that slot too)."""
    counters = user.counters
    index = user.layout.get((key, window))
    if index is None:
        user.layout = layout_of((*user.layout, (key, window)))
        user.counters = (*counters, counter)
    elif counters[index] is not counter:
        user.counters = (*counters[:index], counter, *counters[index + 1:])


_layouts: dict[tuple[CounterSlot, ...], CounterLayout] = {}
"""The slots of each layout, in order -> the layout. Bounded: limits.COUNTER_LAYOUTS_MAX."""


def layout_of(slots: tuple[CounterSlot, ...]) -> CounterLayout:
    """The shared layout of these slots, in this order (each slot once)."""
    layout = _layouts.get(slots)
    if layout is None:
        layout = {slot: index for index, slot in enumerate(slots)}
        assert len(layout) == len(slots), slots
        remember(_layouts, slots, layout, limits.COUNTER_LAYOUTS_MAX)
    return layout


@value_type
class IdempotencyEntry:
    request: Any
    """The request that made the entry: its command; once read back from a snapshot, that
    command's fingerprint (`request_fingerprint`). A repeat is matched against either
    (`_same_request`)."""
    result: Any
    created_at_ns: int

    def fingerprinted(self) -> IdempotencyEntry:
        """The entry as a snapshot keeps it: its request's fingerprint in place of it."""
        if type(self.request) is str:
            return self
        return IdempotencyEntry(_fingerprint(self.request), self.result, self.created_at_ns)


@dataclass(slots=True)
class AppState:
    plans: dict[str, Plan] = field(default_factory=dict)
    users: dict[str, UserState] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)
    idempotency: dict[tuple[str, str], IdempotencyEntry] = field(default_factory=dict)
    plan_subscribers: Tally[str] = field(default_factory=Tally)
    departed: dict[int, Subscription] = field(default_factory=dict,
                                              metadata={"plain": "omit_empty"})
    """The subscriptions of users whose slots moved to another shard, by their number here:
    their audit events from before the move stay in this shard's log, which names them by
    number, and a usage export names them by user id (one entry per user moved away)."""


@dataclass(slots=True)
class KeyState:
    """An API key as stored: its hash, never the key. Keys are global by key_id, each
    belonging to one app; a revoked key is kept, with when it was revoked."""

    key_id: str
    app: str
    kind: str
    name: str
    secret_sha256: str
    token_signing_key: str
    created_at_ns: int
    revoked_at_ns: int | None = None

    def view(self) -> KeyView:
        return KeyView(key_id=self.key_id, app=self.app, kind=self.kind, name=self.name,
                       created_at_ns=self.created_at_ns, revoked_at_ns=self.revoked_at_ns)


@value_type
class Outcome:
    """What apply() gives back: a result or an error, and the records to make durable."""

    result: Any
    error: QuotaError | None
    records: tuple[Record, ...]


_EMPTY_APP = AppState()
_CATALOG_TYPES = frozenset(CATALOG_COMMANDS)


def _copied_counter(counter: CounterState) -> CounterState:
    """A counter that shares nothing mutable with the one copied."""
    copied = replace(counter)
    if counter.balance is not None:
        copied.balance = counter.balance.copy()
    return copied


def moved_key(app_id: str, key: tuple[str, str], entry: IdempotencyEntry,
              slot: int) -> MovedKey:
    """An idempotency entry as a move carries it."""
    return MovedKey(app=app_id, rpc=key[0], key=key[1], request=request_fingerprint(entry.request),
                    result=entry.result, created_at_ns=entry.created_at_ns, slot=slot)


def _fingerprint(command: Any) -> str:
    """What makes two requests the same for idempotency: a digest of every field the caller
    chose (compact to keep for 24 h, and plain to put in a snapshot). The fields are str,
    int, bool, None and tuples of those, which marshal's version 0 writes with their types
    and lengths and without references, so equal requests give equal bytes."""
    chosen = _chosen_fields(type(command))(command)
    return hashlib.blake2b(marshal.dumps((type(command).__name__, chosen), 0),
                           digest_size=16).hexdigest()


def request_fingerprint(request: Any) -> str:
    """An idempotency entry's request as a snapshot keeps it: its fingerprint."""
    return request if type(request) is str else _fingerprint(request)


def _same_request(made: Any, command: Any) -> bool:
    """Whether a command repeats the request that made an idempotency entry: field by field
    against the command that made it (the fields a fingerprint digests, compared rather than
    hashed: a key's first use then costs no digest); against its fingerprint once read back
    from a snapshot. The fields are validated values of fixed types (no bool where an int
    goes), so equal fields are equal fingerprints."""
    if type(made) is str:
        return made == _fingerprint(command)
    chosen = _chosen_fields(type(command))
    return type(made) is type(command) and chosen(made) == chosen(command)


@cache
def _chosen_fields(command_type: type) -> Callable[[Any], tuple[Any, ...]]:
    ignored = {"idempotency_key", "reservation_id"} if command_type is Reserve else {
        "idempotency_key"}
    names = [name for name in value_fields(command_type) if name not in ignored]
    assert len(names) >= 2, command_type  # attrgetter of two or more names gives a tuple
    return attrgetter(*names)


_USER_COMMANDS = frozenset({Reserve, Track, GetUsage, GrantCredits, ListGrants,
                            UpsertSubscription, GetSubscription})
_HOLD_COMMANDS = frozenset({Commit, Release, Extend})


def command_slot(command: Any) -> int | None:
    """The slot of the user (or hold) a command is about; None for one about no user."""
    kind = type(command)
    if kind in _USER_COMMANDS:
        return slot_of(command.app, command.user_id)
    if kind in _HOLD_COMMANDS:
        return slot_of_reservation(command.reservation_id)
    return None


class Core:
    def __init__(self) -> None:
        self.apps: dict[str, AppState] = {}
        self.keys: dict[str, KeyState] = {}
        """API keys by key_id, of every app."""
        self.sequence = 0
        """Sequence number of the last record made."""
        self.catalog_revision = 0
        """The etcd revision of the last change of a cluster's catalog applied (0: none):
        a shard follows the catalog on from the next one."""
        self.users_numbered = 0
        """The number the latest new subscriber got (UserState.number)."""
        self.last_record_ns = 0
        self.expiry: SortedList = SortedList()
        """(expires_at_ns, sequence, app, reservation_id) of every live hold."""
        self.grant_expiry: SortedList = SortedList()
        """(expires_at_ns, app, user_id, group key, grant_id) of every live credit grant
        with an expiry, but recurring ones (they end with their window, at the balance's
        next change). Derived from the balances: rebuilt by rebuild_grant_expiry()."""
        self.forget: SortedList = SortedList()
        """(forget_at_ns, sequence, kind, app, key): finished holds and idempotency keys."""
        self.idempotency_retention_ns = limits.IDEMPOTENCY_RETENTION_NS_MIN
        """How long a key is answered as a repeat after its first use: the retention in force
        (SetIdempotencyRetention), whatever it was when the key was first used."""
        self.durable_idempotency: Callable[[str, str, str, int],
                                           IdempotencyEntry | None] | None = None
        """Where idempotency keys live once their records are durable, (app, rpc, key, as of
        sequence) -> the entry, or None: keys are then kept in memory only until durable
        (`forget_durable`). Unset (a core alone), memory keeps them for their
        whole retention."""
        self._idempotency_pending: deque[tuple[int, str, tuple[str, str]]] = deque()
        """(sequence, app, slot) of keys in memory that a durable store will hold."""
        self.durable_hold: Callable[[str, int], Reservation | None] | None = None
        """Where finished holds live once their records are durable: (reservation id, as of
        sequence) -> the hold, or None. Unset (a core alone), memory keeps them 1 h."""
        self._holds_pending: deque[tuple[int, str, str]] = deque()
        """(sequence, app, reservation id) of finished holds in memory until durable."""
        self._holds_latest: dict[str, int] = {}
        """The latest pending sequence of each of those: an older one leaves it in memory."""
        self._finished: list[Reservation] = []
        """Copies of the holds the command being applied finished; they go into its record."""
        self._matched_cache: dict[tuple[int, str, Metadata],
                                  tuple[Plan, tuple[tuple[LimitGroup, int], ...]]] = {}
        """(id(plan), event type, metadata) -> (plan, the groups they match, with their
        rates): match rules and costs run
        once per distinct request shape. The entry holds the plan, so its id is not reused
        while the entry lives."""
        self._events: list[AuditEvent] = []
        """Audit events of the command being applied; they go into its record."""
        self._answering = True
        """False while a record that keeps no answer is replayed: nothing reads its result,
        so the counter views a commit, release, track or allowed reserve answers with are
        left out (a tenth of replay's time). Set by replay() only."""
        self._replaying = False
        """True while a record read back from the log is applied (replay()). A keyed record
        in the log is its key's first use, or a use past the first's retention: a repeat
        within it made no record. So replay neither looks its key up (in memory it would find
        nothing unexpired; the log's lookup, durable_idempotency, finds the use the
        idempotency table's row names, the key's latest, never one before the record
        replayed) nor keeps it (every record replayed is durable: the log answers for it).
        A core alone (no durable_idempotency) keeps keys in memory, as its state: its replay
        makes them as apply() did. Finished holds likewise leave memory as they finish
        (_hold_changed)."""
        self.frozen_slots: set[int] = set()
        """Slots moving away (FreezeSlots): their users' calls are refused SLOTS_MOVING."""
        self.incoming_slots: set[int] = set()
        """Slots moving in (AdoptSlots) that the shard map may not name this shard's yet."""
        self.moved_key_slots: dict[tuple[str, tuple[str, str]], int] = {}
        """(app, (rpc, key)) -> slot of the idempotency entries a move brought in: memory
        keeps them (as fingerprints, which name no user) for their retention."""
        self.users_changed: dict[str, set[str]] = {}
        """app -> the ids of its users that a command may have changed (or removed) since
        clear_users_changed(): what a delta snapshot holds of the users. Marked where a
        command takes a user's state in hand, so a read through apply may mark one too (a
        delta then holds it unchanged). At most every user: bounded by the state."""
        self._handlers: dict[type, Callable[[Any, int], tuple[Any, bool]]] = {
            Reserve: self._reserve, Commit: self._commit, Release: self._release,
            Extend: self._extend, Track: self._track, GetUsage: self._get_usage,
            UpsertPlan: self._upsert_plan, DeletePlan: self._delete_plan,
            GetPlan: self._get_plan, ListPlans: self._list_plans,
            UpsertSubscription: self._upsert_subscription,
            GetSubscription: self._get_subscription,
            ListSubscriptions: self._list_subscriptions,
            CreateKey: self._create_key, RevokeKey: self._revoke_key, ListKeys: self._list_keys,
            GrantCredits: self._grant_credits, ListGrants: self._list_grants,
            FreezeSlots: self._freeze_slots, ThawSlots: self._thaw_slots,
            AdoptSlots: self._adopt_slots, ForgetSlots: self._forget_slots,
            SetIdempotencyRetention: self._set_idempotency_retention,
        }

    # --- the way in -----------------------------------------------------------------------

    def apply(self, command: Command, now_ns: int) -> Outcome:
        if now_ns < self.last_record_ns:  # the caller's clock, checked even under python -O
            raise ValueError(f"time went back: now_ns {now_ns} is before the last record's "
                             f"{self.last_record_ns}")
        records = self._expire_due(now_ns)
        if isinstance(command, ExpireHolds):
            expired = records[0].command.expired if records else ()
            return Outcome(ExpireResult(expired=expired), None, tuple(records))
        handler = self._handlers[type(command)]
        self._events.clear()
        self._finished.clear()
        revision = command.catalog_revision if type(command) in _CATALOG_TYPES else 0
        if revision:
            return self._apply_catalog_change(command, revision, handler, now_ns, records)
        try:
            if self.frozen_slots:
                self._refuse_frozen(command)
            if getattr(command, "idempotency_key", ""):
                result, changed = self._idempotent(command, now_ns, handler)
            else:
                result, changed = handler(command, now_ns)
        except QuotaError as error:
            return Outcome(None, error, tuple(records))
        if changed:
            records.append(self._emit(
                command, now_ns, result if getattr(command, "idempotency_key", "") else None))
        return Outcome(result, None, tuple(records))

    def _apply_catalog_change(self, command: Command, revision: int,
                              handler: Callable[[Any, int], tuple[Any, bool]], now_ns: int,
                              records: list[Record]) -> Outcome:
        """A change of a cluster's catalog at an etcd revision: recorded whether it changes
        anything here or this server refuses it (the record says the revision was applied,
        so a restart follows the catalog on from the next one). One older than the last
        applied is refused, unrecorded: it was applied already."""
        assert revision > 0, revision
        if revision < self.catalog_revision:
            return Outcome(None, AlreadyExists(
                f"the catalog change at etcd revision {revision} is older than the last one "
                f"applied here, at {self.catalog_revision}"), tuple(records))
        try:
            result, _ = handler(command, now_ns)
            error = None
        except QuotaError as refused:
            result, error = None, refused
        self.catalog_revision = revision
        records.append(self._emit(command, now_ns))
        assert records[-1].command.catalog_revision == self.catalog_revision
        return Outcome(result, error, tuple(records))

    def catalog_entries(self) -> tuple[list[tuple[str, str]], list[str]]:
        """What this server holds that a cluster's catalog may hold: (app, plan id) of every
        plan, and the id of every key not revoked. Changes nothing."""
        plans = [(app_id, plan_id) for app_id, app in sorted(self.apps.items())
                 for plan_id in sorted(app.plans)]
        keys = sorted(key_id for key_id, key in self.keys.items() if key.revoked_at_ns is None)
        return plans, keys

    def check(self, command: CreateKey | RevokeKey | DeletePlan) -> None:
        """Raises the QuotaError applying the command now would: what a shard checks before
        it writes a change to its cluster's catalog. Changes nothing."""
        if isinstance(command, DeletePlan):
            self._check_delete_plan(command)
        elif isinstance(command, CreateKey):
            self._check_create_key(command)
        else:
            self._check_revoke_key(command)

    def replay(self, record: Record) -> None:
        """Applies a record read back from the log; it must make exactly that record again."""
        self._answering = record.answer is not None
        self._replaying = True
        try:
            outcome = self.apply(record.command, record.now_ns)
        finally:
            self._answering = True
            self._replaying = False
        if outcome.records != (record,):
            raise AssertionError(
                f"replay diverged at sequence {record.sequence}: the log holds {record!r}, "
                f"applying it made {outcome.records!r} ({outcome.error!r})"
            )

    def next_expiry_ns(self) -> int | None:
        """When the next hold or credit grant expires; None if none will."""
        hold_ns = self.expiry[0][0] if self.expiry else None
        grant_ns = self.grant_expiry[0][0] if self.grant_expiry else None
        if hold_ns is None or grant_ns is None:
            return grant_ns if hold_ns is None else hold_ns
        return min(hold_ns, grant_ns)

    def rebuild_grant_expiry(self) -> None:
        """The grant expiry index from every user's balances (after a snapshot is loaded)."""
        self.grant_expiry = SortedList()
        self.index_grant_expiry(
            (app_id, user_id, key, counter.balance)
            for app_id, app in self.apps.items() for user_id, user in app.users.items()
            for (key, _), counter in user.counter_items() if counter.balance is not None)

    def index_grant_expiry(self, owned: Iterable[tuple[str, str, str, Balance]]) -> None:
        """Adds to the grant expiry index the grants of these balances (app, user id, group
        key, balance): a snapshot's reader names them, where rebuild_grant_expiry would walk
        every counter of every user to find them (0.13 s at 1,000,000 users)."""
        self.grant_expiry.update(
            self._grant_expiry_entry(app_id, user_id, key, grant)
            for app_id, user_id, key, balance in owned for grant in balance.grants
            if self._expires_by_index(grant))

    @staticmethod
    def _expires_by_index(grant: Grant) -> bool:
        return not grant.expired and not grant.recurring and grant.expires_at_ns is not None

    @staticmethod
    def _grant_expiry_entry(app_id: str, user_id: str, key: str,
                            grant: Grant) -> tuple[int, str, str, str, str]:
        assert grant.expires_at_ns is not None
        return (grant.expires_at_ns, app_id, user_id, key, grant.grant_id)

    def user_number(self, app_id: str, user_id: str) -> int | None:
        """The audit index's number for a subscriber; None for a user that never subscribed."""
        user = self.apps.get(app_id, _EMPTY_APP).users.get(user_id)
        return None if user is None else user.number

    def usage(self, app_id: str, user_id: str, now_ns: int) -> UsageResult:
        """GetUsage without applying anything (nothing expires, no record): what a watcher is
        sent between commands. FailedPrecondition NO_PLAN for a user with no subscription."""
        return self._get_usage(GetUsage(app=app_id, user_id=user_id), now_ns)[0]

    # --- records, expiry, forgetting ------------------------------------------------------

    def _emit(self, command: Command, now_ns: int, answer: Any = None) -> Record:
        self.sequence += 1
        self.last_record_ns = now_ns
        self._forget_due(now_ns)
        events, self._events = tuple(self._events), []
        finished, self._finished = tuple(self._finished), []
        apps = self.apps
        event_users = tuple([apps[event.app].users[event.user_id].number for event in events])
        return Record(self.sequence, now_ns, command, events, event_users, answer, finished)

    def _audit(self, kind: str, app: str, user_id: str, event_type: str, amount: int,
               metadata: Metadata = (), reservation_id: str = "", allowed: bool = True) -> None:
        self._events.append(AuditEvent(
            kind=kind, app=app, user_id=user_id, event_type=event_type, amount=amount,
            metadata=metadata, reservation_id=reservation_id, allowed=allowed))

    def _audit_hold(self, kind: str, reservation: Reservation, amount: int) -> None:
        self._audit(kind, reservation.app, reservation.user_id, reservation.event_type, amount,
                    reservation.metadata, reservation.reservation_id)

    def _expire_due(self, now_ns: int) -> list[Record]:
        """Expires the holds and credit grants due by now_ns, in the order of their times
        (holds first at equal times), as one ExpireHolds record."""
        expiry, grant_expiry = self.expiry, self.grant_expiry
        if ((not expiry or expiry[0][0] > now_ns)
                and (not grant_expiry or grant_expiry[0][0] > now_ns)):
            return []
        expired: list[ExpiredHold] = []
        grants: list[ExpiredGrant] = []
        self._events.clear()
        self._finished.clear()
        while True:
            hold_due = bool(expiry) and expiry[0][0] <= now_ns
            grant_due = bool(grant_expiry) and grant_expiry[0][0] <= now_ns
            if hold_due and (not grant_due or expiry[0][0] <= grant_expiry[0][0]):
                _, _, app_id, reservation_id = expiry.pop(0)
                reservation = self.apps[app_id].reservations[reservation_id]
                user, plan = self._subscriber(app_id, reservation.user_id)
                self._end_live_hold(reservation, user,
                                    next_state(reservation.status, HoldEvent.EXPIRE),
                                    now_ns, in_index=False)
                self._audit_hold("expire", reservation, reservation.amount)
                self._check_hold_thresholds(reservation, user, plan)
                expired.append(ExpiredHold(app=app_id, reservation_id=reservation_id,
                                           user_id=reservation.user_id))
            elif grant_due:
                _, app_id, user_id, key, grant_id = grant_expiry.pop(0)
                if self._expire_grant(app_id, user_id, key, grant_id, now_ns):
                    grants.append(ExpiredGrant(app=app_id, user_id=user_id, group_key=key,
                                               grant_id=grant_id))
            else:
                break
        if not expired and not grants:
            return []
        return [self._emit(ExpireHolds(expired=tuple(expired), grants=tuple(grants)), now_ns)]

    def _expire_grant(self, app_id: str, user_id: str, key: str, grant_id: str,
                      now_ns: int) -> bool:
        """Ends a credit grant (its recurring grant renewed first, if due): what it has left
        is dropped, but for what live holds need. False if it is gone already (spent and
        forgotten)."""
        user = self.apps[app_id].users[user_id]
        self._user_changed(app_id, user_id)
        counter = user.counter(key, Window.LIFETIME)
        if counter is None or counter.balance is None:
            return False
        plan = self.apps[app_id].plans[user.subscription.plan_id]
        group = plan.group(key)
        if group is not None and group.kind is Kind.BALANCE and group.window is Window.LIFETIME:
            counter = self._current(user, group, now_ns)
            file_counter(user, key, Window.LIFETIME, counter)
        balance = counter.balance
        assert balance is not None
        grant = next((g for g in balance.grants if g.grant_id == grant_id and not g.expired),
                     None)
        if grant is None:
            return False
        dropped = balance.expire(grant, counter.held)
        counter.used = balance.used()
        self._audit("expire_grant", app_id, user_id, key, dropped)
        return True

    def _forget_due(self, now_ns: int) -> None:
        while self.forget and self.forget[0][0] <= now_ns:
            _, _, kind, app_id, key = self.forget.pop(0)
            app = self.apps[app_id]
            if kind == "idempotency":
                entry = app.idempotency.get(key)  # gone already once durable elsewhere
                if entry is None:
                    continue
                forget_at_ns = entry.created_at_ns + self.idempotency_retention_ns
                if forget_at_ns <= now_ns:
                    del app.idempotency[key]
                    self.moved_key_slots.pop((app_id, key), None)
                elif not any(queued[2:] == (kind, app_id, key) for queued in self.forget.irange(
                        (forget_at_ns,), (forget_at_ns + 1,), inclusive=(True, False))):
                    # the retention grew since it was queued (a key used anew is queued anew)
                    self.forget.add((forget_at_ns, self.sequence + 1, kind, app_id, key))
            else:
                assert kind == "reservation", kind
                reservation = app.reservations.pop(key, None)  # None: the log holds it now
                assert reservation is None or reservation.status is not HoldState.LIVE

    def _end_live_hold(self, reservation: Reservation, user: UserState, status: HoldState,
                       now_ns: int, *, in_index: bool) -> None:
        """Returns a live hold's amount to its counters and marks how it ended. user: the
        hold's, as _subscriber gave it (which marked it changed)."""
        assert reservation.status is HoldState.LIVE and status is not HoldState.LIVE
        if in_index:
            self.expiry.remove(self._expiry_entry(reservation))
        for hold in reservation.holds:
            counter = self._counter_of(user, hold)
            if counter is not None:
                if counter.balance is not None:
                    counter = self._renewed_balance_of(user, hold, counter, reservation.app,
                                                       now_ns)
                counter.held -= hold.counted(reservation.amount)
                assert counter.held >= 0, (hold, counter)
                if counter.balance is not None:
                    counter.balance.holds_ended(counter.held)
                    counter.used = counter.balance.used()
        user.live_holds -= 1
        assert user.live_holds >= 0
        reservation.status = status
        reservation.finished_at_ns = now_ns
        if self.durable_hold is None:
            self.forget.add((now_ns + limits.RESERVATION_RETENTION_NS, reservation.sequence,
                             "reservation", reservation.app, reservation.reservation_id))
        else:
            self._hold_changed(reservation)

    def _hold_changed(self, reservation: Reservation) -> None:
        """A hold finished, or an expired one was committed: kept in memory until the record
        that says so is durable, and handed to that record for the log's holds table. A
        record replayed is durable already, its row in the table: memory lets the hold go at
        once, as it would at the next forget_durable (and durable_hold answers for it as of
        any later record, as it does past that forget)."""
        if self._replaying:
            assert reservation.reservation_id not in self._holds_latest, reservation
            self.apps[reservation.app].reservations.pop(reservation.reservation_id, None)
            return
        sequence = self.sequence + 1  # the record this command makes
        self.apps[reservation.app].reservations[reservation.reservation_id] = reservation
        self._holds_pending.append((sequence, reservation.app, reservation.reservation_id))
        self._holds_latest[reservation.reservation_id] = sequence
        self._finished.append(reservation.copy())

    @staticmethod
    def _expiry_entry(reservation: Reservation) -> tuple[int, int, str, str]:
        return (reservation.expires_at_ns, reservation.sequence, reservation.app,
                reservation.reservation_id)

    @staticmethod
    def _counter_of(user: UserState, hold: HoldRef) -> CounterState | None:
        """The counter a hold counts in, unless its window has since been replaced."""
        index = user.layout.get((hold.key, hold.window))  # user.counter(), inline: hot
        counter = None if index is None else user.counters[index]
        if counter is None or counter.window_start_ns != hold.window_start_ns:
            return None
        return counter

    def _renewed_balance_of(self, user: UserState, hold: HoldRef, counter: CounterState,
                            app_id: str, now_ns: int) -> CounterState:
        """A balance's counter with its recurring grant renewed to now_ns, stored."""
        assert counter.balance is not None
        end_ns = counter.balance.recurring_window_end_ns
        if end_ns is not None and now_ns < end_ns:
            return counter  # this window's recurring grant is made
        group = self.apps[app_id].plans[user.subscription.plan_id].group(hold.key)
        if group is None or group.window is not hold.window:
            return counter
        renewed = self._current(user, group, now_ns)
        file_counter(user, hold.key, hold.window, renewed)
        return renewed

    @classmethod
    def _refilled_counter_of(cls, user: UserState, plan: Plan, hold: HoldRef,
                             now_ns: int) -> CounterState | None:
        """_counter_of, and for a bucket the copy refilled to now_ns, for a balance the copy
        with its recurring grant renewed (either stored by a change)."""
        counter = cls._counter_of(user, hold)
        group = plan.group(hold.key)
        if (counter is not None and group is not None and group.window is hold.window
                and (counter.balance is not None or group.kind is Kind.BALANCE)):
            return cls._current(user, group, now_ns)
        if (counter is None or group is None or group.kind is not Kind.RATE
                or group.window is not hold.window):
            return counter
        return buckets.refilled(counter, group.quota, group.period_ns, now_ns)

    # --- thresholds ------------------------------------------------------------------------

    def _check_thresholds(self, app_id: str, user_id: str, event_type: str,
                          changed: Iterable[tuple[LimitGroup, CounterState]]) -> None:
        """Records a "threshold" audit event for each of limits.WATCH_THRESHOLDS_PERCENT that
        a changed counter's used + held now reaches and that has not fired in its window.

        Used + held is what `remaining` is computed from, so a hold that fills the quota
        already warns, before its commit. Quota 0 groups have no thresholds. Only a change of
        the counter checks: a plan edit that lowers a quota below the usage fires nothing
        until the counter next changes. A rate bucket has no thresholds: it refills without a
        change, so a percentage of it is no event."""
        for group, counter in changed:
            quota = self._quota(group, counter)
            if quota == 0 or group.kind is Kind.RATE:
                continue
            consumed = counter.used + counter.held
            for percent in limits.WATCH_THRESHOLDS_PERCENT:
                if percent > counter.threshold_percent_fired and consumed * 100 >= (
                        percent * quota):
                    counter.threshold_percent_fired = percent
                    self._events.append(AuditEvent(
                        kind="threshold", app=app_id, user_id=user_id, event_type=event_type,
                        amount=consumed, limit_group_key=group.key, threshold_percent=percent,
                        window_start_ns=counter.window_start_ns))

    def _check_hold_thresholds(self, reservation: Reservation, user: UserState, plan: Plan,
                               counters: list[CounterState | None] | None = None) -> None:
        """Thresholds of the counters a hold counts in (in the window it was taken in); user
        and plan: the hold's subscriber's; counters: those of reservation.holds, when the
        caller has them already."""
        if counters is None:
            counters = [self._counter_of(user, hold) for hold in reservation.holds]
        changed = []
        for hold, counter in zip(reservation.holds, counters):
            group = plan.group(hold.key)
            if counter is not None and group is not None and group.window is hold.window:
                changed.append((group, counter))
        self._check_thresholds(reservation.app, reservation.user_id, reservation.event_type,
                               changed)

    # --- idempotency ----------------------------------------------------------------------

    def _idempotent(self, command: Any, now_ns: int,
                    handler: Callable[[Any, int], tuple[Any, bool]]) -> tuple[Any, bool]:
        """Same key, same request: the first answer, nothing changed. Same key, another
        request: ALREADY_EXISTS. A key belongs to one app and one RPC."""
        if self._replaying and self.durable_idempotency is not None:  # see _replaying
            return handler(command, now_ns)[0], True
        slot = (type(command).__name__, command.idempotency_key)
        entry = self.apps.get(command.app, _EMPTY_APP).idempotency.get(slot)
        if entry is None and self.durable_idempotency is not None:
            entry = self.durable_idempotency(command.app, slot[0], slot[1], self.sequence)
        if entry is not None and entry.created_at_ns + self.idempotency_retention_ns <= now_ns:
            entry = None  # past its retention; dropped with the next record
        if entry is not None:
            if not _same_request(entry.request, command):
                raise AlreadyExists(
                    f"idempotency key {command.idempotency_key!r} was used for another "
                    f"{slot[0]} request"
                )
            return entry.result, False
        result, _ = handler(command, now_ns)
        self._app(command.app).idempotency[slot] = IdempotencyEntry(command, result, now_ns)
        if self.durable_idempotency is None:
            self.forget.add((now_ns + self.idempotency_retention_ns, self.sequence + 1,
                             "idempotency", command.app, slot))
        else:
            self._idempotency_pending.append((self.sequence + 1, command.app, slot))
        return result, True

    def _set_idempotency_retention(self, command: SetIdempotencyRetention,
                                   now_ns: int) -> tuple[RetentionResult, bool]:
        previous_ns = self.idempotency_retention_ns
        self.idempotency_retention_ns = command.retention_ns
        return RetentionResult(previous_ns=previous_ns, retention_ns=command.retention_ns), (
            command.retention_ns != previous_ns)

    def forget_durable(self, durable_sequence: int) -> None:
        """Drops from memory the idempotency keys and finished holds whose records are durable
        up to durable_sequence: the log answers for them from now on. Memory holds only what
        is not yet durable."""
        pending = self._idempotency_pending
        while pending and pending[0][0] <= durable_sequence:
            _, app_id, slot = pending.popleft()
            self.apps[app_id].idempotency.pop(slot, None)
        holds, latest = self._holds_pending, self._holds_latest
        while holds and holds[0][0] <= durable_sequence:
            sequence, app_id, reservation_id = holds.popleft()
            if latest.get(reservation_id) == sequence:  # else a later record changed it again
                del latest[reservation_id]
                reservation = self.apps[app_id].reservations.pop(reservation_id, None)
                assert reservation is None or reservation.status is not HoldState.LIVE, (
                    reservation)  # None: a move took it away (ForgetSlots)

    def pending_durable(self) -> tuple[frozenset[tuple[str, tuple[str, str]]], frozenset[str]]:
        """The (app, slot) of idempotency keys, and the reservation ids of finished holds,
        that memory holds only until their records are durable (empty for a core alone)."""
        return (frozenset((app_id, slot) for _, app_id, slot in self._idempotency_pending),
                frozenset(self._holds_latest))

    # --- lookups --------------------------------------------------------------------------

    def _app(self, app_id: str) -> AppState:
        app = self.apps.get(app_id)
        if app is None:
            app = self.apps[app_id] = AppState()
        return app

    def _matched(self, plan: Plan, event_type: str, metadata: Metadata
                 ) -> tuple[tuple[LimitGroup, int], ...]:
        """plan.matched(event_type, metadata), remembered (see self._matched_cache)."""
        key = (id(plan), event_type, metadata)
        hit = self._matched_cache.get(key)
        if hit is not None and hit[0] is plan:
            return hit[1]
        groups = plan.matched(event_type, metadata)
        remember(self._matched_cache, key, (plan, groups), limits.MATCH_CACHE_ENTRIES_MAX)
        return groups

    def _subscriber(self, app_id: str, user_id: str) -> tuple[UserState, Plan]:
        user = self.apps.get(app_id, _EMPTY_APP).users.get(user_id)
        if user is None:
            raise FailedPrecondition(ErrorReason.NO_PLAN, f"user {user_id!r} has no subscription")
        subscription = user.subscription
        self._user_changed(app_id, subscription.user_id)  # the id the state keeps, not a copy
        return user, self.apps[app_id].plans[subscription.plan_id]

    def _user_changed(self, app_id: str, user_id: str) -> None:
        changed = self.users_changed.get(app_id)
        if changed is None:
            changed = self.users_changed[app_id] = set()
        changed.add(user_id)

    def clear_users_changed(self) -> None:
        """From now on, users_changed counts from here (a whole snapshot taken now)."""
        self.users_changed = {}

    def users_changed_count(self) -> int:
        return sum(map(len, self.users_changed.values()))

    def users_count(self) -> int:
        return sum(len(app.users) for app in self.apps.values())

    def _reservation(self, app_id: str, reservation_id: str, now_ns: int) -> Reservation:
        reservation = self.apps.get(app_id, _EMPTY_APP).reservations.get(reservation_id)
        if reservation is None and self.durable_hold is not None:
            reservation = self.durable_hold(reservation_id, self.sequence)
            if reservation is not None and reservation.app != app_id:
                raise PermissionDenied(f"reservation {reservation_id!r} belongs to another app")
        if reservation is None and any(reservation_id in other.reservations
                                       for other in self.apps.values()):
            raise PermissionDenied(f"reservation {reservation_id!r} belongs to another app")
        if reservation is None or (
                reservation.status is not HoldState.LIVE
                and reservation.finished_at_ns + limits.RESERVATION_RETENTION_NS <= now_ns):
            raise NotFound(f"no reservation {reservation_id!r}")
        return reservation

    @staticmethod
    def _current(user: UserState, group: LimitGroup, now_ns: int) -> CounterState:
        """The group's counter for the window holding now. A new window's counter is not
        stored here: only a change stores it, so that reads change nothing (a balance's:
        a copy with its recurring grant renewed, when one is due)."""
        index = user.layout.get((group.key, group.window))  # user.counter(), inline: hot
        counter = None if index is None else user.counters[index]
        if counter is not None and (counter.balance is None) == (group.kind is Kind.BALANCE):
            # a plan edit made the group a balance, or no longer one: its counter starts
            # afresh but for what live holds hold, which their ends give back
            counter = CounterState(counter.window_start_ns, counter.window_end_ns,
                                   held=counter.held, refilled_at_ns=now_ns,
                                   balance=Balance() if group.kind is Kind.BALANCE else None)
        if group.kind is Kind.BALANCE:
            if counter is None:
                counter = CounterState(0, None, balance=Balance())
            if group.grant is None:
                return counter
            zone = load_time_zone(user.subscription.time_zone)
            assert zone is not None, user.subscription
            renewed = balances.renewed(counter.balance, group.grant, zone, counter.held, now_ns)
            if renewed is None:
                return counter
            counter = replace(counter, balance=renewed, used=renewed.used())
            counter.threshold_percent_fired = Core._rearmed(counter, renewed.quota())
            return counter
        if group.kind is Kind.RATE:
            if counter is None:
                return CounterState(0, None, refilled_at_ns=now_ns)
            return buckets.refilled(counter, group.quota, group.period_ns, now_ns)
        if counter is not None and (counter.window_end_ns is None
                                    or now_ns < counter.window_end_ns):
            return counter
        zone = load_time_zone(user.subscription.time_zone)
        assert zone is not None, user.subscription
        start_ns, end_ns = latest_window_bounds(group.window, zone, now_ns)
        return CounterState(start_ns, end_ns)

    @staticmethod
    def _rearmed(counter: CounterState, quota: int) -> int:
        """threshold_percent_fired once a balance's quota changed (a grant): the thresholds
        its usage is now below fire again when it reaches them."""
        consumed = counter.used + counter.held
        reached = [percent for percent in limits.WATCH_THRESHOLDS_PERCENT
                   if quota and consumed * 100 >= percent * quota]
        return min(counter.threshold_percent_fired, reached[-1] if reached else 0)

    @staticmethod
    def _quota(group: LimitGroup, counter: CounterState) -> int:
        """The group's quota: a balance's is its live grants' (core.balances)."""
        if group.kind is Kind.BALANCE:
            assert counter.balance is not None
            return counter.balance.quota()
        return group.quota

    @staticmethod
    def _view(group: LimitGroup, counter: CounterState) -> CounterView:
        """A counter as of the time it was read (a bucket's: refilled to then)."""
        if group.kind is Kind.BALANCE:
            balance = counter.balance
            assert balance is not None and counter.used == balance.used(), counter
            quota = balance.quota()
            return CounterView(
                key=group.key, label=group.label, unit=group.unit, window=group.window,
                quota=quota, used=counter.used, held=counter.held,
                remaining=max(0, quota - counter.used - counter.held),
                window_start_ns=counter.window_start_ns,
                resets_at_ns=balance.recurring_window_end_ns if group.grant else None,
                kind=Kind.BALANCE)
        if group.kind is Kind.RATE:
            return CounterView(
                key=group.key, label=group.label, unit=group.unit, window=group.window,
                quota=group.quota, used=counter.used, held=counter.held,
                remaining=max(0, group.quota - counter.used - counter.held),
                window_start_ns=counter.window_start_ns, resets_at_ns=None, kind=Kind.RATE,
                full_at_ns=buckets.full_at_ns(counter, group.quota, group.period_ns))
        return CounterView(
            key=group.key, label=group.label, unit=group.unit, window=group.window,
            quota=group.quota, used=counter.used, held=counter.held,
            remaining=max(0, group.quota - counter.used - counter.held),
            window_start_ns=counter.window_start_ns, resets_at_ns=counter.window_end_ns,
        )

    def _views(self, groups: tuple[tuple[LimitGroup, int], ...],
               counters: list[CounterState]) -> tuple[CounterView, ...]:
        """The views of the counters a change left, for its answer (none if unanswered)."""
        if not self._answering:
            return ()
        return tuple([self._view(g, c) for (g, _), c in zip(groups, counters)])

    def _hold_views(self, reservation: Reservation, user: UserState, plan: Plan,
                    now_ns: int) -> tuple[CounterView, ...]:
        """The counters of the groups a hold was taken on, as the plan (user's) has them now
        (none if unanswered)."""
        if not self._answering:
            return ()
        views = []
        for hold in reservation.holds:
            group = plan.group(hold.key)
            if group is not None and group.window is hold.window:
                views.append(self._view(group, self._current(user, group, now_ns)))
        return tuple(views)

    @staticmethod
    def _counted(amount: int, keys_and_rates: Iterable[tuple[str, int]]) -> list[int]:
        """What the amount counts in each group, at its rate; INVALID_ARGUMENT naming `amount`
        if that would be past AMOUNT_MAX either way (a cost's rate multiplies the amount, and
        what a group counts has an amount's limits)."""
        counted = []
        for key, rate in keys_and_rates:
            value = amount * rate
            if abs(value) > limits.AMOUNT_MAX:
                raise InvalidArgument([FieldViolation(
                    "amount", f"counts {value} in limit group {key!r} (at a rate of {rate}), "
                              f"past {limits.AMOUNT_MAX}")])
            counted.append(value)
        return counted

    @staticmethod
    def _check_counter_room(counters: list[CounterState] | list[CounterState | None],
                            used_adds: list[int], held_adds: list[int] | None = None) -> None:
        """Refuses a change that would take a counter past COUNTER_MAX."""
        for index, counter in enumerate(counters):
            if counter is not None and (
                    counter.used + used_adds[index] > limits.COUNTER_MAX
                    or counter.held + (held_adds[index] if held_adds else 0)
                    > limits.COUNTER_MAX):
                raise ResourceExhausted(ErrorReason.COUNTER_LIMIT,
                                        f"a counter would pass {limits.COUNTER_MAX}")

    @staticmethod
    def _first_without_room(groups: tuple[tuple[LimitGroup, int], ...],
                            counters: list[CounterState], counted: list[int]) -> str:
        """The first enforced group the amounts do not fit in; soft groups never deny."""
        for (group, _), counter, amount in zip(groups, counters, counted):
            if group.enforce and counter.used + counter.held + amount > (
                    group.quota if counter.balance is None else counter.balance.quota()):
                return group.key
        return ""

    @staticmethod
    def _fits_at(groups: tuple[tuple[LimitGroup, int], ...], counters: list[CounterState],
                 counted: list[int], now_ns: int) -> int | None:
        """When a denied request would fit every group, if nothing else happened: a bucket
        once it has refilled enough, a calendar quota once its window resets. None when
        waiting alone never makes room (more than the quota, a lifetime window, or a bucket
        whose live holds leave too little of its capacity)."""
        fits_at_ns = now_ns
        for (group, _), counter, amount in zip(groups, counters, counted):
            if (not group.enforce
                    or counter.used + counter.held + amount <= Core._quota(group, counter)):
                continue
            if group.kind is Kind.BALANCE:
                return None  # only a grant makes room (a recurring one: resets_at)
            if group.kind is Kind.RATE:
                at_ns = buckets.fits_at_ns(counter, group.quota, group.period_ns, amount)
            elif amount <= group.quota:
                at_ns = counter.window_end_ns
            else:
                at_ns = None
            if at_ns is None:
                return None
            fits_at_ns = max(fits_at_ns, at_ns)
        return fits_at_ns

    # --- the hot path ---------------------------------------------------------------------

    def _reserve(self, command: Reserve, now_ns: int) -> tuple[ReserveResult, bool]:
        user, plan = self._subscriber(command.app, command.user_id)
        if user.live_holds >= limits.LIVE_HOLDS_PER_USER_MAX:
            raise ResourceExhausted(
                ErrorReason.TOO_MANY_HOLDS,
                f"user {command.user_id!r} has {user.live_holds} live holds, the most allowed",
            )
        app = self.apps[command.app]
        if command.reservation_id in app.reservations:  # chosen by the caller, so checked
            raise AlreadyExists(f"reservation id {command.reservation_id!r} is taken")
        groups = self._matched(plan, command.event_type, command.metadata)
        counted = self._counted(command.amount, ((g.key, rate) for g, rate in groups))
        counters = [self._current(user, group, now_ns) for group, _ in groups]
        denied_by = self._first_without_room(groups, counters, counted)
        if denied_by:
            views = tuple(self._view(g, c) for (g, _), c in zip(groups, counters))
            self._audit("reserve", command.app, command.user_id, command.event_type,
                        command.amount, command.metadata, allowed=False)
            return ReserveResult(allowed=False, reservation_id="", expires_at_ns=0,
                                 counters=views, denied_by=denied_by,
                                 fits_at_ns=self._fits_at(groups, counters, counted, now_ns)
                                 ), False
        self._check_counter_room(counters, [0] * len(counters), counted)
        for (group, _), counter, amount in zip(groups, counters, counted):
            counter.held += amount
            file_counter(user, group.key, group.window, counter)
        reservation = Reservation(
            app=command.app, reservation_id=command.reservation_id, user_id=command.user_id,
            event_type=command.event_type, amount=command.amount, metadata=command.metadata,
            holds=tuple(HoldRef(g.key, g.window, c.window_start_ns, rate)
                        for (g, rate), c in zip(groups, counters)),
            sequence=self.sequence + 1, created_at_ns=now_ns,
            expires_at_ns=now_ns + command.ttl_ns,
        )
        app.reservations[reservation.reservation_id] = reservation
        user.live_holds += 1
        self.expiry.add(self._expiry_entry(reservation))
        self._audit_hold("reserve", reservation, reservation.amount)
        self._check_thresholds(command.app, command.user_id, command.event_type,
                               ((g, c) for (g, _), c in zip(groups, counters)))
        views = self._views(groups, counters)
        return ReserveResult(allowed=True, reservation_id=reservation.reservation_id,
                             expires_at_ns=reservation.expires_at_ns, counters=views), True

    def _commit(self, command: Commit, now_ns: int) -> tuple[CommitResult, bool]:
        reservation = self._reservation(command.app, command.reservation_id, now_ns)
        status = next_state(reservation.status, HoldEvent.COMMIT)
        amount = reservation.amount if command.amount is None else command.amount
        expired = reservation.status is HoldState.EXPIRED
        user, plan = self._subscriber(command.app, reservation.user_id)
        counters = [self._refilled_counter_of(user, plan, hold, now_ns)
                    for hold in reservation.holds]
        counted = self._counted(amount, ((hold.key, hold.rate) for hold in reservation.holds))
        self._check_counter_room(counters, counted)
        for hold, counter in zip(reservation.holds, counters):
            if counter is not None:  # a bucket refilled to now before its used grows
                file_counter(user, hold.key, hold.window, counter)
        for counter, used in zip(counters, counted):
            if counter is not None and counter.balance is not None:  # before its hold ends:
                counter.balance.consume(used)  # what expired grants keep for it is taken
                counter.used = counter.balance.used()
        if not expired:
            self._end_live_hold(reservation, user, status, now_ns, in_index=True)
        reservation.status = status
        if expired and self.durable_hold is not None:
            self._hold_changed(reservation)
        for counter, used in zip(counters, counted):
            if counter is not None and counter.balance is None:  # else its window is over:
                counter.used += used  # the usage counts there
        returned = 0 if expired else max(0, reservation.amount - amount)
        self._audit_hold("commit", reservation, amount)
        self._check_hold_thresholds(reservation, user, plan, counters)
        return CommitResult(counters=self._hold_views(reservation, user, plan, now_ns),
                            committed=amount, returned=returned, expired=expired), True

    def _release(self, command: Release, now_ns: int) -> tuple[ReleaseResult, bool]:
        reservation = self._reservation(command.app, command.reservation_id, now_ns)
        status = next_state(reservation.status, HoldEvent.RELEASE)
        changed = status is not reservation.status
        user, plan = self._subscriber(command.app, reservation.user_id)
        if changed:
            self._end_live_hold(reservation, user, status, now_ns, in_index=True)
            self._audit_hold("release", reservation, reservation.amount)
            self._check_hold_thresholds(reservation, user, plan)
        views = self._hold_views(reservation, user, plan, now_ns)
        return ReleaseResult(counters=views), changed

    def _extend(self, command: Extend, now_ns: int) -> tuple[ExtendResult, bool]:
        reservation = self._reservation(command.app, command.reservation_id, now_ns)
        next_state(reservation.status, HoldEvent.EXTEND)  # a live hold stays live
        self.expiry.remove(self._expiry_entry(reservation))
        reservation.expires_at_ns = now_ns + command.ttl_ns
        self.expiry.add(self._expiry_entry(reservation))
        self._audit_hold("extend", reservation, 0)
        return ExtendResult(expires_at_ns=reservation.expires_at_ns), True

    def _track(self, command: Track, now_ns: int) -> tuple[TrackResult, bool]:
        user, plan = self._subscriber(command.app, command.user_id)
        groups = self._matched(plan, command.event_type, command.metadata)
        counted = self._counted(command.amount, ((g.key, rate) for g, rate in groups))
        counters = [self._current(user, group, now_ns) for group, _ in groups]
        if command.enforce and command.amount > 0:
            denied_by = self._first_without_room(groups, counters, counted)
            if denied_by:
                views = tuple(self._view(g, c) for (g, _), c in zip(groups, counters))
                self._audit("track", command.app, command.user_id, command.event_type,
                            command.amount, command.metadata, allowed=False)
                return TrackResult(allowed=False, counters=views, denied_by=denied_by,
                                   fits_at_ns=self._fits_at(groups, counters, counted, now_ns)
                                   ), False
        self._check_counter_room(counters, counted)
        for (group, _), counter, amount in zip(groups, counters, counted):
            if counter.balance is not None:
                if amount > 0:
                    counter.balance.consume(amount)
                else:
                    counter.balance.refund(-amount)
                counter.used = counter.balance.used()
            else:
                counter.used = max(0, counter.used + amount)
            if counter.used == 0:  # a bucket a refund fills has no part-token refilled
                counter.refill_carry = 0
            file_counter(user, group.key, group.window, counter)
        views = self._views(groups, counters)
        self._audit("track", command.app, command.user_id, command.event_type, command.amount,
                    command.metadata)
        self._check_thresholds(command.app, command.user_id, command.event_type,
                               ((g, c) for (g, _), c in zip(groups, counters)))
        return TrackResult(allowed=True, counters=views), True

    def _get_usage(self, command: GetUsage, now_ns: int) -> tuple[UsageResult, bool]:
        user, plan = self._subscriber(command.app, command.user_id)
        views = tuple(self._view(g, self._current(user, g, now_ns)) for g in plan.limit_groups)
        return UsageResult(user_id=command.user_id, plan_id=plan.id, counters=views), False

    # --- credit balances --------------------------------------------------------------------

    def _balance_group(self, plan: Plan, key: str) -> LimitGroup:
        group = plan.group(key)
        if group is None or group.kind is not Kind.BALANCE:
            raise InvalidArgument([FieldViolation(
                "group_key", f"plan {plan.id!r} has no balance group {key[:128]!r}")])
        return group

    def _grant_credits(self, command: GrantCredits, now_ns: int) -> tuple[GrantResult, bool]:
        user, plan = self._subscriber(command.app, command.user_id)
        group = self._balance_group(plan, command.group_key)
        if command.expires_at_ns is not None and command.expires_at_ns <= now_ns:
            raise InvalidArgument([FieldViolation(
                "expires_at", f"must be after now ({now_ns} ns, the server's time)")])
        counter = self._current(user, group, now_ns)
        balance = counter.balance
        assert balance is not None
        room = limits.GRANTS_PER_BALANCE_MAX - (1 if group.grant is not None else 0)
        if balance.grants_with_credit() >= room:
            raise ResourceExhausted(
                ErrorReason.TOO_MANY_GRANTS,
                f"user {command.user_id!r} has {balance.grants_with_credit()} grants with "
                f"credit left in {group.key!r}, the most allowed (GRANTS_PER_BALANCE_MAX, a "
                "place kept for the plan's recurring grant)")
        grant = balance.add(balances.credit_grant_id(self.sequence + 1), command.amount,
                            now_ns, command.expires_at_ns, command.priority)
        counter.used = balance.used()
        counter.threshold_percent_fired = self._rearmed(counter, balance.quota())
        file_counter(user, group.key, group.window, counter)
        if self._expires_by_index(grant):
            self.grant_expiry.add(self._grant_expiry_entry(command.app, command.user_id,
                                                           group.key, grant))
        self._audit("grant", command.app, command.user_id, group.key, command.amount)
        return GrantResult(grant=self._grant_view(group.key, grant),
                           counter=self._view(group, counter)), True

    def _list_grants(self, command: ListGrants, now_ns: int) -> tuple[GrantsResult, bool]:
        user, plan = self._subscriber(command.app, command.user_id)
        groups = ([self._balance_group(plan, command.group_key)] if command.group_key else
                  [g for g in plan.limit_groups if g.kind is Kind.BALANCE])
        views = []
        for group in groups:
            balance = self._current(user, group, now_ns).balance
            assert balance is not None
            views.extend(self._grant_view(group.key, grant)
                         for grant in sorted(balance.grants, key=lambda g: (
                             g.expired, g.spend_key())))
        return GrantsResult(grants=tuple(views)), False

    @staticmethod
    def _grant_view(key: str, grant: Grant) -> GrantView:
        return GrantView(grant_id=grant.grant_id, group_key=key, amount=grant.amount,
                         remaining=grant.remaining, granted_at_ns=grant.granted_at_ns,
                         expires_at_ns=grant.expires_at_ns, priority=grant.priority,
                         expired=grant.expired, recurring=grant.recurring)

    # --- administration -------------------------------------------------------------------

    def _upsert_plan(self, command: UpsertPlan, now_ns: int) -> tuple[PlanResult, bool]:
        plans = self.apps.get(command.app, _EMPTY_APP).plans
        if plans.get(command.plan.id) == command.plan:
            return PlanResult(plan=command.plan, changed=False), False
        self._app(command.app).plans[command.plan.id] = command.plan
        return PlanResult(plan=command.plan, changed=True), True

    def _check_delete_plan(self, command: DeletePlan) -> AppState:
        app = self.apps.get(command.app, _EMPTY_APP)
        if command.plan_id not in app.plans:
            raise NotFound(f"no plan {command.plan_id!r}")
        subscribers = app.plan_subscribers[command.plan_id]
        if subscribers:
            raise FailedPrecondition(ErrorReason.PLAN_IN_USE,
                                     f"plan {command.plan_id!r} has {subscribers} subscribers")
        return app

    def _delete_plan(self, command: DeletePlan, now_ns: int) -> tuple[DeletePlanResult, bool]:
        app = self._check_delete_plan(command)
        del app.plans[command.plan_id]
        return DeletePlanResult(), True

    def _get_plan(self, command: GetPlan, now_ns: int) -> tuple[PlanResult, bool]:
        plan = self.apps.get(command.app, _EMPTY_APP).plans.get(command.plan_id)
        if plan is None:
            raise NotFound(f"no plan {command.plan_id!r}")
        return PlanResult(plan=plan), False

    def _list_plans(self, command: ListPlans, now_ns: int) -> tuple[PlansResult, bool]:
        plans = self.apps.get(command.app, _EMPTY_APP).plans
        return PlansResult(plans=tuple(plans[key] for key in sorted(plans))), False

    def _upsert_subscription(self, command: UpsertSubscription,
                             now_ns: int) -> tuple[SubscriptionResult, bool]:
        app = self.apps.get(command.app, _EMPTY_APP)
        if command.plan_id not in app.plans:
            raise NotFound(f"no plan {command.plan_id!r}")
        user = app.users.get(command.user_id)
        billing_customer_id = command.billing_customer_id
        if billing_customer_id is None:  # unset: kept
            billing_customer_id = "" if user is None else user.subscription.billing_customer_id
        subscription = Subscription(user_id=command.user_id, plan_id=command.plan_id,
                                    time_zone=command.time_zone or "UTC",
                                    billing_customer_id=billing_customer_id)
        if user is not None and user.subscription == subscription:
            return SubscriptionResult(subscription=subscription, changed=False), False
        self._user_changed(command.app, command.user_id)
        if user is None:
            self.users_numbered += 1
            user = app.users[command.user_id] = UserState(subscription=subscription,
                                                          number=self.users_numbered)
        else:
            app.plan_subscribers[user.subscription.plan_id] -= 1
            user.subscription = subscription
        app.plan_subscribers[subscription.plan_id] += 1
        return SubscriptionResult(subscription=subscription, changed=True), True

    def _list_subscriptions(self, command: ListSubscriptions,
                            now_ns: int) -> tuple[SubscriptionsResult, bool]:
        """Sorts the app's user ids on every page: a pass over them, for an admin's listing."""
        users = self.apps.get(command.app, _EMPTY_APP).users
        plan_id, after = command.plan_id, command.after_user_id
        page: list[Subscription] = []
        for user_id in sorted(users):
            if user_id <= after:
                continue
            subscription = users[user_id].subscription
            if plan_id and subscription.plan_id != plan_id:
                continue
            if len(page) == command.subscriptions_per_page:
                return SubscriptionsResult(subscriptions=tuple(page), more=True), False
            page.append(subscription)
        return SubscriptionsResult(subscriptions=tuple(page)), False

    def subscriptions_by_number(self, app_id: str) -> dict[int, Subscription]:
        """The app's subscriptions by user number (UserState.number): whom the audit index's
        entries are about (users moved to another shard's included)."""
        app = self.apps.get(app_id, _EMPTY_APP)
        return app.departed | {user.number: user.subscription for user in app.users.values()}

    def _get_subscription(self, command: GetSubscription,
                          now_ns: int) -> tuple[SubscriptionResult, bool]:
        user = self.apps.get(command.app, _EMPTY_APP).users.get(command.user_id)
        if user is None:
            raise NotFound(f"user {command.user_id!r} has no subscription")
        return SubscriptionResult(subscription=user.subscription), False

    # --- moving slots between shards ---------------------------------------------------------

    def _refuse_frozen(self, command: Command) -> None:
        slot = command_slot(command)
        if slot is not None and slot in self.frozen_slots:
            raise SlotsMoving(f"slot {slot} is moving to another shard: nothing was done; "
                              "send the call again shortly (fetch the shard map)", slot=slot)

    def _slot_users(self, slots: frozenset[int]) -> Iterable[tuple[str, str, UserState]]:
        """(app, user id, state) of every user of these slots: a pass over every user."""
        for app_id, app in self.apps.items():
            for user_id, user in app.users.items():
                if slot_of(app_id, user_id) in slots:
                    yield app_id, user_id, user

    def _key_slot(self, app_id: str, key: tuple[str, str], entry: IdempotencyEntry) -> int | None:
        if type(entry.request) is not str:
            return command_slot(entry.request)
        return self.moved_key_slots.get((app_id, key))

    def _freeze_slots(self, command: FreezeSlots, now_ns: int) -> tuple[SlotsResult, bool]:
        slots = frozenset(command.slots)
        new = slots - self.frozen_slots
        users = list(self._slot_users(slots))
        result = SlotsResult(slots=len(new), users=len(users),
                             holds=sum(user.live_holds for _, _, user in users))
        if not new:
            return result, False
        self.frozen_slots |= new
        self.incoming_slots -= new
        return result, True

    def _thaw_slots(self, command: ThawSlots, now_ns: int) -> tuple[SlotsResult, bool]:
        thawed = self.frozen_slots & frozenset(command.slots)
        self.frozen_slots -= thawed
        return SlotsResult(slots=len(thawed)), bool(thawed)

    def export_slots(self, slots: frozenset[int], now_ns: int
                     ) -> tuple[list[MovedUser], list[Reservation], list[MovedKey]]:
        """What memory holds of the users of these frozen slots, copied: the users with their
        counters, their holds (live, and finished ones memory still keeps), and the
        idempotency entries memory keeps (those not yet durable, and those a move brought
        in). The log's holds and idempotency tables hold the rest (a reader of the log adds
        them). InvalidArgument naming `slots` unless every one is frozen: nothing of them may
        change while they are read."""
        unfrozen = sorted(slots - self.frozen_slots)
        if unfrozen:
            raise InvalidArgument([FieldViolation(
                "slots", f"{len(unfrozen)} of them are not frozen (slot {unfrozen[0]} the "
                         "first): FreezeSlots first")])
        users = [MovedUser(app=app_id, user_id=user_id, subscription=user.subscription,
                           counters=tuple((key, window, _copied_counter(counter))
                                          for (key, window), counter in user.counter_items()))
                 for app_id, user_id, user in self._slot_users(slots)]
        holds, keys = [], []
        for app_id, app in self.apps.items():
            holds.extend(reservation.copy() for reservation in app.reservations.values()
                         if slot_of(app_id, reservation.user_id) in slots)
            for key, entry in app.idempotency.items():
                slot = self._key_slot(app_id, key, entry)
                if (slot in slots and now_ns
                        < entry.created_at_ns + self.idempotency_retention_ns):
                    keys.append(moved_key(app_id, key, entry, slot))
        return users, holds, keys

    def _adopt_slots(self, command: AdoptSlots, now_ns: int) -> tuple[SlotsResult, bool]:
        """Checks the whole chunk, then takes it in (see AdoptSlots)."""
        slots = frozenset(command.slots)
        frozen = slots & self.frozen_slots
        if frozen:
            raise InvalidArgument([FieldViolation(
                "slots", f"slot {min(frozen)} is frozen here, moving away from this shard")])
        if not command.first and not slots <= self.incoming_slots:
            raise InvalidArgument([FieldViolation(
                "first", f"slot {min(slots - self.incoming_slots)} has not begun moving in: "
                         "the first chunk of a move comes first")])
        chunk_users: set[tuple[str, str]] = set()
        for moved in command.users:
            place = (moved.app, moved.user_id)
            if slot_of(*place) not in slots or place in chunk_users:
                raise InvalidArgument([FieldViolation(
                    "state", f"user {moved.user_id!r} is not of the slots, or twice")])
            if not command.first and moved.user_id in self.apps.get(
                    moved.app, _EMPTY_APP).users:
                raise InvalidArgument([FieldViolation(
                    "state", f"user {moved.user_id!r} was adopted by an earlier chunk")])
            if moved.subscription.plan_id not in self.apps.get(moved.app, _EMPTY_APP).plans:
                raise NotFound(f"user {moved.user_id!r} subscribes to plan "
                               f"{moved.subscription.plan_id!r}, which this shard does not "
                               "have: upsert it here first")
            chunk_users.add(place)
        for hold in command.holds:
            place = (hold.app, hold.user_id)
            known = place in chunk_users or (not command.first and hold.user_id in self.apps.get(
                hold.app, _EMPTY_APP).users)
            if slot_of(*place) not in slots or not known:
                raise InvalidArgument([FieldViolation(
                    "state", f"hold {hold.reservation_id!r} is of no user of the move")])
            if hold.reservation_id in self.apps.get(hold.app, _EMPTY_APP).reservations and (
                    not command.first):
                raise AlreadyExists(f"hold {hold.reservation_id!r} was adopted already")
        for key in command.keys:
            if key.slot not in slots:
                raise InvalidArgument([FieldViolation(
                    "state", f"idempotency key {key.key!r} is of no slot of the move")])
        # checked: from here on nothing refuses
        if command.first:
            self._drop_slots(slots)
            self.incoming_slots |= slots
        for moved in command.users:
            app = self._app(moved.app)
            self._user_changed(moved.app, moved.user_id)
            self.users_numbered += 1
            user = app.users[moved.user_id] = UserState(
                subscription=moved.subscription, number=self.users_numbered)
            for key, window, counter in moved.counters:
                file_counter(user, key, window, _copied_counter(counter))
            app.plan_subscribers[moved.subscription.plan_id] += 1
            for (key, _), counter in user.counter_items():
                if counter.balance is not None:
                    for grant in counter.balance.grants:
                        if self._expires_by_index(grant):
                            self.grant_expiry.add(self._grant_expiry_entry(
                                moved.app, moved.user_id, key, grant))
        for hold in command.holds:
            app = self.apps[hold.app]
            reservation = hold.copy()
            reservation.sequence = 0  # reserved on another shard: no Reserve record here
            app.reservations[reservation.reservation_id] = reservation
            if reservation.status is HoldState.LIVE:
                app.users[reservation.user_id].live_holds += 1
                self._user_changed(hold.app, reservation.user_id)
                self.expiry.add(self._expiry_entry(reservation))
            else:
                self.forget.add((reservation.finished_at_ns + limits.RESERVATION_RETENTION_NS,
                                 0, "reservation", hold.app, reservation.reservation_id))
        keys_taken = 0
        for moved_key_ in command.keys:
            app = self._app(moved_key_.app)
            key = (moved_key_.rpc, moved_key_.key)
            if key in app.idempotency:  # this shard's own use of the key wins
                continue
            app.idempotency[key] = IdempotencyEntry(moved_key_.request, moved_key_.result,
                                                    moved_key_.created_at_ns)
            self.moved_key_slots[(moved_key_.app, key)] = moved_key_.slot
            self.forget.add((moved_key_.created_at_ns + self.idempotency_retention_ns,
                             self.sequence + 1, "idempotency", moved_key_.app, key))
            keys_taken += 1
        return SlotsResult(slots=len(slots) if command.first else 0,
                           users=len(command.users), holds=len(command.holds),
                           keys=keys_taken), True

    def _forget_slots(self, command: ForgetSlots, now_ns: int) -> tuple[SlotsResult, bool]:
        slots = frozenset(command.slots)
        ended = slots & (self.frozen_slots | self.incoming_slots)
        users, holds, keys = self._drop_slots(slots)
        self.frozen_slots -= slots
        self.incoming_slots -= slots
        changed = bool(ended or users or holds or keys)
        return SlotsResult(slots=len(ended), users=users, holds=holds, keys=keys), changed

    def _drop_slots(self, slots: frozenset[int]) -> tuple[int, int, int]:
        """Drops the users of these slots, their holds and the idempotency entries memory
        keeps of them: (users, holds, keys) dropped."""
        users = holds = keys = 0
        dropped_holds: set[tuple[str, str]] = set()
        dropped_keys: set[tuple[str, tuple[str, str]]] = set()
        dropped_users: set[tuple[str, str]] = set()
        for app_id, app in self.apps.items():
            for reservation_id, reservation in list(app.reservations.items()):
                if slot_of(app_id, reservation.user_id) not in slots:
                    continue
                if reservation.status is HoldState.LIVE:
                    self.expiry.remove(self._expiry_entry(reservation))
                del app.reservations[reservation_id]
                self._holds_latest.pop(reservation_id, None)
                dropped_holds.add((app_id, reservation_id))
                holds += 1
            for key, entry in list(app.idempotency.items()):
                if self._key_slot(app_id, key, entry) in slots:
                    del app.idempotency[key]
                    self.moved_key_slots.pop((app_id, key), None)
                    dropped_keys.add((app_id, key))
                    keys += 1
            for user_id in [u for u in app.users if slot_of(app_id, u) in slots]:
                user = app.users.pop(user_id)
                self._user_changed(app_id, user_id)
                app.plan_subscribers[user.subscription.plan_id] -= 1
                app.departed[user.number] = user.subscription
                dropped_users.add((app_id, user_id))
                users += 1
        if dropped_holds or dropped_keys:
            self.forget = SortedList(
                entry for entry in self.forget
                if (entry[3], entry[4]) not in (dropped_holds if entry[2] == "reservation"
                                                else dropped_keys))
        if dropped_users:
            self.grant_expiry = SortedList(
                entry for entry in self.grant_expiry
                if (entry[1], entry[2]) not in dropped_users)
        return users, holds, keys

    # --- API keys -------------------------------------------------------------------------

    def _check_create_key(self, command: CreateKey) -> KeyState | None:
        """The same key, when a catalog applies one this server has already (None if new)."""
        known = self.keys.get(command.key_id)
        if known is not None:
            if (command.catalog_revision and known.app == command.app
                    and known.secret_sha256 == command.secret_sha256):
                return known
            raise AlreadyExists(f"key id {command.key_id!r} is taken")
        count = sum(1 for key in self.keys.values() if key.app == command.app)
        if count >= limits.KEYS_PER_APP_MAX:
            raise ResourceExhausted(ErrorReason.TOO_MANY_KEYS,
                                    f"app {command.app!r} has {count} keys, the most allowed "
                                    "(revoked keys count too)")
        return None

    def _create_key(self, command: CreateKey, now_ns: int) -> tuple[KeyResult, bool]:
        known = self._check_create_key(command)
        if known is not None:
            return KeyResult(key=known.view()), False
        key = self.keys[command.key_id] = KeyState(
            key_id=command.key_id, app=command.app, kind=command.kind, name=command.name,
            secret_sha256=command.secret_sha256, token_signing_key=command.token_signing_key,
            created_at_ns=command.created_at_ns or now_ns)
        return KeyResult(key=key.view()), True

    def _check_revoke_key(self, command: RevokeKey) -> KeyState:
        key = self.keys.get(command.key_id)
        if key is None:
            raise NotFound(f"no key {command.key_id!r}")
        if command.app and key.app != command.app:
            raise PermissionDenied(f"key {command.key_id!r} belongs to another app")
        return key

    def _revoke_key(self, command: RevokeKey, now_ns: int) -> tuple[KeyResult, bool]:
        key = self._check_revoke_key(command)
        if key.revoked_at_ns is not None:
            return KeyResult(key=key.view()), False
        key.revoked_at_ns = command.revoked_at_ns or now_ns
        return KeyResult(key=key.view()), True

    def _list_keys(self, command: ListKeys, now_ns: int) -> tuple[KeysResult, bool]:
        keys = sorted((key for key in self.keys.values() if key.app == command.app),
                      key=lambda key: (key.created_at_ns, key.key_id))
        return KeysResult(keys=tuple(key.view() for key in keys)), False
