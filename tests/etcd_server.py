"""The tests' etcd: quotad.cluster.etcd_process's, installed from Debian's package when it is
missing (deploy/install_etcd.sh, once per test run; skipped with the script's reason when
this machine cannot install it: not root, no apt-get)."""

from __future__ import annotations

import shutil

from quotad.cluster.etcd_process import ETCD_BINARY, EtcdProcess
from quotad.testing import run_install_script
from server_process import ROOT

INSTALL_SCRIPT = ROOT / "deploy" / "install_etcd.sh"
INSTALL_TIMEOUT_S = 900.0

__all__ = ["EtcdProcess", "install_etcd"]

_install_outcome: list[str | RuntimeError | None] = []


def install_etcd() -> str | None:
    """Makes etcd available: None once it is on PATH, else why it cannot be installed on this
    machine. RuntimeError when the install itself fails. Tried once per process."""
    if shutil.which(ETCD_BINARY) is not None:
        return None
    if not _install_outcome:
        _install_outcome.append(run_install_script(INSTALL_SCRIPT, ETCD_BINARY,
                                                   INSTALL_TIMEOUT_S))
    outcome = _install_outcome[0]
    if isinstance(outcome, RuntimeError):
        raise outcome
    return outcome
