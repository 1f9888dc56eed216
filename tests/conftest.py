from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from server_process import ServerProcess

# As the server's entry point (quotad.cli.main) sets it, before any test module imports grpc:
# the writer tests fork snapshot children from this process.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real quotad process with the example plans, on its own data directory."""
    process = ServerProcess(tmp_path / "data").start()
    try:
        yield process
    finally:
        process.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    """Starts servers on demand (restarts included) and kills what is left at the end."""
    started: list[ServerProcess] = []

    def start(data_dir: Path | None = None, listen: str = "127.0.0.1:0",
              **kwargs) -> ServerProcess:
        process = ServerProcess(data_dir or tmp_path / "data", **kwargs)
        started.append(process)
        return process.start(listen)

    yield start
    for process in started:
        process.close()


OPENSSL_TIMEOUT_S = 30.0


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key (openssl CLI),
    written in folder."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=OPENSSL_TIMEOUT_S)
    return cert, key


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A real etcd on free loopback ports with its own data directory, for a module's tests
    (installed from Debian's package when missing; see etcd_server.py)."""
    from etcd_server import EtcdProcess, install_etcd

    why = install_etcd()
    if why is not None:
        pytest.skip(why)
    process = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data").start()
    try:
        yield process
    finally:
        process.stop()
        process.close()
