"""The browser endpoint: `GET /v1/usage?user_id=U`, read-only JSON over HTTP/1.1.

It runs on the gRPC server's event loop (h11 parses, asyncio streams carry the bytes) and
reads through the same writer as GetUsage, so an answer never shows state that is not yet
durable. Every connection is bounded: head size, body size, connections, an idle timeout
between requests, a read timeout per request and a write timeout per answer, so a slow or
hostile client costs a socket and a little memory, never the gRPC side's time.

Authorization is one injected callable, `authorize(authorization_header, user_token_header,
user_id) -> app`, raising Unauthenticated (401) or PermissionDenied (403): the server passes
service.http_usage_authorizer, GetUsage's own rule.

Connections: no one takes more than a share of them. Before its first request a connection
is known only by its peer's address: at most limits.HTTP_CONNECTIONS_PER_PEER_MAX each. Once a
request on it is authorized, it belongs to that request's key and app: at most
HTTP_CONNECTIONS_PER_KEY_MAX and HTTP_CONNECTIONS_PER_APP_MAX each (the request that would
pass one is answered 429 TOO_MANY_CONNECTIONS naming it, and the connection closed). And at
most HTTP_CONNECTIONS_MAX in all: one more is answered 503 and closed.

Host: a web page on the machine can point a name it controls at 127.0.0.1 (DNS rebinding)
and read the endpoint as if it were its own origin, CORS notwithstanding. So in the open mode
(no API keys) a request is answered only when its Host is a loopback name or address
(`localhost`, 127.0.0.0/8, `[::1]`, with any port); with keys, only when it is in
`--http-allowed-host`, if that list is given. Any other Host: 421, nothing read.

Framing: a request with both Content-Length and Transfer-Encoding (a request smuggling
attempt through a proxy that reads the other one) is refused with 400 and the connection
closed (RFC 9112 section 6.3), as is a head over limits.HTTP_REQUEST_HEAD_BYTES_MAX, however
its bytes arrive (431).

At --log-level debug every answer writes one access line: method, path (never the query),
status, peer address, app and key id, duration.

CORS: an Origin in the allow-list gets `Access-Control-Allow-Origin: <that origin>`; any
other origin gets no CORS header (the browser then withholds the answer from the page) and
its preflight is refused with 403. Never `*`.
"""

from __future__ import annotations

import asyncio
import collections
import http
import ipaddress
import json
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import h11

from quotad.core import limits
from quotad.core.commands import CounterView, GetUsage, UsageResult, check_user_id
from quotad.core.errors import (
    FieldViolation, InvalidArgument, Refusal, ResourceExhausted, Violations,
)
from quotad.api.metrics import Metrics
from quotad.api.auth import USER_TOKEN_HEADER, UsageGrant, presented_key_id
from quotad.api.gate import Gate
from quotad_contract.errors import ERRORS, ErrorReason

log = logging.getLogger("quotad.http")

USAGE_PATH = "/v1/usage"
ALLOWED_METHODS = "GET, HEAD, OPTIONS"
READ_CHUNK_BYTES = 4096
CLOSE_GRACE_S = 2.0
"""On close, requests already being answered get this long to finish."""
LOGGED_PATH_CHARS_MAX = 256
"""An access line shows at most this much of a request's path."""
LINGER_S = 1.0
LINGER_BYTES_MAX = 64 * 1024
"""Closing a connection waits at most LINGER_S for the peer to close its side, dropping at
most LINGER_BYTES_MAX of what it still sends."""

