"""The browser endpoint (`--http-listen`) of the real server, read with the standard library's
HTTP client: the usage JSON, refusals, keep-alive, CORS, drain, and hostile clients."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

import quotad_client as qc
from quotad.core import limits
from quotad.core.errors import PermissionDenied, InvalidArgument, Unauthenticated
from quotad.api.auth import OPEN_PRINCIPAL, UsageGrant
from quotad.api.http_api import HttpApi, query_user_id
from quotad.server import Config
from quotad.api.gate import Gate
from server_process import ServerProcess

ORIGIN = "https://app.example.com"
READ_TIMEOUT_S = 0.5
SOCKET_TIMEOUT_S = 10.0
"""Every socket read in these tests gives up after this long: a hang fails, never blocks."""
PLAN = {
    "id": "p", "name": "P",
    "limit_groups": [
        {"key": "tokens", "label": "Tokens", "unit": "tokens", "quota": 1000, "window": "month",
         "match": {"event_types": ["openai.*"]}},
        {"key": "renders", "label": "Renders", "unit": "renders", "quota": 5,
         "window": "lifetime", "match": {"event_types": ["render"]}},
    ],
}
HTTP_ARGS = ("--http-listen", "127.0.0.1:0", "--cors-origin", ORIGIN,
             "--cors-origin", "http://localhost:8080",
             "--http-read-timeout-s", str(READ_TIMEOUT_S), "--metrics-listen", "127.0.0.1:0")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path_factory.mktemp("http") / "data", extra_args=HTTP_ARGS)
    try:
        process.start()
        with qc.QuotaClient(process.address, timeout_s=10) as client:
            client.upsert_plan(PLAN)
            client.subscribe("u1", "p", time_zone="Europe/Paris")
        yield process
    finally:
        process.close()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[qc.QuotaClient]:
    with qc.QuotaClient(server.address, timeout_s=10) as client:
        yield client


def connect(server: ServerProcess) -> http.client.HTTPConnection:
    host, _, port = server.http_address.rpartition(":")
    return http.client.HTTPConnection(host, int(port), timeout=SOCKET_TIMEOUT_S)


def request(server: ServerProcess, method: str, target: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[http.client.HTTPResponse, bytes]:
    connection = connect(server)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return response, response.read()
    finally:
        connection.close()


def get_json(server: ServerProcess, target: str,
             headers: dict[str, str] | None = None) -> tuple[int, dict]:
    response, body = request(server, "GET", target, headers=headers)
    assert response.getheader("content-type") == "application/json"
    assert response.getheader("cache-control") == "no-store"
    return response.status, json.loads(body)


def raw_exchange(server: ServerProcess, data: bytes) -> bytes:
    """Sends raw bytes, then reads until the server closes the connection."""
    host, _, port = server.http_address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def instant(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def test_usage_json_equals_get_usage_after_reserve_and_commit(server, client):
    with client.reserve("u1", "openai.chat", 400) as hold:
        hold.actual = 123
    held = client.reserve("u1", "openai.chat", 50, ttl_s=600)
    client.track("u1", "render", 2)
    status, document = get_json(server, "/v1/usage?user_id=u1")
    expected = client.usage("u1")
    held.release()
    assert status == 200
    assert (document["user_id"], document["plan_id"]) == ("u1", "p")
    assert [c["key"] for c in document["counters"]] == ["tokens", "renders"]
    for got, want in zip(document["counters"], expected.counters, strict=True):
        assert {k: got[k] for k in ("key", "label", "unit", "window", "quota", "used", "held",
                                    "remaining")} == {
            "key": want.key, "label": want.label, "unit": want.unit, "window": want.window,
            "quota": want.quota, "used": want.used, "held": want.held,
            "remaining": want.remaining}
        assert instant(got["window_start"]) == want.window_start
        assert instant(got["resets_at"]) == want.resets_at
    tokens, renders = document["counters"]
    assert (tokens["used"], tokens["held"], tokens["remaining"]) == (123, 50, 827)
    assert tokens["resets_at"].endswith("Z") and renders["resets_at"] is None
    assert (renders["used"], renders["remaining"]) == (2, 3)


def test_head_answers_the_headers_of_get_without_a_body(server):
    response, body = request(server, "HEAD", "/v1/usage?user_id=u1")
    assert response.status == 200 and body == b""
    assert int(response.getheader("content-length")) > 0


@pytest.mark.parametrize("target, field", [
    ("/v1/usage", "user_id"),
    ("/v1/usage?user_id=", "user_id"),
    ("/v1/usage?user_id=a&user_id=b", "user_id"),
    ("/v1/usage?user_id=" + "x" * (limits.USER_ID_BYTES_MAX + 1), "user_id"),
    ("/v1/usage?user_id=%ff", "query"),
])
def test_a_bad_or_missing_user_id_is_400_naming_the_field(server, target, field):
    status, document = get_json(server, target)
    assert status == 400
    assert document["error"]["code"] == "INVALID_ARGUMENT"
    assert [v["field"] for v in document["error"]["field_violations"]] == [field]


def test_an_unknown_user_is_409_no_plan_as_over_grpc_and_an_unknown_path_is_404(server, client):
    status, document = get_json(server, "/v1/usage?user_id=nobody")
    with pytest.raises(qc.FailedPrecondition) as over_grpc:
        client.usage("nobody")
    assert (status, document["error"]["code"], document["error"]["reason"]) == (
        409, "FAILED_PRECONDITION", "NO_PLAN")
    assert (over_grpc.value.code.name, over_grpc.value.reason) == (
        document["error"]["code"], document["error"]["reason"])
    assert document["error"]["message"] == over_grpc.value.message
    status, document = get_json(server, "/v1/elsewhere?user_id=u1")
    assert (status, document["error"]["code"]) == (404, "NOT_FOUND")
    assert "reason" not in document["error"]


def test_a_method_other_than_get_head_options_is_405_with_allow(server):
    response, body = request(server, "POST", "/v1/usage?user_id=u1", body=b"{}")
    assert response.status == 405
    assert response.getheader("allow") == "GET, HEAD, OPTIONS"
    assert json.loads(body)["error"]["code"] == "METHOD_NOT_ALLOWED"


def test_an_oversized_body_is_413_and_an_oversized_head_431_then_closed(server, client):
    body = b"x" * (limits.HTTP_REQUEST_BODY_BYTES_MAX + 1)
    answer = raw_exchange(server, b"GET /v1/usage?user_id=u1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert answer.startswith(b"HTTP/1.1 413 ")
    head = b"X-Filler: " + b"y" * limits.HTTP_REQUEST_HEAD_BYTES_MAX + b"\r\n"
    answer = raw_exchange(server, b"GET /v1/usage?user_id=u1 HTTP/1.1\r\nHost: 127.0.0.1\r\n" + head)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert client.usage("u1").user_id == "u1"  # the gRPC side is unharmed


def head_of(head_bytes: int) -> bytes:
    """A whole GET request whose head (request line, headers, blank line) is head_bytes long."""
    start = b"GET /v1/usage?user_id=u1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    end = b"\r\n\r\n"
    filler = head_bytes - len(start) - len(b"X-Filler: ") - len(end)
    assert filler > 0
    return start + b"X-Filler: " + b"y" * filler + end


def test_the_head_limit_holds_when_the_whole_head_arrives_in_one_write(server):
    """h11 bounds only a head still incomplete: 12,000 bytes sent at once were answered 200."""
    answer = raw_exchange(server, head_of(12_000))
    assert answer.startswith(b"HTTP/1.1 431 ") and answer.count(b"HTTP/1.1 ") == 1
    answer = raw_exchange(server, head_of(limits.HTTP_REQUEST_HEAD_BYTES_MAX))
    assert answer.startswith(b"HTTP/1.1 200 ")  # at the limit
    answer = raw_exchange(server, head_of(limits.HTTP_REQUEST_HEAD_BYTES_MAX + 1))
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_content_length_with_transfer_encoding_is_400_and_the_connection_closed(server):
    """RFC 9112 section 6.3: such a request may be smuggling a second one past a proxy."""
    smuggled = b"GET /v1/usage?user_id=u1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    answer = raw_exchange(server, b"GET /v1/usage?user_id=u1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"0\r\n\r\n" + smuggled)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert answer.count(b"HTTP/1.1 ") == 1  # closed: the request behind it is never answered
    assert b"Content-Length and Transfer-Encoding" in answer


LOOPBACK_HOSTS = ["localhost", "localhost:8081", "127.0.0.1", "127.0.0.1:9", "127.1.2.3:80",
                  "[::1]", "[::1]:8081", "LOCALHOST:8081"]
FOREIGN_HOSTS = ["rebind.attacker.example:8081", "rebind.attacker.example", "localhost.evil",
                 "127.0.0.1.nip.io", "0.0.0.0", "[::2]", "::1", "[127.0.0.1]", "localhost:x",
                 "10.0.0.1:8081", ""]


def with_host(server: ServerProcess, host: str | None, headers: dict[str, str] | None = None,
              ) -> tuple[int, dict]:
    """GET the usage of u1 with this Host header (None: none, as HTTP/1.0 allows)."""
    lines = [b"GET /v1/usage?user_id=u1 HTTP/1.0" if host is None else
             b"GET /v1/usage?user_id=u1 HTTP/1.1", b"Connection: close"]
    if host is not None:
        lines.append(b"Host: " + host.encode())
    lines += [f"{name}: {value}".encode() for name, value in (headers or {}).items()]
    answer = raw_exchange(server, b"\r\n".join(lines) + b"\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def test_without_keys_only_a_loopback_host_is_answered_so_dns_rebinding_reads_nothing(server):
    for host in LOOPBACK_HOSTS:
        status, document = with_host(server, host)
        assert (status, document.get("user_id")) == (200, "u1"), host
    for host in [*FOREIGN_HOSTS, None]:
        status, document = with_host(server, host)
        assert status == 421 and "counters" not in document, host
        assert document["error"]["code"] == "MISDIRECTED_REQUEST"
        assert "loopback" in document["error"]["message"]


def test_two_requests_share_one_keep_alive_connection(server):
    connection = connect(server)
    try:
        answers = []
        for _ in range(2):
            connection.request("GET", "/v1/usage?user_id=u1")
            response = connection.getresponse()
            answers.append((response.status, json.loads(response.read())["user_id"]))
            if not answers[1:]:
                first_socket = connection.sock
        assert answers == [(200, "u1"), (200, "u1")]
        assert connection.sock is first_socket and first_socket is not None
    finally:
        connection.close()


def test_an_allowed_origin_is_echoed_and_any_other_gets_no_cors_headers(server):
    response, _ = request(server, "GET", "/v1/usage?user_id=u1", headers={"Origin": ORIGIN})
    assert response.status == 200
    assert response.getheader("access-control-allow-origin") == ORIGIN
    assert response.getheader("vary") == "Origin"
    response, _ = request(server, "GET", "/v1/usage?user_id=u1",
                          headers={"Origin": "https://evil.example.com"})
    assert response.status == 200  # answered, but the browser withholds it from the page
    assert not [name for name, _ in response.getheaders()
                if name.lower().startswith("access-control-")]


def test_a_preflight_from_an_allowed_origin_is_204_and_from_another_403(server):
    asks = {"Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, x-quotad-user-token"}
    response, body = request(server, "OPTIONS", "/v1/usage?user_id=u1",
                             headers={"Origin": ORIGIN, **asks})
    assert (response.status, body) == (204, b"")
    assert response.getheader("access-control-allow-origin") == ORIGIN
    assert response.getheader("access-control-allow-methods") == "GET"
    assert response.getheader("access-control-allow-headers") == (
        "Authorization, X-Quotad-User-Token")
    assert response.getheader("access-control-max-age") == str(limits.HTTP_CORS_MAX_AGE_S)
    assert response.getheader("access-control-allow-credentials") is None
    response, body = request(server, "OPTIONS", "/v1/usage",
                             headers={"Origin": "https://evil.example.com", **asks})
    assert response.status == 403
    assert json.loads(body)["error"]["code"] == "PERMISSION_DENIED"
    assert response.getheader("access-control-allow-origin") is None


def test_a_slow_client_is_cut_off_by_the_read_timeout_while_grpc_answers(server, client):
    host, _, port = server.http_address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(b"GET /v1/usage?user_id=u1 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ")
        assert client.usage("u1").user_id == "u1"  # while the HTTP request stalls
        answer = read_until_closed(sock)  # the server closes it; SOCKET_TIMEOUT_S bounds it
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert client.usage("u1").user_id == "u1"


def test_http_answers_are_counted_by_status_in_the_metrics(server):
    request(server, "GET", "/v1/usage?user_id=u1")
    request(server, "GET", "/v1/usage?user_id=nobody")
    host, _, port = server.last("serving")["metrics"].rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=SOCKET_TIMEOUT_S)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    counts = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line.startswith("quotad_http_requests_total{")}
    assert counts['status="200"'] >= 1 and counts['status="409"'] >= 1


def connect_from(server: ServerProcess, source: str) -> socket.socket:
    """A connection to the endpoint from this loopback address (Linux answers all of
    127.0.0.0/8), so that one test can be many peers."""
    host, _, port = server.http_address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT_S,
                                    source_address=(source, 0))


def ask(sock: socket.socket, headers: dict[str, str] | None = None,
        user_id: str = "nobody") -> bytes:
    """One keep-alive request on an open connection; the answer's head and body as they come
    in one read (each answer here is small)."""
    lines = [f"GET /v1/usage?user_id={user_id} HTTP/1.1", "Host: 127.0.0.1",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock.recv(65536)


def refusal_of(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\r\nconnection: close" in head.lower(), head
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


def test_connections_beyond_the_limit_get_503_and_grpc_keeps_answering(start_server):
    server = start_server(extra_args=("--http-listen", "127.0.0.1:0"))
    per_peer = limits.HTTP_CONNECTIONS_PER_PEER_MAX
    sources = [f"127.0.0.{2 + index}" for index in range(limits.HTTP_CONNECTIONS_MAX // per_peer)]
    held: list[socket.socket] = []
    try:
        for source in sources:
            held += [connect_from(server, source) for _ in range(per_peer)]
        # Connections are taken in order: once the last one is answered, all are counted.
        assert ask(held[-1]).startswith(b"HTTP/1.1 409 ")
        with connect_from(server, "127.0.0.99") as one_more:
            status, error = refusal_of(read_until_closed(one_more))
        assert (status, error["code"], error["metadata"]) == (503, "UNAVAILABLE", {
            "limit": "HTTP_CONNECTIONS_MAX", "max": str(limits.HTTP_CONNECTIONS_MAX)})
        assert "too many HTTP connections" in error["message"]
        with qc.QuotaClient(server.address, timeout_s=10) as client:
            assert client.list_plans()
    finally:
        for sock in held:
            sock.close()


def test_one_address_gets_at_most_its_share_of_connections_and_others_still_connect(
        start_server):
    """256 idle connections from one address took every connection for everyone."""
    server = start_server(extra_args=("--http-listen", "127.0.0.1:0"))
    held = [connect_from(server, "127.0.0.2")
            for _ in range(limits.HTTP_CONNECTIONS_PER_PEER_MAX)]
    try:
        assert ask(held[-1]).startswith(b"HTTP/1.1 409 ")  # at the cap: answered
        with connect_from(server, "127.0.0.2") as one_more:
            status, error = refusal_of(read_until_closed(one_more))
        assert (status, error["code"], error["reason"], error["metadata"]) == (
            429, "RESOURCE_EXHAUSTED", "TOO_MANY_CONNECTIONS",
            {"limit": "HTTP_CONNECTIONS_PER_PEER_MAX",
             "max": str(limits.HTTP_CONNECTIONS_PER_PEER_MAX)})
        with connect_from(server, "127.0.0.3") as elsewhere:
            assert ask(elsewhere).startswith(b"HTTP/1.1 409 ")
        held.pop().close()  # one closes: its place is free again, once the server sees it
        deadline = time.monotonic() + SOCKET_TIMEOUT_S
        while time.monotonic() < deadline:
            with connect_from(server, "127.0.0.2") as again:
                if ask(again).startswith(b"HTTP/1.1 409 "):
                    break
        else:
            raise AssertionError("the closed connection's place never came back")
    finally:
        for sock in held:
            sock.close()


def test_a_draining_server_answers_http_with_503_or_a_closed_connection_never_a_hang(
        start_server):
    server = start_server(extra_args=("--http-listen", "127.0.0.1:0"))
    kept = connect(server)
    kept.request("GET", "/v1/usage?user_id=nobody")
    assert kept.getresponse().read()
    server.process.send_signal(signal.SIGTERM)
    outcomes: list[int | str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "closed" not in outcomes[-1:]:
        connection = kept if not outcomes else connect(server)
        try:
            connection.request("GET", "/v1/usage?user_id=nobody")
            outcomes.append(connection.getresponse().status)
        except (ConnectionError, http.client.RemoteDisconnected):
            outcomes.append("closed")
        finally:
            connection.close()
    print(f"\nafter SIGTERM: {outcomes}")
    assert outcomes[-1] == "closed", outcomes
    # Until the signal lands the user merely has no plan (409); from then on: 503 or closed.
    draining = outcomes[next(i for i, o in enumerate(outcomes) if o != 409):]
    assert set(draining) <= {503, "closed"}, outcomes
    assert server.process.wait(timeout=30) == 0


@pytest.mark.parametrize("fields", [
    {"http_listen": "0.0.0.0:8080"},
    {"http_listen": "127.0.0.1"},
    {"cors_origins": ("*",)},
    {"cors_origins": ("https://app.example.com/",)},
    {"cors_origins": ("app.example.com",)},
    {"cors_origins": ("https://App.example.com",)},
    {"cors_origins": ("ftp://app.example.com",)},
    {"cors_origins": ("null",)},
    {"cors_origins": tuple(f"https://a{i}.example.com"
                           for i in range(limits.HTTP_CORS_ORIGINS_MAX + 1))},
    {"cors_origins": ("https://" + "a" * (limits.HTTP_CORS_ORIGIN_BYTES_MAX - 7),)},
    {"http_read_timeout_s": 0.0},
    {"http_read_timeout_s": limits.HTTP_REQUEST_READ_TIMEOUT_S_MIN / 2},
    {"http_read_timeout_s": limits.HTTP_REQUEST_READ_TIMEOUT_S_MAX + 1},
])
def test_config_refuses_a_bad_http_address_origin_or_timeout(fields):
    with pytest.raises(ValueError):
        Config(data_dir=Path("unused"), **fields)


def test_config_takes_exact_origins_with_ports_and_a_loopback_http_address():
    config = Config(data_dir=Path("unused"), http_listen="[::1]:0",
                    cors_origins=("https://app.example.com", "http://localhost:8080"))
    assert config.cors_origins == ("https://app.example.com", "http://localhost:8080")
    longest = "https://" + "a" * (limits.HTTP_CORS_ORIGIN_BYTES_MAX - 8)
    many = tuple(f"https://a{i}.example.com" for i in range(limits.HTTP_CORS_ORIGINS_MAX))
    for origins in ((longest,), many):  # at the limits: taken
        Config(data_dir=Path("unused"), cors_origins=origins)
    for timeout_s in (limits.HTTP_REQUEST_READ_TIMEOUT_S_MIN,
                      limits.HTTP_REQUEST_READ_TIMEOUT_S_MAX):
        Config(data_dir=Path("unused"), http_read_timeout_s=timeout_s)


def test_a_query_of_more_than_query_fields_max_fields_is_refused():
    busters = "&".join(f"b{i}=1" for i in range(limits.HTTP_QUERY_FIELDS_MAX - 1))
    assert query_user_id(f"user_id=u1&{busters}") == "u1"  # at the limit
    with pytest.raises(InvalidArgument):
        query_user_id(f"user_id=u1&{busters}&one=more")


def _ask_in_process(authorize, target: str = "/v1/usage?user_id=u1",
                    headers: bytes = b"") -> tuple[bytes, list]:
    """Runs HttpApi on this process's own event loop (its gate still starting, so no writer)
    and sends one request; returns the raw answer and what authorize was called with."""
    calls: list = []

    def recording(authorization, user_token, user_id):
        calls.append((authorization, user_token, user_id))
        return authorize(authorization, user_token, user_id)

    async def run() -> bytes:
        api = HttpApi(Gate(), authorize=recording)
        port = await api.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".encode()
                         + headers + b"\r\n")
            answer = await asyncio.wait_for(reader.read(), SOCKET_TIMEOUT_S)
            writer.close()
            return answer
        finally:
            await api.close()

    return asyncio.run(run()), calls


def _refuse(error: Exception):
    def authorize(authorization, user_token, user_id):
        raise error
    return authorize


@pytest.mark.parametrize("error, status, code", [
    (Unauthenticated("a key is required"), 401, "UNAUTHENTICATED"),
    (PermissionDenied("this token names another user"), 403, "PERMISSION_DENIED"),
])
def test_authorize_refusals_are_401_and_403_with_the_error_json(error, status, code):
    answer, calls = _ask_in_process(_refuse(error), headers=(
        b"Authorization: Bearer pk_test\r\nX-Quotad-User-Token: t0k3n\r\n"))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert json.loads(body) == {"error": {"code": code, "message": error.args[0]}}
    assert calls == [("Bearer pk_test", "t0k3n", "u1")]


def test_an_authorized_read_before_serving_is_503_and_a_bad_user_id_never_reaches_authorize():
    answer, calls = _ask_in_process(
        lambda authorization, user_token, user_id: UsageGrant(OPEN_PRINCIPAL))
    assert answer.startswith(b"HTTP/1.1 503 ") and calls == [(None, None, "u1")]
    answer, calls = _ask_in_process(_refuse(AssertionError("not called")),
                                    target="/v1/usage?user_id=")
    assert answer.startswith(b"HTTP/1.1 400 ") and calls == []


def test_with_keys_on_a_pk_key_and_a_user_token_read_only_that_user(tmp_path: Path) -> None:
    """The GetUsage rule, over HTTP: 401 without a valid key or token, 403 for a key that may
    not read or a token naming someone else, 200 for the user the token names. With keys on,
    the endpoint may listen on any address (here 0.0.0.0, reached over loopback)."""
    admin_key = "ak_" + "h" * 40
    process = ServerProcess(tmp_path / "data", plans=None, env={"QUOTAD_ADMIN_KEY": admin_key},
                            extra_args=("--http-listen", "0.0.0.0:0"))
    try:
        process.start()
        process.http_address = "127.0.0.1:" + process.http_address.rpartition(":")[2]
        with qc.QuotaClient(process.address, api_key=admin_key, timeout_s=10) as admin:
            secret = admin.create_key("secret", app="acme").secret
            public = admin.create_key("public", app="acme").secret
            other_secret = admin.create_key("secret", app="other").secret
        with qc.QuotaClient(process.address, api_key=secret, timeout_s=10) as backend:
            backend.upsert_plan(PLAN)
            for user in ("u1", "u2"):
                backend.subscribe(user, "p")
            backend.track("u1", "render", 2)
            expected = backend.usage("u1")
        token = qc.mint_user_token(secret, "acme", "u1", ttl_s=600)
        as_browser = {"Authorization": f"Bearer {public}", "X-Quotad-User-Token": token}

        status, body = get_json(process, "/v1/usage?user_id=u1", as_browser)
        assert status == 200, body
        renders = next(c for c in body["counters"] if c["key"] == "renders")
        assert renders["used"] == 2 and renders["remaining"] == 3
        assert [c["used"] for c in body["counters"]] == [c.used for c in expected.counters]

        refusals = {
            401: [{}, {"Authorization": f"Bearer {public}"},
                  {"Authorization": "Bearer pk_nothing", "X-Quotad-User-Token": token},
                  {**as_browser, "X-Quotad-User-Token": qc.mint_user_token(
                      secret, "acme", "u1", ttl_s=600)[:-3] + "AAA"}],
            403: [{**as_browser, "X-Quotad-User-Token": qc.mint_user_token(
                      secret, "acme", "u2", ttl_s=600)},
                  {**as_browser, "X-Quotad-User-Token": qc.mint_user_token(
                      other_secret, "other", "u1", ttl_s=600)},
                  {"Authorization": f"Bearer {admin_key}"}],
        }
        for code, cases in refusals.items():
            for headers in cases:
                status, body = get_json(process, "/v1/usage?user_id=u1", headers)
                assert status == code, (headers, body)
                assert "counters" not in body
        status, _ = get_json(process, "/v1/usage?user_id=u1",
                             {"Authorization": f"Bearer {secret}"})
        assert status == 200  # the app's own sk_ key reads any of its users
        for host in FOREIGN_HOSTS[:2]:  # with keys and no --http-allowed-host: any Host
            status, _ = with_host(process, host, {"Authorization": f"Bearer {secret}"})
            assert status == 200, host
    finally:
        process.close()


def test_a_key_and_an_app_get_at_most_their_share_of_connections_naming_the_cap(
        tmp_path: Path) -> None:
    """A connection belongs to the key and app of its last authorized request: one more than
    a key's or an app's cap is 429 TOO_MANY_CONNECTIONS naming it, and closed; the app's
    other keys, and other apps, still connect."""
    admin_key = "ak_" + "h" * 40
    process = ServerProcess(tmp_path / "data", plans=None, env={"QUOTAD_ADMIN_KEY": admin_key},
                            extra_args=("--http-listen", "127.0.0.1:0"))
    held: list[socket.socket] = []
    try:
        process.start()
        keys = {}
        with qc.QuotaClient(process.address, api_key=admin_key, timeout_s=10) as admin:
            for name, app in (("a1", "acme"), ("a2", "acme"), ("a3", "acme"), ("b", "other")):
                keys[name] = {"Authorization": "Bearer " + admin.create_key(
                    "secret", app=app).secret}
        per_key = limits.HTTP_CONNECTIONS_PER_KEY_MAX
        assert limits.HTTP_CONNECTIONS_PER_APP_MAX == 2 * per_key  # two keys fill the app
        sources = iter(f"127.0.0.{index}" for index in range(2, 250))
        for key in ("a1", "a2"):
            source = next(sources)  # one address per key: its cap is per_key too
            for _ in range(per_key):
                held.append(connect_from(process, source))
                assert ask(held[-1], keys[key]).startswith(b"HTTP/1.1 409 "), key
            with connect_from(process, next(sources)) as one_more:
                status, error = refusal_of(ask(one_more, keys[key]) + read_until_closed(
                    one_more))
            assert (status, error["reason"], error["metadata"]) == (
                429, "TOO_MANY_CONNECTIONS", {"limit": "HTTP_CONNECTIONS_PER_KEY_MAX",
                                              "max": str(per_key)})
        with connect_from(process, next(sources)) as one_more:
            status, error = refusal_of(ask(one_more, keys["a3"]) + read_until_closed(one_more))
        assert (status, error["reason"], error["metadata"]) == (
            429, "TOO_MANY_CONNECTIONS", {"limit": "HTTP_CONNECTIONS_PER_APP_MAX",
                                          "max": str(limits.HTTP_CONNECTIONS_PER_APP_MAX)})
        with connect_from(process, next(sources)) as other_app:
            assert ask(other_app, keys["b"]).startswith(b"HTTP/1.1 409 ")
        # A connection of a1 read next with a2's key moves to a2, which is full: refused.
        status, error = refusal_of(ask(held[0], keys["a2"]) + read_until_closed(held[0]))
        assert error["metadata"]["limit"] == "HTTP_CONNECTIONS_PER_KEY_MAX"
    finally:
        for sock in held:
            sock.close()
        process.close()


def test_at_debug_each_request_gets_one_access_line_without_its_query(start_server):
    server = start_server(extra_args=("--http-listen", "127.0.0.1:0", "--log-level", "debug"))
    with qc.QuotaClient(server.address, timeout_s=10) as client:
        client.subscribe("u1", "free")
    pk = "pk_" + "a" * 12 + "_" + "s" * 43  # a key of no server: refused, its id logged
    asked = [
        ("GET", "/v1/usage?user_id=u1&api_key=query-secret", {}, 200),
        ("GET", "/v1/usage?user_id=nobody", {}, 409),
        ("HEAD", "/v1/usage?user_id=u1", {}, 200),
        ("GET", "/v1/elsewhere?token=query-secret", {"Authorization": f"Bearer {pk}"}, 404),
        ("OPTIONS", "/v1/usage", {"Origin": ORIGIN, "Access-Control-Request-Method": "GET"},
         403),
    ]
    for method, target, headers, status in asked:
        response, _ = request(server, method, target, headers=headers)
        assert response.status == status, target
    answer = raw_exchange(server, head_of(limits.HTTP_REQUEST_HEAD_BYTES_MAX + 1))
    assert answer.startswith(b"HTTP/1.1 431 ")
    deadline = time.monotonic() + SOCKET_TIMEOUT_S
    lines: list[dict] = []
    while time.monotonic() < deadline and len(lines) < len(asked) + 1:
        lines = [line for line in list(server.log_lines) if line.get("message") == "http"]
        time.sleep(0.02)
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [
        (method, target.partition("?")[0], status) for method, target, _, status in asked
    ] + [("GET", "/v1/usage", 431)]
    for line in lines:
        assert line["level"] == "debug" and line["peer"] == "127.0.0.1"
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert (lines[0]["app"], lines[3]["key_id"]) == ("default", "a" * 12)
    logged = "\n".join(json.dumps(line) for line in list(server.log_lines))
    assert "query-secret" not in logged and pk not in logged


def test_with_keys_http_allowed_host_answers_only_those_hosts(tmp_path: Path) -> None:
    admin_key = "ak_" + "h" * 40
    process = ServerProcess(tmp_path / "data", plans=None, env={"QUOTAD_ADMIN_KEY": admin_key},
                            extra_args=("--http-listen", "127.0.0.1:0",
                                        "--http-allowed-host", "quota.example.com",
                                        "--http-allowed-host", "[2001:db8::1]:8443"))
    try:
        process.start()
        with qc.QuotaClient(process.address, api_key=admin_key, timeout_s=10) as admin:
            secret = admin.create_key("secret", app="acme").secret
        with qc.QuotaClient(process.address, api_key=secret, timeout_s=10) as backend:
            backend.upsert_plan(PLAN)
            backend.subscribe("u1", "p")
        as_backend = {"Authorization": f"Bearer {secret}"}
        for host in ("quota.example.com", "quota.example.com:443", "Quota.Example.com:8081",
                     "[2001:db8::1]:8443"):
            assert with_host(process, host, as_backend)[0] == 200, host
        for host in ("quota.example.com.evil", "[2001:db8::1]:8444", "[2001:db8::1]",
                     "127.0.0.1", "localhost", None):
            status, document = with_host(process, host, as_backend)
            assert status == 421 and "--http-allowed-host" in document["error"]["message"], host
    finally:
        process.close()


@pytest.mark.parametrize("hosts, admin_key", [
    (("quota.example.com",), ""),  # without keys: loopback only, no list
    (("Quota.example.com",), "k" * 32),
    (("https://quota.example.com",), "k" * 32),
    (("quota.example.com/",), "k" * 32),
    (("quota.example.com:99999x",), "k" * 32),
    (("a" * (limits.HTTP_ALLOWED_HOST_BYTES_MAX + 1),), "k" * 32),
    (tuple(f"h{i}.example.com" for i in range(limits.HTTP_ALLOWED_HOSTS_MAX + 1)), "k" * 32),
])
def test_config_refuses_bad_allowed_hosts_and_any_without_keys(hosts, admin_key):
    with pytest.raises(ValueError, match="--http-allowed-host"):
        Config(data_dir=Path("unused"), admin_key=admin_key, http_allowed_hosts=hosts)


def test_config_takes_allowed_hosts_at_their_limits():
    many = tuple(f"h{i}.example.com" for i in range(limits.HTTP_ALLOWED_HOSTS_MAX))
    longest = ("a" * 63 + ".") * 3 + "a" * 63 + ":65535"
    assert len(longest) == limits.HTTP_ALLOWED_HOST_BYTES_MAX
    for hosts in (many, (longest,), ("localhost:8081", "[::1]", "10.1.2.3")):
        Config(data_dir=Path("unused"), admin_key="k" * 32, http_allowed_hosts=hosts)


def test_with_tls_the_browser_endpoint_serves_https(tls_files: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    """A page served over HTTPS may not fetch plain HTTP: with --tls-cert/--tls-key the
    endpoint speaks HTTPS with the same certificate, and refuses plain HTTP."""
    cert, key = tls_files
    process = ServerProcess(tmp_path / "data", extra_args=(
        "--tls-cert", str(cert), "--tls-key", str(key), "--http-listen", "127.0.0.1:0"))
    try:
        process.start()
        with qc.QuotaClient(process.address, tls_root_cert=cert.read_bytes(),
                            timeout_s=10) as client:
            client.subscribe("u1", "free")
        host, _, port = process.http_address.rpartition(":")
        context = ssl.create_default_context(cafile=str(cert))
        secure = http.client.HTTPSConnection(host, int(port), timeout=SOCKET_TIMEOUT_S,
                                             context=context)
        try:
            secure.request("GET", "/v1/usage?user_id=u1")
            response = secure.getresponse()
            assert response.status == 200
            assert json.loads(response.read())["plan_id"] == "free"
        finally:
            secure.close()
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            plain = connect(process)
            try:
                plain.request("GET", "/v1/usage?user_id=u1")
                plain.getresponse().read()
            finally:
                plain.close()
    finally:
        process.close()
