"""Every limit quotad enforces, named, in one place: the wire contract's limits
(`quotad_contract.limits`, shared with the client) and the server's own.

Byte limits count UTF-8 bytes. Times are nanoseconds since the Unix epoch unless named
otherwise. Each limit is validated at the edge of the core and tested at its edge.
"""

from __future__ import annotations

from quotad_contract.limits import *  # noqa: F401,F403  (the wire limits, re-exported)
from quotad_contract.limits import BATCH_OPERATIONS_MAX, NS_PER_S

LIVE_HOLDS_PER_USER_MAX = 10_000
"""A user with this many live holds gets RESOURCE_EXHAUSTED on Reserve until some end."""

GRANTS_PER_BALANCE_MAX = 64
"""Credit grants with credit left, per user and balance group: one more GrantCredits is
RESOURCE_EXHAUSTED (TOO_MANY_GRANTS) until some are spent or expire (a recurring grant takes
a place too). Each spend walks them in order: 64 keeps that a few microseconds."""

SPENT_GRANTS_PER_BALANCE_MAX = 64
"""Grants with nothing left to spend (all consumed, or expired) kept per user and balance
group for refunds to find: past it, the one taken from longest ago is folded into a single
count of consumption that refunds still find, and lose."""

CATALOG_REVISION_MAX = 2**63 - 1
"""An etcd revision (int64) that a change of a cluster's catalog carries into the log."""

IDEMPOTENCY_RETENTION_NS_MIN = 24 * 3600 * NS_PER_S
"""An idempotency key is remembered at least this long after its first use: the default of
quotad serve --idempotency-retention-hours, and the least it takes."""

IDEMPOTENCY_RETENTION_NS_MAX = 90 * 24 * 3600 * NS_PER_S
"""The longest retention --idempotency-retention-hours takes (90 days). Keys live in the log,
not the heap: a longer retention costs disk (their records stay), never memory."""

RESERVATION_RETENTION_NS = 3600 * NS_PER_S
"""A finished hold (committed, released, expired) is remembered this long; an expired hold
still takes its commit within it. Past it, the reservation id is NOT_FOUND. Finished holds
are kept in memory, so this bounds memory at about one hour of Reserve traffic."""

LOG_KEPT_NS_MIN = max(IDEMPOTENCY_RETENTION_NS_MIN, RESERVATION_RETENTION_NS)
"""Log records are kept at least this long, whatever the audit retention or the log's size
bound: they hold the keys' first answers and the finished holds for their retention (and
at least the idempotency retention in force, when it is longer: Writer._retention)."""

BATCH_RECORDS_MAX = 8192
"""Records written in one LMDB transaction at most; more wait for the next flush."""

INLINE_BATCH_RECORDS_MIN = 64
"""A batch of at least this many records is written on the event loop's own thread, a
smaller one on the log thread (see quotad.engine.writer): a large batch comes from Batch
RPCs, whose records cost ~20 % more CPU written from a second thread (the two threads take
turns with the GIL); a small one from calls that trickle in one by one, which gRPC hands
the loop only while it is free, so the loop must go on taking them during the sync for them
to group."""

LONE_CALL_QUIET_FLUSHES = 32
"""After this many flushes in a row on the log thread of one record each, with nothing new
pending when each ended, calls are taken to come one at a time: a batch of one record is then
written on the loop's thread too, which spares it the two hand-offs between threads (nobody
waits meanwhile to join the next batch). Any batch of more records, or a probe (below) that
ends with records pending, goes back to the log thread."""

LONE_CALL_PROBE_EVERY_FLUSHES = 16
"""While calls come one at a time, after this many such batches written on the loop's thread
the next goes to the log thread, to see whether calls now arrive during a sync (gRPC hands
the loop new calls only while it is free, so inline writes alone would never show them)."""

