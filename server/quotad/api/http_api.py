"""The browser endpoint: `GET /v1/usage?user_id=U`, read-only JSON over HTTP/1.1.

It runs on the gRPC server's event loop (h11 parses, asyncio streams carry the bytes) and
reads through the same writer as GetUsage, so an answer never shows state that is not yet
durable. Every connection is bounded: head size, body size, connections, an idle timeout
between requests, a read timeout per request and a write timeout per answer, so a slow or
hostile client costs a socket and a little memory, never the gRPC side's time.

Authorization is one injected callable, `authorize(authorization_header, user_token_header,
user_id) -> app`, raising Unauthenticated (401) or PermissionDenied (403): the server passes
service.http_usage_authorizer, GetUsage's own rule.

CORS: an Origin in the allow-list gets `Access-Control-Allow-Origin: <that origin>`; any
other origin gets no CORS header (the browser then withholds the answer from the page) and
its preflight is refused with 403. Never `*`.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import h11

from quotad.core import limits
from quotad.core.commands import CounterView, GetUsage, UsageResult, check_user_id
from quotad.core.errors import FieldViolation, InvalidArgument, Refusal, Violations
from quotad.api.metrics import Metrics
from quotad.api.auth import USER_TOKEN_HEADER
from quotad.api.gate import Gate
from quotad_contract.errors import ERRORS

log = logging.getLogger("quotad.http")

USAGE_PATH = "/v1/usage"
ALLOWED_METHODS = "GET, HEAD, OPTIONS"
READ_CHUNK_BYTES = 4096
CLOSE_GRACE_S = 2.0
"""On close, requests already being answered get this long to finish."""
LINGER_S = 1.0
LINGER_BYTES_MAX = 64 * 1024
"""Closing a connection waits at most LINGER_S for the peer to close its side, dropping at
most LINGER_BYTES_MAX of what it still sends."""

Authorize = Callable[[str | None, str | None, str], str]
"""(Authorization header, X-Quotad-User-Token header, user_id) -> the app to read from."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


class _Peer:
    """One open connection: its stream, and whether a request on it is being answered."""

    __slots__ = ("stream", "busy")

    def __init__(self, stream: asyncio.StreamWriter) -> None:
        self.stream = stream
        self.busy = False


class _BodyTooLarge(Exception):
    pass


class _Idle(Exception):
    """No request began within the keep-alive idle timeout."""


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
    }


def usage_json(result: UsageResult) -> dict[str, Any]:
    return {"user_id": result.user_id, "plan_id": result.plan_id,
            "counters": [counter_json(view) for view in result.counters]}


def json_answer(status: int, document: Any, headers: tuple[tuple[str, str], ...] = ()) -> Answer:
    body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    return Answer(status, body, (("content-type", "application/json"), *headers))


def error_answer(status: int, code: str, message: str, *, reason: str | None = None,
                 violations: tuple[FieldViolation, ...] = (),
                 headers: tuple[tuple[str, str], ...] = ()) -> Answer:
    error: dict[str, Any] = {"code": code, "message": message}
    if reason is not None:
        error["reason"] = reason
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


_BUSY_BODY = b'{"error":{"code":"UNAVAILABLE","message":"too many HTTP connections"}}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
         b"cache-control: no-store\r\nconnection: close\r\n"
         + f"content-length: {len(_BUSY_BODY)}\r\n\r\n".encode() + _BUSY_BODY)
"""The answer to a connection beyond HTTP_CONNECTIONS_MAX, written without parsing anything."""


