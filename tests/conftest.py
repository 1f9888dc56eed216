from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from server_process import ServerProcess

# As the quotad package sets it, before any test module imports grpc: the writer tests fork
# snapshot children from this process.
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
