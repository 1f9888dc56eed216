"""The tests' etcd: quotad.cluster.etcd_process's, installed from Debian's package when it is
missing (deploy/install_etcd.sh, once per test run; skipped with the script's reason when
this machine cannot install it: not root, no apt-get)."""

from __future__ import annotations

import json
import shutil
import urllib.request

from quotad.cluster.etcd_process import ETCD_BINARY, EtcdProcess
from quotad.testing import run_install_script
from server_process import ROOT

INSTALL_SCRIPT = ROOT / "deploy" / "install_etcd.sh"
INSTALL_TIMEOUT_S = 900.0

__all__ = ["EtcdProcess", "compact", "install_etcd"]

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


def compact(endpoint: str, revision: int, timeout_s: float = 5.0) -> None:
    """etcd at endpoint ("HOST:PORT") forgets every change before revision: its compaction
    call, through its JSON gateway (a watch from an older revision is then refused)."""
    request = urllib.request.Request(f"http://{endpoint}/v3/kv/compaction",
                                     data=json.dumps({"revision": revision}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        assert response.status == 200, response.status
