"""The limits of a shard's control plane: its etcd lease, its calls to etcd, and the waits
between attempts. The contract's limits (slots, shard ids, cluster names) are in
quotad_contract.limits."""

from __future__ import annotations

LEASE_TTL_S_DEFAULT = 10
"""A shard serves only while it holds its shard id's etcd lease, of this TTL (seconds)."""
LEASE_TTL_S_MIN = 2
"""etcd's own minimum is about 1.5 s with its default election timeout."""
LEASE_TTL_S_MAX = 300
KEEP_ALIVES_PER_TTL = 3
"""The lease is renewed every TTL / KEEP_ALIVES_PER_TTL: two renewals may fail in a row
before the shard stops serving."""
LEASE_SAFETY_FRACTION = 0.2
"""A shard stops serving at the renewal's send time + TTL * (1 - LEASE_SAFETY_FRACTION):
etcd counts the TTL from when it receives the renewal, later, so the shard stops first."""
ETCD_REQUEST_TIMEOUT_S = 2.0
"""One unary call to etcd (range, put, txn, lease grant or renewal), at most."""
ETCD_CONNECT_TIMEOUT_S = 5.0
"""How long `quotad serve --cluster` and `quotad cluster init` wait for etcd at start."""
ETCD_RETRY_S = 0.5
"""The wait before trying etcd again after a failed call (the lease, the map's watch)."""
LEASE_WAIT_POLL_S = 0.5
"""How often a shard whose id's lease another process holds looks again."""
SHARD_MAP_VALUE_BYTES_MAX = 1024 * 1024
"""A shard map in etcd, at most (etcd's own request limit is 1.5 MiB)."""
CATALOG_RESULTS_KEPT = 1024
"""A shard remembers what applying each of the last this many catalog changes answered, for
the UpsertPlan calls that wrote them to etcd and wait for it."""
CATALOG_VALUE_BYTES_MAX = 64 * 1024
"""One value of the catalog in etcd (a plan, an API key), at most: a plan arrives in a
message of at most 64 KiB (the contract's limit), a key is a few hundred bytes. A larger
value found in etcd is skipped, logged."""
CATALOG_APPLY_TIMEOUT_S = 10.0
"""A catalog change (UpsertPlan, DeletePlan, CreateKey, RevokeKey) without a deadline waits
at most this long for its own shard to apply it."""
CATALOG_CATCH_UP_TIMEOUT_S = 30.0
"""A starting shard waits at most this long for the catalog's changes it missed; past it
(etcd failed meanwhile) it goes on starting and applies them once etcd answers. It cannot
serve without etcd anyway: its lease is there."""
CLUSTER_UP_SHARDS_MAX = 16
"""`quotad cluster up` starts at most this many shards on one machine."""

if not LEASE_TTL_S_MIN <= LEASE_TTL_S_DEFAULT <= LEASE_TTL_S_MAX:
    raise AssertionError("LEASE_TTL_S_MIN <= LEASE_TTL_S_DEFAULT <= LEASE_TTL_S_MAX")
if not (1 - LEASE_SAFETY_FRACTION) > 1 / KEEP_ALIVES_PER_TTL * 2:
    raise AssertionError("two renewals fit within the time the shard serves on one")