Authorize = Callable[[str | None, str | None, str], UsageGrant]
"""(Authorization header, X-Quotad-User-Token header, user_id) -> the grant to read with (its
app the one to read from)."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


class _Peer:
    """One open connection: its stream, whether a request on it is being answered, the
    address it comes from, and the (app, key id) of its last authorized request; and, for
    the access line, the request being answered: its head, its app once authorized, and when
    its first byte came."""

    __slots__ = ("stream", "busy", "address", "owner", "request", "app", "started_s")

    def __init__(self, stream: asyncio.StreamWriter, address: str) -> None:
        self.stream = stream
        self.busy = False
        self.address = address
        self.owner: tuple[str, str] | None = None
        self.request: h11.Request | None = None
        self.app = ""
        self.started_s = time.perf_counter()


def _access_line(address: str, status: int, request: h11.Request | None, app: str,
                 started_s: float) -> None:
    """The debug line of one answer: method, path (never the query, which may carry what a
    page should not have put there), status, peer, app and key id, duration."""
    method = path = key_id = ""
    if request is not None:
        method = request.method.decode("ascii", "replace")
        path = request.target.decode("ascii", "replace").partition("?")[0]
        path = path[:LOGGED_PATH_CHARS_MAX]
        authorization = [value for name, value in request.headers if name == b"authorization"]
        if len(authorization) == 1:
            key_id = presented_key_id(authorization[0].decode("latin-1"))
    log.debug("http", extra={"method": method, "path": path, "status": status,
                             "peer": address, "app": app, "key_id": key_id,
                             "duration_ms": round((time.perf_counter() - started_s) * 1e3, 3)})


def peer_address(stream: asyncio.StreamWriter) -> str:
    """The IP address a connection comes from ("" if the transport has none)."""
    peername = stream.get_extra_info("peername")
    return str(peername[0]) if isinstance(peername, tuple) and peername else ""


class _BodyTooLarge(Exception):
    pass


class _Idle(Exception):
    """No request began within the keep-alive idle timeout."""


class _HeadTooLarge(Exception):
    pass


class _AmbiguousFraming(Exception):
    """Both Content-Length and Transfer-Encoding: which one ends the body is a guess."""


_HOST_NAME = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
_HOST_PATTERN = re.compile(rf"({_HOST_NAME}|\[[0-9a-f:.]+\])(?::([0-9]{{1,5}}))?")
"""A Host: a DNS name or IPv4 address, or an IPv6 address in brackets; then maybe a port."""


def split_host(value: str) -> tuple[str, int | None] | None:
    """(host, port) of a Host header value or an allowed host, lowercased; None if it is not
    one."""
    match = _HOST_PATTERN.fullmatch(value.strip().lower())
    if match is None:
        return None
    host, port = match.groups()
    return host, None if port is None else int(port)


def is_loopback_host(host: str) -> bool:
    """localhost, 127.0.0.0/8 or [::1]: what a Host may name in the open mode."""
    if host == "localhost":
        return True
    literal = host[1:-1] if host.startswith("[") else host
    if host.startswith("[") != (":" in literal):  # an IPv6 address, and only one, in brackets
        return False
    try:
        return ipaddress.ip_address(literal).is_loopback
    except ValueError:
        return False


def host_allowed(value: str | None, allowed_hosts: tuple[str, ...], *,
                 loopback_only: bool) -> bool:
    """May a request with this Host header (None: none) be answered? Loopback only: a
    loopback name or address. Else, with allowed hosts, one of them (an allowed host without
    a port allows every port); else any."""
    if not loopback_only and not allowed_hosts:
        return True
    parts = None if value is None else split_host(value)
    if parts is None:
        return False
    host, port = parts
    if loopback_only:
        return is_loopback_host(host)
    for allowed in allowed_hosts:
        allowed_parts = split_host(allowed)
        assert allowed_parts is not None, allowed  # the config checked each
        if allowed_parts[0] == host and allowed_parts[1] in (None, port):
            return True
    return False


def rfc3339(at_ns: int) -> str:
    seconds, nanos = divmod(at_ns, limits.NS_PER_S)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return text + (f".{nanos:09d}".rstrip("0") if nanos else "") + "Z"


def counter_json(view: CounterView) -> dict[str, Any]:
    return {
        "key": view.key, "label": view.label, "unit": view.unit, "quota": view.quota,
        "used": view.used, "held": view.held, "remaining": view.remaining,
        "overage": view.overage, "window": getattr(view.window, "name", "unspecified").lower(),
        "window_start": rfc3339(view.window_start_ns),
        "resets_at": None if view.resets_at_ns is None else rfc3339(view.resets_at_ns),
        "kind": view.kind.name.lower(),
        "full_at": None if view.full_at_ns is None else rfc3339(view.full_at_ns),
    }


def usage_json(result: UsageResult) -> dict[str, Any]:
    return {"user_id": result.user_id, "plan_id": result.plan_id,
            "counters": [counter_json(view) for view in result.counters]}


def json_answer(status: int, document: Any, headers: tuple[tuple[str, str], ...] = ()) -> Answer:
    body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    return Answer(status, body, (("content-type", "application/json"), *headers))


def error_answer(status: int, code: str, message: str, *, reason: str | None = None,
                 violations: tuple[FieldViolation, ...] = (),
                 metadata: Any = None,
                 headers: tuple[tuple[str, str], ...] = ()) -> Answer:
    error: dict[str, Any] = {"code": code, "message": message}
    if reason is not None:
        error["reason"] = reason
    if metadata:
        error["metadata"] = dict(metadata)
    if violations:
        error["field_violations"] = [{"field": v.field, "description": v.description}
                                     for v in violations]
    return json_answer(status, {"error": error}, headers)


def _bad(field: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, description)])


def query_user_id(query: str) -> str:
    """The one valid user_id of a query string, or InvalidArgument. Other parameters are
    ignored (pages add cache busters)."""
    try:
        fields = parse_qs(query, keep_blank_values=True, errors="strict",
                          max_num_fields=limits.HTTP_QUERY_FIELDS_MAX)
    except ValueError as error:  # bad UTF-8 in an escape, or too many fields
        raise _bad("query", f"cannot be read: {error}") from error
    values = fields.get("user_id", [])
    if len(values) != 1:
        raise _bad("user_id", "must be given exactly once")
    v = Violations()
    check_user_id(v, values[0])
    v.raise_if_any()
    return values[0]


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """A header's value (None if absent); InvalidArgument if it is given twice."""
    values = [value for key, value in headers if key == name]
    if len(values) > 1:
        raise _bad(name.decode(), "must be given at most once")
    return values[0].decode("latin-1") if values else None


