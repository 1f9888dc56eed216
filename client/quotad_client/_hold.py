"""What ``reserve`` returns: a Reservation that can also settle itself.

    with client.reserve("u1", "openai.chat", 2000, metadata={"model": "gpt-4o"}) as hold:
        reply = call_llm(...)
        hold.actual = reply.usage.total_tokens

On a normal exit the hold commits ``actual`` (default: the reserved amount); on an exception it
releases the hold and the exception propagates. Entering a denied hold (``raise_on_deny=False``)
raises QuotaExceeded, so the guarded work never runs without quota. A hold committed or released
by hand inside the block is left alone on exit.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Protocol

from ._errors import QuotadError, QuotaExceeded
from ._types import CommitResult, ReleaseResult, Reservation

OPEN = "open"
COMMITTED = "committed"
RELEASED = "released"


class _SyncSettler(Protocol):
    def commit(self, reservation_id: str, amount: int | None = None, *,
               idempotency_key: str | None = None,
               timeout_s: float | None = None) -> CommitResult: ...

    def release(self, reservation_id: str, *, idempotency_key: str | None = None,
                timeout_s: float | None = None) -> ReleaseResult: ...

    def extend(self, reservation_id: str, ttl_s: float | timedelta, *,
               idempotency_key: str | None = None, timeout_s: float | None = None) -> datetime: ...


class _AsyncSettler(Protocol):
    async def commit(self, reservation_id: str, amount: int | None = None, *,
                     idempotency_key: str | None = None,
                     timeout_s: float | None = None) -> CommitResult: ...

    async def release(self, reservation_id: str, *, idempotency_key: str | None = None,
                      timeout_s: float | None = None) -> ReleaseResult: ...

    async def extend(self, reservation_id: str, ttl_s: float | timedelta, *,
                     idempotency_key: str | None = None,
                     timeout_s: float | None = None) -> datetime: ...


class _HoldBase(Reservation):
    """Reservation fields (read-only) plus the settable ``actual`` and the settle state."""

    actual: int | None
    state: str
    """"open", "committed" or "released" (as far as this object knows)."""
    commit_result: CommitResult | None
    """The answer of the commit this hold made, once it made one."""
    _user_id: str
    _event_type: str

    def __init__(self, reservation: Reservation, *, user_id: str, event_type: str) -> None:
        super().__init__(**{f.name: getattr(reservation, f.name)
                            for f in dataclasses.fields(Reservation)})
        object.__setattr__(self, "actual", None)
        object.__setattr__(self, "state", OPEN)
        object.__setattr__(self, "commit_result", None)
        object.__setattr__(self, "_user_id", user_id)
        object.__setattr__(self, "_event_type", event_type)

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "actual":
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
        self.set_actual(value)

    def set_actual(self, amount: int | None) -> None:
        """What the work really used, committed on exit (None: the reserved amount)."""
        if amount is not None and (isinstance(amount, bool) or not isinstance(amount, int)):
            raise TypeError(f"actual must be an int or None, got {amount!r}")
        object.__setattr__(self, "actual", amount)

    def _enter_check(self) -> None:
        if not self.allowed:
            raise QuotaExceeded(user_id=self._user_id, event_type=self._event_type,
                                amount=self.amount, result=self)
        if self.state != OPEN:
            raise RuntimeError(f"this hold is already {self.state}")

    def _set_state(self, state: str, result: CommitResult | None = None) -> None:
        object.__setattr__(self, "state", state)
        if result is not None:
            object.__setattr__(self, "commit_result", result)

    @property
    def reservation(self) -> Reservation:
        """The plain Reservation data, without the client binding."""
        return Reservation(**{f.name: getattr(self, f.name)
                              for f in dataclasses.fields(Reservation)})


def _note_release_failure(error: BaseException, release_error: QuotadError) -> None:
    error.add_note(f"quotad: releasing the hold failed too ({release_error}); "
                   "it expires at its TTL")


class Hold(_HoldBase):
    """A Reservation of the sync client; a context manager (see the module doc)."""

    _client: _SyncSettler

    def __init__(self, client: _SyncSettler, reservation: Reservation, *, user_id: str,
                 event_type: str) -> None:
        super().__init__(reservation, user_id=user_id, event_type=event_type)
        object.__setattr__(self, "_client", client)

    def commit(self, amount: int | None = None, *, idempotency_key: str | None = None,
               timeout_s: float | None = None) -> CommitResult:
        """Commits ``amount`` (default: ``actual``, else the reserved amount)."""
        result = self._client.commit(self.reservation_id, self.actual if amount is None else amount,
                                     idempotency_key=idempotency_key, timeout_s=timeout_s)
        self._set_state(COMMITTED, result)
        return result

    def release(self, *, timeout_s: float | None = None) -> ReleaseResult:
        result = self._client.release(self.reservation_id, timeout_s=timeout_s)
        self._set_state(RELEASED)
        return result

    def extend(self, ttl_s: float | timedelta, *, timeout_s: float | None = None) -> datetime:
        return self._client.extend(self.reservation_id, ttl_s, timeout_s=timeout_s)

    def __enter__(self) -> Hold:
        self._enter_check()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.state != OPEN:
            return
        if exc is None:
            self.commit()
            return
        try:
            self.release()
        except QuotadError as release_error:
            _note_release_failure(exc, release_error)


class AsyncHold(_HoldBase):
    """A Reservation of the asyncio client; an async context manager (see the module doc)."""

    _client: _AsyncSettler

    def __init__(self, client: _AsyncSettler, reservation: Reservation, *, user_id: str,
                 event_type: str) -> None:
        super().__init__(reservation, user_id=user_id, event_type=event_type)
        object.__setattr__(self, "_client", client)

    async def commit(self, amount: int | None = None, *, idempotency_key: str | None = None,
                     timeout_s: float | None = None) -> CommitResult:
        """Commits ``amount`` (default: ``actual``, else the reserved amount)."""
        result = await self._client.commit(
            self.reservation_id, self.actual if amount is None else amount,
            idempotency_key=idempotency_key, timeout_s=timeout_s)
        self._set_state(COMMITTED, result)
        return result

    async def release(self, *, timeout_s: float | None = None) -> ReleaseResult:
        result = await self._client.release(self.reservation_id, timeout_s=timeout_s)
        self._set_state(RELEASED)
        return result

    async def extend(self, ttl_s: float | timedelta, *,
                     timeout_s: float | None = None) -> datetime:
        return await self._client.extend(self.reservation_id, ttl_s, timeout_s=timeout_s)

    async def __aenter__(self) -> AsyncHold:
        self._enter_check()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self.state != OPEN:
            return
        if exc is None:
            await self.commit()
            return
        try:
            await self.release()
        except QuotadError as release_error:
            _note_release_failure(exc, release_error)
