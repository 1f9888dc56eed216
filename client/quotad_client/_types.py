"""Plain, immutable Python results of quotad calls (no protobuf objects).

Every time is a timezone-aware ``datetime`` in UTC. Windows are lower-case names
("minute", "hour", "day", "week", "month", "lifetime").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

WINDOWS: tuple[str, ...] = ("minute", "hour", "day", "week", "month", "lifetime")
"""The window names a limit group may use."""

def _empty_mapping() -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Counter:
    """One limit group's counter for one user in the current window."""

    key: str
    label: str
    unit: str
    window: str
    quota: int
    used: int
    held: int
    remaining: int
    window_start: datetime
    resets_at: datetime | None
    """``None`` for lifetime windows."""
    overage: int = 0
    """max(0, used + held - quota): what was counted past the quota (a soft limit's usage
    beyond it, or a commit above its hold, a track without enforce)."""
    kind: str = "quota"
    """"quota" (a calendar quota), "rate" (a token bucket: ``remaining`` is the tokens
    available now, ``used`` what commits and tracks took that has not refilled yet) or
    "balance" (credits: ``quota`` is the live grants' total, ``used`` what was consumed from
    them, ``held`` what live holds reserved, ``remaining`` what is left to reserve, and
    ``resets_at`` when the next recurring grant comes)."""
    full_at: datetime | None = None
    """A rate bucket's: when everything commits and tracks took is back, if nothing else
    happens (live holds keep their tokens until they end); ``None`` for a quota."""


def _find(counters: tuple[Counter, ...], key: str) -> Counter | None:
    for counter in counters:
        if counter.key == key:
            return counter
    return None


@dataclass(frozen=True, slots=True)
class Reservation:
    """The answer to Reserve: a hold on every matched limit group, or a denial."""

    allowed: bool
    reservation_id: str
    """Set when allowed (also when the event matched no limit group); empty when denied."""
    expires_at: datetime | None
    counters: tuple[Counter, ...]
    """The matched groups' counters after the operation."""
    denied_by: str
    """The key of the first group that had no room, when denied."""
    amount: int
    """The amount that was asked for (and is held, when allowed)."""
    fits_at: datetime | None = None
    """Denied: when the same request would fit if nothing else happened (a rate bucket
    refilled, a window reset); ``None`` when allowed or when waiting alone never fits."""

    def counter(self, key: str) -> Counter | None:
        return _find(self.counters, key)


@dataclass(frozen=True, slots=True)
class CommitResult:
    counters: tuple[Counter, ...]
    committed: int
    returned: int
    """What this commit gave back to the user (reserved - committed, when positive)."""
    expired: bool
    """The hold had expired before the commit; the usage was recorded all the same."""

    def counter(self, key: str) -> Counter | None:
        return _find(self.counters, key)


@dataclass(frozen=True, slots=True)
class ReleaseResult:
    counters: tuple[Counter, ...]

    def counter(self, key: str) -> Counter | None:
        return _find(self.counters, key)


@dataclass(frozen=True, slots=True)
class TrackResult:
    allowed: bool
    counters: tuple[Counter, ...]
    denied_by: str
    fits_at: datetime | None = None
    """Denied (enforce): when it would fit, as ``Reservation.fits_at``."""

    def counter(self, key: str) -> Counter | None:
        return _find(self.counters, key)


@dataclass(frozen=True, slots=True)
class Usage:
    """A user's counters, one per limit group of their plan."""

    user_id: str
    plan_id: str
    counters: tuple[Counter, ...]

    def counter(self, key: str) -> Counter | None:
        return _find(self.counters, key)

    def __getitem__(self, key: str) -> Counter:
        found = _find(self.counters, key)
        if found is None:
            raise KeyError(key)
        return found


@dataclass(frozen=True, slots=True)
class Match:
    """Which events a limit group counts: event types and metadata constraints."""

    event_types: tuple[str, ...] = ()
    """Exact ("openai.chat"), prefix ("openai.*"), or "*". Empty: every event type."""
    metadata: Mapping[str, tuple[str, ...]] = field(default_factory=_empty_mapping)
    """metadata[key] must be one of the values, for every key."""


def _no_rates() -> Mapping[str, int]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Cost:
    """A limit group counts amount x rate, the rate picked by the event's ``metadata[by]``:
    ``rates[value]``, else ``default_rate``; with neither, the group does not match."""

    by: str
    rates: Mapping[str, int] = field(default_factory=_no_rates)
    default_rate: int | None = None


@dataclass(frozen=True, slots=True)
class RecurringGrant:
    """A balance group's grant made at the start of every window of ``every`` (minute ...
    month, in the user's time zone), expiring at its end; what the previous one had left,
    at most ``rollover_max``, is added to it."""

    amount: int
    every: str
    rollover_max: int = 0
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Grant:
    """One credit grant of a user's balance group."""

    grant_id: str
    group_key: str
    granted: int
    remaining: int
    """What is left to spend (an expired grant's: what it keeps for live holds)."""
    granted_at: datetime
    expires_at: datetime | None
    """``None``: never expires."""
    priority: int
    expired: bool = False
    recurring: bool = False
    """Made by the plan's recurring grant."""


