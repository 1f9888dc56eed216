"""The blocking client, over a ``grpc.Channel``."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar

import grpc

from quotad_contract.shards import EtcdTarget
from quotad_contract.v1 import quotad_pb2

from . import _convert as cv
from . import _ops as ops
from ._config import (
    ClientConfig,
    api_key_or_env,
    channel_credentials,
    merged_channel_options,
)
from ._convert import PlanLike
from ._errors import (DeadlineExceeded, error_from_rpc_error, shed_delay_s,
                      slots_moving_delay_s,
                      with_tls_hint)
from ._cluster import (WRONG_SHARD, Routes, export_cursor, export_cursors, map_sources,
                       merged_subscription_page)
from ._throttle import AdaptiveThrottle, throttle_at, throttled
from ._etcd import read_shard_map, shard_addresses
from ._hold import Hold
from ._retry import SLOTS_MOVING_RETRIES_MAX, RetryPolicy
from ._watch import Resume
from ._types import (
    Grant,
    GrantResult,
    ApiKey,
    CommitResult,
    CreatedKey,
    UserToken,
    Event,
    EventPage,
    Plan,
    ReleaseResult,
    Subscription,
    SubscriptionPage,
    TrackResult,
    UpsertPlanResult,
    UpsertSubscriptionResult,
    Usage,
    UsageExportPage,
    WatchUpdate,
)

T = TypeVar("T")


class QuotaClient:
    """A blocking quotad client. Use as a context manager, or call ``close()``.

    ``timeout_s`` is the default time budget of each call, retries included; every method takes
    ``timeout_s=`` to override it. UNAVAILABLE is retried up to ``retries`` times with
    exponential backoff and jitter, for reads and for mutations that carry an idempotency key;
    with ``auto_idempotency_keys`` (the default) the client gives each mutation that has none a
    fresh key, sent unchanged on every retry. A call the server shed under overload
    (RESOURCE_EXHAUSTED ``OVERLOADED``: it did nothing) is retried too, any call, waiting the
    server's RetryInfo delay plus the backoff. With ``adaptive_throttle`` (the default), while
    the server takes less than half of what this client sends (over the last 10 s), the client
    refuses some attempts itself, before sending, and waits as if they were shed; a call whose
    attempts it keeps refusing raises RESOURCE_EXHAUSTED ``CLIENT_THROTTLED``
    (quotad_client._throttle).

    ``api_key`` (default: the QUOTAD_API_KEY environment variable, else none) and
    ``user_token`` (with a pk_ key) go with every call. ``tls_root_cert`` (PEM bytes) or
    ``tls=True`` (the system's roots) make the channel TLS.

    ``cluster="HOST:PORT"`` (any shard of a cluster, instead of ``target``) routes each call
    to the shard that owns its user or hold, from the map GetShardMap answers, with one
    channel per shard; a WRONG_SHARD refusal fetches the map again (from the refusing shard
    first) and sends the call once more. Calls that name no user (plans, lists, exports,
    keys) go to the shard given.
    ``cluster="etcd://HOST:PORT/NAME"`` reads the map from the cluster's etcd instead (over
    etcd's JSON gateway, within ``timeout_s``, when the client is made and again after a
    WRONG_SHARD), and the first shard of that map stands for the shard given.
    """

    def __init__(self, target: str = "127.0.0.1:50051", *, api_key: str | None = None,
                 timeout_s: float = 2.0, retries: int = 3,
                 retry_policy: RetryPolicy | None = None, auto_idempotency_keys: bool = True,
                 credentials: grpc.ChannelCredentials | None = None,
                 channel_options: Sequence[tuple[str, Any]] = (),
                 metadata: Sequence[tuple[str, str]] = (), user_token: str | None = None,
                 tls_root_cert: bytes | None = None, tls: bool = False,
                 cluster: str | None = None, adaptive_throttle: bool = True) -> None:
        etcd = (EtcdTarget.parse(cluster) if cluster is not None and EtcdTarget.is_etcd(cluster)
                else None)
        if cluster is not None:
            target = cluster
        self._config = ClientConfig.make(
            api_key=api_key_or_env(api_key), user_token=user_token, timeout_s=timeout_s,
            retries=retries, retry_policy=retry_policy,
            auto_idempotency_keys=auto_idempotency_keys, metadata=metadata)
        if etcd is not None:  # the map's first shard stands for the cluster
            target = read_shard_map(etcd, self._config.budget(None)).shards[0].address
        self._etcd = etcd
        self.throttle = AdaptiveThrottle() if adaptive_throttle else None
        """Refuses some calls before sending them while quotad refuses most for overload
        (see quotad_client._throttle); None: off. With cluster=, the target shard's: each
        other shard has its own."""
        self._shard_throttles: dict[str, AdaptiveThrottle] = {}
        credentials = channel_credentials(credentials, tls_root_cert, tls)
        self._plaintext = credentials is None
        self._credentials = credentials
        self._channel_options = merged_channel_options(channel_options)
        self._channel = self._open_channel(target)
        self._stubs = ops.make_stubs(self._channel)
        self._target = target
        self._clustered = cluster is not None
        self._routes: Routes | None = None
        self._target_in_map = ""
        """The map's address of the shard at target (once the target answered the map)."""
        self._shard_stubs: dict[str, tuple[grpc.Channel, dict[str, Any]]] = {}

    def _open_channel(self, target: str) -> grpc.Channel:
        if self._credentials is not None:
            return grpc.secure_channel(target, self._credentials, options=self._channel_options)
        return grpc.insecure_channel(target, options=self._channel_options)

    # --- routing (cluster=) ------------------------------------------------------------------

    def _stubs_at(self, address: str | None) -> dict[str, Any]:
        if address is None or address in (self._target, self._target_in_map):
            return self._stubs
        if address not in self._shard_stubs:
            channel = self._open_channel(address)
            self._shard_stubs[address] = (channel, ops.make_stubs(channel))
        return self._shard_stubs[address][1]

    def _address_for(self, request: Any) -> str | None:
        """The address of the shard that owns the request's user or hold (cluster=); None:
        the target."""
        if not self._clustered:
            return None
        if self._routes is None:
            self._refresh_routes()
        assert self._routes is not None
        return self._routes.address_for(request)

    def _throttle_at(self, address: str | None) -> AdaptiveThrottle | None:
        return throttle_at(self.throttle, self._shard_throttles, address,
                           (self._target, self._target_in_map))

    def _refresh_routes(self, refused_by: str | None = None) -> None:
        """The map again, from the first shard of `map_sources` that answers."""
        known = self._routes.addresses if self._routes is not None else ()
        if self._etcd is not None:
            known = (*self._etcd_addresses(), *known)
        failure: grpc.RpcError | None = None
        for address in map_sources(refused_by, self._target, known):
            try:
                response = self._stubs_at(address)[ops.QUOTA].GetShardMap(
                    quotad_pb2.GetShardMapRequest(), timeout=self._config.budget(None),
                    metadata=self._config.metadata)
            except grpc.RpcError as rpc_error:
                failure = rpc_error
                continue
            self._routes = Routes.from_proto(response)
            if address == self._target:
                self._target_in_map = self._routes.answered_by
            return
        assert failure is not None
        raise with_tls_hint(error_from_rpc_error(failure), self._plaintext) from failure

    def _etcd_addresses(self) -> tuple[str, ...]:
        """The shards etcd's map names now (none when etcd cannot say: the shards known
        still answer the map)."""
        assert self._etcd is not None
        return shard_addresses(self._etcd, self._config.budget(None))

    # --- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()
        for channel, _ in self._shard_stubs.values():
            channel.close()

    def __enter__(self) -> QuotaClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- the call loop -----------------------------------------------------------------------

    def _run(self, op: ops.Op[T], timeout_s: float | None, *, address: str | None = None,
             deadline: float | None = None) -> T:
        """The op, retried as its policy says until the deadline (time.monotonic(); None:
        timeout_s from now); to the shard at ``address`` when given, else routed."""
        config = self._config
        if deadline is None:
            deadline = time.monotonic() + config.budget(timeout_s)
        retry = 0
        rerouted = False
        moving_retries = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED,
                                       f"{op.method}: no time left for another attempt")
            route = address if address is not None else self._address_for(op.request)
            method = getattr(self._stubs_at(route)[op.service], op.method)
            throttle = self._throttle_at(route)
            if throttle is not None and throttle.refuse():  # not sent: retried as if shed
                wait = config.policy.next_wait(retry=retry, code=grpc.StatusCode.RESOURCE_EXHAUSTED,
                                               retryable=True, deadline=deadline,
                                               shed_delay_s=0.0)
                if wait is None:
                    raise throttled()
                time.sleep(wait)
                retry += 1
                continue
            try:
                response = method(op.request, timeout=remaining, metadata=config.metadata)
            except grpc.RpcError as rpc_error:
                error = error_from_rpc_error(rpc_error)
                if throttle is not None:
                    throttle.failed(error)
                if self._clustered and getattr(error, "reason", "") == WRONG_SHARD and not rerouted:
                    rerouted = True  # the map moved: fetch it again, send the call once more
                    self._refresh_routes(refused_by=route)
                    continue
                moving_s = slots_moving_delay_s(error)
                if moving_s is not None and moving_retries < SLOTS_MOVING_RETRIES_MAX and (
                        time.monotonic() + moving_s < deadline):
                    moving_retries += 1  # nothing was done: the same call, a moment later
                    time.sleep(moving_s)
                    continue
                if moving_s is not None:  # its resends used up: not retried as UNAVAILABLE
                    raise error from rpc_error
                wait = config.policy.next_wait(retry=retry, code=error.code,
                                               retryable=op.retryable, deadline=deadline,
                                               shed_delay_s=shed_delay_s(error))
                if wait is None:
                    raise with_tls_hint(error, self._plaintext) from rpc_error
                time.sleep(wait)
                retry += 1
                continue
            if throttle is not None:
                throttle.accepted()
            return op.convert(response)

    # --- QuotaService ------------------------------------------------------------------------

    def reserve(self, user_id: str, event_type: str, amount: int, *,
                metadata: Mapping[str, str] | None = None,
                ttl_s: float | timedelta | None = None, idempotency_key: str | None = None,
                raise_on_deny: bool = True, timeout_s: float | None = None) -> Hold:
        """Holds ``amount`` on every limit group the event matches, or on none.

        Denied: raises QuotaExceeded, or with ``raise_on_deny=False`` returns a hold with
        ``allowed=False``. The result is a Reservation and a context manager.
        """
        op = ops.reserve(user_id, event_type, amount, metadata, ttl_s, idempotency_key,
                         self._config.auto_idempotency_keys)
        reservation = ops.check_denial(self._run(op, timeout_s), user_id=user_id,
                                       event_type=event_type, amount=amount,
                                       raise_on_deny=raise_on_deny)
        return Hold(self, reservation, user_id=user_id, event_type=event_type)

    def commit(self, reservation_id: str, amount: int | None = None, *,
               idempotency_key: str | None = None,
               timeout_s: float | None = None) -> CommitResult:
        """Records what the hold really used (None: the reserved amount) and returns the rest."""
        return self._run(ops.commit(reservation_id, amount, idempotency_key,
                                    self._config.auto_idempotency_keys), timeout_s)

    def release(self, reservation_id: str, *, idempotency_key: str | None = None,
                timeout_s: float | None = None) -> ReleaseResult:
        """Returns the whole hold (a no-op for a released or expired one)."""
        return self._run(ops.release(reservation_id, idempotency_key,
                                     self._config.auto_idempotency_keys), timeout_s)

    def extend(self, reservation_id: str, ttl_s: float | timedelta, *,
               idempotency_key: str | None = None, timeout_s: float | None = None) -> datetime:
        """Moves a live hold's expiry to now + ttl; returns the new expiry."""
        return self._run(ops.extend(reservation_id, ttl_s, idempotency_key,
                                    self._config.auto_idempotency_keys), timeout_s)

    def track(self, user_id: str, event_type: str, amount: int, *,
              metadata: Mapping[str, str] | None = None, enforce: bool = False,
              idempotency_key: str | None = None, raise_on_deny: bool = True,
              timeout_s: float | None = None) -> TrackResult:
        """Records usage directly (negative: a refund); ``enforce`` checks and records at once."""
        op = ops.track(user_id, event_type, amount, metadata, enforce, idempotency_key,
                       self._config.auto_idempotency_keys)
        return ops.check_denial(self._run(op, timeout_s), user_id=user_id,
                                event_type=event_type, amount=amount,
                                raise_on_deny=raise_on_deny)

    def grant_credits(self, user_id: str, group_key: str, amount: int, *,
                      expires_at: datetime | None = None, priority: int = 0,
                      idempotency_key: str | None = None,
                      timeout_s: float | None = None) -> GrantResult:
        """Grants ``amount`` credits to the user's balance group ``group_key`` (a top-up is
        one more grant): spent by ``priority`` (lowest first), then earliest expiry, then
        oldest; ``expires_at`` ``None``: never expires. With a key, a repeat gets the first
        answer and grants nothing more."""
        return self._run(ops.grant_credits(user_id, group_key, amount, expires_at, priority,
                                         idempotency_key, self._config.auto_idempotency_keys),
                         timeout_s)

    def list_grants(self, user_id: str, *, group_key: str = "",
                    timeout_s: float | None = None) -> tuple[Grant, ...]:
        """The user's credit grants (of one balance group, or all): live ones in spend
        order, then expired ones kept for refunds."""
        return self._run(ops.list_grants(user_id, group_key), timeout_s)

    def usage(self, user_id: str, *, timeout_s: float | None = None) -> Usage:
        return self._run(ops.usage(user_id), timeout_s)

    def watch_usage(self, user_id: str, *, after_sequence: int = 0,
                    reconnect: bool = True) -> Iterator[WatchUpdate]:
        """A generator of the user's counters: now ("initial"), then after every change and
        window reset, in log order; the same as ``AsyncQuotaClient.watch_usage``, blocking.
        Close the generator (or leave the loop) to end the watch."""
        resume = Resume(user_id, after_sequence, self._config.policy, reconnect=reconnect)
        rerouted = False
        while True:
            route = self._address_for(quotad_pb2.WatchUsageRequest(user_id=user_id))
            stub = self._stubs_at(route)[ops.QUOTA]
            call = stub.WatchUsage(resume.request(), metadata=self._config.metadata)
            try:
                for message in call:
                    update = cv.watch_update_from_proto(message)
                    resume.saw(update)
                    yield update
                return
            except grpc.RpcError as rpc_error:
                error = error_from_rpc_error(rpc_error)
                if self._clustered and getattr(error, "reason", "") == WRONG_SHARD and not rerouted:
                    rerouted = True  # the map moved: fetch it again, open the watch there
                    self._refresh_routes(refused_by=route)
                    continue
                wait = resume.next_wait(error)
                if wait is None:
                    raise with_tls_hint(error, self._plaintext) from rpc_error
            finally:
                call.cancel()
            time.sleep(wait)

    # --- AdminService ------------------------------------------------------------------------

    def upsert_plan(self, plan: PlanLike, *, timeout_s: float | None = None) -> UpsertPlanResult:
        return self._run(ops.upsert_plan(plan), timeout_s)

    def get_plan(self, plan_id: str, *, timeout_s: float | None = None) -> Plan:
        return self._run(ops.get_plan(plan_id), timeout_s)

    def list_plans(self, *, timeout_s: float | None = None) -> list[Plan]:
        return self._run(ops.list_plans(), timeout_s)

    def delete_plan(self, plan_id: str, *, timeout_s: float | None = None) -> None:
        self._run(ops.delete_plan(plan_id), timeout_s)

    def subscribe(self, user_id: str, plan_id: str, time_zone: str = "UTC", *,
                  billing_customer_id: str | None = None,
                  timeout_s: float | None = None) -> UpsertSubscriptionResult:
        """billing_customer_id None keeps the subscription's own; "" clears it."""
        return self._run(ops.subscribe(user_id, plan_id, time_zone, billing_customer_id),
                         timeout_s)

    def list_subscriptions(self, *, plan_id: str = "", page_size: int = 0,
                           page_token: str = "",
                           timeout_s: float | None = None) -> SubscriptionPage:
        """One page of the app's subscriptions (or one plan's), in user id order. With
        cluster=, every shard's, merged."""
        op = ops.list_subscriptions(plan_id, page_size, page_token)
        if not self._clustered:
            return self._run(op, timeout_s)
        if self._routes is None:
            self._refresh_routes()
        assert self._routes is not None
        deadline = time.monotonic() + self._config.budget(timeout_s)
        return merged_subscription_page(
            [self._run(op, timeout_s, address=address, deadline=deadline)
             for address in self._routes.addresses], page_size)

    def export_usage(self, *, cursor: str = "", end: datetime | None = None, app: str = "",
                     timeout_s: float | None = None) -> Iterator[UsageExportPage]:
        """The committed and tracked amounts after ``cursor`` (empty: from the oldest record
        the log keeps) and before ``end``, page by page; each page's ``next_cursor`` resumes
        right after it. Not retried: resume from the last page's cursor instead. With
        cluster=, every shard's, one shard after another (in shard id order); the cursor is
        then the cluster's (``shards:...``), holding each shard's own, and ``timeout_s``
        bounds each shard's part."""
        if not self._clustered:
            yield from self._export_usage_at(None, cursor, end, app, timeout_s)
            return
        cursors = export_cursors(cursor)
        if self._routes is None:
            self._refresh_routes()
        assert self._routes is not None
        for shard in self._routes.shard_map.shards:
            for page in self._export_usage_at(shard.address, cursors.get(shard.shard_id, ""),
                                              end, app, timeout_s):
                cursors[shard.shard_id] = page.next_cursor
                yield UsageExportPage(page.lines, export_cursor(cursors))

    def _export_usage_at(self, address: str | None, cursor: str, end: datetime | None,
                         app: str, timeout_s: float | None) -> Iterator[UsageExportPage]:
        call = self._stubs_at(address)[ops.ADMIN].ExportUsage(
            ops.export_usage_request(cursor, end, app), metadata=self._config.metadata,
            timeout=timeout_s)
        try:
            for message in call:
                yield cv.usage_export_page_from_proto(message)
        except grpc.RpcError as rpc_error:
            raise with_tls_hint(error_from_rpc_error(rpc_error), self._plaintext) from rpc_error
        finally:
            call.cancel()

    def get_subscription(self, user_id: str, *, timeout_s: float | None = None) -> Subscription:
        return self._run(ops.get_subscription(user_id), timeout_s)

    def list_events(self, user_id: str, *, start: datetime | None = None,
                    end: datetime | None = None, page_size: int = 0, page_token: str = "",
                    timeout_s: float | None = None) -> EventPage:
        """One page of the user's audit trail in [start, end)."""
        return self._run(ops.list_events(user_id, start, end, page_size, page_token), timeout_s)

    def iter_events(self, user_id: str, *, start: datetime | None = None,
                    end: datetime | None = None, page_size: int = 0,
                    timeout_s: float | None = None) -> Iterator[Event]:
        """Every event of the user in [start, end), fetching page after page."""
        token = ""
        while True:
            page = self.list_events(user_id, start=start, end=end, page_size=page_size,
                                    page_token=token, timeout_s=timeout_s)
            yield from page.events
            if not page.next_page_token:
                return
            token = page.next_page_token

    # --- API keys (the admin key, or an sk_ key for its own app) -----------------------------

    def create_key(self, kind: str = "secret", *, name: str = "", app: str = "",
                   timeout_s: float | None = None) -> CreatedKey:
        """A new key, "secret" (sk_) or "public" (pk_); ``app`` empty: the caller's own app
        (the admin key must name one). The whole key is in ``.secret``, shown only this once."""
        return self._run(ops.create_key(kind, name, app), timeout_s)

    def revoke_key(self, key_id: str, *, timeout_s: float | None = None) -> ApiKey:
        """Revokes a key at once (its user tokens too, for an sk_ key)."""
        return self._run(ops.revoke_key(key_id), timeout_s)

    def list_keys(self, *, app: str = "", timeout_s: float | None = None) -> list[ApiKey]:
        return self._run(ops.list_keys(app), timeout_s)

    def mint_user_token(self, user_id: str, *, ttl_s: float | timedelta | None = None,
                        timeout_s: float | None = None) -> UserToken:
        """A token for a pk_ key to read this user's usage (1 s to 24 h; default 1 h). The
        module function ``quotad_client.mint_user_token`` makes one without a call."""
        return self._run(ops.mint_user_token(user_id, ttl_s), timeout_s)
