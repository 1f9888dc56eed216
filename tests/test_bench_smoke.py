"""The benchmark runs end to end (briefly), so that it cannot rot. Figures are not asserted."""

from __future__ import annotations

import subprocess
import sys

from server_process import ROOT


def test_the_unary_bench_runs_against_its_own_servers_and_prints_a_ratio():
    result = subprocess.run(
        [sys.executable, "-m", "bench.unary", "--seconds", "0.5", "--runs", "1",
         "--concurrency", "2", "--pairs"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    row = result.stdout.strip().splitlines()[-1].split("|")
    assert row[0].strip() == "2"
    assert float(row[1].split()[0]) > 0 and float(row[-1]) > 0
