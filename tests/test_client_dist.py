"""quotad-client, installed alone into a fresh venv the way a user would (`pip install
./client`), brings none of the server with it and still reserves and commits against a real
server; `quotactl` comes with it.

The client is built from a copy of client/ and protos/ without the generated stubs, so the
build itself must make them from the .proto."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server_process import ROOT, ServerProcess

INSTALL_TIMEOUT_S = 600.0
SERVER_ONLY = ("quotad", "lmdb", "grpc_tools", "prometheus_client", "h11")
SERVER_ONLY_DISTRIBUTIONS = ("quotad", "lmdb", "grpcio-tools", "prometheus-client", "h11")


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A fresh venv holding quotad-client and what it depends on, nothing else."""
    work = tmp_path_factory.mktemp("client-dist")
    shutil.copytree(ROOT / "protos", work / "protos")
    shutil.copytree(ROOT / "client", work / "client", ignore=shutil.ignore_patterns(
        "*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py", "__pycache__", "build", "*.egg-info"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                   timeout=INSTALL_TIMEOUT_S)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(work / "client")],
                   check=True, capture_output=True, text=True, cwd=work,
                   timeout=INSTALL_TIMEOUT_S)
    return venv


def run_python(venv: Path, program: str, *args: str) -> str:
    done = subprocess.run([str(venv / "bin" / "python"), "-c", program, *args],
                          capture_output=True, text=True, cwd=venv, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_client_alone_installs_none_of_the_server(client_venv: Path):
    found = json.loads(run_python(client_venv, (
        "import importlib.metadata as md, importlib.util, json, sys\n"
        f"modules = [m for m in {SERVER_ONLY!r} if importlib.util.find_spec(m)]\n"
        "names = {d.metadata['Name'].lower() for d in md.distributions()}\n"
        f"dists = [d for d in {SERVER_ONLY_DISTRIBUTIONS!r} if d in names]\n"
        "print(json.dumps({'modules': modules, 'distributions': dists,\n"
        "                  'client': 'quotad-client' in names}))\n")))
    assert found == {"modules": [], "distributions": [], "client": True}


def test_the_client_alone_reserves_and_commits_against_a_server(client_venv: Path, tmp_path):
    server = ServerProcess(tmp_path / "data").start()
    try:
        out = run_python(client_venv, (
            "import sys\n"
            "from quotad_client import QuotaClient\n"
            "with QuotaClient(sys.argv[1]) as client:\n"
            "    client.subscribe('dist-user', 'pro', time_zone='Europe/Paris')\n"
            "    hold = client.reserve('dist-user', 'openai.chat', 100,\n"
            "                          metadata={'model': 'gpt-4o'})\n"
            "    client.commit(hold.reservation_id, 40)\n"
            "    print(max(c.used for c in client.usage('dist-user').counters))\n"),
            server.address)
    finally:
        server.close()
    assert out.strip() == "40"


def test_quotactl_comes_with_the_client(client_venv: Path):
    done = subprocess.run([str(client_venv / "bin" / "quotactl"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: quotactl")
