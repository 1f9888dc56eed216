"""Commands the core applies, and the results it answers with: immutable values.

Each command validates its own fields when built (InvalidArgument names each bad field), so an
invalid command never exists and the core only checks what depends on the state. Field names
in violations are the contract's. A command that changes the state becomes a log record.
"""

from __future__ import annotations

import re
from dataclasses import field
from typing import Any

from quotad.core import limits
from quotad.core.errors import Violations
from quotad.core.plans import Kind, Metadata, Plan, Subscription, Window, load_time_zone
from quotad.core.values import value_type
from quotad_contract import tokens
from quotad_contract.limits import SLOTS
from quotad_contract.zones import time_zone_problem

RESERVATION_ID_PATTERN = re.compile(r"rsv_[0-9a-f]{24}")
KEY_ID_PATTERN = re.compile(tokens.KEY_ID_PATTERN)
"""The public part of an API key: 12 lowercase base32 characters (60 random bits)."""
KEY_KINDS = ("secret", "public")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


# --- the rules of the fields: each written once, for every request that carries the field ---


def check_user_id(v: Violations, user_id: str) -> None:
    """The one rule of a user id, wherever one arrives (gRPC, Batch, WatchUsage, HTTP)."""
    v.text(user_id, "user_id", bytes_min=1, bytes_max=limits.USER_ID_BYTES_MAX)


def _app(v: Violations, app: str, bytes_min: int = 1) -> None:
    v.text(app, "app", bytes_min=bytes_min, bytes_max=limits.APP_ID_BYTES_MAX)


def _plan_id(v: Violations, plan_id: str, name: str) -> None:
    v.text(plan_id, name, bytes_min=1, bytes_max=limits.PLAN_ID_BYTES_MAX)


def _common(v: Violations, app: str, idempotency_key: str) -> None:
    _app(v, app)
    v.text(idempotency_key, "idempotency_key", bytes_min=0,
           bytes_max=limits.IDEMPOTENCY_KEY_BYTES_MAX)


def _event(v: Violations, user_id: str, event_type: str, metadata: Metadata) -> None:
    check_user_id(v, user_id)
    v.text(event_type, "event_type", bytes_min=1, bytes_max=limits.EVENT_TYPE_BYTES_MAX)
    if len(metadata) > limits.METADATA_ENTRIES_MAX:
        v.add("metadata", f"at most {limits.METADATA_ENTRIES_MAX} entries, got {len(metadata)}")
    if len(metadata) > 1:  # one entry or none is sorted
        keys = [key for key, _ in metadata]
        if keys != sorted(set(keys)):
            v.add("metadata", "keys must be unique and sorted")
    for key, value in metadata[: limits.METADATA_ENTRIES_MAX]:
        v.text(key, "metadata", bytes_min=1, bytes_max=limits.METADATA_KEY_BYTES_MAX)
        v.text(value, "metadata", bytes_min=0, bytes_max=limits.METADATA_VALUE_BYTES_MAX)


def _reservation_id(v: Violations, reservation_id: str) -> None:
    if not RESERVATION_ID_PATTERN.fullmatch(reservation_id):
        v.add("reservation_id", "must be a reservation id as Reserve returns it")


def _duration(v: Violations, duration_ns: int | None, name: str, duration_ns_min: int,
              duration_ns_max: int) -> None:
    """A duration (a hold's or a user token's ttl): None is one the request left out."""
    if duration_ns is None:
        v.add(name, "is required")
    elif not (type(duration_ns) is int and duration_ns_min <= duration_ns <= duration_ns_max):
        v.add(name, f"must be {duration_ns_min // limits.NS_PER_S} s to "
                    f"{duration_ns_max // limits.NS_PER_S} s")


def _ttl(v: Violations, ttl_ns: int | None) -> None:
    _duration(v, ttl_ns, "ttl", limits.TTL_NS_MIN, limits.TTL_NS_MAX)


def _int(value: object) -> bool:
    return type(value) is int


def _catalog_revision(v: Violations, revision: int) -> None:
    """The etcd revision of a change of a cluster's catalog (0: a change of this server's
    own, not from a catalog)."""
    v.check(_int(revision) and 0 <= revision <= limits.CATALOG_REVISION_MAX, "catalog_revision",
            f"must be 0 to {limits.CATALOG_REVISION_MAX}")


