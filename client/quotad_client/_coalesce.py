"""Coalescing: the asyncio client gathers the hot-path calls of one process into Batch RPCs.

Calls made while a batch is in flight wait and go together in the next one (up to
BATCH_OPERATIONS_MAX, at most IN_FLIGHT_BATCHES_MAX batches at a time), so under load one
gRPC call and one group commit on the server carry many operations. A batch is also kept
within the server's message limit (MESSAGE_BYTES_MAX): its encoded size is taken once, when
it is built, and only a batch over the limit is measured operation by operation to find where
to cut it; the rest waits for the next batch. Each caller still gets its own response or its
own error; a failure of the whole batch (UNAVAILABLE) reaches every caller in it, whose retry
loop then decides as for a unary call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2

from quotad_contract import limits
from quotad_contract.v1 import quotad_pb2

BATCHABLE = {"Reserve": "reserve", "Commit": "commit", "Release": "release",
             "Extend": "extend", "Track": "track", "GetUsage": "get_usage"}
IN_FLIGHT_BATCHES_MAX = 2

Item = tuple[str, Message, "asyncio.Future[Message]"]


class OperationFailed(Exception):
    """One operation of a batch failed; the batch itself went through."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


class Coalescer:
    def __init__(self, batch_method: Any, timeout_s: float,
                 metadata: Sequence[tuple[str, str]]) -> None:
        self._batch_method = batch_method
        self._timeout_s = timeout_s
        self._metadata = metadata
        self._queue: list[Item] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches_sent = 0

    async def call(self, method: str, request: Message) -> Message:
        """The operation's response; raises OperationFailed or the batch's grpc.RpcError."""
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._queue.append((BATCHABLE[method], request, future))
        self._schedule()
        return await future

    def _schedule(self) -> None:
        if self._scheduled or self._in_flight >= IN_FLIGHT_BATCHES_MAX:
            return
        self._scheduled = True  # after this tick, so that calls made together go together
        asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._scheduled = False
        if not self._queue or self._in_flight >= IN_FLIGHT_BATCHES_MAX:
            return
        items = self._queue[:limits.BATCH_OPERATIONS_MAX]
        request = quotad_pb2.BatchRequest()
        add = request.operations.add
        for kind, message, _ in items:  # ~3x cheaper than BatchOperation(**{kind: ...})
            getattr(add(), kind).CopyFrom(message)
        if request.ByteSize() > limits.MESSAGE_BYTES_MAX:  # one C call per batch
            count = _operations_fitting(request.operations)
            del request.operations[count:]
            items = items[:count]
        del self._queue[:len(items)]
        self._in_flight += 1
        task = asyncio.ensure_future(self._run(items, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._queue:
            self._schedule()

    async def _run(self, items: list[Item], request: quotad_pb2.BatchRequest) -> None:
        try:
            self.batches_sent += 1
            response = await self._batch_method(request, timeout=self._timeout_s,
                                                metadata=self._metadata)
        except grpc.RpcError as error:
            for _, _, future in items:
                if not future.done():
                    future.set_exception(error)
        else:
            for (_, _, future), result in zip(items, response.results, strict=True):
                if future.done():  # its caller gave up
                    continue
                which = result.WhichOneof("result")
                if which == "error":
                    future.set_exception(OperationFailed(result.error))
                else:
                    future.set_result(getattr(result, which))
        finally:
            self._in_flight -= 1
            if self._queue:
                self._schedule()


def _operations_fitting(operations: Sequence[quotad_pb2.BatchOperation]) -> int:
    """How many of the first operations fit in COALESCED_BATCH_OPERATIONS_BYTES_MAX; at least
    one, so that an operation too large for any batch goes alone (and fails alone)."""
    total = 0
    for count, operation in enumerate(operations):
        total += operation.ByteSize()
        if total > limits.COALESCED_BATCH_OPERATIONS_BYTES_MAX:
            return max(count, 1)
    return len(operations)