def _declared_body_bytes(headers: list[tuple[bytes, bytes]]) -> int:
    """The Content-Length a request declares (h11 has checked its form), else 0."""
    return max((int(value) for key, value in headers if key == b"content-length"), default=0)


def _raw_answer(answer: Answer) -> bytes:
    """An answer written without parsing anything, closing the connection."""
    head = [f"HTTP/1.1 {answer.status} {http.HTTPStatus(answer.status).phrase}",
            *(f"{name}: {value}" for name, value in answer.headers),
            "cache-control: no-store", "connection: close",
            f"content-length: {len(answer.body)}"]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + answer.body


_BUSY = _raw_answer(error_answer(
    503, "UNAVAILABLE", "too many HTTP connections",
    metadata={"limit": "HTTP_CONNECTIONS_MAX", "max": str(limits.HTTP_CONNECTIONS_MAX)},
    headers=(("retry-after", "1"),)))
"""The answer to a connection beyond HTTP_CONNECTIONS_MAX."""
_TOO_MANY_FROM_PEER = _raw_answer(error_answer(
    429, "RESOURCE_EXHAUSTED",
    "too many HTTP connections from this address (HTTP_CONNECTIONS_PER_PEER_MAX)",
    reason=ErrorReason.TOO_MANY_CONNECTIONS,
    metadata={"limit": "HTTP_CONNECTIONS_PER_PEER_MAX",
              "max": str(limits.HTTP_CONNECTIONS_PER_PEER_MAX)}))
"""The answer to a connection beyond HTTP_CONNECTIONS_PER_PEER_MAX from its address."""