# --- the hot path -------------------------------------------------------------------------


@value_type(kw_only=True)
class Reserve:
    app: str
    user_id: str
    event_type: str
    amount: int
    metadata: Metadata = ()
    ttl_ns: int = limits.TTL_NS_DEFAULT
    idempotency_key: str = ""
    reservation_id: str
    """Chosen by the server before the command is applied, so that replay makes the same."""

    def __post_init__(self) -> None:
        v = Violations()
        _common(v, self.app, self.idempotency_key)
        _event(v, self.user_id, self.event_type, self.metadata)
        if not (_int(self.amount) and 1 <= self.amount <= limits.AMOUNT_MAX):
            v.add("amount", f"must be 1 to {limits.AMOUNT_MAX}")
        _ttl(v, self.ttl_ns)
        _reservation_id(v, self.reservation_id)
        v.raise_if_any()


@value_type(kw_only=True)
class Commit:
    app: str
    reservation_id: str
    amount: int | None = None
    """None: the reserved amount."""
    idempotency_key: str = ""

    def __post_init__(self) -> None:
        v = Violations()
        _common(v, self.app, self.idempotency_key)
        _reservation_id(v, self.reservation_id)
        if not (self.amount is None
                or (_int(self.amount) and 0 <= self.amount <= limits.AMOUNT_MAX)):
            v.add("amount", f"must be 0 to {limits.AMOUNT_MAX}")
        v.raise_if_any()


@value_type(kw_only=True)
class Release:
    app: str
    reservation_id: str
    idempotency_key: str = ""

    def __post_init__(self) -> None:
        v = Violations()
        _common(v, self.app, self.idempotency_key)
        _reservation_id(v, self.reservation_id)
        v.raise_if_any()


@value_type(kw_only=True)
class Extend:
    app: str
    reservation_id: str
    ttl_ns: int
    """None is refused: Extend has no default."""
    idempotency_key: str = ""

    def __post_init__(self) -> None:
        v = Violations()
        _common(v, self.app, self.idempotency_key)
        _reservation_id(v, self.reservation_id)
        _ttl(v, self.ttl_ns)
        v.raise_if_any()


@value_type(kw_only=True)
class Track:
    app: str
    user_id: str
    event_type: str
    amount: int
    metadata: Metadata = ()
    idempotency_key: str = ""
    enforce: bool = False

    def __post_init__(self) -> None:
        v = Violations()
        _common(v, self.app, self.idempotency_key)
        _event(v, self.user_id, self.event_type, self.metadata)
        if not (_int(self.amount) and self.amount != 0 and abs(self.amount) <= limits.AMOUNT_MAX):
            v.add("amount", f"must be non-zero, at most {limits.AMOUNT_MAX} either way")
        v.raise_if_any()


@value_type(kw_only=True)
class GetUsage:
    app: str
    user_id: str

    def __post_init__(self) -> None:
        v = Violations()
        _app(v, self.app)
        check_user_id(v, self.user_id)
        v.raise_if_any()


@value_type(kw_only=True)
class GrantCredits:
    """Credits for a user's balance group: a new grant (a top-up is one more)."""

    app: str
    user_id: str
    group_key: str
    amount: int
    expires_at_ns: int | None = None
    """None: never expires. Must be after the time it is applied at (checked by the core)."""
    priority: int = 0
    idempotency_key: str = ""

    def __post_init__(self) -> None:
        v = Violations()
        _common(v, self.app, self.idempotency_key)
        check_user_id(v, self.user_id)
        v.text(self.group_key, "group_key", bytes_min=1, bytes_max=limits.GROUP_KEY_BYTES_MAX)
        v.check(_int(self.amount) and 1 <= self.amount <= limits.GRANT_AMOUNT_MAX,
                "amount", f"must be 1 to {limits.GRANT_AMOUNT_MAX}")
        _time(v, self.expires_at_ns, "expires_at")
        v.check(_int(self.priority) and 0 <= self.priority <= limits.GRANT_PRIORITY_MAX,
                "priority", f"must be 0 to {limits.GRANT_PRIORITY_MAX}")
        v.raise_if_any()


