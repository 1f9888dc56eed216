"""A plaintext client meeting a TLS server says so: the server may require TLS, and the
argument or flag that turns it on. One TLS server (a self-signed certificate) for the module."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import quotad_client as qc
from conftest import self_signed_certificate
from server_process import ServerProcess

CALL_TIMEOUT_S = 3.0
SUBPROCESS_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory) -> Iterator[tuple[ServerProcess, Path]]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = self_signed_certificate(folder)
    process = ServerProcess(folder / "data",
                            extra_args=("--tls-cert", str(cert), "--tls-key", str(key))).start()
    try:
        yield process, cert
    finally:
        process.close()


def assert_names_tls(error: qc.Unavailable) -> None:
    assert error.may_need_tls
    assert "requires TLS" in str(error) and "tls_root_cert=" in str(error)
    assert "tls=True" in str(error)


def test_the_sync_client_over_plaintext_says_the_server_may_require_tls(tls_server):
    process, cert = tls_server
    with qc.QuotaClient(process.address, timeout_s=CALL_TIMEOUT_S) as plaintext:
        with pytest.raises(qc.Unavailable) as refused:
            plaintext.list_plans()
        assert_names_tls(refused.value)
        with pytest.raises(qc.Unavailable) as refused:
            next(plaintext.watch_usage("user-42", reconnect=False))
        assert_names_tls(refused.value)
    with qc.QuotaClient(process.address, timeout_s=CALL_TIMEOUT_S,
                        tls_root_cert=cert.read_bytes()) as over_tls:
        assert {plan.id for plan in over_tls.list_plans()} == {"free", "pro"}


def test_the_asyncio_client_over_plaintext_says_the_server_may_require_tls(tls_server):
    process, _ = tls_server

    async def calls() -> list[BaseException]:
        async with qc.AsyncQuotaClient(process.address, timeout_s=CALL_TIMEOUT_S) as client:
            watch = client.watch_usage("user-42", reconnect=False)
            return await asyncio.gather(
                client.list_plans(),  # unary
                client.track("user-42", "openai.chat", 1),  # coalesced into a Batch
                watch.__anext__(), return_exceptions=True)

    for error in asyncio.run(calls()):
        assert isinstance(error, qc.Unavailable), error
        assert_names_tls(error)


def test_quotactl_over_plaintext_names_the_tls_flags(tls_server):
    process, cert = tls_server

    def quotactl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "quotad_client.ctl", "--target", process.address,
             "--timeout-s", str(CALL_TIMEOUT_S), *args, "plans", "list"],
            capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)

    plaintext = quotactl()
    assert plaintext.returncode == 2
    assert "requires TLS" in plaintext.stderr and "--tls-root-cert CA.pem" in plaintext.stderr
    assert "--tls " in plaintext.stderr and "tls_root_cert=" not in plaintext.stderr
    over_tls = quotactl("--tls-root-cert", str(cert))
    assert over_tls.returncode == 0, over_tls.stderr
    assert "requires TLS" not in over_tls.stderr
