"""The limits of the wire contract: what a caller may send, named in one place.

The server enforces each of them (INVALID_ARGUMENT naming the field) and the client may check
them before sending. Byte limits count UTF-8 bytes; times are nanoseconds unless named
otherwise. Standard library only: the server's pure core imports this module too.
"""

from __future__ import annotations

NS_PER_S = 1_000_000_000

USER_ID_BYTES_MAX = 256
EVENT_TYPE_BYTES_MAX = 128
METADATA_ENTRIES_MAX = 16
METADATA_KEY_BYTES_MAX = 256
METADATA_VALUE_BYTES_MAX = 256
IDEMPOTENCY_KEY_BYTES_MAX = 128

AMOUNT_MAX = 2**53
"""Reserve amount 1 ... AMOUNT_MAX; Commit 0 ... AMOUNT_MAX; Track 0 < |amount| <= AMOUNT_MAX."""

COUNTER_MAX = 2**62
"""used and held never exceed this (int64 with room to spare): a change that would push one
past it is refused (RESOURCE_EXHAUSTED, COUNTER_LIMIT) and nothing changes."""

OVERAGE_MAX = 2**63 - 1
"""A counter's overage (used + held - quota) is reported as at most this, int64's largest: with
used and held each at COUNTER_MAX over a quota of 0 it would be one more."""

QUOTA_MAX = 2**53
"""A limit group's quota is 0 ... QUOTA_MAX."""

TTL_NS_MIN = 1 * NS_PER_S
TTL_NS_MAX = 3600 * NS_PER_S
TTL_NS_DEFAULT = 60 * NS_PER_S

PLAN_ID_BYTES_MAX = 128
PLAN_NAME_BYTES_MAX = 256
GROUP_KEY_BYTES_MAX = 128
GROUP_LABEL_BYTES_MAX = 256
GROUP_UNIT_BYTES_MAX = 64
LIMIT_GROUPS_PER_PLAN_MAX = 32
EVENT_TYPE_PATTERNS_PER_GROUP_MAX = 16
METADATA_MATCHES_PER_GROUP_MAX = 4
METADATA_MATCH_VALUES_MAX = 32
"""A group matches a handful of event-type patterns ("openai.*", "anthropic.chat") and a few
metadata keys, each against a list of values (model names): room for any real plan, and
little enough that a plan with one group at every limit fits in PLAN_BYTES_MAX. A match's
key and values are event metadata, so they have its byte limits."""
COST_RATES_PER_GROUP_MAX = 64
"""A cost table prices one metadata key's values (model names): room for every model of a few
providers, and little enough that a plan with one group at every limit fits in PLAN_BYTES_MAX.
Its `by` key and its values are event metadata, so they have its byte limits."""
COST_RATE_MAX = 10**9
"""A rate is 1 ... COST_RATE_MAX units counted per unit of amount (a billion: micro-dollars
per image, or per token at any price). What a call counts in a group, amount x rate, must be
within AMOUNT_MAX as an amount is (else INVALID_ARGUMENT naming `amount`)."""
RATE_PERIOD_NS_MIN = 1 * NS_PER_S
RATE_PERIOD_NS_MAX = 31 * 24 * 3600 * NS_PER_S
"""A rate group's bucket refills its whole quota over its period, 1 s ... 31 days (a
second-long bucket down to one with a month's patience); outside it INVALID_ARGUMENT naming
the group's period."""
GRANT_PRIORITY_MAX = 1000
"""A credit grant's priority is 0 ... GRANT_PRIORITY_MAX: spent lowest first (0 unless given)."""
GRANT_AMOUNT_MAX = AMOUNT_MAX
"""A grant (GrantCredits, a plan's recurring grant) is 1 ... GRANT_AMOUNT_MAX credits, an
amount's limits; a recurring grant's rollover_max is 0 ... its amount, so that what rolls
over is at most one window's grant."""
PLAN_BYTES_MAX = 60 * 1024
"""A plan's protobuf encoding, at most; a larger `plan` is INVALID_ARGUMENT naming `plan`.

The per-field limits bound one group, this bounds a plan: 32 groups at every limit would
take about 1.7 MB (see PLAN_BYTES_AT_EVERY_LIMIT), and per-field limits small enough for
32 of them to fit in MESSAGE_BYTES_MAX leave 2 KiB a group, about 4 patterns and 8 model
names, too few for a real plan. So each field may use its limit, the plan as a whole may
not, and whatever is accepted fits in one message: UpsertPlanRequest and its response,
GetPlanResponse, one entry of ListPlansResponse. For scale: 32 groups, each with a 32-byte
key and unit, a 64-byte label, 8 patterns of 32 bytes and 16 model names of 40 bytes, take
35 KB (tests/test_limits.py)."""
TIME_ZONE_BYTES_MAX = 64
APP_ID_BYTES_MAX = 64
BILLING_CUSTOMER_ID_BYTES_MAX = 256
"""A subscription's billing_customer_id (a Stripe customer id is at most 255 characters)."""

