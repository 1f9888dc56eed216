"""Plans, limit groups, match rules and subscriptions: immutable values, validated when built."""

from __future__ import annotations

import enum
import zoneinfo
from dataclasses import dataclass
from functools import lru_cache

from quotad.core import limits
from quotad.core.errors import Violations
from quotad.core.values import value_type
from quotad_contract.zones import time_zone_problem

Metadata = tuple[tuple[str, str], ...]
"""Event metadata as (key, value) pairs sorted by key: hashable and canonical."""


class Window(enum.IntEnum):
    """Numbered as in the proto enum."""

    MINUTE = 1
    HOUR = 2
    DAY = 3
    WEEK = 4
    MONTH = 5
    LIFETIME = 6


class Kind(enum.IntEnum):
    """What a limit group is; numbered as in the proto enum LimitKind."""

    QUOTA = 1
    """A calendar quota: used + held within the quota in each window."""
    RATE = 2
    """A token bucket of capacity `quota`, refilled continuously over `period_ns`."""
    BALANCE = 3
    """A credit balance: its quota is the sum of the user's live grants (core.balances)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MetadataMatch:
    key: str
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Match:
    event_types: tuple[str, ...] = ()
    metadata: tuple[MetadataMatch, ...] = ()

    def matches(self, event_type: str, metadata: dict[str, str]) -> bool:
        if self.event_types and not any(
            event_type_matches(pattern, event_type) for pattern in self.event_types
        ):
            return False
        return all(metadata.get(m.key) in m.values for m in self.metadata)


def event_type_matches(pattern: str, event_type: str) -> bool:
    """`*` matches all; `openai.*` matches `openai.chat` but not `openai`; else exact."""
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        prefix = pattern[:-1]  # keeps the dot
        return len(event_type) > len(prefix) and event_type.startswith(prefix)
    return pattern == event_type


@dataclass(frozen=True, slots=True, kw_only=True)
class Cost:
    """A group that counts amount x rate, the rate chosen by the event's metadata[by]: the
    rate of that value, else default_rate, else (None) the group does not match the event.
    Rates are integers, so that a unit such as micro-dollars stays exact."""

    by: str
    rates: tuple[tuple[str, int], ...] = ()
    """(metadata value, rate) pairs, sorted by value, each value once."""
    default_rate: int | None = None

    def rate_of(self, metadata: dict[str, str]) -> int | None:
        value = metadata.get(self.by)
        if value is not None:
            for known, rate in self.rates:
                if known == value:
                    return rate
        return self.default_rate


@dataclass(frozen=True, slots=True, kw_only=True)
class RecurringGrant:
    """A BALANCE group's grant made at the start of every window of `every`, in the user's
    time zone, expiring at its end; what the previous one left (up to rollover_max) is
    added to it."""

    amount: int
    every: Window
    rollover_max: int = 0
    priority: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitGroup:
    key: str
    label: str = ""
    unit: str = ""
    quota: int
    window: Window
    match: Match = Match()
    enforce: bool = True
    """False: a soft limit. The group counts and shows its overage but never denies."""
    cost: Cost | None = None
    """None: the group counts the amount itself (a rate of 1)."""
    kind: Kind = Kind.QUOTA
    period_ns: int = 0
    """A RATE group's: its bucket refills `quota` tokens over this long (0 for QUOTA). A
    RATE group has no calendar window: its window is LIFETIME, and it has no thresholds."""
    grant: RecurringGrant | None = None
    """A BALANCE group's recurring grant; None: grants come from GrantCredits alone."""

    def rate(self, metadata: dict[str, str]) -> int | None:
        """What one unit of an event's amount counts here; None: the group does not match."""
        return 1 if self.cost is None else self.cost.rate_of(metadata)


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    id: str
    name: str = ""
    limit_groups: tuple[LimitGroup, ...] = ()

    def __post_init__(self) -> None:
        validate_plan(self)

    def matched(self, event_type: str, metadata: Metadata) -> tuple[tuple[LimitGroup, int], ...]:
        """Every group the event hits, with the rate its amount counts at there (a group
        with a cost and no rate for the event does not match)."""
        metadata_dict = dict(metadata)
        matched = []
        for group in self.limit_groups:
            if group.match.matches(event_type, metadata_dict):
                rate = group.rate(metadata_dict)
                if rate is not None:
                    matched.append((group, rate))
        return tuple(matched)

    def group(self, key: str) -> LimitGroup | None:
        for group in self.limit_groups:
            if group.key == key:
                return group
        return None


