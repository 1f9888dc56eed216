"""The tests' etcd: quotad.cluster.etcd_process's, installed from Debian's package when it is
missing (deploy/install_etcd.sh, once per test run; skipped with the script's reason when
this machine cannot install it: not root, no apt-get)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

from quotad.cluster.etcd_process import ETCD_BINARY, EtcdProcess
from server_process import ROOT

INSTALL_SCRIPT = ROOT / "deploy" / "install_etcd.sh"
INSTALL_TIMEOUT_S = 900.0
INSTALL_STOP_TIMEOUT_S = 30.0
CANNOT_INSTALL = 2

__all__ = ["EtcdProcess", "install_etcd"]

_install_outcome: list[str | RuntimeError | None] = []


def install_etcd() -> str | None:
    """Makes etcd available: None once it is on PATH, else why it cannot be installed on this
    machine. RuntimeError when the install itself fails. Tried once per process."""
    if shutil.which(ETCD_BINARY) is not None:
        return None
    if not _install_outcome:
        _install_outcome.append(_run_install_script())
    outcome = _install_outcome[0]
    if isinstance(outcome, RuntimeError):
        raise outcome
    return outcome


def _run_install_script() -> str | RuntimeError | None:
    # its own process group, so that a timeout stops apt-get and dpkg too, not only bash
    process = subprocess.Popen(["bash", str(INSTALL_SCRIPT)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=INSTALL_STOP_TIMEOUT_S)
        return RuntimeError(f"{INSTALL_SCRIPT.name} took over {INSTALL_TIMEOUT_S:g} s")
    if process.returncode == CANNOT_INSTALL:
        return stderr.strip() or "etcd cannot be installed here"
    if process.returncode != 0 or shutil.which(ETCD_BINARY) is None:
        return RuntimeError(f"{INSTALL_SCRIPT.name} failed ({process.returncode}): "
                            f"{stderr.strip()[-2000:]}")
    return None
