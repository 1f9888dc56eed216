"""Load shedding: bound what waits for the writer, and do no work for a call that is late.

Offered more calls than it can answer in time, a server that takes them all answers none in
time: every call waits behind all the others, its deadline passes, and the work done for it
is thrown away. So each unary call is *admitted* before it is applied, counting its
operations (a Batch counts each of its operations, any other call one): at most
`admission_operations` are admitted and not yet answered. The excess is refused at once
with RESOURCE_EXHAUSTED `OVERLOADED` and a google.rpc.RetryInfo, having done nothing. A call
whose deadline has already passed when its handler starts (it waited in gRPC's queue) is
answered DEADLINE_EXCEEDED, also having done nothing; the writer checks the deadline again
before it applies. A call once applied is always answered as applied.

Health checks and WatchUsage streams are not admitted here (WatchUsage has its own bound,
WATCHERS_MAX): they are served under overload. That is why this is done in the handlers
rather than with grpc.aio's `maximum_concurrent_rpcs`, which counts every RPC, streams and
health checks included, and cannot count a Batch's operations.
"""

from __future__ import annotations

import time
from collections import Counter

from quotad.core import limits
from quotad.core.errors import ResourceExhausted
from quotad.engine.writer import DeadlinePassed
from quotad_contract.errors import ErrorReason


def overloaded(message: str, retry_delay_s: float | None) -> ResourceExhausted:
    """RESOURCE_EXHAUSTED OVERLOADED: refused at the admission limit, nothing done.
    `retry_delay_s`, when set, goes out as a RetryInfo: how long to wait before sending the
    call again. None: sending it again cannot help (a Batch of more operations than the
    whole limit)."""
    error = ResourceExhausted(ErrorReason.OVERLOADED, message)
    error.retry_delay_s = retry_delay_s  # type: ignore[attr-defined]
    return error


SHED_OVERLOADED = "overloaded"
SHED_DEADLINE = "deadline"


class Admission:
    """The count of operations admitted and not yet answered, against the limit."""

    def __init__(self, operations_max: int = limits.ADMISSION_OPERATIONS) -> None:
        if not limits.ADMISSION_OPERATIONS_MIN <= operations_max <= limits.ADMISSION_OPERATIONS_MAX:
            raise ValueError(f"admission limit {operations_max}: must be "
                             f"{limits.ADMISSION_OPERATIONS_MIN} to "
                             f"{limits.ADMISSION_OPERATIONS_MAX} operations")
        self.operations_max = operations_max
        self.admitted = 0
        self.shed: Counter[tuple[str, str]] = Counter()
        """Calls refused without work, by (RPC, why: SHED_OVERLOADED or SHED_DEADLINE)."""

    def admit(self, rpc: str, operations: int) -> None:
        """Counts the call's operations in; RESOURCE_EXHAUSTED OVERLOADED if they do not fit. Every admit that
        returns is paired with one `release` of the same operations."""
        if self.admitted + operations <= self.operations_max:
            self.admitted += operations
            return
        self.shed[rpc, SHED_OVERLOADED] += 1
        if operations > self.operations_max:
            raise overloaded(
                f"this call has {operations} operations, more than quotad's whole admission "
                f"limit ({self.operations_max}): nothing was done; send fewer per call", None)
        raise overloaded(
            f"quotad is at its admission limit ({self.operations_max} operations admitted "
            f"and not yet answered; this call has {operations}): nothing was done; send it "
            "again after the RetryInfo delay", limits.OVERLOAD_RETRY_DELAY_S)

    def release(self, operations: int) -> None:
        self.admitted -= operations

    def check_deadline(self, rpc: str, deadline_s: float | None) -> None:
        """DeadlinePassed if the call's deadline (time.monotonic() based) has passed."""
        if deadline_s is not None and time.monotonic() >= deadline_s:
            raise DeadlinePassed("the call's deadline passed before quotad could start it: "
                                 "nothing was done")

    def count_deadline_shed(self, rpc: str) -> None:
        self.shed[rpc, SHED_DEADLINE] += 1