COMMIT_DELAY_MS_DEFAULT = 4
"""`--commit-delay-ms` by default. With many unary calls in flight 4 ms fills each batch
with more records and lowers the CPU per call; with few, the wait is not taken (below). At
64 in flight (`bench.unary`): 3,410 calls/s at 347 us of CPU each against 2,722 at 434 with
none; at 8 2,108 against 2,219, within the runs' spread."""
COMMIT_DELAY_MS_MAX = 20
"""`--commit-delay-ms` at most. While calls overlap and the wait fills (below), a small batch
on the log thread (unary calls) waits this long for more records before it is written: its
calls wait that much longer, and the transaction's fixed cost (the sync, the commit, the
hops between threads) is shared by more records (quotad.engine.writer; README, Unary calls).
Beyond 20 ms a wait would cost callers more than any sync it shares."""

COMMIT_DELAY_JOINED_PER_MS_MIN = 2
"""A commit delay goes on being taken while it gathers at least this many records per
millisecond it waits, on average (2,000 calls/s): with few calls in flight each caller waits
in the batch and nobody else comes, so the wait would cost calls/s for nothing."""
COMMIT_DELAY_JOINED_AVERAGE_WEIGHT = 0.25
"""The weight of the last wait in the moving average of the records the waits gather."""
COMMIT_DELAY_PROBE_EVERY_MIN = 8
COMMIT_DELAY_PROBE_EVERY_MAX = 256
"""While the delay does not fill, one small batch in this many (while calls overlap) waits all
the same, to see whether it now would: every 8th at first, twice as far apart after each
probe that did not fill, up to every 256th, so that few callers rarely pay the wait."""

EXPIRY_POLL_S_MAX = 1.0
"""The expiry task sleeps at most this long; every command expires what is due anyway."""

END_OF_TIME_NS = 2**64 - 1
"""The event index stores times as unsigned 64-bit ns (to the year 2554): a ListEvents
without end_time reads up to here, and a later time is clamped to just before it."""

DRAIN_S = 5.0
"""How long in-flight calls get to finish after SIGTERM."""

LOG_GROWTH_SAMPLE_EVERY_S = 1.0
"""How often the server reads the LMDB file's bytes in use, its map and the disk's free bytes
(engine/headroom.py: ~4 us each time, `timeit`)."""
LOG_GROWTH_SMOOTHING_S = 600.0
"""The log's growth rate is a mean weighted over about this long: a burst moves it little."""
LOG_FULL_WARN_WITHIN_S = 24 * 3600.0
"""A warning is logged while the log, growing at that rate, would fill its map or its disk
within this long."""
LOG_FULL_WARN_REPEAT_S = 600.0
"""Such a warning is logged again at most this often while it holds."""
PRUNED_RECORDS_PER_TRANSACTION_MAX = 1024
"""Log records pruned in one LMDB transaction at most (~5 ms of the log thread on a shared
2-core machine, `python -m bench.recovery --prune`), so that its dirty pages stay bounded:
the writer prunes one after each batch (more after a large batch,
PRUNED_RECORDS_PER_RECORD_WRITTEN) until nothing more is due. In one transaction, the
100,000 records of a snapshot's interval held the log thread ~3 s there."""
PRUNED_RECORDS_PER_RECORD_WRITTEN = 2
"""After a batch of more than half a transaction's records (Batch RPCs write up to 8,192 a
transaction), this many records per record it wrote are pruned at most, in as many
transactions as that needs: one transaction after each batch pruned less than such a batch
wrote, and the log of a server at its retention grew past it. The log shrinks while
anything is due whatever the batches' size. A smaller batch is followed by one full
transaction, not by fewer records: a transaction costs ~0.2 ms of CPU besides its records
(`python -m bench.recovery --prune --prune-transaction-records 300` against the default: 5.7
against 5.3 us a record, on 100,000 users' keyed log)."""
LOG_RETENTION_BYTES_SHARE = 0.75
"""Without --audit-retention-gib, the log's live data is kept under this share of its room: the
disk's free bytes at start and what the log uses there, or its map if smaller. The rest is
room for growth between prunes, for pages freed but not yet reused, and for the disk's other
users."""
AUDIT_TRIMMED_WARN_REPEAT_S = 600.0
"""While the size bound prunes records inside the audit retention, or cannot prune enough
(its records of the keys' retention are more), a warning is logged at most this often."""

