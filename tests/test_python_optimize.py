"""python -O strips assert statements, the core's checks of its own invariants: quotad refuses
to run without them, before it touches its data directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

QUOTAD_SCRIPT = Path(sys.executable).parent / "quotad"


@pytest.mark.parametrize("how", ["python -O -m quotad", "PYTHONOPTIMIZE=1 quotad"])
@pytest.mark.parametrize("command", ["serve", "verify"])
def test_quotad_refuses_to_run_with_its_asserts_stripped(tmp_path: Path, how: str,
                                                        command: str) -> None:
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONOPTIMIZE"}
    if how.startswith("python"):
        program = [sys.executable, "-O", "-m", "quotad"]
    else:
        program, env["PYTHONOPTIMIZE"] = [str(QUOTAD_SCRIPT)], "1"
    arguments = [command, "--data-dir", str(data_dir)]
    if command == "serve":
        arguments += ["--listen", "127.0.0.1:0"]
    done = subprocess.run([*program, *arguments], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "sys.flags.optimize=1" in lines[0], done.stderr
    assert "python -O" in lines[0] and "asserts" in lines[0]
    assert not data_dir.exists()


def test_without_optimize_the_same_command_runs(tmp_path: Path) -> None:
    """The refusal is the flag's doing: the same verify runs (and finds no data there)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONOPTIMIZE"}
    done = subprocess.run([sys.executable, "-m", "quotad", "verify", "--data-dir",
                           str(tmp_path)], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=60)
    assert done.returncode == 2 and "holds no quotad data" in done.stderr
    assert "sys.flags.optimize" not in done.stderr

