"""A real etcd in a child process, on loopback: for `quotad cluster up` and the tests.

    etcd = EtcdProcess(Path("cluster") / "etcd").start()   # free loopback ports
    ... etcd.endpoint ("127.0.0.1:PORT") ...
    etcd.stop()   # SIGTERM, then SIGKILL past STOP_TIMEOUT_S; the exit code

One member, its own data directory, its client and peer URLs on 127.0.0.1 only. Every wait
is bounded. Standard library only.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Self

ETCD_BINARY = "etcd"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
HEALTH_POLL_INTERVAL_S = 0.05
HEALTH_REQUEST_TIMEOUT_S = 1.0
MEMBER_NAME = "quotad-etcd"
INSTALL_HINT = ("etcd is not on PATH: install it (Debian: apt-get install etcd-server, or "
                "deploy/install_etcd.sh from quotad's repository)")


EPHEMERAL_PORTS_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
EPHEMERAL_PORTS_FIRST_DEFAULT = 32768
"""Linux's first ephemeral port unless EPHEMERAL_PORTS_FILE says otherwise."""
PICKED_PORTS_MIN = 1000
"""Ports below the ephemeral ones that free_ports needs (else it takes the OS's picks)."""
PORT_PICK_TRIES_MAX = 1000
"""Binds free_ports tries before it gives up (OSError): each failed one a port in use."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (free until someone else binds it: see free_ports)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """count different ports nothing listens on now, for servers that are told their port
    before they start (a cluster's map names them). Picked at random below the kernel's
    ephemeral ports, which it hands to every outgoing connection and every bind to port 0:
    a port from among those could be taken by any of them before its server binds it (a
    test's cluster lost its third shard's port so). Each probe stays bound until all are
    picked, so no port is picked twice."""
    candidates = range(1024, _first_ephemeral_port())
    below = len(candidates) >= PICKED_PORTS_MIN  # else an unusual range: the OS's picks
    probes: list[socket.socket] = []
    tries = 0
    try:
        while len(probes) < count:
            if tries == PORT_PICK_TRIES_MAX:
                raise OSError(f"found {len(probes)} of {count} free ports below "
                              f"{candidates.stop} in {PORT_PICK_TRIES_MAX} tries")
            tries += 1
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probes.append(probe)
            try:
                probe.bind((host, random.choice(candidates) if below else 0))
            except OSError:  # in use, or picked already: another
                probes.pop().close()
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _first_ephemeral_port() -> int:
    try:
        return int(EPHEMERAL_PORTS_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return EPHEMERAL_PORTS_FIRST_DEFAULT


class EtcdProcess:
    """One etcd member on 127.0.0.1. Port 0 (the default) picks a free one."""

    def __init__(self, data_dir: Path, *, client_port: int = 0, peer_port: int = 0,
                 log_path: Path | None = None) -> None:
        self.data_dir = data_dir
        picked = iter(free_ports(2))
        self.client_port = client_port or next(picked)
        self.peer_port = peer_port or next(picked)
        self.log_path = log_path if log_path is not None else data_dir.parent / "etcd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """HOST:PORT of its client URL (what an etcd:// target names)."""
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> Self:
        """Starts etcd and waits until /health answers true; RuntimeError naming why not."""
        binary = shutil.which(ETCD_BINARY)
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)  # etcd refuses a data directory others may read
        client_url = f"http://127.0.0.1:{self.client_port}"
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        args = [binary, "--name", MEMBER_NAME, "--data-dir", str(self.data_dir),
                "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
                "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", f"{MEMBER_NAME}={peer_url}",
                "--initial-cluster-state", "new", "--logger", "zap", "--log-outputs", "stderr"]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 -- closed in _wait
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=self._log, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self._wait()
                raise RuntimeError(f"etcd exited ({code}) while starting; see {self.log_path}")
            if self.healthy():
                return self
            time.sleep(HEALTH_POLL_INTERVAL_S)
        self.kill()
        raise RuntimeError(f"etcd did not become healthy within {START_TIMEOUT_S:g} s; "
                           f"see {self.log_path}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health",
                                        timeout=HEALTH_REQUEST_TIMEOUT_S) as response:
                return b'"health":"true"' in response.read()
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> int:
        """SIGTERM (SIGKILL past STOP_TIMEOUT_S), then the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self._wait()

    def kill(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.kill()
        return self._wait()

    def _wait(self) -> int:
        assert self.process is not None
        try:
            code = self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=STOP_TIMEOUT_S)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def close(self) -> None:
        """Kills etcd if it still runs; safe to call more than once."""
        if self.process is not None and self.process.poll() is None:
            self.kill()