WATCH_THRESHOLDS_PERCENT = (80, 100)
"""A limit group's usage (used + held) reaching these percents of its quota is a threshold
event, each at most once per user, group and window; ascending. Quota 0 groups have none."""

WATCHERS_MAX = 1024
"""Concurrent WatchUsage streams per server; one more is RESOURCE_EXHAUSTED (TOO_MANY_WATCHERS,
its ErrorInfo metadata naming the cap it hit: {"limit": "WATCHERS_MAX", "max": "1024"}), as
for each cap below. The caps are checked from the narrowest (the user) to the widest."""
WATCHERS_PER_APP_MAX = 256
"""Concurrent watches of one app: a quarter of the server, so that no app, however many
keys it makes, keeps the others from watching."""
WATCHERS_PER_KEY_MAX = 128
"""Concurrent watches opened with one key: half of its app's, so that a pk_ key shipped to
browsers cannot take the app's backend's share. Not counted without keys (the open mode)."""
WATCHERS_PER_USER_MAX = 16
"""Concurrent watches of one end user (app and user_id): a user's tabs and devices, and no
more, so that one user with a valid token cannot take the share of its key's other users."""

WATCH_QUEUE_MESSAGES_MAX = 1024
"""Messages a watcher may have waiting to be sent. A reader that falls this far behind gets
RESOURCE_EXHAUSTED (WATCH_QUEUE_FULL) and resumes with after_sequence: the writer never waits
for a reader, and memory stays bounded."""

WATCH_REPLAY_THRESHOLDS_MAX = 1024
"""Threshold events a resumed watch replays at most (the latest ones)."""

WATCH_DRAIN_POLL_S = 0.2
"""How often the watch hub looks whether the server started draining (one check for all
watchers, only while some watch): a drain ends every watch within this."""

MATCH_CACHE_ENTRIES_MAX = 4096
"""Distinct (plan, event type, metadata) whose matched limit groups the core remembers; at
the limit it forgets them all and starts again (metadata with ever-new values never grows
it). Each entry is a few hundred bytes at most."""
COUNTER_LAYOUTS_MAX = 4096
"""Distinct counter layouts (the slots a user has counters in, in order: core.machine's
CounterLayout) remembered for users to share; at the limit they are forgotten and made
again as users need them (a user keeps the layout it has). Each is a few hundred bytes."""

SNAPSHOT_DELTA_USER_COST = 5
"""What a changed user costs a delta snapshot's child, in users of a whole snapshot (at
1,000,000 users ~15-20 µs against ~3-4 µs: a changed user's objects lie apart in the heap,
so the child copies their pages). Each delta holds every user changed since the last whole
snapshot, so the writer takes a whole one instead once the deltas since, the one due
included, would have cost a whole one: their users summed, times this, past all the users.
A restart reads the whole snapshot and one delta, so a delta holds at most a fifth of them."""

SNAPSHOT_WHOLE_EVERY_CADENCES = 20
"""A snapshot is whole once the log holds this many --snapshot-every-records of records after
the latest whole one: pruning never goes past the latest whole snapshot, so at most these
records (2,000,000 at the default cadence) stay past the retention, and a restart that cannot
read the delta replays at most these."""

COUNTER_SHAPES_REMEMBERED_MAX = 4096
"""Counter shapes (a limit group's key, label, unit, window, quota and kind as an answer shows
them) the log remembers having stored, and, apart, having read: at the limit it forgets them
all and starts again (storing a shape again is harmless: the same id, the same bytes). Each
entry is a few hundred bytes at most."""

