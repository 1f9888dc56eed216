"""The tests' server: quotad.testing's, with the example plans and the state digest logged."""

from __future__ import annotations

from pathlib import Path

from quotad import testing
from quotad.testing import START_TIMEOUT_S, STOP_TIMEOUT_S

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PLANS = ROOT / "examples" / "plans.toml"

__all__ = ["EXAMPLE_PLANS", "ROOT", "START_TIMEOUT_S", "STOP_TIMEOUT_S", "ServerProcess"]


class ServerProcess(testing.ServerProcess):
    """One `quotad serve` process run from the repository, by default with the example plans
    and --log-state-digest. Its JSON log lines are collected in `log_lines`."""

    def __init__(self, data_dir: Path, *, plans: Path | None = EXAMPLE_PLANS,
                 extra_args: tuple[str, ...] = ("--log-state-digest",),
                 env: dict[str, str] | None = None) -> None:
        super().__init__(data_dir, plans=plans, extra_args=extra_args, env=env, cwd=ROOT)