BATCH_OPERATIONS_MAX = 1000
"""Operations in one Batch RPC (and so in one coalesced batch of the client)."""
EVENTS_PAGE_SIZE_MAX = 1000
"""Events in one ListEvents page; page_size 0 means EVENTS_PAGE_SIZE_DEFAULT."""
EVENTS_PAGE_SIZE_DEFAULT = 100
SUBSCRIPTIONS_PAGE_SIZE_MAX = 1000
"""Subscriptions in one ListSubscriptions page; page_size 0 means
SUBSCRIPTIONS_PAGE_SIZE_DEFAULT."""
SUBSCRIPTIONS_PAGE_SIZE_DEFAULT = 100
EXPORT_CURSOR_BYTES_MAX = 20
"""An ExportUsage cursor: the decimal sequence of the last log record it covers."""
EXPORT_LINES_PER_MESSAGE_MAX = 500
"""Usage lines in one ExportUsage message (each under 2 KB, so a message stays under
RESPONSE_BYTES_MAX)."""
TIME_NS_MAX = 253_402_300_800 * NS_PER_S - 1
"""The latest time a request may name (ListEvents' start_time and end_time):
9999-12-31T23:59:59.999999999Z, protobuf's own bound. The earliest is the Unix epoch."""
REQUEST_ID_BYTES_MAX = 128
"""A caller's x-request-id up to this long is kept; longer (or not printable ASCII) is
replaced by one the server makes."""

ADMIN_KEY_BYTES_MIN = 32
ADMIN_KEY_BYTES_MAX = 256
KEY_NAME_BYTES_MAX = 128
KEYS_PER_APP_MAX = 1000
"""Keys of one app, revoked ones included (they are kept, with when they were revoked)."""
USER_TOKEN_TTL_NS_MIN = 1 * NS_PER_S
USER_TOKEN_TTL_NS_MAX = 24 * 3600 * NS_PER_S
USER_TOKEN_TTL_NS_DEFAULT = 3600 * NS_PER_S
USER_TOKEN_BYTES_MAX = 2048
"""A longer x-quotad-user-token is refused unread (UNAUTHENTICATED)."""

MESSAGE_BYTES_MAX = 64 * 1024
"""gRPC receive limit per message: a request larger than this is RESOURCE_EXHAUSTED."""
RESPONSE_BYTES_MAX = 4 * 1024**2
"""gRPC send limit per message; gRPC's own default receive limit, so a client with default
options takes every answer the server sends."""


# --- the limits fit together ------------------------------------------------------------
# Checked when this module is imported, as plain ifs so that `python -O` checks them too.

if not TTL_NS_MIN <= TTL_NS_DEFAULT <= TTL_NS_MAX:
    raise AssertionError("TTL_NS_MIN <= TTL_NS_DEFAULT <= TTL_NS_MAX")
