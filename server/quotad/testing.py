"""A real quotad server in a child process, for tests and benchmarks.

    server = ServerProcess(Path("some-dir") / "data").start()   # a free loopback port
    ... QuotaClient(server.address) ...
    server.stop()   # SIGTERM; the exit code

The server is `python -m quotad serve` with this interpreter; its JSON log lines (stderr) are
collected in `log_lines` as they come. Every wait is bounded by a timeout. Standard library
only: importing this module imports neither grpc nor the server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
LOG_POLL_INTERVAL_S = 0.02
READER_JOIN_TIMEOUT_S = 5.0


class ServerProcess:
    """One `quotad serve` process. Its JSON log lines are collected in `log_lines`."""

    def __init__(self, data_dir: Path, *, plans: Path | None = None,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.data_dir = data_dir
        self.env = env
        """Set in the server's environment, over this process's own."""
        self.plans = plans
        self.extra_args = extra_args
        self.cwd = cwd
        """The server's working directory (None: this process's)."""
        self.process: subprocess.Popen[str] | None = None
        self.address = ""
        self.http_address = ""
        """HOST:PORT of the browser endpoint, when started with --http-listen."""
        self.log_lines: list[dict] = []
        self._reader: threading.Thread | None = None

    def start(self, listen: str = "127.0.0.1:0") -> Self:
        """Starts the server and waits until it serves (its "serving" log line); one that
        does not serve in time is killed before the error is raised."""
        self.launch(listen)
        try:
            serving = self.wait_for("serving", START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        self.address, self.http_address = serving["address"], serving.get("http", "")
        return self

    def launch(self, listen: str = "127.0.0.1:0") -> Self:
        """Starts the server without waiting for it to serve (wait_for what it should log)."""
        args = [sys.executable, "-m", "quotad", "serve", "--listen", listen,
                "--data-dir", str(self.data_dir), *self.extra_args]
        if self.plans is not None:
            args += ["--plans", str(self.plans)]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, cwd=self.cwd,
                                        env={**os.environ, **(self.env or {})})
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        return self

    def _read_log(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            try:
                self.log_lines.append(json.loads(line))
            except json.JSONDecodeError:
                self.log_lines.append({"message": line.rstrip("\n"), "raw": True})

    def wait_for(self, message: str, timeout_s: float) -> dict:
        """The first log line with this message, waiting at most timeout_s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.log_lines):
                if line.get("message") == message:
                    return line
            if self.process is not None and self.process.poll() is not None:
                if self._reader is not None:
                    self._reader.join(timeout=READER_JOIN_TIMEOUT_S)
                for line in self.log_lines:
                    if line.get("message") == message:
                        return line
                raise RuntimeError(f"quotad exited ({self.process.returncode}) before "
                                   f"{message!r}: {self.log_lines[-5:]}")
            time.sleep(LOG_POLL_INTERVAL_S)
        raise TimeoutError(f"no {message!r} from quotad within {timeout_s} s")

    def last(self, message: str) -> dict:
        """The latest log line with this message (IndexError if none)."""
        return [line for line in self.log_lines if line.get("message") == message][-1]

    def stop(self) -> int:
        """SIGTERM, then the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self._wait()

    def kill(self) -> int:
        """SIGKILL, then the exit code."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        return self._wait()

    def _wait(self) -> int:
        assert self.process is not None
        code = self.process.wait(timeout=STOP_TIMEOUT_S)
        if self._reader is not None:
            self._reader.join(timeout=READER_JOIN_TIMEOUT_S)
        return code

    def close(self) -> None:
        """Kills the server if it still runs; safe to call more than once."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)


INSTALL_CANNOT_EXIT_CODE = 2
"""The exit code of deploy/install_debian_package.sh (and its wrappers) when this machine
cannot install: not root, or no apt-get."""
INSTALL_STOP_TIMEOUT_S = 30.0


def run_install_script(script: Path, program: str,
                       timeout_s: float) -> str | RuntimeError | None:
    """Runs an install script (deploy/install_etcd.sh, bench/install_redis.sh): None once
    `program` is on PATH, the script's reason when this machine cannot install it (the caller
    skips), a RuntimeError when the install failed or took over timeout_s. The script runs in
    its own process group, so that a timeout stops apt-get and dpkg too, not only bash."""
    process = subprocess.Popen(["bash", str(script)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=INSTALL_STOP_TIMEOUT_S)
        return RuntimeError(f"{script.name} took over {timeout_s:g} s")
    if process.returncode == INSTALL_CANNOT_EXIT_CODE:
        return stderr.strip() or f"{program} cannot be installed here"
    if process.returncode != 0 or shutil.which(program) is None:
        return RuntimeError(f"{script.name} failed ({process.returncode}): "
                            f"{stderr.strip()[-2000:]}")
    return None
