"""The tests' server: quotad.testing's, with the example plans and the state digest logged."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from quotad import testing
from quotad.testing import START_TIMEOUT_S, STOP_TIMEOUT_S

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PLANS = ROOT / "examples" / "plans.toml"
STOP_LOG_LINES_SHOWN = 10

__all__ = ["EXAMPLE_PLANS", "ROOT", "START_TIMEOUT_S", "STOP_TIMEOUT_S", "ServerProcess",
           "bench_module", "refused_serve"]


def bench_module(name: str) -> ModuleType:
    """bench.<name>, imported from the checkout (the bench is not an installed package)."""
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module(f"bench.{name}")
    finally:
        sys.path.remove(str(ROOT))


def refused_serve(data_dir: Path, *flags: str) -> str:
    """`quotad serve` with these flags, which must refuse them: exit 2, a message and no
    traceback on stderr (returned), nothing made at data_dir."""
    refused = subprocess.run(
        [sys.executable, "-m", "quotad", "serve", "--data-dir", str(data_dir),
         "--listen", "127.0.0.1:0", *flags],
        capture_output=True, text=True, timeout=START_TIMEOUT_S, cwd=ROOT)
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    assert not data_dir.exists()  # refused before anything was made
    return refused.stderr


class ServerProcess(testing.ServerProcess):
    """One `quotad serve` process run from the repository, by default with the example plans
    and --log-state-digest. Its JSON log lines are collected in `log_lines`."""

    def __init__(self, data_dir: Path, *, plans: Path | None = EXAMPLE_PLANS,
                 extra_args: tuple[str, ...] = ("--log-state-digest",),
                 env: dict[str, str] | None = None) -> None:
        super().__init__(data_dir, plans=plans, extra_args=extra_args, env=env, cwd=ROOT)

    def stop(self) -> int:
        """SIGTERM, then the exit code; when it is not 0, the server's last log lines are
        printed, so that the failing test shows why it exited so."""
        code = super().stop()
        if code != 0:
            for line in self.log_lines[-STOP_LOG_LINES_SHOWN:]:
                print(json.dumps(line), file=sys.stderr)
        return code