@value_type(kw_only=True)
class ListGrants:
    """A user's credit grants, of every balance group of their plan or of one."""

    app: str
    user_id: str
    group_key: str = ""
    """Empty: every balance group's."""

    def __post_init__(self) -> None:
        v = Violations()
        _app(v, self.app)
        check_user_id(v, self.user_id)
        v.text(self.group_key, "group_key", bytes_min=0, bytes_max=limits.GROUP_KEY_BYTES_MAX)
        v.raise_if_any()


# --- administration ---------------------------------------------------------------------


@value_type(kw_only=True)
class UpsertPlan:
    app: str
    plan: Plan  # validated when built
    catalog_revision: int = 0
    """A cluster's catalog change at this etcd revision (0: this server's own)."""

    def __post_init__(self) -> None:
        v = Violations()
        _app(v, self.app)
        _catalog_revision(v, self.catalog_revision)
        v.check(isinstance(self.plan, Plan), "plan", "is required")
        v.raise_if_any()


@value_type(kw_only=True)
class DeletePlan:
    app: str
    plan_id: str
    catalog_revision: int = 0
    """A cluster's catalog change at this etcd revision (0: this server's own)."""

    def __post_init__(self) -> None:
        v = Violations()
        _app(v, self.app)
        _catalog_revision(v, self.catalog_revision)
        _plan_id(v, self.plan_id, "id")
        v.raise_if_any()


@value_type(kw_only=True)
class GetPlan:
    app: str
    plan_id: str

    def __post_init__(self) -> None:
        v = Violations()
        _app(v, self.app)
        _plan_id(v, self.plan_id, "id")
        v.raise_if_any()


@value_type(kw_only=True)
class ListPlans:
    app: str


@value_type(kw_only=True)
class UpsertSubscription:
    app: str
    user_id: str
    plan_id: str
    time_zone: str = "UTC"
    billing_customer_id: str | None = None
    """None: the subscription keeps the one it has (none for a new one); "": none."""

    def __post_init__(self) -> None:
        v = Violations()
        _app(v, self.app)
        check_user_id(v, self.user_id)
        _plan_id(v, self.plan_id, "plan_id")
        v.text(self.time_zone, "time_zone", bytes_min=0, bytes_max=limits.TIME_ZONE_BYTES_MAX)
        if self.time_zone and load_time_zone(self.time_zone) is None:
            v.add("time_zone", time_zone_problem(self.time_zone)
                  or f"time zone {self.time_zone!r} has no data on this host")
        if self.billing_customer_id is not None:
            v.text(self.billing_customer_id, "billing_customer_id", bytes_min=0,
                   bytes_max=limits.BILLING_CUSTOMER_ID_BYTES_MAX)
            v.check(self.billing_customer_id.isprintable(), "billing_customer_id",
                    "must be printable text")
        v.raise_if_any()


@value_type(kw_only=True)
class ListSubscriptions:
    """One page of an app's subscriptions (or one plan's), in user id order."""

    app: str
    plan_id: str = ""
    """Empty: every plan's."""
    page_size: int = 0
    """0: limits.SUBSCRIPTIONS_PAGE_SIZE_DEFAULT."""
    after_user_id: str = ""
    """The page starts after this user id; empty: at the first."""

    def __post_init__(self) -> None:
        v = Violations()
        _app(v, self.app)
        v.text(self.plan_id, "plan_id", bytes_min=0, bytes_max=limits.PLAN_ID_BYTES_MAX)
        v.check(_int(self.page_size) and 0 <= self.page_size <= limits.SUBSCRIPTIONS_PAGE_SIZE_MAX,
                "page_size", f"must be 0 (meaning {limits.SUBSCRIPTIONS_PAGE_SIZE_DEFAULT}) to "
                             f"{limits.SUBSCRIPTIONS_PAGE_SIZE_MAX}")
        v.text(self.after_user_id, "page_token", bytes_min=0, bytes_max=limits.USER_ID_BYTES_MAX)
        v.raise_if_any()

    @property
    def subscriptions_per_page(self) -> int:
        return self.page_size or limits.SUBSCRIPTIONS_PAGE_SIZE_DEFAULT


