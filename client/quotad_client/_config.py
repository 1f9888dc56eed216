"""Settings shared by the sync and asyncio clients: auth metadata, deadline, retry policy."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from quotad_contract.tokens import USER_TOKEN_HEADER

from ._retry import RetryPolicy


API_KEY_ENV = "QUOTAD_API_KEY"


def api_key_or_env(api_key: str | None) -> str | None:
    """The key given, else QUOTAD_API_KEY, else none (a server in open mode needs none)."""
    return api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None


def channel_credentials(credentials: grpc.ChannelCredentials | None,
                        tls_root_cert: bytes | None,
                        tls: bool) -> grpc.ChannelCredentials | None:
    """The channel's credentials: given ones, TLS trusting ``tls_root_cert`` (PEM bytes),
    TLS with the system's roots (``tls=True``), or None for a plaintext channel."""
    if credentials is not None and (tls_root_cert is not None or tls):
        raise ValueError("give credentials, or tls_root_cert / tls, not both")
    if credentials is not None:
        return credentials
    if tls_root_cert is not None or tls:
        return grpc.ssl_channel_credentials(root_certificates=tls_root_cert)
    return None


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
             metadata: Sequence[tuple[str, str]],
             user_token: str | None = None) -> ClientConfig:
        """``retry_policy``, when given, wins over ``retries``. The API key travels as
        ``authorization: Bearer <key>``, a user token as ``x-quotad-user-token``."""
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        pairs = [(key.lower(), value) for key, value in metadata]
        if api_key:
            pairs = [p for p in pairs if p[0] != "authorization"]
            pairs.insert(0, ("authorization", f"Bearer {api_key}"))
        if user_token:
            pairs = [p for p in pairs if p[0] != USER_TOKEN_HEADER]
            pairs.append((USER_TOKEN_HEADER, user_token))
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
