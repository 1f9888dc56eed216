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
EVENT_TYPE_PATTERNS_PER_GROUP_MAX = 32
METADATA_MATCHES_PER_GROUP_MAX = 16
METADATA_MATCH_VALUES_MAX = 64
TIME_ZONE_BYTES_MAX = 64
APP_ID_BYTES_MAX = 64

BATCH_OPERATIONS_MAX = 1000
"""Operations in one Batch RPC (and so in one coalesced batch of the client)."""
EVENTS_PAGE_SIZE_MAX = 1000
"""Events in one ListEvents page; page_size 0 means EVENTS_PAGE_SIZE_DEFAULT."""
EVENTS_PAGE_SIZE_DEFAULT = 100
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
"""gRPC receive limit per message."""

__all__ = [name for name in dir() if name.isupper()]