@value_type(kw_only=True)
class GetSubscription:
    app: str
    user_id: str

    def __post_init__(self) -> None:
        v = Violations()
        _app(v, self.app)
        check_user_id(v, self.user_id)
        v.raise_if_any()


# --- API keys ---------------------------------------------------------------------------


def _key_id(v: Violations, key_id: str) -> None:
    if not KEY_ID_PATTERN.fullmatch(key_id):
        v.add("key_id", "must be a key id as CreateKey returns it (12 characters a-z, 2-7)")


def _key_kind_and_name(v: Violations, kind: str, name: str) -> None:
    v.check(kind in KEY_KINDS, "kind", "must be KEY_KIND_SECRET or KEY_KIND_PUBLIC")
    v.text(name, "name", bytes_min=0, bytes_max=limits.KEY_NAME_BYTES_MAX)


@value_type(kw_only=True)
class KeySpec:
    """The key a CreateKey request asks for, checked before the service makes the key (and
    then applies CreateKey with it). Never applied by the core itself."""

    app: str
    kind: str
    """secret or public; any other value is refused."""
    name: str = ""

    def __post_init__(self) -> None:
        v = Violations()
        _app(v, self.app)
        _key_kind_and_name(v, self.kind, self.name)
        v.raise_if_any()


@value_type(kw_only=True)
class CreateKey:
    """A new API key of an app. The key itself is made by the service and never stored: only
    its SHA-256, and for a secret key the HMAC key its user tokens are signed with."""

    app: str
    key_id: str
    kind: str
    """secret or public."""
    name: str = ""
    secret_sha256: str
    """Hex SHA-256 of the whole key ("sk_<key_id>_<secret>")."""
    token_signing_key: str = ""
    """Hex HMAC-SHA256 key for user tokens (secret keys only; empty for public ones)."""
    created_at_ns: int = 0
    """When the key was made, as a cluster's catalog says (0: when applied)."""
    catalog_revision: int = 0
    """A cluster's catalog change at this etcd revision (0: this server's own)."""

    def __post_init__(self) -> None:
        v = Violations()
        _app(v, self.app)
        _key_id(v, self.key_id)
        _time(v, self.created_at_ns, "created_at")
        _catalog_revision(v, self.catalog_revision)
        _key_kind_and_name(v, self.kind, self.name)
        v.check(bool(_SHA256_HEX.fullmatch(self.secret_sha256)), "secret_sha256",
                "must be 64 lowercase hex digits")
        v.check(bool(_SHA256_HEX.fullmatch(self.token_signing_key)) if self.kind == "secret"
                else self.token_signing_key == "", "token_signing_key",
                "must be 64 lowercase hex digits for a secret key, empty for a public one")
        v.raise_if_any()


@value_type(kw_only=True)
class RevokeKey:
    app: str
    """The caller's app: only its own keys may be revoked. Empty: the admin key, any app."""
    key_id: str
    revoked_at_ns: int = 0
    """When the key was revoked, as a cluster's catalog says (0: when applied)."""
    catalog_revision: int = 0
    """A cluster's catalog change at this etcd revision (0: this server's own)."""

    def __post_init__(self) -> None:
        v = Violations()
        _app(v, self.app, bytes_min=0)
        _key_id(v, self.key_id)
        _time(v, self.revoked_at_ns, "revoked_at")
        _catalog_revision(v, self.catalog_revision)
        v.raise_if_any()


@value_type(kw_only=True)
class ListKeys:
    app: str

    def __post_init__(self) -> None:
        v = Violations()
        _app(v, self.app)
        v.raise_if_any()


@value_type(kw_only=True)
class MintUserToken:
    """A user token for a user of the caller's app. The service signs it; the core keeps no
    state of tokens."""

    app: str
    user_id: str
    ttl_ns: int = limits.USER_TOKEN_TTL_NS_DEFAULT

    def __post_init__(self) -> None:
        v = Violations()
        _app(v, self.app)
        check_user_id(v, self.user_id)
        _duration(v, self.ttl_ns, "ttl", limits.USER_TOKEN_TTL_NS_MIN,
                  limits.USER_TOKEN_TTL_NS_MAX)
        v.raise_if_any()


# --- reads the service answers from the log or the writer ------------------------------

