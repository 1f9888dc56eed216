"""The core against a small independent reference model, driven by a Hypothesis state machine.

The model is plain dicts written from protos/DESIGN.md: which groups each event hits is a
hand-made table (not the core's matcher), a cost's rate is a dict lookup made here (a group
whose cost has no rate for the event does not match), every group may be drawn soft, a rate
bucket is kept as its debt in tokens x period_ns (not the core's tokens and carried remainder),
a credit balance is a list of grants spent, refunded and expired by protos/DESIGN.md's rules
(with a recurring daily grant and its rollover), windows are computed with modular arithmetic for
fixed-offset zones (not zoneinfo), and every answer is predicted before the core gives it. After
every step the invariants compare the core's state with the model and check the contract's
invariants. Crashes are rules too: one drops every record after the last sync and rebuilds from
the latest snapshot (whole, or a whole one and its latest delta) and the synced log, which must
give exactly the state at that sync.

QUOTAD_LONG=1 scales the run from 200 examples x 50 steps to 2000 x 100.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from core_helpers import (
    APP, DAY, HOUR, MINUTE, S, T0, digest, group, md, plan, replay_all, rid, view_tuple,
)
from quotad.core import limits
from quotad.core.commands import (
    Commit, ExpiredGrant, ExpiredHold, ExpireHolds, Extend, GetUsage, GrantCredits, ListGrants,
    Release, Reserve, Track, UpsertPlan, UpsertSubscription,
)
from quotad.core.holds import HoldState
from quotad.core.machine import Core
from quotad.core.errors import AlreadyExists, FailedPrecondition, NotFound
from quotad.core.plans import Cost, Kind, RecurringGrant, Window
from quotad.core.values import replace
from quotad.storage.snapshot import core_from_snapshot, core_with_delta, snapshot_of

LONG = os.environ.get("QUOTAD_LONG") == "1"
MAX_EXAMPLES = 2000 if LONG else 200
STEPS = 100 if LONG else 50

RET = limits.RESERVATION_RETENTION_NS
KEY_RET = limits.IDEMPOTENCY_RETENTION_NS_MIN

# --- the world: one plan, two users, a fixed table of events ------------------------------

GROUPS = (  # key, window, event types, metadata constraints; in plan order
    ("all", Window.MINUTE, ("openai.*", "anthropic.*", "image.render"), None),
    ("chat", Window.HOUR, ("openai.*",), None),
    ("prem", Window.DAY, ("openai.*",), {"model": ("gpt-4o",)}),
    ("life", Window.LIFETIME, ("image.render",), None),
    ("spend", Window.HOUR, ("openai.*", "anthropic.*"), None),  # with a cost by model
    ("rate", Window.LIFETIME, ("openai.*", "anthropic.*"), None),  # a token bucket
    ("cred", Window.LIFETIME, ("anthropic.*", "image.render"), None),  # a credit balance
)
KEYS = tuple(g[0] for g in GROUPS)
WINDOW_OF = {g[0]: g[1] for g in GROUPS}
COSTED = "spend"
BUCKET = "rate"
CREDITS = "cred"
RECURRING = st.sampled_from([None, (50, 0), (40, 15), (30, 30)])
"""The balance's recurring daily grant (amount, rollover_max), drawn once a run, or none."""
PERIOD = st.sampled_from([7 * S, HOUR, DAY, DAY])
"""A bucket's period, drawn once a run: a plan edit changes its quota, never its period."""

EVENTS = (  # event type, metadata, the groups whose match rule it meets (by hand)
    ("openai.chat", {"model": "gpt-4o"}, ("all", "chat", "prem", "spend", "rate")),
    ("openai.chat", {"model": "gpt-3.5"}, ("all", "chat", "spend", "rate")),
    ("openai.images", {}, ("all", "chat", "spend", "rate")),
    ("anthropic.chat", {"model": "gpt-4o"}, ("all", "spend", "rate", "cred")),
    ("image.render", {}, ("all", "life", "cred")),
    ("openai", {"model": "gpt-4o"}, ()),  # the bare prefix matches nothing
    ("audio.speech", {}, ()),
)


@dataclass(frozen=True)
class Pricing:
    """What the plan says beyond quotas: spend's rates by model, and which groups are soft."""

    rates: tuple[tuple[str, int], ...] = (("gpt-4o", 10),)
    default_rate: int | None = None
    soft: frozenset[str] = frozenset()

    def rate(self, key: str, metadata: dict[str, str]) -> int | None:
        if key != COSTED:
            return 1
        return dict(self.rates).get(metadata.get("model"), self.default_rate)


PRICING = st.builds(
    Pricing,
    rates=st.lists(st.tuples(st.sampled_from(["gpt-4o", "gpt-3.5"]),
                             st.sampled_from([1, 3, 10])),
                   unique_by=lambda pair: pair[0], min_size=1, max_size=2).map(
        lambda pairs: tuple(sorted(pairs))),
    default_rate=st.sampled_from([None, None, 1, 4]),
    soft=st.sets(st.sampled_from(KEYS), max_size=2).map(frozenset))

USERS = {"u1": ("UTC", 0), "u2": ("Asia/Kolkata", 5 * 3600 + 1800)}  # fixed offsets (s)

QUOTA = st.sampled_from([0, 20, 30, 45, 60, 80, 100, 150])  # 0 only now and then
AMOUNT = st.integers(min_value=1, max_value=30)
TTL = st.sampled_from([1 * S, 5 * S, 30 * S, 60 * S, 3600 * S])
ADVANCE = st.sampled_from([1, S // 3, S, 7 * S, 59 * S, 61 * S, 10 * MINUTE, HOUR, 6 * HOUR,
                           DAY, RET + S])


