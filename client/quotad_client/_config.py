"""Settings shared by the sync and asyncio clients: auth metadata, deadline, retry policy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._retry import RetryPolicy


DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    # gRPC's own reconnect backoff starts at 1 s and grows to 120 s: a server that restarts
    # would stay unreachable for the client's retries long after it is back. Reconnect sooner.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def merged_channel_options(given: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The caller's channel options, plus the client's defaults for those it did not set."""
    names = {name for name, _ in given}
    return [*given, *(o for o in DEFAULT_CHANNEL_OPTIONS if o[0] not in names)]


@dataclass(frozen=True, slots=True)
class ClientConfig:
    metadata: tuple[tuple[str, str], ...]
    timeout_s: float
    policy: RetryPolicy
    auto_idempotency_keys: bool

    @classmethod
    def make(cls, *, api_key: str | None, timeout_s: float, retries: int,
             retry_policy: RetryPolicy | None, auto_idempotency_keys: bool,
             metadata: Sequence[tuple[str, str]]) -> ClientConfig:
        """``retry_policy``, when given, wins over ``retries``."""
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        pairs = [(key.lower(), value) for key, value in metadata]
        if api_key:
            pairs = [p for p in pairs if p[0] != "authorization"]
            pairs.insert(0, ("authorization", f"Bearer {api_key}"))
        return cls(metadata=tuple(pairs), timeout_s=float(timeout_s),
                   policy=retry_policy if retry_policy is not None else RetryPolicy(retries),
                   auto_idempotency_keys=auto_idempotency_keys)

    def budget(self, timeout_s: float | None) -> float:
        """The time budget of one call (all its attempts), in seconds."""
        if timeout_s is None:
            return self.timeout_s
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        return float(timeout_s)