COUNTER_HEADS_REMEMBERED_MAX = 4096
"""Counters' unchanging parts (a group's key, label, unit, window, quota and window bounds),
encoded once as a response's Counter (quota groups), and once as a stored answer's (the
log's), that the server remembers to copy into the next response or record showing them: two
memos of at most this many each. At the limit one forgets them all and starts again. Each
entry is a few hundred bytes at most."""

EVENT_INDEX_BUFFERED_RECORDS_MAX = 16_384
"""Log records whose audit events' index entries the log keeps in memory before it files
them in the event index, all at once, in one transaction (also with every snapshot). Filed
per record, each entry dirtied a page of its user's of its own: ~17 us of server CPU per
reserve + commit pair at 1,000 users (`python -m bench.batch --idempotency-keys`). What is
not yet filed is read again from those records when the log is opened: at most this many
records, ~20 bytes of memory per entry."""

EVENT_INDEX_SWEEP_RECORDS = 65_536
"""Records pruned before the event index is swept of their entries: a pass over its users in
which each user's entries of pruned records (its oldest, side by side) go together. Deleted
with each record instead, an entry dirtied pages of its user's of its own in every pruning
transaction (a user's entries are a tree of their own once they fill a page): a server at its
retention served 6,016 operations/s at 137 us of CPU each, where with sweeps it serves 14,796
at 59.6 (`python -m bench.soak --minutes 10 --aged-records 15000000 --aged-minutes 12`, 2,000
users). Until its pass an entry of a pruned record stays in the table, 18 bytes, and is never
listed (ListEvents starts at the log's oldest record)."""

EVENT_INDEX_SWEEP_USERS_PER_TRANSACTION = 4096
"""Users of the event index one pruning transaction sweeps at most; a pass goes on in the
next ones (the writer prunes after each batch until the pass is done)."""

RESERVE_EXPIRIES_REMEMBERED_MAX = 16_384
"""Holds whose Reserve's expiry (its time plus its TTL) the log remembers until their finished
row is written, which then leaves out an expiry equal to it (the row reads it from the Reserve
record). At the limit it forgets them all and starts again: a row of a hold it forgot keeps
its expiry. Each entry is ~150 bytes."""

IDEMPOTENCY_ROWS_REMEMBERED_MAX = 16_384
"""New idempotency keys the log remembers the row key of, from their lookup until the record
they make is written (so it is computed once). At the limit it forgets them all and starts
again: a forgotten one is computed again. Each entry is ~300 bytes."""

ADMISSION_OPERATIONS = 8192
"""Operations admitted and not yet answered, at most (a Batch counts its operations, any
other unary call one; WatchUsage and health checks are not counted): past it a call is
refused at once, RESOURCE_EXHAUSTED OVERLOADED, rather than queued behind more than the
writer can answer in time. `--admission-operations` sets it within the bounds below. At
least BATCH_OPERATIONS_MAX by default, so that a full Batch is admitted alone: a Batch of
more operations than the limit is refused however idle the server is. 8192 is one
transaction's worth of records (BATCH_RECORDS_MAX): well under a second of the writer's work
at today's cost per operation, and room for several clients' full Batches at once (1024
refused `python -m bench.batch`'s 3,000 operations in flight)."""
ADMISSION_OPERATIONS_MIN = 1
ADMISSION_OPERATIONS_MAX = 1_000_000

PENDING_CALLS_PER_METHOD = 256
"""Calls of one RPC method that grpc has received and quotad's handlers have not yet taken,
at most. grpc.aio hands the handlers about one new call per method per event-loop turn, so
under overload calls wait in grpc's queue, first in first out: with grpc's own bound (3,000,
refusing at random from 1,000) a call waited there seconds, past its deadline, and nearly
none was answered in time. A call that arrives while this many wait is refused by grpc's
core at once, before any Python work: the caller sees CANCELLED, nothing was done. Each
method has its own queue (registered methods), so a flood of unary calls never holds back
WatchUsage or health checks. At ~600 calls/s per method, 256 waiting is ~0.4 s, inside a
1 s deadline; a client with more than 256 calls of one method in flight at once gets some
refused (quotad_client coalesces concurrent calls into Batch RPCs, so it sends few).
`--pending-calls-per-method` sets it within the bounds below."""
PENDING_CALLS_PER_METHOD_MIN = 1
PENDING_CALLS_PER_METHOD_MAX = 100_000