EVENT_CURSOR_BYTES = 18
"""An events index position (time, sequence, event): a ListEvents page token is its hex."""


def _time(v: Violations, at_ns: int | None, name: str) -> bool:
    """A time a request may leave out (None): when given, from 1970 to limits.TIME_NS_MAX.
    True if it was given, and valid."""
    if at_ns is None:
        return False
    if not (_int(at_ns) and 0 <= at_ns <= limits.TIME_NS_MAX):
        v.add(name, "must be a valid time from 1970 to 9999")
        return False
    return True


def _cursor(page_token: str) -> bytes | None:
    """The events index position a page token names (empty: the first page); None if it is
    not one a ListEvents page gave."""
    try:
        cursor = bytes.fromhex(page_token)
    except ValueError:
        return None
    return cursor if len(cursor) in (0, EVENT_CURSOR_BYTES) else None


@value_type(kw_only=True)
class ListEvents:
    """One page of a user's audit events, oldest first, with start_time <= time < end_time."""

    app: str
    user_id: str
    start_time_ns: int | None = None
    """None: from the first event kept."""
    end_time_ns: int | None = None
    """None: to the last."""
    page_size: int = 0
    """0: limits.EVENTS_PAGE_SIZE_DEFAULT."""
    page_token: str = ""
    """The next_page_token of the page before; empty for the first page."""

    def __post_init__(self) -> None:
        v = Violations()
        _app(v, self.app)
        check_user_id(v, self.user_id)
        v.check(_int(self.page_size) and 0 <= self.page_size <= limits.EVENTS_PAGE_SIZE_MAX,
                "page_size", f"must be 0 (meaning {limits.EVENTS_PAGE_SIZE_DEFAULT}) to "
                             f"{limits.EVENTS_PAGE_SIZE_MAX}")
        if (_time(v, self.start_time_ns, "start_time")
                & _time(v, self.end_time_ns, "end_time")):  # both checked, whatever the first
            start_ns, end_ns = self.range_ns
            v.check(end_ns > start_ns, "end_time", "must be after start_time")
        v.check(_cursor(self.page_token) is not None, "page_token",
                "must be a next_page_token from ListEvents")
        v.raise_if_any()

    @property
    def range_ns(self) -> tuple[int, int]:
        """[start, end) in the events index's terms: clamped to what it can hold."""
        last_ns = limits.END_OF_TIME_NS - 1
        return (0 if self.start_time_ns is None else min(self.start_time_ns, last_ns),
                limits.END_OF_TIME_NS if self.end_time_ns is None else min(self.end_time_ns, last_ns))

    @property
    def cursor(self) -> bytes:
        cursor = _cursor(self.page_token)
        assert cursor is not None
        return cursor

    @property
    def events_per_page(self) -> int:
        return self.page_size or limits.EVENTS_PAGE_SIZE_DEFAULT


@value_type(kw_only=True)
class ExportUsage:
    """Committed and tracked amounts of one app from the log, after a cursor (the sequence of
    the last record an export covered) and before end_time."""

    app: str
    cursor: str = ""
    """The decimal sequence of the last record an export covered; empty: before the oldest
    record the log keeps."""
    end_time_ns: int | None = None
    """None: up to the last durable record."""

    def __post_init__(self) -> None:
        v = Violations()
        _app(v, self.app)
        v.check(_export_cursor(self.cursor) is not False, "cursor",
                "must be a next_cursor from ExportUsage")
        _time(v, self.end_time_ns, "end_time")
        v.raise_if_any()

    @property
    def after_sequence(self) -> int | None:
        """None: from the oldest record the log keeps."""
        sequence = _export_cursor(self.cursor)
        assert sequence is not False
        return sequence


def _export_cursor(text: str) -> int | None | bool:
    """The sequence an ExportUsage cursor names: None for empty, False if it is not one."""
    if not text:
        return None
    if len(text) > limits.EXPORT_CURSOR_BYTES_MAX or not (text.isascii() and text.isdigit()):
        return False
    sequence = int(text)
    return sequence if sequence < 2**63 else False


