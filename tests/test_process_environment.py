"""Importing quotad leaves the importing process as it was; only the server's entry point
sets GRPC_ENABLE_FORK_SUPPORT, and before grpc is imported. Each check runs in a fresh
interpreter whose environment lacks the variable (this test process has it set)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server_process import ROOT

FORK_SUPPORT_ENV = "GRPC_ENABLE_FORK_SUPPORT"
SUBPROCESS_TIMEOUT_S = 60


def _fresh(program: str) -> dict:
    env = {name: value for name, value in os.environ.items() if name != FORK_SUPPORT_ENV}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          check=True, timeout=SUBPROCESS_TIMEOUT_S, cwd=ROOT, env=env)
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("modules", [
    ("quotad_client",), ("quotad.core",), ("quotad",), ("quotad.testing",),
    ("quotad_client", "quotad.core.machine", "quotad.server", "quotad_client.ctl"),
])
def test_importing_the_packages_leaves_the_environment_alone(modules: tuple[str, ...]):
    seen = _fresh("import json, os\n"
                  f"for name in {modules!r}: __import__(name)\n"
                  f"print(json.dumps(os.environ.get({FORK_SUPPORT_ENV!r})))\n")
    assert seen is None


def test_the_entry_point_sets_it_before_the_server_imports_grpc(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    seen = _fresh(
        "import json, os, sys\n"
        "from quotad.cli import main\n"
        "imported = 'grpc' in sys.modules\n"
        f"code = main(['verify', '--data-dir', {str(empty)!r}])\n"
        "print(json.dumps({'grpc_on_import': imported, 'code': code,\n"
        f"                  'value': os.environ.get({FORK_SUPPORT_ENV!r})}}))\n")
    assert seen == {"grpc_on_import": False, "code": 2, "value": "false"}