OVERLOAD_RETRY_DELAY_S = 0.1
"""The RetryInfo delay of an OVERLOADED refusal: how long a caller waits before sending the
call again (quotad_client adds its own backoff and jitter on top)."""

MIGRATE_RECORDS_PER_TRANSACTION = 4096
"""`quotad migrate` writes the new log this many records per LMDB transaction (at most
BATCH_RECORDS_MAX, as the writer)."""
MIGRATE_PROGRESS_EVERY_S = 1.0
"""`quotad migrate` prints how far it is on stderr this often."""

# --- the browser endpoint (`--http-listen`) ----------------------------------------------

HTTP_REQUEST_HEAD_BYTES_MAX = 8 * 1024
"""Request line and headers together; more: 431 and the connection is closed."""

HTTP_REQUEST_BODY_BYTES_MAX = 1024
"""A usage read carries no body; a larger one: 413 and the connection is closed."""

HTTP_QUERY_FIELDS_MAX = 16
"""Query parameters per request; more: 400."""

HTTP_CONNECTIONS_MAX = 256
"""Open HTTP connections at most; one more is answered 503 and closed at once."""
HTTP_CONNECTIONS_PER_PEER_MAX = 32
"""Open HTTP connections from one IP address (all a connection is known by before its first
request): one more is answered 429 TOO_MANY_CONNECTIONS and closed at once. An eighth of the
server: a browser opens at most 6 per host; a proxy in front of quotad reuses its own."""
HTTP_CONNECTIONS_PER_APP_MAX = 64
"""Open HTTP connections whose last authorized request was of one app: a quarter of the
server. The request that would pass it is answered 429 TOO_MANY_CONNECTIONS and its
connection closed."""
HTTP_CONNECTIONS_PER_KEY_MAX = 32
"""The same per key: half of its app's, so that a pk_ key shipped to browsers cannot take all
of the app's. Not counted without keys (the open mode)."""

HTTP_KEEP_ALIVE_IDLE_S = 30.0
"""An idle keep-alive connection is closed after this long without a new request."""

HTTP_REQUEST_READ_TIMEOUT_S = 10.0
"""A request must arrive whole within this long of its first byte (408, closed), so a slow
client cannot hold a connection; `--http-read-timeout-s` sets it within the bounds below."""
HTTP_REQUEST_READ_TIMEOUT_S_MIN = 0.1
HTTP_REQUEST_READ_TIMEOUT_S_MAX = 60.0

HTTP_RESPONSE_WRITE_TIMEOUT_S = 10.0
"""A client that does not read its answer within this long is disconnected."""

HTTP_ALLOWED_HOSTS_MAX = 64
HTTP_ALLOWED_HOST_BYTES_MAX = 261
"""`--http-allowed-host`: this many hosts at most, each a DNS name of at most 255 bytes and a
port (":65535"), or less."""

HTTP_CORS_ORIGINS_MAX = 64
HTTP_CORS_ORIGIN_BYTES_MAX = 256
HTTP_CORS_MAX_AGE_S = 600
"""How long a browser may cache a preflight answer."""

# --- moving slots between shards (quotactl cluster move-slots) -------------------------------