@value_type(kw_only=True)
class WatchUsage:
    """A stream of a user's counters as they change."""

    app: str
    user_id: str
    after_sequence: int = 0
    """Non-zero: the first message also carries the threshold events after this record."""

    def __post_init__(self) -> None:
        v = Violations()
        _app(v, self.app)
        check_user_id(v, self.user_id)
        v.check(_int(self.after_sequence) and self.after_sequence >= 0, "after_sequence",
                "must be a log sequence number (0 or more)")
        v.raise_if_any()


# --- internal ---------------------------------------------------------------------------


@value_type(kw_only=True)
class ExpiredHold:
    app: str
    reservation_id: str
    user_id: str


@value_type(kw_only=True)
class ExpiredGrant:
    app: str
    user_id: str
    group_key: str
    grant_id: str


@value_type(kw_only=True)
class ExpireHolds:
    """Releases every hold whose expires_at <= now, and ends every credit grant whose
    expires_at <= now, in the order of their times (holds first at equal times). The core
    makes this command itself, before any other at the same time; the lists are what
    expired, checked again on replay."""

    expired: tuple[ExpiredHold, ...] = ()
    grants: tuple[ExpiredGrant, ...] = ()


CATALOG_COMMANDS = (UpsertPlan, DeletePlan, CreateKey, RevokeKey)
"""The changes of what a cluster's shards share (plans, API keys): each may carry the etcd
revision of the catalog change it applies."""


# --- moving slots between shards -------------------------------------------------------


def _slot_set(v: Violations, slots: tuple[int, ...]) -> None:
    if not slots:
        v.add("slots", "at least one slot")
    elif (any(type(slot) is not int or not 0 <= slot < SLOTS for slot in slots)
          or list(slots) != sorted(set(slots))):
        v.add("slots", f"slots 0 ... {SLOTS - 1}, each once, in order")


def _check_slots(command: Any) -> None:
    """The __post_init__ of a step of a move that names only its slots."""
    v = Violations()
    _slot_set(v, command.slots)
    v.raise_if_any()


@value_type(kw_only=True)
class FreezeSlots:
    """The source's first step of a move: from now on every call for a user (or a hold) of
    these slots is refused UNAVAILABLE SLOTS_MOVING, having done nothing, until ForgetSlots
    (or ThawSlots). Logged, so a restart keeps the slots frozen. Freezing a frozen slot
    changes nothing."""

    slots: tuple[int, ...]

    __post_init__ = _check_slots


@value_type(kw_only=True)
class ThawSlots:
    """Ends a freeze without moving anything (a move given up before the map changed)."""

    slots: tuple[int, ...]

    __post_init__ = _check_slots


@value_type(kw_only=True)
class MovedUser:
    """A user's state as a move carries it: its subscription and counters (the core's
    CounterState, each with its group key and window)."""

    app: str
    user_id: str
    subscription: Subscription
    counters: tuple[tuple[str, Window, Any], ...]


@value_type(kw_only=True)
class MovedKey:
    """An idempotency entry as a move carries it: its request's fingerprint, its first
    answer, and when it was made (its retention runs from then)."""

    app: str
    rpc: str
    key: str
    request: str
    result: Any
    created_at_ns: int
    slot: int
    """The slot of the user (or hold) whose request made it."""


@value_type(kw_only=True)
class AdoptSlots:
    """The target's step of a move: one chunk of the slots' state, applied as a logged
    command (so a replay is exact). `first`: the chunk that starts the move, which drops
    whatever the target held for those slots (a move run again starts afresh). Holds are the
    core's Reservation, live ones with their absolute expiry. Until the shard map names this
    shard their owner, calls for those slots are refused SLOTS_MOVING rather than
    WRONG_SHARD."""

    slots: tuple[int, ...]
    first: bool
    users: tuple[MovedUser, ...] = ()
    holds: tuple[Any, ...] = ()
    keys: tuple[MovedKey, ...] = ()

    def __post_init__(self) -> None:
        v = Violations()
        _slot_set(v, self.slots)
        if len(self.users) + len(self.holds) + len(self.keys) > limits.MOVE_CHUNK_ITEMS_MAX:
            v.add("state", f"at most {limits.MOVE_CHUNK_ITEMS_MAX} users, holds and keys in "
                           "one chunk")
        v.raise_if_any()