def validate_plan(plan: Plan) -> None:
    v = Violations()
    v.text(plan.id, "plan.id", bytes_min=1, bytes_max=limits.PLAN_ID_BYTES_MAX)
    v.text(plan.name, "plan.name", bytes_min=0, bytes_max=limits.PLAN_NAME_BYTES_MAX)
    groups = plan.limit_groups
    v.check(
        len(groups) <= limits.LIMIT_GROUPS_PER_PLAN_MAX,
        "plan.limit_groups",
        f"at most {limits.LIMIT_GROUPS_PER_PLAN_MAX} limit groups, got {len(groups)}",
    )
    keys = [g.key for g in groups]
    v.check(len(set(keys)) == len(keys), "plan.limit_groups", "keys must be unique")
    for index, group in enumerate(groups[: limits.LIMIT_GROUPS_PER_PLAN_MAX]):
        _validate_group(v, group, f"plan.limit_groups[{index}]")
    v.raise_if_any()


def _validate_group(v: Violations, group: LimitGroup, field: str) -> None:
    v.text(group.key, f"{field}.key", bytes_min=1, bytes_max=limits.GROUP_KEY_BYTES_MAX)
    v.text(group.label, f"{field}.label", bytes_min=0, bytes_max=limits.GROUP_LABEL_BYTES_MAX)
    v.text(group.unit, f"{field}.unit", bytes_min=0, bytes_max=limits.GROUP_UNIT_BYTES_MAX)
    v.check(
        type(group.quota) is int and 0 <= group.quota <= limits.QUOTA_MAX,
        f"{field}.quota",
        f"must be 0 to {limits.QUOTA_MAX}",
    )
    v.check(isinstance(group.window, Window), f"{field}.window",
            "must be one of MINUTE, HOUR, DAY, WEEK, MONTH, LIFETIME")
    patterns = group.match.event_types
    v.check(
        len(patterns) <= limits.EVENT_TYPE_PATTERNS_PER_GROUP_MAX,
        f"{field}.match.event_types",
        f"at most {limits.EVENT_TYPE_PATTERNS_PER_GROUP_MAX} patterns",
    )
    for i, pattern in enumerate(patterns):
        v.text(pattern, f"{field}.match.event_types[{i}]", bytes_min=1,
               bytes_max=limits.EVENT_TYPE_BYTES_MAX)
        v.check(
            _pattern_is_valid(pattern),
            f"{field}.match.event_types[{i}]",
            "must be '*', an exact event type, or a prefix ending in '.*'",
        )
    constraints = group.match.metadata
    v.check(
        len(constraints) <= limits.METADATA_MATCHES_PER_GROUP_MAX,
        f"{field}.match.metadata",
        f"at most {limits.METADATA_MATCHES_PER_GROUP_MAX} constraints",
    )
    first_index_by_key: dict[str, int] = {}
    for i, constraint in enumerate(constraints):
        where = f"{field}.match.metadata[{i}]"
        v.text(constraint.key, f"{where}.key", bytes_min=1,
               bytes_max=limits.METADATA_KEY_BYTES_MAX)
        first = first_index_by_key.setdefault(constraint.key, i)
        v.check(first == i, f"{where}.key",
                f"repeats the key of metadata[{first}]: one constraint per key, holding "
                "every value it allows")
        v.check(
            1 <= len(constraint.values) <= limits.METADATA_MATCH_VALUES_MAX,
            f"{where}.values",
            f"must hold 1 to {limits.METADATA_MATCH_VALUES_MAX} values",
        )
        for value in constraint.values:
            v.text(value, f"{where}.values", bytes_min=0,
                   bytes_max=limits.METADATA_VALUE_BYTES_MAX)
    v.check(type(group.enforce) is bool, f"{field}.enforce", "must be true or false")
    _validate_kind(v, group, field)
    if group.cost is not None:
        _validate_cost(v, group.cost, f"{field}.cost")