MOVE_CHUNK_BYTES_MAX = 40 * 1024
"""A moved slot set's state travels in chunks (ExportSlots' messages, each one AdoptSlots
request and one record in the target's log) of at most this many bytes of JSON: within
MESSAGE_BYTES_MAX with room for the request's other fields. One user's state (its
subscription and counters), one hold or one idempotency entry larger than this is not cut:
the export refuses it (INVALID_ARGUMENT naming `slots`) and the move stops before the map
changes (`quotactl cluster move-slots --abort` gives the slots back)."""
MOVE_CHUNK_ITEMS_MAX = 512
"""Users, holds and idempotency entries in one chunk, at most."""
MOVE_SCAN_ROWS_PER_PAGE = 1024
"""The export reads the log's holds and idempotency tables this many rows at a time, letting
the event loop serve other calls between pages."""
MOVE_KEY_SCANS_MAX = 4
"""A source keeps the scans of the idempotency table it made before freezing (the slots'
keyed records, to export) for at most this many slot sets at once."""
MOVE_SLOTS_TEXT_BYTES_MAX = 16 * 1024
"""A slot set as text ("0-99,105,200-4095"): every other slot of 4,096 alone is ~10 KB."""
SLOTS_MOVING_RETRY_DELAY_S = 0.05
"""What a call refused SLOTS_MOVING (UNAVAILABLE, nothing done) is told to wait, in its
RetryInfo, before it is sent again."""

# --- the limits fit together (checked on import, as plain ifs so `python -O` checks them) --

if not (0 < WATCH_THRESHOLDS_PERCENT[0]
        and all(low < high for low, high in zip(WATCH_THRESHOLDS_PERCENT,
                                                WATCH_THRESHOLDS_PERCENT[1:]))):
    raise AssertionError("WATCH_THRESHOLDS_PERCENT are positive and ascending")
if not 1 <= WATCHERS_PER_USER_MAX <= WATCHERS_PER_KEY_MAX <= WATCHERS_PER_APP_MAX < WATCHERS_MAX:
    raise AssertionError("1 <= WATCHERS_PER_USER_MAX <= WATCHERS_PER_KEY_MAX "
                         "<= WATCHERS_PER_APP_MAX < WATCHERS_MAX: no app fills the server")
if not (1 <= HTTP_CONNECTIONS_PER_KEY_MAX <= HTTP_CONNECTIONS_PER_APP_MAX < HTTP_CONNECTIONS_MAX
        and 1 <= HTTP_CONNECTIONS_PER_PEER_MAX < HTTP_CONNECTIONS_MAX):
    raise AssertionError("1 <= HTTP_CONNECTIONS_PER_KEY_MAX <= HTTP_CONNECTIONS_PER_APP_MAX "
                         "< HTTP_CONNECTIONS_MAX and 1 <= HTTP_CONNECTIONS_PER_PEER_MAX "
                         "< HTTP_CONNECTIONS_MAX: no app or address fills the server")
if not (1 <= COMMIT_DELAY_PROBE_EVERY_MIN <= COMMIT_DELAY_PROBE_EVERY_MAX
        and 0 < COMMIT_DELAY_JOINED_AVERAGE_WEIGHT <= 1 and COMMIT_DELAY_JOINED_PER_MS_MIN > 0):
    raise AssertionError("the commit delay's probes and average are bounded")
if not ADMISSION_OPERATIONS_MIN <= ADMISSION_OPERATIONS <= ADMISSION_OPERATIONS_MAX:
    raise AssertionError("ADMISSION_OPERATIONS_MIN <= ADMISSION_OPERATIONS "
                         "<= ADMISSION_OPERATIONS_MAX")
if not PENDING_CALLS_PER_METHOD_MIN <= PENDING_CALLS_PER_METHOD <= PENDING_CALLS_PER_METHOD_MAX:
    raise AssertionError("PENDING_CALLS_PER_METHOD_MIN <= PENDING_CALLS_PER_METHOD "
                         "<= PENDING_CALLS_PER_METHOD_MAX")
if not (EVENT_INDEX_SWEEP_RECORDS >= 1 and EVENT_INDEX_SWEEP_USERS_PER_TRANSACTION >= 1):
    raise AssertionError("the event index is swept after at least one record pruned, of at "
                         "least one user a transaction")