@value_type(kw_only=True)
class ForgetSlots:
    """The source's last step of a move, once the map names the target: drops every user of
    these slots with their holds and idempotency entries in memory, and ends their freeze."""

    slots: tuple[int, ...]

    __post_init__ = _check_slots


@value_type(kw_only=True)
class SlotsResult:
    """What a step of a move did: the slots it changed, and the users, holds and
    idempotency entries it took in or dropped."""

    slots: int = 0
    users: int = 0
    holds: int = 0
    keys: int = 0


@value_type(kw_only=True)
class SetIdempotencyRetention:
    """How long idempotency keys are remembered after their first use, from this record on
    (quotad serve --idempotency-retention-hours): a key is answered as a repeat while the
    retention in force is not over since its first use. Logged, so that replay answers each
    repeat as it was answered. Setting the retention in force changes nothing."""

    retention_ns: int

    def __post_init__(self) -> None:
        v = Violations()
        v.check(type(self.retention_ns) is int and limits.IDEMPOTENCY_RETENTION_NS_MIN
                <= self.retention_ns <= limits.IDEMPOTENCY_RETENTION_NS_MAX, "retention_ns",
                f"{limits.IDEMPOTENCY_RETENTION_NS_MIN} to {limits.IDEMPOTENCY_RETENTION_NS_MAX} "
                "ns (24 h to 90 days)")
        v.raise_if_any()


@value_type(kw_only=True)
class RetentionResult:
    """The idempotency retention before a SetIdempotencyRetention, and from it on."""

    previous_ns: int
    retention_ns: int


Command = (Reserve | Commit | Release | Extend | Track | GetUsage | UpsertPlan | DeletePlan
           | GetPlan | ListPlans | UpsertSubscription | GetSubscription | ListSubscriptions
           | ExpireHolds | CreateKey | RevokeKey | ListKeys | GrantCredits | ListGrants
           | FreezeSlots | ThawSlots | AdoptSlots | ForgetSlots | SetIdempotencyRetention)

COMMAND_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (Reserve, Commit, Release, Extend, Track, GetUsage, UpsertPlan, DeletePlan,
                GetPlan, ListPlans, UpsertSubscription, GetSubscription, ListSubscriptions,
                ExpireHolds, CreateKey, RevokeKey, ListKeys, GrantCredits, ListGrants,
                FreezeSlots, ThawSlots, AdoptSlots, ForgetSlots, SetIdempotencyRetention)
}


@value_type(kw_only=True)
class AuditEvent:
    """One entry of the audit trail: what changed for a user. Never any content beyond the
    metadata the caller chose."""

    kind: str
    """reserve, commit, release, expire, extend, track, threshold, grant (credits granted:
    event_type is the balance group's key, amount the grant's) or expire_grant (a grant
    ended: amount is what its expiry dropped)."""
    app: str
    user_id: str
    event_type: str
    """For a threshold: the event type of the change that crossed it."""
    amount: int
    """For a threshold: the group's used + held when it was crossed."""
    metadata: Metadata = ()
    reservation_id: str = ""
    allowed: bool = True
    limit_group_key: str = ""
    """Threshold events only, as are the two fields after it."""
    threshold_percent: int = 0
    window_start_ns: int = 0

    def __post_init__(self) -> None:
        assert self.kind in AUDIT_KINDS, self.kind
        is_threshold = self.kind == "threshold"
        assert is_threshold == bool(self.limit_group_key) == (self.threshold_percent > 0), self


AUDIT_KINDS = ("reserve", "commit", "release", "expire", "extend", "track", "threshold",
               "grant", "expire_grant")
"""Appended to, never reordered: the log stores an event's kind as its index here."""


@value_type
class Record:
    """One entry of the write-ahead log: the command, applied at now_ns, as number sequence,
    with the audit events it made. The log stores the events once, in the events index, so a
    record read back has none; what replay checks is the rest, the user number of each event
    included."""

    sequence: int
    now_ns: int
    command: Command
    events: tuple[AuditEvent, ...] = field(default=(), compare=False)
    event_users: tuple[int, ...] = ()
    """The user number (UserState.number) of each event: where the index files it."""
    answer: Any = None
    """The result, for a command with an idempotency key: what a repeat of it gets back, from
    the log once the key is no longer in memory."""
    finished: tuple[Any, ...] = field(default=(), compare=False)
    """Copies of the holds this record finished (the core's Reservation, as it was then):
    where the log keeps them once memory no longer does."""