@dataclass(frozen=True, slots=True)
class GrantResult:
    grant: Grant
    counter: Counter
    """The balance group's counter after the grant."""


@dataclass(frozen=True, slots=True)
class LimitGroup:
    key: str
    label: str
    unit: str
    quota: int
    window: str
    match: Match = field(default_factory=Match)
    enforce: bool = True
    """False: a soft limit, which counts and shows its overage but never denies."""
    cost: Cost | None = None
    """None: the group counts the amount itself."""
    kind: str = "quota"
    """"quota", "rate": a token bucket of capacity ``quota`` refilled over ``period_s``
    (its window is "lifetime": it has no calendar window), or "balance": credits, the
    quota being the user's live grants (its quota is 0 and its window "lifetime")."""
    period_s: int | None = None
    """A rate group's refill period in seconds; ``None`` for a quota."""
    grant: RecurringGrant | None = None
    """A balance group's recurring grant; ``None``: none."""


@dataclass(frozen=True, slots=True)
class Plan:
    id: str
    name: str
    limit_groups: tuple[LimitGroup, ...] = ()


@dataclass(frozen=True, slots=True)
class UpsertPlanResult:
    plan: Plan
    changed: bool
    """False when the stored plan was already identical."""


@dataclass(frozen=True, slots=True)
class Subscription:
    user_id: str
    plan_id: str
    time_zone: str
    """IANA time zone that anchors calendar windows; empty means UTC."""
    billing_customer_id: str = ""
    """Who pays in the billing system (a Stripe customer id); empty: none."""


@dataclass(frozen=True, slots=True)
class SubscriptionPage:
    subscriptions: tuple[Subscription, ...]
    next_page_token: str
    """Empty on the last page."""


@dataclass(frozen=True, slots=True)
class UpsertSubscriptionResult:
    subscription: Subscription
    changed: bool


@dataclass(frozen=True, slots=True)
class Event:
    """One audit record."""

    sequence: int
    time: datetime
    kind: str
    """"reserve", "commit", "release", "expire", "extend", "track" or "threshold"."""
    user_id: str
    event_type: str
    amount: int
    metadata: Mapping[str, str]
    reservation_id: str
    allowed: bool
    limit_group_key: str = ""
    """Threshold events: the limit group, the percent of its quota reached, and the window."""
    threshold_percent: int = 0
    window_start: datetime | None = None


@dataclass(frozen=True, slots=True)
class UsageLine:
    """One committed or tracked amount, for billing (ExportUsage)."""

    id: str
    """"<sequence>-<index>" (a shard's: "<shard_id>:<sequence>-<index>"): the same usage
    always has the same id."""
    sequence: int
    index: int
    time: datetime
    kind: str
    """"commit" or "track"."""
    user_id: str
    billing_customer_id: str
    event_type: str
    amount: int
    """In the request's unit; negative: a refund."""
    metadata: Mapping[str, str]
    reservation_id: str
    shard_id: int = 0
    """The shard whose log holds it (0 for a server alone)."""


@dataclass(frozen=True, slots=True)
class UsageExportPage:
    """One message of an export: its lines, and the cursor that resumes right after them."""

    lines: tuple[UsageLine, ...]
    next_cursor: str


@dataclass(frozen=True, slots=True)
class ThresholdCrossed:
    """A limit group's used + held reached ``percent`` of its quota (once per window)."""

    limit_group_key: str
    percent: int
    window_start: datetime
    sequence: int
    """The log record that crossed it."""


@dataclass(frozen=True, slots=True)
class WatchUpdate:
    """One message of ``watch_usage``: the user's counters as of log record ``sequence``."""

    reason: str
    """"initial" (the counters when the watch (re)starts), "change" (a log record changed
    them) or "window_reset" (a window of one of the user's limit groups rolled over)."""
    sequence: int
    user_id: str
    plan_id: str
    counters: tuple[Counter, ...]
    thresholds: tuple[ThresholdCrossed, ...]
    """Crossed by this change; in an "initial" update after a reconnect, those crossed since
    the last update seen (each is delivered once)."""

    def counter(self, key: str) -> Counter | None:
        return _find(self.counters, key)


@dataclass(frozen=True, slots=True)
class EventPage:
    events: tuple[Event, ...]
    next_page_token: str
    """Empty on the last page."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as the server shows it: never the secret."""

    key_id: str
    app: str
    kind: str
    """"secret" (sk_...) or "public" (pk_...)."""
    name: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key: ApiKey
    secret: str
    """The whole key ("sk_..." or "pk_..."): shown only once, store it now."""


@dataclass(frozen=True, slots=True)
class UserToken:
    token: str
    """Send as ``x-quotad-user-token`` (``user_token=`` of the clients) with a pk_ key."""
    expires_at: datetime
