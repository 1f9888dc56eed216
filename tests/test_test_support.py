"""quotad.testing, the server process shared by the tests and the bench, checked in a fresh
interpreter: it pulls in neither grpc nor the server, and the bench reaches it without
adding tests/ to sys.path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quotad import testing
from server_process import ROOT

SUBPROCESS_TIMEOUT_S = 60


def _run(program: str) -> dict:
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          check=True, timeout=SUBPROCESS_TIMEOUT_S, cwd=ROOT)
    return json.loads(done.stdout)


def test_the_test_support_module_imports_no_grpc_and_no_server():
    loaded = _run("import json, sys\n"
                  "import quotad.testing\n"
                  "print(json.dumps([m for m in ('grpc', 'lmdb', 'asyncio', 'quotad.server')\n"
                  "                  if m in sys.modules]))\n")
    assert loaded == []


def test_the_bench_gets_its_server_from_quotad_testing_not_from_tests():
    seen = _run("import json, sys\n"
                "before = list(sys.path)\n"
                "import bench.targets, bench.batch, bench.unary\n"
                "print(json.dumps({'path_changed': sys.path != before,\n"
                "                  'server_process': 'server_process' in sys.modules,\n"
                "                  'testing': 'quotad.testing' in sys.modules}))\n")
    assert seen == {"path_changed": False, "server_process": False, "testing": True}


def test_a_server_that_does_not_serve_in_time_is_killed_before_start_raises(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(testing, "START_TIMEOUT_S", 0.0)  # no time to serve: it must not live on
    server = testing.ServerProcess(tmp_path / "data")
    with pytest.raises(TimeoutError, match="no 'serving'"):
        server.start()
    assert server.process is not None and server.process.poll() is not None