if not USER_TOKEN_TTL_NS_MIN <= USER_TOKEN_TTL_NS_DEFAULT <= USER_TOKEN_TTL_NS_MAX:
    raise AssertionError(
        "USER_TOKEN_TTL_NS_MIN <= USER_TOKEN_TTL_NS_DEFAULT <= USER_TOKEN_TTL_NS_MAX")
if not 1 <= EVENTS_PAGE_SIZE_DEFAULT <= EVENTS_PAGE_SIZE_MAX:
    raise AssertionError("1 <= EVENTS_PAGE_SIZE_DEFAULT <= EVENTS_PAGE_SIZE_MAX")
if not 1 <= SUBSCRIPTIONS_PAGE_SIZE_DEFAULT <= SUBSCRIPTIONS_PAGE_SIZE_MAX:
    raise AssertionError("1 <= SUBSCRIPTIONS_PAGE_SIZE_DEFAULT <= SUBSCRIPTIONS_PAGE_SIZE_MAX")
if not ADMIN_KEY_BYTES_MIN <= ADMIN_KEY_BYTES_MAX:
    raise AssertionError("ADMIN_KEY_BYTES_MIN <= ADMIN_KEY_BYTES_MAX")
if not AMOUNT_MAX <= QUOTA_MAX <= COUNTER_MAX < 2**63:
    raise AssertionError("AMOUNT_MAX <= QUOTA_MAX <= COUNTER_MAX < 2**63 (int64)")
if not 1 <= COST_RATE_MAX <= AMOUNT_MAX:
    raise AssertionError("1 <= COST_RATE_MAX <= AMOUNT_MAX: an amount of 1 counts at any rate")


# Upper bounds of encoded sizes, from the protobuf wire format: every field of these messages
# is numbered below 16, so its tag is one byte; a string or message adds a varint length.

