"""Resuming a WatchUsage stream: which errors reconnect, after which sequence, how soon.

The server ends a watch UNAVAILABLE when it drains (or cannot be reached) and
RESOURCE_EXHAUSTED (WATCH_QUEUE_FULL) when the reader fell too far behind. Either way the
client opens the watch again with ``after_sequence`` = the last sequence it saw: the new first
message carries the threshold crossings since, so none is lost and none repeats. Consecutive
failed attempts wait with the client's backoff (bounded by its ``max_backoff_s``) and stop
after RECONNECT_ATTEMPTS_MAX; any message received starts the count again.
"""

from __future__ import annotations

import grpc

from quotad_contract.errors import ErrorReason
from quotad_contract.v1 import quotad_pb2

from ._errors import QuotadError, ResourceExhausted
from ._retry import RetryPolicy
from ._types import WatchUpdate

RECONNECT_ATTEMPTS_MAX = 60
"""Consecutive reconnects without a message before the watch gives up (about a minute with
the default backoff, enough for a server restart)."""
QUEUE_FULL_REASON = ErrorReason.WATCH_QUEUE_FULL


def reconnects_after(error: QuotadError) -> bool:
    if error.code == grpc.StatusCode.UNAVAILABLE:
        return True
    return isinstance(error, ResourceExhausted) and error.reason == QUEUE_FULL_REASON


class Resume:
    """Where a watch stands: the last sequence seen, and the reconnects since a message."""

    def __init__(self, user_id: str, after_sequence: int, policy: RetryPolicy, *,
                 reconnect: bool) -> None:
        if isinstance(after_sequence, bool) or not isinstance(after_sequence, int) or (
                after_sequence < 0):
            raise ValueError(f"after_sequence must be an int >= 0, got {after_sequence!r}")
        self.user_id = user_id
        self.after_sequence = after_sequence
        self._policy = policy
        self._reconnect = reconnect
        self._failures = 0

    def request(self) -> quotad_pb2.WatchUsageRequest:
        return quotad_pb2.WatchUsageRequest(user_id=self.user_id,
                                            after_sequence=self.after_sequence)

    def saw(self, update: WatchUpdate) -> None:
        self.after_sequence = max(self.after_sequence, update.sequence)
        self._failures = 0

    def next_wait(self, error: QuotadError) -> float | None:
        """Seconds to wait before reconnecting, or None: raise the error."""
        if not self._reconnect or not reconnects_after(error) or (
                self._failures >= RECONNECT_ATTEMPTS_MAX):
            return None
        wait = self._policy.backoff(min(self._failures, 32))
        self._failures += 1
        return wait