# --- results ----------------------------------------------------------------------------


@value_type(kw_only=True)
class CounterView:
    key: str
    label: str
    unit: str
    window: Window
    quota: int
    used: int
    held: int
    remaining: int
    """max(0, quota - used - held)"""
    window_start_ns: int
    resets_at_ns: int | None
    kind: Kind = Kind.QUOTA
    full_at_ns: int | None = None
    """A rate bucket's: when every token commits and tracks took is back, if nothing else
    happens (live holds keep theirs until they end); None for a quota, or a bucket that
    never refills (quota 0)."""

    @property
    def overage(self) -> int:
        """max(0, used + held - quota), at most OVERAGE_MAX: what a soft limit (or a
        recorded overage path) counted past the quota. Derived, so stored answers and snapshots
        need not hold it."""
        overage = self.used + self.held - self.quota
        if overage <= 0:
            return 0
        return overage if overage <= limits.OVERAGE_MAX else limits.OVERAGE_MAX


@value_type(kw_only=True)
class ReserveResult:
    allowed: bool
    reservation_id: str
    expires_at_ns: int
    counters: tuple[CounterView, ...]
    denied_by: str = ""
    fits_at_ns: int | None = None
    """Denied: when the same request would fit every group if nothing else happened (a
    bucket refilled, a window reset); None when allowed, or when waiting alone never makes
    room."""


@value_type(kw_only=True)
class CommitResult:
    counters: tuple[CounterView, ...]
    committed: int
    returned: int
    expired: bool


@value_type(kw_only=True)
class ReleaseResult:
    counters: tuple[CounterView, ...]


@value_type(kw_only=True)
class ExtendResult:
    expires_at_ns: int


@value_type(kw_only=True)
class TrackResult:
    allowed: bool
    counters: tuple[CounterView, ...]
    denied_by: str = ""
    fits_at_ns: int | None = None
    """Denied: when the same request would fit every group if nothing else happened (a
    bucket refilled, a window reset); None when allowed, or when waiting alone never makes
    room."""


@value_type(kw_only=True)
class UsageResult:
    user_id: str
    plan_id: str
    counters: tuple[CounterView, ...]


@value_type(kw_only=True)
class GrantView:
    grant_id: str
    group_key: str
    amount: int
    """Granted."""
    remaining: int
    """Left to spend (an expired grant's: what it keeps for live holds)."""
    granted_at_ns: int
    expires_at_ns: int | None
    priority: int
    expired: bool = False
    recurring: bool = False


@value_type(kw_only=True)
class GrantResult:
    grant: GrantView
    counter: CounterView
    """The balance group's counter after the grant."""


@value_type(kw_only=True)
class GrantsResult:
    grants: tuple[GrantView, ...]


@value_type(kw_only=True)
class PlanResult:
    plan: Plan
    changed: bool = False


@value_type(kw_only=True)
class PlansResult:
    plans: tuple[Plan, ...]


@value_type(kw_only=True)
class DeletePlanResult:
    pass


@value_type(kw_only=True)
class SubscriptionsResult:
    subscriptions: tuple[Subscription, ...]
    more: bool = False
    """True when subscriptions follow the last one of this page."""


@value_type(kw_only=True)
class SubscriptionResult:
    subscription: Subscription
    changed: bool = False


@value_type(kw_only=True)
class ExpireResult:
    expired: tuple[ExpiredHold, ...] = ()


@value_type(kw_only=True)
class KeyView:
    """What may be shown of a key: never its hash or signing key."""

    key_id: str
    app: str
    kind: str
    name: str
    created_at_ns: int
    revoked_at_ns: int | None = None


@value_type(kw_only=True)
class KeyResult:
    key: KeyView


@value_type(kw_only=True)
class KeysResult:
    keys: tuple[KeyView, ...]


RESULT_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (ReserveResult, CommitResult, ReleaseResult, ExtendResult, TrackResult,
                UsageResult, PlanResult, PlansResult, DeletePlanResult, SubscriptionResult,
                ExpireResult, KeyResult, KeysResult, GrantResult, GrantsResult)
}