class HttpApi:
    """The HTTP server: start(), stop_accepting() when draining, close() when stopping."""

    def __init__(self, gate: Gate, *, authorize: Authorize,
                 cors_origins: tuple[str, ...] = (),
                 read_timeout_s: float = limits.HTTP_REQUEST_READ_TIMEOUT_S,
                 metrics: Metrics | None = None, loopback_hosts_only: bool = True,
                 allowed_hosts: tuple[str, ...] = ()) -> None:
        """loopback_hosts_only: the open mode's rule for Host (see the module's doc);
        allowed_hosts: with keys, the Hosts answered (empty: any)."""
        assert not (loopback_hosts_only and allowed_hosts)
        self._gate = gate
        self._authorize = authorize
        self._loopback_hosts_only = loopback_hosts_only
        self._allowed_hosts = allowed_hosts
        self._cors_origins = frozenset(cors_origins)
        self._read_timeout_s = read_timeout_s
        self._metrics = metrics
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], _Peer] = {}
        self._refused: set[asyncio.Task[Any]] = set()
        """Connections beyond the limit, being told so (each for at most LINGER_S)."""
        self._per_peer: collections.Counter[str] = collections.Counter()
        self._per_key: collections.Counter[str] = collections.Counter()
        self._per_app: collections.Counter[str] = collections.Counter()
        """Open connections by address, and by the key and app of their last authorized
        request (keyless callers, the open mode, are not counted by key)."""
        self._closing = False

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listens (HTTPS with an ssl_context); returns the bound port. OSError if the
        address cannot be had."""
        self._server = await asyncio.start_server(
            self._connection, host.strip("[]"), port, limit=READ_CHUNK_BYTES, ssl=ssl_context,
            ssl_handshake_timeout=self._read_timeout_s if ssl_context is not None else None)
        return self._server.sockets[0].getsockname()[1]

    def stop_accepting(self) -> None:
        """No new connections; requests on open ones are still answered (503 once draining)."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Closes every connection: idle ones at once, busy ones after their answer (at most
        CLOSE_GRACE_S). Their transports are closed, never their tasks cancelled: a handler
        then ends by itself, seeing the end of its input."""
        self._closing = True
        self.stop_accepting()
        for peer in list(self._connections.values()):
            if not peer.busy:
                peer.stream.transport.close()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=CLOSE_GRACE_S)
        for peer in list(self._connections.values()):
            peer.stream.transport.abort()
        if self._connections or self._refused:
            await asyncio.wait([*self._connections, *self._refused], timeout=CLOSE_GRACE_S)
        if self._server is not None:
            await self._server.wait_closed()

    def _count(self, status: int) -> None:
        if self._metrics is not None:
            self._metrics.http_requests.labels(str(status)).inc()

    # --- one connection ------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader,
                          stream: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        address = peer_address(stream)
        if self._closing or len(self._connections) >= limits.HTTP_CONNECTIONS_MAX:
            await self._refuse(reader, stream, task, 503, _BUSY)
            return
        if self._per_peer[address] >= limits.HTTP_CONNECTIONS_PER_PEER_MAX:
            await self._refuse(reader, stream, task, 429, _TOO_MANY_FROM_PEER)
            return
        peer = self._connections[task] = _Peer(stream, address)
        self._per_peer[address] += 1
        connection = h11.Connection(h11.SERVER,
                                    max_incomplete_event_size=limits.HTTP_REQUEST_HEAD_BYTES_MAX)
        try:
            await self._converse(connection, reader, stream, peer)
        except (ConnectionError, TimeoutError, h11.LocalProtocolError):
            pass  # the peer went away or stopped reading; nothing left to tell it
        finally:
            try:
                await _close(reader, stream)
            finally:
                del self._connections[task]
                self._disown(peer)
                _decrement(self._per_peer, address)

    async def _refuse(self, reader: asyncio.StreamReader, stream: asyncio.StreamWriter,
                      task: asyncio.Task[Any], status: int, answer: bytes) -> None:
        """The answer to a connection past a cap; beyond HTTP_CONNECTIONS_MAX such answers
        at once, a plain reset."""
        self._count(status)
        if len(self._refused) >= limits.HTTP_CONNECTIONS_MAX:
            stream.transport.abort()
            return
        self._refused.add(task)
        try:
            stream.write(answer)
            if log.isEnabledFor(logging.DEBUG):
                _access_line(peer_address(stream), status, None, "", time.perf_counter())
            await _close(reader, stream)
        finally:
            self._refused.discard(task)

    def _own(self, peer: _Peer, grant: UsageGrant) -> None:
        """The connection now belongs to the grant's key and app, if their caps allow one
        more; else RESOURCE_EXHAUSTED TOO_MANY_CONNECTIONS naming the cap."""
        owner = (grant.app, grant.principal.key_id)
        if peer.owner == owner:
            return
        self._disown(peer)
        app, key_id = owner
        for name, most, count, whose in (
                ("HTTP_CONNECTIONS_PER_KEY_MAX", limits.HTTP_CONNECTIONS_PER_KEY_MAX,
                 self._per_key[key_id] if key_id else 0, f"key {key_id}"),
                ("HTTP_CONNECTIONS_PER_APP_MAX", limits.HTTP_CONNECTIONS_PER_APP_MAX,
                 self._per_app[app], f"app {app!r}")):
            if count >= most:
                raise ResourceExhausted(
                    ErrorReason.TOO_MANY_CONNECTIONS,
                    f"{whose} has {count} HTTP connections open, the most allowed ({name}); "
                    "reuse one", metadata={"limit": name, "max": str(most)})
        peer.owner = owner
        self._per_app[app] += 1
        if key_id:
            self._per_key[key_id] += 1

    def _disown(self, peer: _Peer) -> None:
        if peer.owner is None:
            return
        app, key_id = peer.owner
        peer.owner = None
        _decrement(self._per_app, app)
        if key_id:
            _decrement(self._per_key, key_id)

    async def _converse(self, connection: h11.Connection, reader: asyncio.StreamReader,
                        stream: asyncio.StreamWriter, peer: _Peer) -> None:
        """Answers requests one after another until either side closes."""
        while not self._closing:
            peer.request, peer.app = None, ""
            try:
                request = await self._receive(connection, reader, peer)
            except _Idle:
                return
            except (h11.RemoteProtocolError, TimeoutError, _BodyTooLarge, _HeadTooLarge,
                    _AmbiguousFraming) as error:
                await self._send_refusal(connection, stream, peer, self._unreadable(error))
                return
            if request is None:
                return
            peer.busy = True
            answer = self._with_cors(request, await self._answer(request, peer))
            await self._send(connection, stream, peer, answer,
                             head_only=request.method == b"HEAD")
            peer.busy = False
            if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                return
            connection.start_next_cycle()

    def _unreadable(self, error: Exception) -> Answer:
        """The answer to a request that could not be read whole."""
        if isinstance(error, h11.RemoteProtocolError):
            status = error.error_status_hint
            return error_answer(status, "INVALID_ARGUMENT" if status != 431 else
                                "RESOURCE_EXHAUSTED", f"bad HTTP request: {error}")
        if isinstance(error, TimeoutError):
            return error_answer(408, "DEADLINE_EXCEEDED",
                                f"the request did not arrive within {self._read_timeout_s} s")
        if isinstance(error, _BodyTooLarge):
            return error_answer(413, "RESOURCE_EXHAUSTED", "a request body may hold at most "
                                f"{limits.HTTP_REQUEST_BODY_BYTES_MAX} bytes")
        if isinstance(error, _HeadTooLarge):
            return error_answer(431, "RESOURCE_EXHAUSTED", "a request line and headers may "
                                f"take at most {limits.HTTP_REQUEST_HEAD_BYTES_MAX} bytes")
        assert isinstance(error, _AmbiguousFraming), error
        return error_answer(400, "INVALID_ARGUMENT",
                            "a request may not carry both Content-Length and Transfer-Encoding")

    async def _receive(self, connection: h11.Connection, reader: asyncio.StreamReader,
                       peer: _Peer) -> h11.Request | None:
        """The next whole request (its body read and dropped), or None if the peer closed
        between requests. Its head, once read, and when its first byte came are kept in
        peer, for the access line."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # set when the request's first byte is here
        request: h11.Request | None = None
        body_bytes = 0
        # The head's size, counted here: h11 bounds only a head still incomplete, so one
        # that arrives whole in a few reads would pass its limit.
        received_bytes = len(connection.trailing_data[0])  # pipelined after the last one
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                if deadline is None:
                    try:
                        data = await asyncio.wait_for(reader.read(READ_CHUNK_BYTES),
                                                      limits.HTTP_KEEP_ALIVE_IDLE_S)
                    except TimeoutError:
                        raise _Idle() from None
                    deadline = loop.time() + self._read_timeout_s
                    peer.started_s = time.perf_counter()
                else:
                    data = await asyncio.wait_for(reader.read(READ_CHUNK_BYTES),
                                                  max(0.0, deadline - loop.time()))
                received_bytes += len(data)
                connection.receive_data(data)  # b"": the peer closed
                continue
            if deadline is None:  # a request pipelined behind the last one
                deadline = loop.time() + self._read_timeout_s
                peer.started_s = time.perf_counter()
            if isinstance(event, h11.Request):
                request = peer.request = event
                head_bytes = received_bytes - len(connection.trailing_data[0])
                if head_bytes > limits.HTTP_REQUEST_HEAD_BYTES_MAX:
                    raise _HeadTooLarge()
                names = {name for name, _ in event.headers}
                if b"content-length" in names and b"transfer-encoding" in names:
                    raise _AmbiguousFraming()
                if _declared_body_bytes(event.headers) > limits.HTTP_REQUEST_BODY_BYTES_MAX:
                    raise _BodyTooLarge()
            elif isinstance(event, h11.Data):
                body_bytes += len(event.data)
                if body_bytes > limits.HTTP_REQUEST_BODY_BYTES_MAX:
                    raise _BodyTooLarge()
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

    async def _send(self, connection: h11.Connection, stream: asyncio.StreamWriter,
                    peer: _Peer, answer: Answer, *, head_only: bool = False) -> None:
        headers = [*answer.headers, ("cache-control", "no-store"),
                   ("x-content-type-options", "nosniff")]
        if answer.status != 204:
            headers.append(("content-length", str(len(answer.body))))
        if self._closing or not self._gate.serving:
            headers.append(("connection", "close"))
        data = connection.send(h11.Response(status_code=answer.status, headers=headers,
                                            reason=http.HTTPStatus(answer.status).phrase))
        assert data is not None
        if answer.body and not head_only and answer.status != 204:
            data += connection.send(h11.Data(data=answer.body)) or b""
        data += connection.send(h11.EndOfMessage()) or b""
        self._count(answer.status)
        stream.write(data)
        await asyncio.wait_for(stream.drain(), limits.HTTP_RESPONSE_WRITE_TIMEOUT_S)
        if log.isEnabledFor(logging.DEBUG):
            _access_line(peer.address, answer.status, peer.request, peer.app, peer.started_s)

    async def _send_refusal(self, connection: h11.Connection, stream: asyncio.StreamWriter,
                            peer: _Peer, answer: Answer) -> None:
        """Answers a request that could not be read, if HTTP still allows an answer."""
        if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await self._send(connection, stream, peer, Answer(
                answer.status, answer.body, (*answer.headers, ("connection", "close"))))

    # --- one request ---------------------------------------------------------------------

    async def _answer(self, request: h11.Request, peer: _Peer) -> Answer:
        target = request.target.decode("ascii", "replace")
        path, _, query = target.partition("?")
        try:
            host = _header(request.headers, b"host")
        except InvalidArgument:
            host = None  # two Host headers: none to trust
        if not host_allowed(host, self._allowed_hosts,
                            loopback_only=self._loopback_hosts_only):
            rule = ("a loopback name or address (localhost, 127.0.0.1, [::1]): the server has "
                    "no API keys" if self._loopback_hosts_only else "one of --http-allowed-host")
            return error_answer(421, "MISDIRECTED_REQUEST",
                                f"Host {host!r} is not served here; it must be {rule}")
        if path != USAGE_PATH:
            return error_answer(404, "NOT_FOUND", f"no such path {path!r}; try {USAGE_PATH}")
        method = request.method.decode("ascii", "replace")
        if method == "OPTIONS":
            return self._preflight(request)
        if method not in ("GET", "HEAD"):
            return error_answer(405, "METHOD_NOT_ALLOWED",
                                f"{USAGE_PATH} takes {ALLOWED_METHODS}, not {method}",
                                headers=(("allow", ALLOWED_METHODS),))
        try:
            return json_answer(200, usage_json(await self._usage(request, query, peer)))
        except Refusal as error:  # its status is its code's, in quotad_contract.errors.ERRORS
            kind = ERRORS[error.code]
            headers = (("www-authenticate", "Bearer"),) if kind.http_status == 401 else (
                (("retry-after", "1"),) if kind.http_status == 503 else ())
            if error.reason is ErrorReason.TOO_MANY_CONNECTIONS:
                headers = (("connection", "close"),)  # it holds one connection too many
            return error_answer(kind.http_status, kind.code,
                                getattr(error, "message", None) or str(error), reason=error.reason,
                                violations=getattr(error, "violations", ()),
                                metadata=error.metadata, headers=headers)
        except Exception:
            log.exception("HTTP usage read failed")
            return error_answer(500, "INTERNAL", "internal error")

    async def _usage(self, request: h11.Request, query: str, peer: _Peer) -> UsageResult:
        user_id = query_user_id(query)
        grant = self._authorize(_header(request.headers, b"authorization"),
                                _header(request.headers, USER_TOKEN_HEADER.encode()), user_id)
        self._own(peer, grant)
        peer.app = grant.app
        command = GetUsage(app=grant.app, user_id=user_id)
        result: UsageResult = await self._gate.open_writer().execute(command)
        return result

    def _allowed_origin(self, request: h11.Request) -> str | None:
        try:
            origin = _header(request.headers, b"origin")
        except InvalidArgument:
            return None
        return origin if origin in self._cors_origins else None

    def _preflight(self, request: h11.Request) -> Answer:
        try:
            asks_cors = _header(request.headers, b"access-control-request-method") is not None
        except InvalidArgument:
            asks_cors = True
        if not asks_cors:  # a plain OPTIONS: what the path takes
            return Answer(204, headers=(("allow", ALLOWED_METHODS),))
        if self._allowed_origin(request) is None:
            return error_answer(403, "PERMISSION_DENIED", "origin not allowed")
        return Answer(204, headers=(
            ("access-control-allow-methods", "GET"),
            ("access-control-allow-headers", "Authorization, X-Quotad-User-Token"),
            ("access-control-max-age", str(limits.HTTP_CORS_MAX_AGE_S)),
        ))

    def _with_cors(self, request: h11.Request, answer: Answer) -> Answer:
        origin = self._allowed_origin(request)
        if origin is None:
            return answer
        return Answer(answer.status, answer.body, (
            *answer.headers, ("access-control-allow-origin", origin), ("vary", "Origin")))


def _decrement(counts: collections.Counter[str], key: str) -> None:
    """One fewer; a count that reaches 0 is dropped, so the counters hold only live keys."""
    assert counts[key] > 0, key
    counts[key] -= 1
    if not counts[key]:
        del counts[key]


async def _close(reader: asyncio.StreamReader, stream: asyncio.StreamWriter) -> None:
    """Half-closes, drops what the peer still sends (bounded), then closes: closing with
    unread input makes the kernel reset the connection, which can destroy the answer (a 413
    or 503) before the peer has read it."""
    try:
        if stream.can_write_eof():
            stream.write_eof()
        async with asyncio.timeout(LINGER_S):
            dropped_bytes = 0
            while dropped_bytes <= LINGER_BYTES_MAX:
                chunk = await reader.read(READ_CHUNK_BYTES)
                if not chunk:
                    break
                dropped_bytes += len(chunk)
    except (OSError, TimeoutError):
        pass
    stream.close()
    try:
        await asyncio.wait_for(stream.wait_closed(), LINGER_S)
    except (OSError, TimeoutError):
        stream.transport.abort()
    except BaseException:
        stream.transport.abort()
        raise
