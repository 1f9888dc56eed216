"""A small asyncio client of etcd's v3 gRPC API: what a shard needs of it and no more.

KV (get, put, create-if-absent, compare-and-swap, delete), a watch of one key, and leases
(grant, one renewal, revoke). Every unary call has a timeout; a failure of etcd (down,
unreachable, too slow) raises EtcdUnavailable naming the call. The stubs are generated from
etcd's own protos (protos/etcd/) by the build, like quotad's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from quotad.cluster.etcdpb import kv_pb2, rpc_pb2, rpc_pb2_grpc
from quotad.cluster.limits import ETCD_REQUEST_TIMEOUT_S

__all__ = ["Etcd", "EtcdCompacted", "EtcdUnavailable", "KeyValue", "WatchEvent"]

KeyValue = kv_pb2.KeyValue
CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000))
"""Reconnect to an etcd that was down within a second of it being back (grpc's default
backoff grows to two minutes): a shard that lost its lease resumes as soon as it can."""


def prefix_end(prefix: bytes) -> bytes:
    """The range end that makes [prefix, end) every key starting with prefix (etcd's rule:
    the prefix with its last byte below 0xff plus one)."""
    trimmed = prefix.rstrip(b"\xff")
    assert trimmed, "a prefix of 0xff bytes only has no end"
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


class EtcdUnavailable(Exception):
    """etcd did not answer a call (down, unreachable, too slow, or it refused it)."""


class EtcdCompacted(EtcdUnavailable):
    """A watch asked for changes from a revision etcd has compacted away: they are gone,
    only the keys as they are now can be read."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision
        """The oldest revision etcd still has (0: etcd did not say)."""


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change of a watched key: its new value (None: deleted) at this revision."""

    revision: int
    value: bytes | None
    key: bytes = b""


class Etcd:
    """One channel to one etcd endpoint (HOST:PORT, plaintext)."""

    def __init__(self, endpoint: str, *, timeout_s: float = ETCD_REQUEST_TIMEOUT_S) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
        self._kv = rpc_pb2_grpc.KVStub(self._channel)
        self._watch = rpc_pb2_grpc.WatchStub(self._channel)
        self._lease = rpc_pb2_grpc.LeaseStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, what: str, call: object, request: object,
                    timeout_s: float | None = None) -> object:
        try:
            return await call(request, timeout=timeout_s or self.timeout_s)  # type: ignore[operator]
        except grpc.aio.AioRpcError as error:
            raise EtcdUnavailable(f"etcd at {self.endpoint}: {what} failed: "
                                  f"{error.code().name} {error.details()}") from error

    # --- KV ----------------------------------------------------------------------------------

    async def get(self, key: bytes) -> tuple[KeyValue | None, int]:
        """The key's value (None when absent) and the store's revision."""
        response = await self._call("range", self._kv.Range, rpc_pb2.RangeRequest(key=key))
        assert isinstance(response, rpc_pb2.RangeResponse)
        return (response.kvs[0] if response.kvs else None), response.header.revision

    async def get_prefix(self, prefix: bytes, *, revision: int = 0,
                         keys_only: bool = False) -> tuple[list[KeyValue], int]:
        """Every key under the prefix, in key order, and the store's revision; as they were
        at revision when given (EtcdCompacted when etcd no longer has it), without their
        values when keys_only."""
        try:
            response = await self._call("range", self._kv.Range, rpc_pb2.RangeRequest(
                key=prefix, range_end=prefix_end(prefix), revision=revision,
                keys_only=keys_only))
        except EtcdUnavailable as error:
            cause = error.__cause__
            if (revision and isinstance(cause, grpc.aio.AioRpcError)
                    and cause.code() == grpc.StatusCode.OUT_OF_RANGE):
                raise EtcdCompacted(f"etcd at {self.endpoint}: revision {revision} is "
                                    f"compacted ({cause.details()})", 0) from error
            raise
        assert isinstance(response, rpc_pb2.RangeResponse)
        return list(response.kvs), response.header.revision

    async def put(self, key: bytes, value: bytes, *, lease_id: int = 0) -> int:
        """The revision of the put."""
        response = await self._call("put", self._kv.Put,
                                    rpc_pb2.PutRequest(key=key, value=value, lease=lease_id))
        assert isinstance(response, rpc_pb2.PutResponse)
        return response.header.revision

    async def create(self, key: bytes, value: bytes, *,
                     lease_id: int = 0) -> tuple[bool, KeyValue | None]:
        """Puts the key only if it does not exist, in one transaction: (True, None) when put,
        else (False, the key as it is)."""
        return await self._put_if(rpc_pb2.Compare(
            result=rpc_pb2.Compare.EQUAL, target=rpc_pb2.Compare.CREATE, key=key,
            create_revision=0), key, value, lease_id)

    async def replace(self, key: bytes, value: bytes, mod_revision: int) -> tuple[
            bool, KeyValue | None]:
        """Puts the key only if it was last changed at mod_revision (compare-and-swap):
        (True, None) when put, else (False, the key as it is; None when absent)."""
        return await self._put_if(rpc_pb2.Compare(
            result=rpc_pb2.Compare.EQUAL, target=rpc_pb2.Compare.MOD, key=key,
            mod_revision=mod_revision), key, value, 0)

    async def _put_if(self, compare: rpc_pb2.Compare, key: bytes, value: bytes,
                      lease_id: int) -> tuple[bool, KeyValue | None]:
        request = rpc_pb2.TxnRequest(
            compare=[compare],
            success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(
                key=key, value=value, lease=lease_id))],
            failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))])
        response = await self._call("txn", self._kv.Txn, request)
        assert isinstance(response, rpc_pb2.TxnResponse)
        if response.succeeded:
            return True, None
        found = response.responses[0].response_range.kvs
        return False, (found[0] if found else None)

    async def create_at(self, key: bytes, value: bytes) -> int | None:
        """Puts the key only if it does not exist, in one transaction: the revision of the
        put, or None when the key exists (nothing written)."""
        request = rpc_pb2.TxnRequest(
            compare=[rpc_pb2.Compare(result=rpc_pb2.Compare.EQUAL,
                                     target=rpc_pb2.Compare.CREATE, key=key,
                                     create_revision=0)],
            success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value))])
        response = await self._call("txn", self._kv.Txn, request)
        assert isinstance(response, rpc_pb2.TxnResponse)
        return response.header.revision if response.succeeded else None

    async def delete_at(self, key: bytes) -> tuple[int, int]:
        """Deletes the key: (how many keys were deleted, 0 or 1; the store's revision after,
        the delete's own when there was one)."""
        response = await self._call("delete", self._kv.DeleteRange,
                                    rpc_pb2.DeleteRangeRequest(key=key))
        assert isinstance(response, rpc_pb2.DeleteRangeResponse)
        return response.deleted, response.header.revision

    async def delete(self, key: bytes) -> int:
        """How many keys were deleted (0 or 1)."""
        deleted, _ = await self.delete_at(key)
        return deleted

    # --- Watch -------------------------------------------------------------------------------

    async def watch(self, key: bytes, start_revision: int, *,
                    prefix: bool = False) -> AsyncIterator[WatchEvent]:
        """The changes of one key (or, with prefix, of every key under it) from
        start_revision on (inclusive), as they happen, until the caller stops iterating or
        etcd fails (EtcdUnavailable: watch again from the revision after the last event
        seen; EtcdCompacted: start_revision is compacted away, read the keys instead)."""
        requests: asyncio.Queue[rpc_pb2.WatchRequest | None] = asyncio.Queue()
        await requests.put(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
            key=key, range_end=prefix_end(key) if prefix else b"",
            start_revision=start_revision)))

        async def sent() -> AsyncIterator[rpc_pb2.WatchRequest]:
            while (request := await requests.get()) is not None:
                yield request

        call = self._watch.Watch(sent())
        try:
            async for response in call:
                if response.canceled and response.compact_revision:
                    raise EtcdCompacted(
                        f"etcd at {self.endpoint}: revision {start_revision} is compacted "
                        f"(the oldest kept is {response.compact_revision})",
                        response.compact_revision)
                if response.canceled:
                    raise EtcdUnavailable(
                        f"etcd at {self.endpoint}: watch canceled ({response.cancel_reason or 'compacted'}, "
                        f"compact revision {response.compact_revision})")
                for event in response.events:
                    deleted = event.type == kv_pb2.Event.DELETE
                    yield WatchEvent(event.kv.mod_revision, None if deleted else event.kv.value,
                                     event.kv.key)
        except grpc.aio.AioRpcError as error:
            raise EtcdUnavailable(f"etcd at {self.endpoint}: watch failed: "
                                  f"{error.code().name} {error.details()}") from error
        finally:
            call.cancel()
        raise EtcdUnavailable(f"etcd at {self.endpoint}: the watch stream ended")

    # --- Lease -------------------------------------------------------------------------------

    async def grant_lease(self, ttl_s: int) -> tuple[int, int]:
        """A new lease: its id and the TTL etcd chose (seconds)."""
        response = await self._call("lease grant", self._lease.LeaseGrant,
                                    rpc_pb2.LeaseGrantRequest(TTL=ttl_s))
        assert isinstance(response, rpc_pb2.LeaseGrantResponse)
        if response.error:
            raise EtcdUnavailable(f"etcd at {self.endpoint}: lease grant refused: "
                                  f"{response.error}")
        return response.ID, response.TTL

    async def renew_lease(self, lease_id: int, timeout_s: float | None = None) -> int:
        """One keep-alive: the lease's TTL from now (seconds); 0 when it no longer exists."""
        call = self._lease.LeaseKeepAlive(timeout=timeout_s or self.timeout_s)
        try:
            await call.write(rpc_pb2.LeaseKeepAliveRequest(ID=lease_id))
            response = await call.read()
        except grpc.aio.AioRpcError as error:
            raise EtcdUnavailable(f"etcd at {self.endpoint}: lease keep-alive failed: "
                                  f"{error.code().name} {error.details()}") from error
        finally:
            call.cancel()
        if response is grpc.aio.EOF:
            raise EtcdUnavailable(f"etcd at {self.endpoint}: lease keep-alive got no answer")
        return max(0, response.TTL)

    async def revoke_lease(self, lease_id: int) -> None:
        """Revokes the lease (its keys are deleted); a lease already gone is no error."""
        try:
            await self._lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lease_id),
                                          timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise EtcdUnavailable(f"etcd at {self.endpoint}: lease revoke failed: "
                                      f"{error.code().name} {error.details()}") from error

    async def lease_ttl_s(self, lease_id: int) -> int:
        """The lease's remaining TTL on etcd (seconds); -1 when it no longer exists."""
        response = await self._call("lease time-to-live", self._lease.LeaseTimeToLive,
                                    rpc_pb2.LeaseTimeToLiveRequest(ID=lease_id))
        assert isinstance(response, rpc_pb2.LeaseTimeToLiveResponse)
        return response.TTL
