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
RESPONSE_BYTES_MAX = 2 * 1024 * 1024
"""A shard map's answer, at most (etcd's own request limit is 1.5 MiB)."""


def read_shard_map(target: EtcdTarget, timeout_s: float) -> ShardMap:
    """The map as etcd holds it now. Unavailable when etcd does not answer within
    timeout_s; ShardMapError (a ValueError) when there is no map or it breaks a rule."""
    body = json.dumps({"key": base64.b64encode(target.shard_map_key).decode()}).encode()
    request = urllib.request.Request(f"http://{target.endpoint}{RANGE_PATH}", data=body,
                                     headers={"Content-Type": "application/json"},
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            answer = json.loads(response.read(RESPONSE_BYTES_MAX + 1)[:RESPONSE_BYTES_MAX])
    except (OSError, urllib.error.URLError, json.JSONDecodeError) as error:
        raise Unavailable(grpc.StatusCode.UNAVAILABLE,
                          f"cannot read the shard map from etcd at {target.endpoint}: "
                          f"{error}") from error
    kvs = answer.get("kvs") if isinstance(answer, dict) else None
    if not kvs:
        raise ShardMapError(f"there is no shard map at {target}: write one with "
                            f"`quotad cluster init --cluster {target} ...`")
    try:
        text = base64.b64decode(kvs[0].get("value", "")).decode("utf-8")
    except (ValueError, AttributeError) as error:
        raise ShardMapError(f"the shard map at {target} cannot be decoded: {error}") from error
    try:
        return ShardMap.from_json(text)
    except ShardMapError as error:
        raise ShardMapError(f"the shard map at {target}: {error}") from None


def shard_addresses(target: EtcdTarget, timeout_s: float) -> tuple[str, ...]:
    """The shards etcd's map names now; none when etcd cannot say (the shards a client knows
    still answer the map)."""
    try:
        shard_map = read_shard_map(target, timeout_s)
    except (Unavailable, ShardMapError):
        return ()
    return tuple(shard.address for shard in shard_map.shards)
