"""`quotad health`: exit 0 when a real server answers SERVING over grpc.health.v1, 1 with a
clear message when nothing serves there (the container and orchestrator checks rely on it)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import self_signed_certificate
from server_process import ServerProcess

COMMAND_TIMEOUT_S = 60.0


def quotad_health(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quotad", "health", *args], capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    """One server with TLS (a self-signed certificate for 127.0.0.1) for the whole module."""
    folder = tmp_path_factory.mktemp("health")
    cert, key = self_signed_certificate(folder)
    process = ServerProcess(folder / "data",
                            extra_args=("--tls-cert", str(cert), "--tls-key", str(key))).start()
    try:
        yield process, cert
    finally:
        process.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound by no listener: connections to it are refused."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield bound.getsockname()[1]


def test_health_exits_0_and_says_serving_for_a_serving_server(tls_server):
    server, cert = tls_server
    done = quotad_health("--target", server.address, "--tls-root-cert", str(cert))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"quotad health: {server.address} is SERVING"


def test_health_exits_1_naming_the_target_when_nothing_listens(closed_port: int):
    target = f"127.0.0.1:{closed_port}"
    done = quotad_health("--target", target, "--timeout-s", "5")
    assert done.returncode == 1
    assert f"no answer from {target}" in done.stderr and "UNAVAILABLE" in done.stderr


def test_health_exits_1_when_the_server_speaks_tls_and_the_check_plaintext(tls_server):
    server, _ = tls_server
    done = quotad_health("--target", server.address, "--timeout-s", "5")
    assert done.returncode == 1
    assert f"no answer from {server.address}" in done.stderr


def test_health_exits_1_for_an_unreadable_root_certificate(tmp_path: Path):
    done = quotad_health("--tls-root-cert", str(tmp_path / "missing.pem"))
    assert done.returncode == 1
    assert "--tls-root-cert" in done.stderr


def test_health_help_names_its_flags_and_exit_codes():
    done = quotad_health("--help")
    assert done.returncode == 0
    for flag in ("--target", "--tls-root-cert", "--timeout-s"):
        assert flag in done.stdout
    assert "exits 0 when it is SERVING, 1 otherwise" in " ".join(done.stdout.split())