if not 1 <= INLINE_BATCH_RECORDS_MIN <= BATCH_RECORDS_MAX:
    raise AssertionError("1 <= INLINE_BATCH_RECORDS_MIN <= BATCH_RECORDS_MAX")
if not (0 < LOG_GROWTH_SAMPLE_EVERY_S <= LOG_GROWTH_SMOOTHING_S
        and 0 < LOG_FULL_WARN_REPEAT_S <= LOG_FULL_WARN_WITHIN_S):
    raise AssertionError("0 < LOG_GROWTH_SAMPLE_EVERY_S <= LOG_GROWTH_SMOOTHING_S and "
                         "0 < LOG_FULL_WARN_REPEAT_S <= LOG_FULL_WARN_WITHIN_S")
if not (1 <= LONE_CALL_QUIET_FLUSHES and 1 <= LONE_CALL_PROBE_EVERY_FLUSHES):
    raise AssertionError("1 <= LONE_CALL_QUIET_FLUSHES and 1 <= LONE_CALL_PROBE_EVERY_FLUSHES")
if not (1 <= PRUNED_RECORDS_PER_TRANSACTION_MAX and 1 < PRUNED_RECORDS_PER_RECORD_WRITTEN
        and 0 < LOG_RETENTION_BYTES_SHARE < 1 and 0 < AUDIT_TRIMMED_WARN_REPEAT_S):
    raise AssertionError("1 <= PRUNED_RECORDS_PER_TRANSACTION_MAX, "
                         "1 < PRUNED_RECORDS_PER_RECORD_WRITTEN, "
                         "0 < LOG_RETENTION_BYTES_SHARE < 1, 0 < AUDIT_TRIMMED_WARN_REPEAT_S")
if not RESERVATION_RETENTION_NS <= IDEMPOTENCY_RETENTION_NS_MIN <= IDEMPOTENCY_RETENTION_NS_MAX:
    raise AssertionError("RESERVATION_RETENTION_NS <= IDEMPOTENCY_RETENTION_NS_MIN "
                         "<= IDEMPOTENCY_RETENTION_NS_MAX")
if not 1 <= MIGRATE_RECORDS_PER_TRANSACTION <= BATCH_RECORDS_MAX:
    raise AssertionError("1 <= MIGRATE_RECORDS_PER_TRANSACTION <= BATCH_RECORDS_MAX")
if ADMISSION_OPERATIONS < BATCH_OPERATIONS_MAX:
    raise AssertionError("ADMISSION_OPERATIONS >= BATCH_OPERATIONS_MAX: a full Batch fits")
if not (HTTP_REQUEST_READ_TIMEOUT_S_MIN <= HTTP_REQUEST_READ_TIMEOUT_S
        <= HTTP_REQUEST_READ_TIMEOUT_S_MAX):
    raise AssertionError("HTTP_REQUEST_READ_TIMEOUT_S_MIN <= HTTP_REQUEST_READ_TIMEOUT_S "
                         "<= HTTP_REQUEST_READ_TIMEOUT_S_MAX")
if not 0 < MOVE_CHUNK_BYTES_MAX + MOVE_SLOTS_TEXT_BYTES_MAX + 1024 <= MESSAGE_BYTES_MAX:
    raise AssertionError("an AdoptSlots request of a full chunk (MOVE_CHUNK_BYTES_MAX and "
                         "MOVE_SLOTS_TEXT_BYTES_MAX of slots) fits in MESSAGE_BYTES_MAX")
if not (1 <= MOVE_CHUNK_ITEMS_MAX and 1 <= MOVE_SCAN_ROWS_PER_PAGE and 1 <= MOVE_KEY_SCANS_MAX):
    raise AssertionError("MOVE_CHUNK_ITEMS_MAX, MOVE_SCAN_ROWS_PER_PAGE and MOVE_KEY_SCANS_MAX "
                         "are at least 1")
