"""Coalescing: the asyncio client gathers the hot-path calls of one process into Batch RPCs.

Calls made while a batch is in flight wait and go together in the next one (up to
BATCH_OPERATIONS_MAX, at most IN_FLIGHT_BATCHES_MAX batches at a time), so under load one
gRPC call and one group commit on the server carry many operations. Each operation is encoded
once, when it is queued, already framed as one entry of BatchRequest.operations; a batch is
the concatenation of its entries, sent as bytes as they are. So its size is known exactly
and it is kept within the server's message limit (MESSAGE_BYTES_MAX): what does not fit waits
for the next batch, as encoded. Each caller still gets its own response (a sub-message of the
parsed BatchResponse, not a copy) or its own error; a failure of the whole batch (UNAVAILABLE)
reaches every caller in it, whose retry loop then decides as for a unary call. A call whose
own deadline passes first, queued or in flight, fails alone with TimeoutError: one timer for
the whole coalescer, set for the earliest deadline of the calls still waiting, does it (a
timer per call cost more than the rest of the coalescing).
"""

from __future__ import annotations

import asyncio
import math
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2

from quotad_contract import limits
from quotad_contract.v1 import quotad_pb2

BATCH_PATH = "/quotad.v1.QuotaService/Batch"
BATCHABLE = {"Reserve": 1, "Commit": 2, "Release": 3, "Extend": 4, "Track": 5, "GetUsage": 6}
"""Each method's field in BatchOperation's oneof (protos/quotad/v1/quotad.proto)."""
IN_FLIGHT_BATCHES_MAX = 2

_OPERATIONS_TAG = 1 << 3 | 2
"""BatchRequest.operations: field 1, length-delimited."""
_ONEOF_TAGS = {method: field << 3 | 2 for method, field in BATCHABLE.items()}


class OperationFailed(Exception):
    """One operation of a batch failed; the batch itself went through."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


def batch_method(channel: grpc.aio.Channel) -> Any:
    """Batch over ``channel``, sending a BatchRequest already encoded (bytes) as it is."""
    return channel.unary_unary(BATCH_PATH, request_serializer=None,
                               response_deserializer=quotad_pb2.BatchResponse.FromString)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_operation(method: str, request: Message) -> bytes:
    """``request`` as one entry of BatchRequest.operations: the entry's tag and length, then
    the BatchOperation (its oneof field's tag and length, then the request)."""
    payload = request.SerializeToString()
    size = len(payload)
    if size < 126:  # each length one byte: the common case, in one step
        return bytes((_OPERATIONS_TAG, size + 2, _ONEOF_TAGS[method], size)) + payload
    operation = bytes((_ONEOF_TAGS[method],)) + _varint(size) + payload
    return bytes((_OPERATIONS_TAG,)) + _varint(len(operation)) + operation


class Coalescer:
    def __init__(self, batch_method: Any, timeout_s: float,
                 metadata: Sequence[tuple[str, str]]) -> None:
        """``batch_method`` takes an encoded BatchRequest and answers a BatchResponse (see
        ``batch_method``)."""
        self._batch_method = batch_method
        self._timeout_s = timeout_s
        self._metadata = metadata
        # the operations waiting for a batch: each encoded, its caller's future and deadline
        self._encoded: list[bytes] = []
        self._futures: list[asyncio.Future[Message]] = []
        self._deadlines: list[float] = []
        # the batches in flight: the futures and deadlines of their callers
        self._sent: list[tuple[list[asyncio.Future[Message]], list[float]]] = []
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at = math.inf
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches_sent = 0

    async def call(self, method: str, request: Message, timeout_s: float) -> Message:
        """The operation's response; raises OperationFailed, the batch's grpc.RpcError, or
        TimeoutError when no answer came within ``timeout_s``."""
        loop = asyncio.get_running_loop()
        # A future each, not one per batch: a caller that gives up (cancellation) cancels its
        # own future only.
        future: asyncio.Future[Message] = loop.create_future()
        deadline = loop.time() + timeout_s
        self._encoded.append(encode_operation(method, request))
        self._futures.append(future)
        self._deadlines.append(deadline)
        if deadline < self._expiry_at:
            self._expire_at(deadline)
        if not self._scheduled:
            self._schedule()
        return await future

    def _expire_at(self, when: float) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry_at = when
        self._expiry = asyncio.get_running_loop().call_at(when, self._expire)

    def _expire(self) -> None:
        """Fails the calls whose deadline has passed, queued or in flight (an expired call
        still queued is sent all the same, its answer dropped), and sets the timer for the
        next deadline. The timer is not moved when calls end: it may find nothing to do."""
        self._expiry, self._expiry_at = None, math.inf
        now = asyncio.get_running_loop().time()
        upcoming = math.inf
        for futures, deadlines in ((self._futures, self._deadlines), *self._sent):
            for future, deadline in zip(futures, deadlines):
                if future.done():
                    continue
                if deadline <= now:
                    future.set_exception(TimeoutError())
                elif deadline < upcoming:
                    upcoming = deadline
        if upcoming < math.inf:
            self._expire_at(upcoming)

    def _schedule(self) -> None:
        if self._scheduled or self._in_flight >= IN_FLIGHT_BATCHES_MAX:
            return
        self._scheduled = True  # after this tick, so that calls made together go together
        asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._scheduled = False
        if not self._encoded or self._in_flight >= IN_FLIGHT_BATCHES_MAX:
            return
        encoded = self._encoded[:limits.BATCH_OPERATIONS_MAX]
        if sum(map(len, encoded)) > limits.MESSAGE_BYTES_MAX:
            encoded = encoded[:_operations_fitting(encoded)]
        count = len(encoded)
        sent = self._futures[:count], self._deadlines[:count]
        del self._encoded[:count], self._futures[:count], self._deadlines[:count]
        self._sent.append(sent)
        self._in_flight += 1
        task = asyncio.ensure_future(self._run(sent, b"".join(encoded)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._encoded:
            self._schedule()

    async def _run(self, sent: tuple[list[asyncio.Future[Message]], list[float]],
                   request: bytes) -> None:
        futures = sent[0]
        try:
            self.batches_sent += 1
            response = await self._batch_method(request, timeout=self._timeout_s,
                                                metadata=self._metadata)
        except grpc.RpcError as error:
            for future in futures:
                if not future.done():
                    future.set_exception(error)
        else:
            for future, result in zip(futures, response.results, strict=True):
                if future.done():  # its caller gave up
                    continue
                which = result.WhichOneof("result")
                if which == "error":
                    future.set_exception(OperationFailed(result.error))
                else:
                    future.set_result(getattr(result, which))
        finally:
            self._sent.remove(sent)
            self._in_flight -= 1
            if self._encoded:
                self._schedule()


def _operations_fitting(encoded: list[bytes]) -> int:
    """How many of the first operations fit in MESSAGE_BYTES_MAX together; at least one, so
    that an operation too large for any batch goes alone (and fails alone)."""
    return max(bisect_right(list(accumulate(map(len, encoded))), limits.MESSAGE_BYTES_MAX), 1)
