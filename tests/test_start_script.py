"""`./start`, the README's first command: it installs into .venv only when what an install
depends on changed, so a second start serves at once.

Each test runs the real script on a copy of what it reads (pyproject.toml, protos/, the build
backend) with a .venv whose python is this one and whose pip and quotad only write down how
they were called (pip also writes the stubs, as the build would): no install really happens,
and none is needed to see when one would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server_process import ROOT

SCRIPT_TIMEOUT_S = 60.0
INSTALL_INPUTS = ("pyproject.toml", "setup.py", "server/quotad_build.py",
                  "server/quotad/protogen.py", "client/pyproject.toml",
                  "client/quotad_client_build.py", "client/quotad_client", "client/quotad_contract",
                  "protos")
GENERATED = ("client/quotad_contract/v1/quotad_pb2.py", "server/quotad/storage/log_pb2.py")


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    for name in ("start", *INSTALL_INPUTS):
        source, copy = ROOT / name, tmp_path / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, copy)
    for name in GENERATED:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("# generated\n")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    calls = tmp_path / "calls"
    builds = "".join(f'touch "{tmp_path / name}"\n' for name in GENERATED)  # as the build does
    for tool, does in (("pip", builds), ("quotad", "")):
        (bin_dir / tool).write_text(
            f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\n'
            f'[ -z "${{FAIL_{tool.upper()}:-}}" ] || exit 1\n{does}')
        (bin_dir / tool).chmod(0o755)
    return tmp_path


def start(checkout: Path, *args: str, **env: str) -> list[str]:
    """Runs ./start from another folder; the calls it made to pip and quotad."""
    calls = checkout / "calls"
    calls.unlink(missing_ok=True)
    done = subprocess.run([str(checkout / "start"), *args], cwd=checkout.parent,
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S)
    made = calls.read_text().splitlines() if calls.exists() else []
    return [f"exit {done.returncode}", *made]


def test_the_first_start_installs_and_a_second_serves_without_installing(checkout):
    assert start(checkout, "--plans", "examples/plans.toml") == [
        "exit 0", f"pip install -q -e {checkout}", "quotad serve --plans examples/plans.toml"]
    assert start(checkout, "--listen", "127.0.0.1:0") == [
        "exit 0", "quotad serve --listen 127.0.0.1:0"]


@pytest.mark.parametrize("change", ["a changed proto", "a new proto", "a changed pyproject",
                                    "a changed build backend", "a changed setup.py",
                                    "a changed client module", "a changed client pyproject",
                                    "stubs deleted"])
def test_a_start_after_what_an_install_depends_on_changed_installs_again(checkout, change):
    start(checkout)
    if change == "a changed proto":
        with (checkout / "protos/quotad/v1/quotad.proto").open("a") as proto:
            proto.write("// one more line\n")
    elif change == "a new proto":
        (checkout / "protos/quotad/v1/more.proto").write_text('syntax = "proto3";\n')
    elif change == "a changed pyproject":
        with (checkout / "pyproject.toml").open("a") as pyproject:
            pyproject.write("\n")
    elif change == "a changed build backend":
        with (checkout / "server/quotad_build.py").open("a") as backend:
            backend.write("\n")
    elif change in ("a changed setup.py", "a changed client module",
                    "a changed client pyproject"):
        name = {"a changed setup.py": "setup.py", "a changed client module":
                "client/quotad_client/ctl.py", "a changed client pyproject":
                "client/pyproject.toml"}[change]
        with (checkout / name).open("a") as changed:
            changed.write("\n")
    else:
        (checkout / GENERATED[0]).unlink()
    assert start(checkout) == ["exit 0", f"pip install -q -e {checkout}", "quotad serve"]
    assert start(checkout) == ["exit 0", "quotad serve"]


def test_a_generated_stub_changing_installs_nothing_again(checkout):
    start(checkout)
    (checkout / "client/quotad_contract/v1/quotad_pb2_grpc.py").write_text("# regenerated\n")
    assert start(checkout) == ["exit 0", "quotad serve"]


def test_a_failed_install_does_not_serve_and_the_next_start_installs_again(checkout):
    assert start(checkout, FAIL_PIP="1") == ["exit 1", f"pip install -q -e {checkout}"]
    assert start(checkout) == ["exit 0", f"pip install -q -e {checkout}", "quotad serve"]


def test_the_readme_starts_the_server_with_the_script():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [line.strip() for line in readme.splitlines() if line.startswith("    ")]
    assert commands[0] == "./start --plans examples/plans.toml"
