"""Starts and stops the real quotad server as a subprocess on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PLANS = ROOT / "examples" / "plans.toml"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


class ServerProcess:
    """One `quotad serve` process. Its JSON log lines are collected in `log_lines`."""

    def __init__(self, data_dir: Path, *, plans: Path | None = EXAMPLE_PLANS,
                 extra_args: tuple[str, ...] = ("--log-state-digest",),
                 env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.env = env
        self.plans = plans
        self.extra_args = extra_args
        self.process: subprocess.Popen[str] | None = None
        self.address = ""
        self.http_address = ""
        """HOST:PORT of the browser endpoint, when started with --http-listen."""
        self.log_lines: list[dict] = []
        self._reader: threading.Thread | None = None

    def start(self, listen: str = "127.0.0.1:0") -> "ServerProcess":
        args = [sys.executable, "-m", "quotad", "serve", "--listen", listen,
                "--data-dir", str(self.data_dir), *self.extra_args]
        if self.plans is not None:
            args += ["--plans", str(self.plans)]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                        env={**os.environ, **(self.env or {})})
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        serving = self.wait_for("serving", START_TIMEOUT_S)
        self.address, self.http_address = serving["address"], serving.get("http", "")
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
                self._reader and self._reader.join(timeout=5)
                for line in self.log_lines:
                    if line.get("message") == message:
                        return line
                raise RuntimeError(f"quotad exited ({self.process.returncode}) before "
                                   f"{message!r}: {self.log_lines[-5:]}")
            time.sleep(0.02)
        raise TimeoutError(f"no {message!r} from quotad within {timeout_s} s")

    def last(self, message: str) -> dict:
        return [line for line in self.log_lines if line.get("message") == message][-1]

    def stop(self) -> int:
        """SIGTERM, then the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self._wait()

    def kill(self) -> int:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        return self._wait()

    def _wait(self) -> int:
        assert self.process is not None
        code = self.process.wait(timeout=STOP_TIMEOUT_S)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)