def _varint_bytes(value: int) -> int:
    """A varint's bytes; a negative int64 always takes 10."""
    return 10 if value < 0 else max(1, -(-value.bit_length() // 7))


def _scalar_field_bytes(value: int) -> int:
    return 1 + _varint_bytes(value)


def _bytes_field_bytes(payload_bytes: int) -> int:
    """A string, message or map entry of payload_bytes: tag, length, payload."""
    return 1 + _varint_bytes(payload_bytes) + payload_bytes


_METADATA_BYTES = METADATA_ENTRIES_MAX * _bytes_field_bytes(
    _bytes_field_bytes(METADATA_KEY_BYTES_MAX) + _bytes_field_bytes(METADATA_VALUE_BYTES_MAX))
_TTL_BYTES = _bytes_field_bytes(  # a Duration: seconds, then nanos
    _scalar_field_bytes(TTL_NS_MAX // NS_PER_S) + _scalar_field_bytes(NS_PER_S - 1))

RESERVE_REQUEST_BYTES_BOUND = (
    _bytes_field_bytes(USER_ID_BYTES_MAX) + _bytes_field_bytes(EVENT_TYPE_BYTES_MAX)
    + _scalar_field_bytes(AMOUNT_MAX) + _METADATA_BYTES + _TTL_BYTES
    + _bytes_field_bytes(IDEMPOTENCY_KEY_BYTES_MAX))
"""A ReserveRequest with every field at its limit is at most this long, encoded."""

TRACK_REQUEST_BYTES_BOUND = (
    _bytes_field_bytes(USER_ID_BYTES_MAX) + _bytes_field_bytes(EVENT_TYPE_BYTES_MAX)
    + _scalar_field_bytes(-AMOUNT_MAX) + _METADATA_BYTES
    + _bytes_field_bytes(IDEMPOTENCY_KEY_BYTES_MAX) + _scalar_field_bytes(1))
"""A TrackRequest with every field at its limit (a refund: a negative amount) at most."""

for _bound in (RESERVE_REQUEST_BYTES_BOUND, TRACK_REQUEST_BYTES_BOUND):
    # alone, and as the one operation of a Batch
    if not _bytes_field_bytes(_bytes_field_bytes(_bound)) <= MESSAGE_BYTES_MAX:
        raise AssertionError("an operation with every field at its limit fits in a message")

LIMIT_GROUP_BYTES_BOUND = (
    _bytes_field_bytes(GROUP_KEY_BYTES_MAX) + _bytes_field_bytes(GROUP_LABEL_BYTES_MAX)
    + _bytes_field_bytes(GROUP_UNIT_BYTES_MAX) + _scalar_field_bytes(QUOTA_MAX)
    + _scalar_field_bytes(6)  # the window, LIFETIME the highest
    + _bytes_field_bytes(  # the match
        EVENT_TYPE_PATTERNS_PER_GROUP_MAX * _bytes_field_bytes(EVENT_TYPE_BYTES_MAX)
        + METADATA_MATCHES_PER_GROUP_MAX * _bytes_field_bytes(
            _bytes_field_bytes(METADATA_KEY_BYTES_MAX)
            + METADATA_MATCH_VALUES_MAX * _bytes_field_bytes(METADATA_VALUE_BYTES_MAX)))
    + _scalar_field_bytes(1)  # enforce
    + _bytes_field_bytes(  # the cost: by, rates (map entries of value and rate), default_rate
        _bytes_field_bytes(METADATA_KEY_BYTES_MAX)
        + COST_RATES_PER_GROUP_MAX * _bytes_field_bytes(
            _bytes_field_bytes(METADATA_VALUE_BYTES_MAX) + _scalar_field_bytes(COST_RATE_MAX))
        + _scalar_field_bytes(COST_RATE_MAX))
    + _scalar_field_bytes(2)  # the kind, RATE the highest
    + _bytes_field_bytes(  # the period, a Duration: seconds, then nanos
        _scalar_field_bytes(RATE_PERIOD_NS_MAX // NS_PER_S) + _scalar_field_bytes(NS_PER_S - 1)))
"""A LimitGroup with every field at its limit is at most this long, encoded."""

_PLAN_HEADER_BYTES = (_bytes_field_bytes(PLAN_ID_BYTES_MAX)
                      + _bytes_field_bytes(PLAN_NAME_BYTES_MAX))
PLAN_BYTES_AT_EVERY_LIMIT = (_PLAN_HEADER_BYTES + LIMIT_GROUPS_PER_PLAN_MAX
                             * _bytes_field_bytes(LIMIT_GROUP_BYTES_BOUND))
"""What a plan with every field at its limit would take, encoded: far past PLAN_BYTES_MAX."""

if not _PLAN_HEADER_BYTES + _bytes_field_bytes(LIMIT_GROUP_BYTES_BOUND) <= PLAN_BYTES_MAX:
    raise AssertionError("a plan with one group at every limit fits in PLAN_BYTES_MAX")
if not _bytes_field_bytes(PLAN_BYTES_MAX) + _scalar_field_bytes(1) <= MESSAGE_BYTES_MAX:
    # the largest envelope of a plan: UpsertPlanResponse (the plan and `changed`)
    raise AssertionError("a plan of PLAN_BYTES_MAX fits in one message with its envelope")

__all__ = [name for name in dir() if name.isupper() and not name.startswith("_")]

SLOTS = 4096
"""A user belongs to one of SLOTS slots (crc32 of app, NUL, user id, modulo SLOTS); a shard of
a cluster owns a set of slots. A reservation id's first SLOT_HEX_DIGITS hex digits are its
user's slot."""
SLOT_HEX_DIGITS = 3
assert 16**SLOT_HEX_DIGITS == SLOTS
SHARDS_MAX = SLOTS
"""A shard map has at most one shard per slot (every shard owns at least one)."""
SHARD_ID_MAX = 2**31 - 1
SHARD_ADDRESS_BYTES_MAX = 255
"""A shard's HOST:PORT in the map."""
PORT_MAX = 65535
CLUSTER_NAME_BYTES_MAX = 64
"""The NAME of a cluster target etcd://HOST:PORT/NAME: its keys in etcd are under /quotad/NAME/."""