def _validate_kind(v: Violations, group: LimitGroup, field: str) -> None:
    if group.kind is Kind.RATE:
        v.check(type(group.period_ns) is int
                and limits.RATE_PERIOD_NS_MIN <= group.period_ns <= limits.RATE_PERIOD_NS_MAX,
                f"{field}.period", f"must be {limits.RATE_PERIOD_NS_MIN // limits.NS_PER_S} s to "
                f"{limits.RATE_PERIOD_NS_MAX // limits.NS_PER_S} s for a rate group")
        v.check(group.window is Window.LIFETIME, f"{field}.window",
                "a rate group refills over its period and has no calendar window: leave it "
                "unset (or LIFETIME)")
    elif group.kind is Kind.BALANCE:
        v.check(group.period_ns == 0, f"{field}.period", "only a rate group has a period")
        v.check(group.quota == 0, f"{field}.quota",
                "a balance group's quota is the sum of its grants: leave it 0")
        v.check(group.window is Window.LIFETIME, f"{field}.window",
                "a balance group has no calendar window: leave it unset (or LIFETIME)")
        if group.grant is not None:
            _validate_recurring_grant(v, group.grant, f"{field}.grant")
    else:
        v.check(group.kind is Kind.QUOTA, f"{field}.kind", "must be QUOTA, RATE or BALANCE")
        v.check(group.period_ns == 0, f"{field}.period", "only a rate group has a period")
    if group.kind is not Kind.BALANCE:
        v.check(group.grant is None, f"{field}.grant", "only a balance group has a grant")


def _validate_recurring_grant(v: Violations, grant: RecurringGrant, field: str) -> None:
    amount_ok = type(grant.amount) is int and 1 <= grant.amount <= limits.GRANT_AMOUNT_MAX
    v.check(amount_ok, f"{field}.amount", f"must be 1 to {limits.GRANT_AMOUNT_MAX}")
    v.check(isinstance(grant.every, Window) and grant.every is not Window.LIFETIME,
            f"{field}.every", "must be one of MINUTE, HOUR, DAY, WEEK, MONTH")
    v.check(type(grant.rollover_max) is int and 0 <= grant.rollover_max
            and (not amount_ok or grant.rollover_max <= grant.amount),
            f"{field}.rollover_max", "must be 0 to the grant's amount")
    v.check(type(grant.priority) is int and 0 <= grant.priority <= limits.GRANT_PRIORITY_MAX,
            f"{field}.priority", f"must be 0 to {limits.GRANT_PRIORITY_MAX}")


def _rate_is_valid(rate: object) -> bool:
    return type(rate) is int and 1 <= rate <= limits.COST_RATE_MAX


def _validate_cost(v: Violations, cost: Cost, field: str) -> None:
    v.text(cost.by, f"{field}.by", bytes_min=1, bytes_max=limits.METADATA_KEY_BYTES_MAX)
    rates = cost.rates
    v.check(len(rates) <= limits.COST_RATES_PER_GROUP_MAX, f"{field}.rates",
            f"at most {limits.COST_RATES_PER_GROUP_MAX} rates, got {len(rates)}")
    values = [value for value, _ in rates]
    v.check(values == sorted(set(values)), f"{field}.rates",
            "values must be unique and sorted")
    for value, rate in rates[: limits.COST_RATES_PER_GROUP_MAX]:
        v.text(value, f"{field}.rates", bytes_min=0, bytes_max=limits.METADATA_VALUE_BYTES_MAX)
        v.check(_rate_is_valid(rate), f"{field}.rates",
                f"the rate of {value[:64]!r} must be 1 to {limits.COST_RATE_MAX}")
    v.check(cost.default_rate is None or _rate_is_valid(cost.default_rate),
            f"{field}.default_rate", f"must be 1 to {limits.COST_RATE_MAX} when set")
    v.check(bool(rates) or cost.default_rate is not None, f"{field}.rates",
            "a cost needs at least one rate or a default_rate")


def _pattern_is_valid(pattern: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return len(pattern) > 2 and "*" not in pattern[:-2]
    return "*" not in pattern


@value_type
class Subscription:
    user_id: str
    plan_id: str
    time_zone: str = "UTC"
    billing_customer_id: str = ""


@lru_cache(maxsize=1024)
def load_time_zone(name: str) -> zoneinfo.ZoneInfo | None:
    """The zone for an IANA name, or None if a subscription may not name it (see
    quotad_contract.zones: tzdata's zones, not the host's `localtime`, `posix/` or `right/`),
    so that a log replays alike on any host."""
    if time_zone_problem(name) is not None:
        return None
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return None