def plan_of(quota: dict[str, int], pricing: Pricing = Pricing(), period_ns: int = MINUTE,
            recurring: tuple[int, int] | None = None):
    groups = []
    for key, window, types, constraints in GROUPS:
        made = dataclasses.replace(group(key, quota[key], window, types, constraints),
                                   enforce=key not in pricing.soft)
        if key == CREDITS:  # its quota is its grants
            made = dataclasses.replace(made, kind=Kind.BALANCE, quota=0, grant=None if (
                recurring is None) else RecurringGrant(amount=recurring[0], every=Window.DAY,
                                                       rollover_max=recurring[1]))
        if key == BUCKET:
            made = dataclasses.replace(made, kind=Kind.RATE, period_ns=period_ns)
        if key == COSTED:
            made = dataclasses.replace(made, cost=Cost(by="model", rates=pricing.rates,
                                                       default_rate=pricing.default_rate))
        groups.append(made)
    return plan("p", *groups)


def model_window(window: Window, offset_s: int, now: int) -> tuple[int, int | None]:
    if window is Window.LIFETIME:
        return 0, None
    unit = {Window.MINUTE: MINUTE, Window.HOUR: HOUR, Window.DAY: DAY}[window]
    start = now - (now + offset_s * S) % unit
    return start, start + unit


@dataclass
class MCounter:
    start: int
    end: int | None
    used: int = 0
    held: int = 0
    debt: int = 0
    """The bucket's: tokens x period_ns not yet refilled; its used is debt / period_ns,
    rounded up (a token is back only whole)."""
    at: int = 0
    """The bucket's: the time its debt was last refilled to."""
    balance: MBalance | None = None
    """The credit balance's grants."""


@dataclass
class MGrant:
    grant_id: str
    amount: int
    granted_at: int
    expires_at: int | None
    priority: int
    number: int
    consumed: int = 0
    last_take: int = 0
    expired: bool = False
    kept: int = 0
    recurring: bool = False

    def left(self) -> int:
        return self.kept if self.expired else self.amount - self.consumed

    def order(self) -> tuple:
        """Spend order: priority, then earliest expiry (none last), then oldest."""
        return (self.priority, self.expires_at is None, self.expires_at or 0, self.number)

    def shown(self) -> tuple:
        return (self.grant_id, self.amount, self.left(), self.granted_at, self.expires_at,
                self.priority, self.expired, self.recurring)


@dataclass
class MBalance:
    grants: list[MGrant] = dataclasses.field(default_factory=list)
    owed: int = 0
    made: int = 0
    takes: int = 0
    recurring_end: int | None = None

    def copy(self) -> "MBalance":
        return dataclasses.replace(self, grants=[dataclasses.replace(g) for g in self.grants])

    def quota(self) -> int:
        return sum(g.kept if g.expired else g.amount for g in self.grants)

    def used(self) -> int:
        return sum(g.consumed for g in self.grants if not g.expired) + self.owed

    def available(self, held: int) -> int:
        return sum(g.left() for g in self.grants) - held - self.owed

    def tidy(self) -> None:
        self.grants = [g for g in self.grants if not g.expired or g.kept or g.consumed]
        assert sum(1 for g in self.grants if not g.left()) <= limits.SPENT_GRANTS_PER_BALANCE_MAX

    def add(self, grant: MGrant) -> None:
        self.made += 1
        grant.number = self.made
        self.grants.append(grant)
        self.take(grant, min(self.owed, grant.amount), from_owed=True)

    def take(self, grant: MGrant, amount: int, from_owed: bool = False) -> None:
        if amount:
            self.takes += 1
            grant.consumed += amount
            grant.last_take = self.takes
            if grant.expired:
                grant.kept -= amount
            if from_owed:
                self.owed -= amount

    def consume(self, amount: int) -> None:
        kept = sorted((g for g in self.grants if g.expired and g.kept),
                      key=lambda g: (g.expires_at, g.number))
        for g in kept + sorted((g for g in self.grants if not g.expired), key=MGrant.order):
            take = min(amount, g.left())
            self.take(g, take)
            amount -= take
        self.owed += amount
        self.tidy()

    def refund(self, amount: int) -> None:
        back = min(self.owed, amount)
        self.owed, amount = self.owed - back, amount - back
        for g in sorted((g for g in self.grants if g.consumed), key=lambda g: -g.last_take):
            back = min(amount, g.consumed)
            g.consumed, amount = g.consumed - back, amount - back  # on an expired one: lost
        self.tidy()

    def expire(self, grant: MGrant, held: int) -> int:
        left = grant.amount - grant.consumed
        dropped = min(left, max(0, self.available(held)))
        grant.expired, grant.kept = True, left - dropped
        self.tidy()
        return dropped

    def holds_ended(self, held: int) -> None:
        excess = max(0, sum(g.kept for g in self.grants if g.expired) - held)  # never adds
        for g in sorted((g for g in self.grants if g.expired and g.kept),
                        key=lambda g: (g.expires_at, g.number), reverse=True):
            drop = min(excess, g.kept)
            g.kept, excess = g.kept - drop, excess - drop
        self.tidy()


@dataclass
class MHold:
    user: str
    amount: int
    holds: list[tuple[str, int, int]]  # (group key, window start, rate)
    expires_at: int
    order: int
    status: str = "live"
    finished_at: int = 0


def vt(view) -> tuple:
    """A counter view's numbers, then its overage and when it is full."""
    return view_tuple(view) + (view.overage, view.full_at_ns)


class QuotaMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.core = Core()
        self.now = T0
        self.records: list = []
        self.synced, self.synced_digest = 0, digest(Core())
        self.snapshot: tuple[int, bytes] | None = None
        """(sequence, stored form) of the latest whole snapshot."""
        self.delta: bytes | None = None
        """The latest delta snapshot of that whole one, if any since."""
        self.quota = {key: 0 for key in KEYS}
        self.pricing = Pricing()
        self.period = MINUTE
        self.counters: dict[tuple[str, str], MCounter] = {}
        self.holds: dict[str, MHold] = {}
        self.overage: set[tuple[str, str, int]] = set()
        self.keys: dict[tuple[str, str], tuple] = {}  # (rpc, key) -> (command, result, at)
        self.free_keys: list[tuple[str, str]] = []  # keys whose request was refused
        self.serial = 0
        self.recurring: tuple[int, int] | None = None
        self.due_grants: list[tuple[str, str]] = []
        """(user, grant id) of the grants the last model_expire ended, in order."""

    # --- plumbing -------------------------------------------------------------------------

    def next_serial(self) -> int:
        self.serial += 1
        return self.serial

    def new_key(self, rpc: str, data, use_key: bool) -> str:
        if not use_key:
            return ""
        free = [k for r, k in self.free_keys if r == rpc]
        if free and data.draw(st.booleans(), label="reuse a refused key"):
            key = data.draw(st.sampled_from(free), label="refused key")
            self.free_keys.remove((rpc, key))
            return key
        return f"key{self.next_serial()}"

    def model_expire(self) -> list[str]:
        """Expires every live hold and credit grant due at now, as the core must before any
        command, in the order of their times (holds first at equal times); the grants that
        ended are left in self.due_grants."""
        due = sorted((h.expires_at, h.order, r) for r, h in self.holds.items()
                     if h.status == "live" and h.expires_at <= self.now)
        grants = sorted((g.expires_at, user, g.grant_id)
                        for (user, key), c in self.counters.items() if key == CREDITS
                        for g in c.balance.grants
                        if not g.expired and not g.recurring and g.expires_at is not None
                        and g.expires_at <= self.now)
        self.due_grants, ended = [], []
        while due or grants:
            if due and (not grants or due[0][0] <= grants[0][0]):
                ended.append(due.pop(0)[2])
                self.end_hold(self.holds[ended[-1]], "expired")
                continue
            _, user, grant_id = grants.pop(0)
            c = self.counters[(user, CREDITS)] = self.renewed(user, self.counters[
                (user, CREDITS)])
            grant = next(g for g in c.balance.grants if g.grant_id == grant_id)
            c.balance.expire(grant, c.held)
            self.due_grants.append((user, grant_id))
        return ended

    def apply(self, command, expired: list[str], main_records: int):
        """Applies to the core; checks the expiry record and how many records it made."""
        outcome = self.core.apply(command, self.now)
        self.records.extend(outcome.records)
        records = list(outcome.records)
        if expired or self.due_grants:
            first = records.pop(0)
            assert first.command == ExpireHolds(expired=tuple(
                ExpiredHold(app=APP, reservation_id=r, user_id=self.holds[r].user)
                for r in expired), grants=tuple(
                ExpiredGrant(app=APP, user_id=user, group_key=CREDITS, grant_id=grant_id)
                for user, grant_id in self.due_grants)), first
        self.due_grants = []
        assert len(records) == main_records, (command, outcome)
        if main_records:
            assert records[0].command == command and records[0].now_ns == self.now
        return outcome

    def current(self, user: str, key: str) -> MCounter:
        counter = self.counters.get((user, key))
        if key == CREDITS:
            return self.renewed(user, counter or MCounter(0, None, balance=MBalance()))
        if key == BUCKET:
            return self.refilled(counter or MCounter(0, None, at=self.now))
        if counter is not None and (counter.end is None or self.now < counter.end):
            return counter
        return MCounter(*model_window(WINDOW_OF[key], USERS[user][1], self.now))

    def renewed(self, user: str, c: MCounter) -> MCounter:
        """A copy of the balance with today's recurring grant made (the previous one ended
        first), when it is not made yet: a read stores nothing."""
        balance = c.balance
        if self.recurring is None or (balance.recurring_end is not None
                                      and self.now < balance.recurring_end):
            return c
        start, end = model_window(Window.DAY, USERS[user][1], self.now)
        new = balance.copy()
        previous = next((g for g in new.grants if g.recurring and not g.expired), None)
        dropped = 0 if previous is None else new.expire(previous, c.held)
        amount, rollover_max = self.recurring
        rollover = (0 if balance.recurring_end is None
                    else min(rollover_max, dropped) if balance.recurring_end == start
                    else rollover_max)  # a whole day without a change: its grant was whole
        new.add(MGrant(f"grt_r{start:016x}", amount + rollover, start, end, 0, 0,
                       recurring=True))
        new.recurring_end = end
        return dataclasses.replace(c, balance=new)

    def quota_of(self, key: str, c: MCounter) -> int:
        return c.balance.quota() if key == CREDITS else self.quota[key]

    def refilled(self, c: MCounter) -> MCounter:
        """A copy of the bucket as it is now: a read stores nothing."""
        debt = max(0, c.debt - self.quota[BUCKET] * (self.now - c.at))
        return dataclasses.replace(c, debt=debt, at=self.now)

    def used(self, key: str, c: MCounter) -> int:
        if key == CREDITS:
            return c.balance.used()
        return -(-c.debt // self.period) if key == BUCKET else c.used

    def add_used(self, key: str, c: MCounter, amount: int) -> None:
        if key == CREDITS:
            if amount > 0:
                c.balance.consume(amount)
            else:
                c.balance.refund(-amount)
        elif key == BUCKET:
            c.debt = max(0, c.debt + amount * self.period)
        else:
            c.used = max(0, c.used + amount)

    def after_refill(self, debt_to_drop: int) -> int | None:
        """When the bucket will have refilled debt_to_drop (tokens x period_ns)."""
        if debt_to_drop <= 0:
            return self.now
        quota = self.quota[BUCKET]
        return None if quota == 0 else self.now + -(-debt_to_drop // quota)

    def view(self, key: str, c: MCounter) -> tuple:
        quota, used = self.quota_of(key, c), self.used(key, c)
        full_at = self.after_refill(c.debt) if key == BUCKET else None
        end = c.balance.recurring_end if key == CREDITS else c.end
        return (key, quota, used, c.held, max(0, quota - used - c.held), c.start, end,
                max(0, used + c.held - quota), full_at)

    def fits_at(self, hits, counters, amount: int) -> int | None:
        """When a denied request fits every hard group: a bucket refilled, a window reset."""
        at = self.now
        for (key, rate), c in zip(hits, counters):
            counted = amount * rate
            if key in self.pricing.soft or self.used(key, c) + c.held + counted <= self.quota_of(
                    key, c):
                continue
            if key == CREDITS:
                return None  # only a grant makes room
            if key == BUCKET:
                room = self.quota[key] - c.held - counted
                fits = None if room < 0 else self.after_refill(c.debt - room * self.period)
            else:
                fits = c.end if counted <= self.quota[key] else None
            if fits is None:
                return None
            at = max(at, fits)
        return at

    def hits(self, event_met: tuple[str, ...], metadata) -> list[tuple[str, int]]:
        """(group, rate) of each group the event hits: those whose match rule it meets, less
        a costed group with no rate for it."""
        values = dict(metadata)
        rated = [(key, self.pricing.rate(key, values)) for key in event_met]
        return [(key, rate) for key, rate in rated if rate is not None]

    def note_soft(self, user: str, key: str, start: int) -> None:
        """A soft group counts past its quota: exempt from the invariant, like overage."""
        if key in self.pricing.soft:
            self.overage.add((user, key, start))

    def stored(self, user: str, key: str, start: int) -> MCounter | None:
        counter = self.counters.get((user, key))
        return counter if counter is not None and counter.start == start else None

    def end_hold(self, hold: MHold, status: str) -> None:
        assert hold.status == "live"
        for key, start, rate in hold.holds:
            counter = self.stored(hold.user, key, start)
            if counter is not None and key == CREDITS:  # its recurring grant made first
                counter = self.counters[(hold.user, key)] = self.renewed(hold.user, counter)
            if counter is not None:
                counter.held -= hold.amount * rate
                if key == CREDITS:
                    counter.balance.holds_ended(counter.held)
        hold.status, hold.finished_at = status, self.now

    def hold_views(self, hold: MHold) -> list:
        return [self.view(key, self.current(hold.user, key)) for key, _, _ in hold.holds]

    def known(self, reservation_id: str) -> bool:
        """As protos/DESIGN.md says, a finished hold is remembered RET after it finished."""
        hold = self.holds[reservation_id]
        return hold.status == "live" or self.now < hold.finished_at + RET

    def remember(self, rpc: str, command, result) -> None:
        if command.idempotency_key:
            self.keys[(rpc, command.idempotency_key)] = (command, result, self.now)

    def refused(self, rpc: str, command) -> None:
        if command.idempotency_key:
            self.free_keys.append((rpc, command.idempotency_key))

    # --- the operations, predicted then applied -------------------------------------------

    def first_without_room(self, hits, counters, amount: int) -> str:
        """The first hard group the amount, at its rate, does not fit in; soft ones never deny."""
        return next((key for (key, rate), c in zip(hits, counters)
                     if key not in self.pricing.soft
                     and self.used(key, c) + c.held + amount * rate > self.quota_of(key, c)), "")

    def do_reserve(self, command: Reserve, event_met: tuple[str, ...]) -> None:
        expired = self.model_expire()
        user, amount = command.user_id, command.amount
        hits = self.hits(event_met, command.metadata)
        counters = [self.current(user, key) for key, _ in hits]
        denied = self.first_without_room(hits, counters, amount)
        if not denied:
            for (key, rate), c in zip(hits, counters):
                c.held += amount * rate
                self.counters[(user, key)] = c
                self.note_soft(user, key, c.start)
            self.holds[command.reservation_id] = MHold(
                user, amount, [(key, c.start, rate) for (key, rate), c in zip(hits, counters)],
                self.now + command.ttl_ns, self.next_serial())
        views = [self.view(key, c) for (key, _), c in zip(hits, counters)]
        main = 1 if (not denied or command.idempotency_key) else 0
        result = self.apply(command, expired, main).result
        assert result.allowed == (not denied) and result.denied_by == denied
        assert [vt(v) for v in result.counters] == views
        assert result.fits_at_ns == (self.fits_at(hits, counters, amount) if denied else None)
        if denied:
            assert result.reservation_id == "" and result.expires_at_ns == 0
        else:
            assert result.reservation_id == command.reservation_id
            assert result.expires_at_ns == self.now + command.ttl_ns
        self.remember("Reserve", command, result)

    def do_track(self, command: Track, event_met: tuple[str, ...]) -> None:
        expired = self.model_expire()
        user, amount = command.user_id, command.amount
        hits = self.hits(event_met, command.metadata)
        counters = [self.current(user, key) for key, _ in hits]
        denied = ""
        if command.enforce and amount > 0:
            denied = self.first_without_room(hits, counters, amount)
        if not denied:
            for (key, rate), c in zip(hits, counters):
                self.add_used(key, c, amount * rate)
                self.counters[(user, key)] = c
                if amount > 0 and not command.enforce:
                    self.overage.add((user, key, c.start))
                self.note_soft(user, key, c.start)
        views = [self.view(key, c) for (key, _), c in zip(hits, counters)]
        main = 1 if (not denied or command.idempotency_key) else 0
        result = self.apply(command, expired, main).result
        assert result.allowed == (not denied) and result.denied_by == denied
        assert [vt(v) for v in result.counters] == views
        assert result.fits_at_ns == (self.fits_at(hits, counters, amount) if denied else None)
        self.remember("Track", command, result)

    def do_commit(self, command: Commit) -> None:
        expired = self.model_expire()
        hold = self.holds[command.reservation_id]
        if hold.status in ("released", "committed"):
            outcome = self.apply(command, expired, 0)
            assert isinstance(outcome.error, FailedPrecondition)
            assert outcome.error.reason == f"RESERVATION_{hold.status.upper()}"
            self.refused("Commit", command)
            return
        amount = hold.amount if command.amount is None else command.amount
        was_expired = hold.status == "expired"
        for key, start, rate in hold.holds:  # a balance consumes before its hold ends
            counter = self.stored(hold.user, key, start)
            if counter is not None and key == CREDITS:
                counter = self.counters[(hold.user, key)] = self.renewed(hold.user, counter)
                counter.balance.consume(amount * rate)
                if amount > hold.amount or was_expired:
                    self.overage.add((hold.user, key, start))
                self.note_soft(hold.user, key, start)
        if not was_expired:
            self.end_hold(hold, "committed")
        hold.status = "committed"
        for key, start, rate in hold.holds:  # at the rate the hold was taken at
            counter = self.stored(hold.user, key, start)
            if counter is not None and key != CREDITS:
                if key == BUCKET:  # refilled to now before its debt grows
                    counter = self.counters[(hold.user, key)] = self.refilled(counter)
                self.add_used(key, counter, amount * rate)
                if amount > hold.amount or was_expired:
                    self.overage.add((hold.user, key, start))
                self.note_soft(hold.user, key, start)
        result = self.apply(command, expired, 1).result
        assert result.committed == amount and result.expired == was_expired
        assert result.returned == (0 if was_expired else max(0, hold.amount - amount))
        assert [vt(v) for v in result.counters] == self.hold_views(hold)
        self.remember("Commit", command, result)

    def do_release(self, command: Release) -> None:
        expired = self.model_expire()
        hold = self.holds[command.reservation_id]
        if hold.status == "committed":
            outcome = self.apply(command, expired, 0)
            assert isinstance(outcome.error, FailedPrecondition)
            assert outcome.error.reason == "RESERVATION_COMMITTED"
            self.refused("Release", command)
            return
        changed = hold.status == "live"
        if changed:
            self.end_hold(hold, "released")
        main = 1 if (changed or command.idempotency_key) else 0
        result = self.apply(command, expired, main).result
        assert [vt(v) for v in result.counters] == self.hold_views(hold)
        self.remember("Release", command, result)

    def do_extend(self, command: Extend) -> None:
        expired = self.model_expire()
        hold = self.holds[command.reservation_id]
        if hold.status != "live":
            outcome = self.apply(command, expired, 0)
            assert isinstance(outcome.error, FailedPrecondition)
            assert outcome.error.reason == f"RESERVATION_{hold.status.upper()}"
            self.refused("Extend", command)
            return
        hold.expires_at = self.now + command.ttl_ns
        result = self.apply(command, expired, 1).result
        assert result.expires_at_ns == hold.expires_at
        self.remember("Extend", command, result)

    # --- rules ----------------------------------------------------------------------------

    @initialize(quotas=st.lists(QUOTA, min_size=len(KEYS), max_size=len(KEYS)),
                pricing=PRICING, period=PERIOD, recurring=RECURRING)
    def start(self, quotas: list[int], pricing: Pricing, period: int,
              recurring: tuple[int, int] | None) -> None:
        self.quota, self.pricing, self.period = dict(zip(KEYS, quotas)), pricing, period
        self.quota[CREDITS], self.recurring = 0, recurring
        self.apply(UpsertPlan(app=APP, plan=plan_of(self.quota, pricing, period, recurring)),
                   [], 1)
        for user, (zone, _) in USERS.items():
            command = UpsertSubscription(app=APP, user_id=user, plan_id="p", time_zone=zone)
            assert self.apply(command, [], 1).result.changed

    # The hot-path rules take one `data` argument and draw the rest: Hypothesis tries rules
    # with fewer arguments more often, and these are the ones worth trying most.

    @rule(data=st.data())
    def reserve(self, data) -> None:
        user = data.draw(st.sampled_from(sorted(USERS)), label="user")
        event_type, metadata, hits = data.draw(st.sampled_from(EVENTS), label="event")
        amount = data.draw(AMOUNT, label="amount")
        ttl = data.draw(TTL, label="ttl")
        use_key = data.draw(st.booleans(), label="use_key")
        command = Reserve(app=APP, user_id=user, event_type=event_type, amount=amount,
                          metadata=md(metadata), ttl_ns=ttl,
                          idempotency_key=self.new_key("Reserve", data, use_key),
                          reservation_id=rid(self.next_serial()))
        self.do_reserve(command, hits)

    @rule(data=st.data())
    def track(self, data) -> None:
        user = data.draw(st.sampled_from(sorted(USERS)), label="user")
        event_type, metadata, hits = data.draw(st.sampled_from(EVENTS), label="event")
        amount = data.draw(st.integers(min_value=-40, max_value=40).filter(bool),
                           label="amount")
        enforce = data.draw(st.booleans(), label="enforce")
        use_key = data.draw(st.booleans(), label="use_key")
        command = Track(app=APP, user_id=user, event_type=event_type, amount=amount,
                        metadata=md(metadata), enforce=enforce,
                        idempotency_key=self.new_key("Track", data, use_key))
        self.do_track(command, hits)

    @rule(data=st.data())
    def grant(self, data) -> None:
        user = data.draw(st.sampled_from(sorted(USERS)), label="user")
        amount = data.draw(st.integers(min_value=1, max_value=60), label="amount")
        expires_in = data.draw(st.sampled_from([None, None, 5 * S, MINUTE, HOUR, DAY]),
                               label="expires in")
        priority = data.draw(st.sampled_from([0, 0, 1, 3]), label="priority")
        use_key = data.draw(st.booleans(), label="use_key")
        self.do_grant(GrantCredits(
            app=APP, user_id=user, group_key=CREDITS, amount=amount, priority=priority,
            expires_at_ns=None if expires_in is None else self.now + expires_in,
            idempotency_key=self.new_key("GrantCredits", data, use_key)))

    def do_grant(self, command: GrantCredits) -> None:
        expired = self.model_expire()
        user = command.user_id
        c = self.current(user, CREDITS)
        room = limits.GRANTS_PER_BALANCE_MAX - (0 if self.recurring is None else 1)
        if sum(1 for g in c.balance.grants if not g.expired and g.consumed < g.amount) >= room:
            outcome = self.apply(command, expired, 0)
            assert outcome.error is not None and outcome.error.reason == "TOO_MANY_GRANTS"
            self.refused("GrantCredits", command)
            return
        sequence = len(self.records) + (1 if expired or self.due_grants else 0) + 1
        grant = MGrant(f"grt_{sequence:016x}", command.amount, self.now,
                       command.expires_at_ns, command.priority, 0)
        c.balance.add(grant)
        self.counters[(user, CREDITS)] = c
        result = self.apply(command, expired, 1).result
        g = result.grant
        assert (g.grant_id, g.amount, g.remaining, g.granted_at_ns, g.expires_at_ns, g.priority,
                g.expired, g.recurring) == grant.shown() and g.group_key == CREDITS
        assert vt(result.counter) == self.view(CREDITS, c)
        self.remember("GrantCredits", command, result)

    def model_grants(self, user: str) -> list[tuple]:
        balance = self.current(user, CREDITS).balance
        return [g.shown() for g in sorted(balance.grants, key=lambda g: (g.expired, g.order()))]

    def targets(self) -> list[str]:
        return sorted(r for r in self.holds if self.known(r))

    @precondition(lambda self: self.targets())
    @rule(data=st.data())
    def commit(self, data) -> None:
        """Commits the reserved amount (default or given), less, none of it, or more."""
        target = data.draw(st.sampled_from(self.targets()), label="reservation")
        how = data.draw(st.sampled_from(["default", "zero", "less", "same", "more"]),
                        label="how")
        delta = data.draw(st.integers(min_value=1, max_value=20), label="delta")
        use_key = data.draw(st.booleans(), label="use_key")
        reserved = self.holds[target].amount
        amount = {"default": None, "zero": 0, "less": max(0, reserved - delta),
                  "same": reserved, "more": reserved + delta}[how]
        self.do_commit(Commit(app=APP, reservation_id=target, amount=amount,
                              idempotency_key=self.new_key("Commit", data, use_key)))

    @precondition(lambda self: self.targets())
    @rule(data=st.data())
    def release(self, data) -> None:
        target = data.draw(st.sampled_from(self.targets()), label="reservation")
        use_key = data.draw(st.booleans(), label="use_key")
        self.do_release(Release(app=APP, reservation_id=target,
                                idempotency_key=self.new_key("Release", data, use_key)))

    @precondition(lambda self: self.targets())
    @rule(data=st.data())
    def extend(self, data) -> None:
        target = data.draw(st.sampled_from(self.targets()), label="reservation")
        ttl = data.draw(TTL, label="ttl")
        use_key = data.draw(st.booleans(), label="use_key")
        self.do_extend(Extend(app=APP, reservation_id=target, ttl_ns=ttl,
                              idempotency_key=self.new_key("Extend", data, use_key)))

    def forgotten(self) -> list[str]:
        """Finished holds past their retention: NOT_FOUND from now on."""
        return sorted(r for r in self.holds if not self.known(r))

    @precondition(lambda self: self.forgotten())
    @rule(data=st.data(), kind=st.sampled_from(["commit", "release", "extend"]))
    def touch_forgotten_reservation(self, data, kind) -> None:
        target = data.draw(st.sampled_from(self.forgotten()), label="forgotten")
        command = {"commit": Commit(app=APP, reservation_id=target),
                   "release": Release(app=APP, reservation_id=target),
                   "extend": Extend(app=APP, reservation_id=target, ttl_ns=60 * S)}[kind]
        expired = self.model_expire()
        outcome = self.apply(command, expired, 0)
        assert isinstance(outcome.error, NotFound), outcome


    def retryable(self) -> list[tuple[str, str]]:
        return sorted(k for k, (_, _, at) in self.keys.items() if self.now < at + KEY_RET)

    @precondition(lambda self: self.retryable())
    @rule(data=st.data())
    def retry_with_same_key(self, data) -> None:
        slot = data.draw(st.sampled_from(self.retryable()), label="key")
        command, first, _ = self.keys[slot]
        if isinstance(command, Reserve):  # the server names every attempt anew
            command = replace(command, reservation_id=rid(self.next_serial()))
        expired = self.model_expire()
        outcome = self.apply(command, expired, 0)
        assert outcome.error is None and outcome.result == first

    @precondition(lambda self: self.retryable())
    @rule(data=st.data())
    def reuse_key_for_another_request(self, data) -> None:
        slot = data.draw(st.sampled_from(self.retryable()), label="key")
        command, _, _ = self.keys[slot]
        if isinstance(command, Reserve):
            other = replace(command, amount=command.amount % 30 + 1,
                            reservation_id=rid(self.next_serial()))
        elif isinstance(command, Track):
            other = replace(command, amount=command.amount + (1 if command.amount
                                                              != -1 else 2))
        elif isinstance(command, Commit):
            other = replace(command, amount=0 if command.amount is None
                            else command.amount + 1)
        elif isinstance(command, Release):
            other = replace(command, reservation_id=rid(10**12 + 1))
        elif isinstance(command, GrantCredits):
            other = replace(command, amount=command.amount + 1)
        else:
            other = replace(command, ttl_ns=command.ttl_ns % (3600 * S) + S)
        expired = self.model_expire()
        outcome = self.apply(other, expired, 0)
        assert isinstance(outcome.error, AlreadyExists), outcome

    def forgotten_keys(self) -> list[tuple[str, str]]:
        """Keys past their retention (of Reserve and Track, whose requests are easy to make
        anew): a request under them is answered fresh."""
        return sorted(k for k, (c, _, at) in self.keys.items()
                      if self.now >= at + KEY_RET and isinstance(c, (Reserve, Track)))

    @precondition(lambda self: self.forgotten_keys())
    @rule(data=st.data(), amount=AMOUNT)
    def reuse_forgotten_key(self, data, amount) -> None:
        slot = data.draw(st.sampled_from(self.forgotten_keys()), label="old key")
        command, _, _ = self.keys.pop(slot)
        hits = next(e[2] for e in EVENTS if e[0] == command.event_type
                    and md(e[1]) == command.metadata)
        if isinstance(command, Reserve):
            self.do_reserve(replace(command, amount=amount,
                                    reservation_id=rid(self.next_serial())), hits)
        else:
            self.do_track(replace(command, amount=amount), hits)

    @rule(what=st.sampled_from(["usage", "expire", "unknown", "grants"]),
          user=st.sampled_from(sorted(USERS)))
    def observe(self, what, user) -> None:
        """A read (changes nothing), the expiry timer's command, or an unknown id."""
        expired = self.model_expire()
        if what == "grants":
            result = self.apply(ListGrants(app=APP, user_id=user), expired, 0).result
            assert [(g.grant_id, g.amount, g.remaining, g.granted_at_ns, g.expires_at_ns,
                     g.priority, g.expired, g.recurring) for g in result.grants] == \
                self.model_grants(user)
        elif what == "usage":
            result = self.apply(GetUsage(app=APP, user_id=user), expired, 0).result
            assert result.plan_id == "p" and result.user_id == user
            assert [vt(v) for v in result.counters] == [
                self.view(key, self.current(user, key)) for key in KEYS]
        elif what == "expire":
            outcome = self.apply(ExpireHolds(), expired, 0)
            assert [e.reservation_id for e in outcome.result.expired] == expired
        else:
            outcome = self.apply(Commit(app=APP, reservation_id=rid(10**12)), expired, 0)
            assert isinstance(outcome.error, NotFound)

    @rule(quotas=st.lists(QUOTA, min_size=len(KEYS), max_size=len(KEYS)),
          pricing=st.none() | PRICING)
    def upsert_plan(self, quotas, pricing) -> None:
        """New quotas, and now and then new rates and soft groups: live holds keep the rates
        they were taken at."""
        new = dict(zip(KEYS, quotas))
        new[CREDITS] = 0  # a balance's quota is its grants
        pricing = pricing or self.pricing
        changed = (new, pricing) != (self.quota, self.pricing)
        for key in KEYS:
            # a lower quota, or a soft group made hard, may leave counters above the quota
            if new[key] < self.quota[key] or key in self.pricing.soft - pricing.soft:
                for (user, k), c in self.counters.items():
                    if k == key:
                        self.overage.add((user, key, c.start))
        self.quota, self.pricing = new, pricing
        expired = self.model_expire()
        result = self.apply(UpsertPlan(app=APP, plan=plan_of(new, pricing, self.period,
                                                             self.recurring)), expired,
                            1 if changed else 0).result
        assert result.changed == changed

    @rule(delta=ADVANCE, to_window_end=st.sampled_from([None, Window.MINUTE, Window.HOUR,
                                                          Window.DAY]),
          offset=st.sampled_from([-1, 0]))
    def advance(self, delta, to_window_end, offset) -> None:
        """Moves the clock by delta, or to just before or exactly at a window's end."""
        if to_window_end is None:
            self.now += delta
        else:
            self.now = max(self.now, model_window(to_window_end, 0, self.now)[1] + offset)

    @precondition(lambda self: any(h.status == "live" for h in self.holds.values()))
    @rule(offset=st.sampled_from([-1, 0]))
    def advance_to_next_expiry(self, offset) -> None:
        due = min(h.expires_at for h in self.holds.values() if h.status == "live")
        self.now = max(self.now, due + offset)

    def grant_expiries(self) -> list[int]:
        return [g.expires_at for (_, key), c in self.counters.items() if key == CREDITS
                for g in c.balance.grants
                if not g.expired and not g.recurring and g.expires_at is not None]

    @precondition(lambda self: self.grant_expiries())
    @rule(offset=st.sampled_from([-1, 0]))
    def advance_to_next_grant_expiry(self, offset) -> None:
        self.now = max(self.now, min(self.grant_expiries()) + offset)

    @rule()
    def sync(self) -> None:
        """The log is durable up to here (what a group commit acknowledges)."""
        self.synced, self.synced_digest = len(self.records), digest(self.core)

    @rule(delta=st.booleans())
    def take_snapshot(self, delta) -> None:
        """A snapshot, written with (so synced with) every record it includes: whole, or a
        delta of the latest whole one (the users changed since)."""
        self.sync()
        if delta and self.snapshot is not None:
            self.delta = snapshot_of(self.core, delta_of_sequence=self.snapshot[0])
            return
        self.snapshot, self.delta = (self.core.sequence, snapshot_of(self.core)), None
        self.core.clear_users_changed()

    @rule()
    def crash_dropping_what_was_not_synced(self) -> None:
        """A crash loses the records after the last sync: recovery from the snapshot and the
        synced log must give exactly the state as it was at that sync."""
        sequence, encoded = self.snapshot if self.snapshot else (0, None)
        recovered = core_from_snapshot(encoded) if encoded else Core()
        if self.delta is not None:
            recovered = core_with_delta(recovered, self.delta)
            sequence = recovered.sequence
        for record in self.records[sequence:self.synced]:
            recovered.replay(record)
        assert digest(recovered) == self.synced_digest
        if self.synced == len(self.records):  # nothing was lost: carry on from it
            self.core = recovered

    @rule(check_answers=st.booleans())
    def crash_and_recover(self, check_answers) -> None:
        """Restart: a fresh Core replays every record so far and must hold the same state."""
        fresh = replay_all(self.records)
        assert digest(fresh) == digest(self.core)
        if check_answers:  # and answer reads alike (a read changes nothing, makes no record)
            at = self.core.last_record_ns  # nothing is due then: all was expired by that apply
            for user in USERS:
                read = GetUsage(app=APP, user_id=user)
                before = digest(fresh)
                mine, theirs = fresh.apply(read, at), self.core.apply(read, at)
                assert mine.result == theirs.result and mine.records == theirs.records == ()
                assert digest(fresh) == before
        self.core = fresh

    # --- invariants -----------------------------------------------------------------------

    def app(self):
        return self.core.apps.get(APP)

    @invariant()
    def counters_agree_with_the_model(self) -> None:
        app = self.app()
        if app is None:
            return
        for user, state in app.users.items():
            core = {key: (c.window_start_ns, c.window_end_ns, c.used, c.held,
                          c.refill_carry, c.refilled_at_ns if key == BUCKET else 0)
                    for (key, window), c in state.counter_items()}
            for (key, window) in state.layout:
                assert window is WINDOW_OF[key]
            model = {key: (c.start, c.end, self.used(key, c), c.held,
                           self.used(key, c) * self.period - c.debt if key == BUCKET else 0,
                           c.at)
                     for (u, key), c in self.counters.items() if u == user}
            assert core == model, (user, core, model)

    @invariant()
    def held_is_the_sum_of_live_holds_in_that_window(self) -> None:
        app = self.app()
        if app is None:
            return
        expected: dict = {}
        for r in app.reservations.values():
            if r.status is HoldState.LIVE:
                for hold in r.holds:
                    slot = (r.user_id, hold.key, hold.window, hold.window_start_ns)
                    expected[slot] = expected.get(slot, 0) + r.amount * hold.rate
        for user, state in app.users.items():
            for (key, window), c in state.counter_items():
                assert c.held == expected.get((user, key, window, c.window_start_ns), 0)
                assert c.used >= 0 and c.held >= 0

    @invariant()
    def used_plus_held_within_quota_unless_an_overage_path_touched_it(self) -> None:
        """protos/DESIGN.md's invariant names four overage paths, each flagged here: Track
        without enforce, a commit above the reserved amount, a commit after expiry (its room
        may have been taken meanwhile) and a lowered quota; and a soft group counts past its
        quota by design."""
        app = self.app()
        if app is None or "p" not in app.plans:
            return
        quota = {g.key: g.quota for g in app.plans["p"].limit_groups}
        for user, state in app.users.items():
            for (key, _), c in state.counter_items():
                if (user, key, c.window_start_ns) not in self.overage:
                    limit = c.balance.quota() if key == CREDITS else quota[key]
                    assert c.used + c.held <= limit, (user, key, c)

    @invariant()
    def balances_agree_with_the_model(self) -> None:
        """Every grant as the model has it, what is owed, and the grant expiry index."""
        app = self.app()
        if app is None:
            return
        index = []
        for user, state in app.users.items():
            c = state.counter(CREDITS, Window.LIFETIME)
            model = self.counters.get((user, CREDITS))
            assert (c is None) == (model is None)
            if c is None:
                continue
            core = [(g.grant_id, g.amount, g.remaining, g.granted_at_ns, g.expires_at_ns,
                     g.priority, g.expired, g.recurring, g.consumed) for g in c.balance.grants]
            assert core == [g.shown() + (g.consumed,) for g in model.balance.grants]
            assert c.balance.owed == model.balance.owed and c.used == c.balance.used()
            assert sum(g.kept for g in c.balance.grants) <= c.held  # kept only for holds
            index.extend((g.expires_at, APP, user, CREDITS, g.grant_id)
                         for g in model.balance.grants
                         if not g.expired and not g.recurring and g.expires_at is not None)
        assert list(self.core.grant_expiry) == sorted(index)

    @invariant()
    def expiry_index_holds_exactly_the_live_holds(self) -> None:
        app = self.app()
        if app is None:
            return
        live = sorted((r.expires_at_ns, r.sequence, APP, r.reservation_id)
                      for r in app.reservations.values() if r.status is HoldState.LIVE)
        assert list(self.core.expiry) == live
        model_live = {r: h.expires_at for r, h in self.holds.items() if h.status == "live"}
        assert {e[3]: e[0] for e in self.core.expiry} == model_live
        for user, state in app.users.items():
            assert state.live_holds == sum(1 for h in self.holds.values()
                                           if h.user == user and h.status == "live")

    @invariant()
    def reservations_and_keys_are_remembered_as_long_as_promised(self) -> None:
        app = self.app()
        if app is None:
            return
        for reservation_id, r in app.reservations.items():
            hold = self.holds[reservation_id]
            assert r.status.value == hold.status and r.amount == hold.amount
            assert r.user_id == hold.user
        for reservation_id in self.holds:
            if self.known(reservation_id):
                assert reservation_id in app.reservations, reservation_id
        for slot in self.retryable():
            assert slot in app.idempotency, slot
        for slot, entry in app.idempotency.items():  # only what the model remembers too
            assert slot in self.keys, slot
            assert entry.result == self.keys[slot][1]

    @invariant()
    def records_are_numbered_without_gaps_and_in_time_order(self) -> None:
        assert [r.sequence for r in self.records] == list(range(1, len(self.records) + 1))
        assert all(a.now_ns <= b.now_ns for a, b in zip(self.records, self.records[1:]))
        assert self.core.sequence == len(self.records)


QuotaMachine.TestCase.settings = settings(
    max_examples=MAX_EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestCoreAgainstModel = QuotaMachine.TestCase
