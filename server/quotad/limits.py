"""Every limit quotad enforces, named, in one place.

Byte limits count UTF-8 bytes. Times are nanoseconds since the Unix epoch unless named
otherwise. Each limit is validated at the edge of the core and tested at its edge.
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

LIVE_HOLDS_PER_USER_MAX = 10_000
"""A user with this many live holds gets RESOURCE_EXHAUSTED on Reserve until some end."""

IDEMPOTENCY_RETENTION_NS = 24 * 3600 * NS_PER_S
"""An idempotency key is remembered at least this long after its first use."""

RESERVATION_RETENTION_NS = 3600 * NS_PER_S
"""A finished hold (committed, released, expired) is remembered this long; an expired hold
still takes its commit within it. Past it, the reservation id is NOT_FOUND. Finished holds
are kept in memory, so this bounds memory at about one hour of Reserve traffic."""

MESSAGE_BYTES_MAX = 64 * 1024
"""gRPC receive limit per message."""

BATCH_RECORDS_MAX = 8192
"""Records written in one LMDB transaction at most; more wait for the next flush."""

WATCH_THRESHOLDS_PERCENT = (80, 100)
"""A limit group's usage (used + held) reaching these percents of its quota is a threshold
event, each at most once per user, group and window; ascending. Quota 0 groups have none."""

WATCHERS_MAX = 1024
"""Concurrent WatchUsage streams per server; one more is RESOURCE_EXHAUSTED (TOO_MANY_WATCHERS)."""

WATCH_QUEUE_MESSAGES_MAX = 1024
"""Messages a watcher may have waiting to be sent. A reader that falls this far behind gets
RESOURCE_EXHAUSTED (WATCH_QUEUE_FULL) and resumes with after_sequence: the writer never waits
for a reader, and memory stays bounded."""

WATCH_REPLAY_THRESHOLDS_MAX = 1024
"""Threshold events a resumed watch replays at most (the latest ones)."""

# --- the browser endpoint (`--http-listen`) ----------------------------------------------

HTTP_REQUEST_HEAD_BYTES_MAX = 8 * 1024
"""Request line and headers together; more: 431 and the connection is closed."""

HTTP_REQUEST_BODY_BYTES_MAX = 1024
"""A usage read carries no body; a larger one: 413 and the connection is closed."""

HTTP_QUERY_FIELDS_MAX = 16
"""Query parameters per request; more: 400."""

HTTP_CONNECTIONS_MAX = 256
"""Open HTTP connections at most; one more is answered 503 and closed at once."""

HTTP_KEEP_ALIVE_IDLE_S = 30.0
"""An idle keep-alive connection is closed after this long without a new request."""

HTTP_REQUEST_READ_TIMEOUT_S = 10.0
"""A request must arrive whole within this long of its first byte (408, closed), so a slow
client cannot hold a connection; `--http-read-timeout-s` sets it within the bounds below."""
HTTP_REQUEST_READ_TIMEOUT_S_MIN = 0.1
HTTP_REQUEST_READ_TIMEOUT_S_MAX = 60.0

HTTP_RESPONSE_WRITE_TIMEOUT_S = 10.0
"""A client that does not read its answer within this long is disconnected."""

HTTP_CORS_ORIGINS_MAX = 64
HTTP_CORS_ORIGIN_BYTES_MAX = 256
HTTP_CORS_MAX_AGE_S = 600
"""How long a browser may cache a preflight answer."""