class HttpApi:
    """The HTTP server: start(), stop_accepting() when draining, close() when stopping."""

    def __init__(self, gate: Gate, *, authorize: Authorize,
                 cors_origins: tuple[str, ...] = (),
                 read_timeout_s: float = limits.HTTP_REQUEST_READ_TIMEOUT_S,
                 metrics: Metrics | None = None) -> None:
        self._gate = gate
        self._authorize = authorize
        self._cors_origins = frozenset(cors_origins)
        self._read_timeout_s = read_timeout_s
        self._metrics = metrics
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], _Peer] = {}
        self._refused: set[asyncio.Task[Any]] = set()
        """Connections beyond the limit, being told so (each for at most LINGER_S)."""
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
        if self._closing or len(self._connections) >= limits.HTTP_CONNECTIONS_MAX:
            await self._refuse(reader, stream, task)
            return
        peer = self._connections[task] = _Peer(stream)
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

    async def _refuse(self, reader: asyncio.StreamReader, stream: asyncio.StreamWriter,
                      task: asyncio.Task[Any]) -> None:
        """503 to a connection beyond the limit; beyond as many again, a plain reset."""
        self._count(503)
        if len(self._refused) >= limits.HTTP_CONNECTIONS_MAX:
            stream.transport.abort()
            return
        self._refused.add(task)
        try:
            stream.write(_BUSY)
            await _close(reader, stream)
        finally:
            self._refused.discard(task)

    async def _converse(self, connection: h11.Connection, reader: asyncio.StreamReader,
                        stream: asyncio.StreamWriter, peer: _Peer) -> None:
        """Answers requests one after another until either side closes."""
        while not self._closing:
            try:
                request = await self._receive(connection, reader)
            except _Idle:
                return
            except h11.RemoteProtocolError as error:
                status = error.error_status_hint
                await self._send_refusal(connection, stream, error_answer(
                    status, "INVALID_ARGUMENT" if status != 431 else "RESOURCE_EXHAUSTED",
                    f"bad HTTP request: {error}"))
                return
            except TimeoutError:
                await self._send_refusal(connection, stream, error_answer(
                    408, "DEADLINE_EXCEEDED",
                    f"the request did not arrive within {self._read_timeout_s} s"))
                return
            except _BodyTooLarge:
                await self._send_refusal(connection, stream, error_answer(
                    413, "RESOURCE_EXHAUSTED",
                    f"a request body may hold at most {limits.HTTP_REQUEST_BODY_BYTES_MAX} "
                    "bytes"))
                return
            if request is None:
                return
            peer.busy = True
            answer = self._with_cors(request, await self._answer(request))
            await self._send(connection, stream, answer, head_only=request.method == b"HEAD")
            peer.busy = False
            if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                return
            connection.start_next_cycle()

    async def _receive(self, connection: h11.Connection,
                       reader: asyncio.StreamReader) -> h11.Request | None:
        """The next whole request (its body read and dropped), or None if the peer closed
        between requests."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # set when the request's first byte is here
        request: h11.Request | None = None
        body_bytes = 0
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
                else:
                    data = await asyncio.wait_for(reader.read(READ_CHUNK_BYTES),
                                                  max(0.0, deadline - loop.time()))
                connection.receive_data(data)  # b"": the peer closed
                continue
            if deadline is None:
                deadline = loop.time() + self._read_timeout_s
            if isinstance(event, h11.Request):
                request = event
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
                    answer: Answer, *, head_only: bool = False) -> None:
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

    async def _send_refusal(self, connection: h11.Connection, stream: asyncio.StreamWriter,
                            answer: Answer) -> None:
        """Answers a request that could not be read, if HTTP still allows an answer."""
        if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await self._send(connection, stream, Answer(
                answer.status, answer.body, (*answer.headers, ("connection", "close"))))

    # --- one request ---------------------------------------------------------------------

    async def _answer(self, request: h11.Request) -> Answer:
        target = request.target.decode("ascii", "replace")
        path, _, query = target.partition("?")
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
            return json_answer(200, usage_json(await self._usage(request, query)))
        except Refusal as error:  # its status is its code's, in quotad_contract.errors.ERRORS
            kind = ERRORS[error.code]
            headers = (("www-authenticate", "Bearer"),) if kind.http_status == 401 else (
                (("retry-after", "1"),) if kind.http_status == 503 else ())
            return error_answer(kind.http_status, kind.code,
                                getattr(error, "message", None) or str(error), reason=error.reason,
                                violations=getattr(error, "violations", ()), headers=headers)
        except Exception:
            log.exception("HTTP usage read failed")
            return error_answer(500, "INTERNAL", "internal error")

    async def _usage(self, request: h11.Request, query: str) -> UsageResult:
        user_id = query_user_id(query)
        app = self._authorize(_header(request.headers, b"authorization"),
                              _header(request.headers, USER_TOKEN_HEADER.encode()), user_id)
        command = GetUsage(app=app, user_id=user_id)
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
