"""A cluster's shard map read from etcd (``cluster="etcd://HOST:PORT/NAME"``), through etcd's
JSON gateway with the standard library.

The client reads one key, now and then (when it starts routing, and after a WRONG_SHARD),
so it needs no etcd client of its own: etcd serves its v3 KV API as JSON over HTTP on the
same port as gRPC (POST /v3/kv/range, keys and values base64), and urllib suffices. The
client distribution gains no dependency, and no generated etcd stubs to ship.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import grpc

from quotad_contract.shards import EtcdTarget, ShardMap, ShardMapError

from ._errors import Unavailable

RANGE_PATH = "/v3/kv/range"
"""etcd 3.4 and later (3.3 served it under /v3beta/)."""
TXN_PATH = "/v3/kv/txn"
RESPONSE_BYTES_MAX = 2 * 1024 * 1024
"""A shard map's answer, at most (etcd's own request limit is 1.5 MiB)."""


def _post(target: EtcdTarget, path: str, document: dict, timeout_s: float, what: str) -> dict:
    body = json.dumps(document).encode()
    request = urllib.request.Request(f"http://{target.endpoint}{path}", data=body,
                                     headers={"Content-Type": "application/json"},
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            answer = json.loads(response.read(RESPONSE_BYTES_MAX + 1)[:RESPONSE_BYTES_MAX])
    except (OSError, urllib.error.URLError, json.JSONDecodeError) as error:
        raise Unavailable(grpc.StatusCode.UNAVAILABLE,
                          f"cannot {what} etcd at {target.endpoint}: {error}") from error
    return answer if isinstance(answer, dict) else {}


def read_shard_map(target: EtcdTarget, timeout_s: float) -> ShardMap:
    """The map as etcd holds it now. Unavailable when etcd does not answer within
    timeout_s; ShardMapError (a ValueError) when there is no map or it breaks a rule."""
    return read_shard_map_revision(target, timeout_s)[0]


def read_shard_map_revision(target: EtcdTarget, timeout_s: float) -> tuple[ShardMap, int]:
    """The map as etcd holds it now, and its key's mod revision (what a swap compares)."""
    answer = _post(target, RANGE_PATH, {"key": base64.b64encode(target.shard_map_key).decode()},
                   timeout_s, "read the shard map from")
    kvs = answer.get("kvs")
    if not kvs:
        raise ShardMapError(f"there is no shard map at {target}: write one with "
                            f"`quotad cluster init --cluster {target} ...`")
    try:
        text = base64.b64decode(kvs[0].get("value", "")).decode("utf-8")
    except (ValueError, AttributeError) as error:
        raise ShardMapError(f"the shard map at {target} cannot be decoded: {error}") from error
    try:
        return ShardMap.from_json(text), int(kvs[0].get("mod_revision", 0))
    except ShardMapError as error:
        raise ShardMapError(f"the shard map at {target}: {error}") from None


def swap_shard_map(target: EtcdTarget, shard_map: ShardMap, mod_revision: int,
                   timeout_s: float) -> int | None:
    """Writes the map in one etcd transaction, only if its key's mod revision is still
    mod_revision (nobody changed it since it was read): the revision it was written at, or
    None when the map had changed (nothing written)."""
    key = base64.b64encode(target.shard_map_key).decode()
    value = base64.b64encode(shard_map.to_json().encode()).decode()
    answer = _post(target, TXN_PATH, {
        "compare": [{"key": key, "target": "MOD", "result": "EQUAL",
                     "mod_revision": str(mod_revision)}],
        "success": [{"request_put": {"key": key, "value": value}}],
    }, timeout_s, "write the shard map to")
    if not answer.get("succeeded"):
        return None
    return int(answer.get("header", {}).get("revision", 0))


def shard_addresses(target: EtcdTarget, timeout_s: float) -> tuple[str, ...]:
    """The shards etcd's map names now; none when etcd cannot say (the shards a client knows
    still answer the map)."""
    try:
        shard_map = read_shard_map(target, timeout_s)
    except (Unavailable, ShardMapError):
        return ()
    return tuple(shard.address for shard in shard_map.shards)
