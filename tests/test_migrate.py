"""`quotad migrate` brings a data directory that the format-3 release wrote
(tests/data/format3.tar.gz, made by tests/data/make_old_format.py) to this format: the same
state, the same audit trail, served by this server; the old data kept and never written."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from datetime import datetime
from pathlib import Path

import pytest

from quotad.engine.recovery import recover
from quotad.storage.wal import WriteAheadLog
from quotad_client import QuotaClient
from server_process import ROOT, ServerProcess

FIXTURE = ROOT / "tests" / "data" / "format3.tar.gz"
EXPECTED = json.loads((ROOT / "tests" / "data" / "format3.json").read_text())
COMMAND_TIMEOUT_S = 60


def _quotad(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quotad", *args], capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S, cwd=ROOT)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def old_dir(tmp_path: Path) -> Path:
    with tarfile.open(FIXTURE) as archive:
        archive.extractall(tmp_path, filter="data")
    return tmp_path / "data"


def test_this_server_refuses_format_3_naming_the_command_that_migrates_it(old_dir: Path):
    before = _digest(old_dir / "data.mdb")
    done = _quotad("serve", "--listen", "127.0.0.1:0", "--data-dir", str(old_dir))
    assert done.returncode == 2
    assert "format 3" in done.stderr and f"quotad migrate --data-dir {old_dir}" in done.stderr
    assert _digest(old_dir / "data.mdb") == before


def test_a_migrated_directory_holds_the_same_counters_and_every_record(old_dir: Path):
    old_bytes = _digest(old_dir / "data.mdb")
    done = _quotad("migrate", "--data-dir", str(old_dir))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["records"] == summary["last_sequence"] == 103
    assert 0 < summary["old_snapshot_sequence"] < summary["last_sequence"]  # both paths taken
    backup = Path(summary["old_data_kept_in"])
    assert _digest(backup / "data.mdb") == old_bytes  # read, never written
    assert json.loads(_quotad("verify", "--data-dir", str(old_dir)).stdout)["clean"]

    wal = WriteAheadLog(old_dir)
    try:
        core = recover(wal, repair=False)
        assert wal.first_sequence() == 1 and wal.last_sequence() == 103
    finally:
        wal.close()
    users = core.apps["default"].users
    assert sorted(users) == sorted(EXPECTED)
    for user_id, expected in EXPECTED.items():
        window = {group.key: group.window
                  for group in core.apps["default"].plans["pro"].limit_groups}
        for key, _quota, used, held, _remaining, window_start, _resets in expected["counters"]:
            counter = users[user_id].counters.get((key, window[key]))
            stored = (0, 0) if counter is None else (counter.used, counter.held)
            assert stored == (used, held), (user_id, key)
            if counter is not None:
                assert counter.window_start_ns == int(
                    datetime.fromisoformat(window_start).timestamp()) * 10**9


def test_this_server_serves_a_migrated_directory_with_its_whole_audit_trail(old_dir: Path):
    assert _quotad("migrate", "--data-dir", str(old_dir)).returncode == 0
    server = ServerProcess(old_dir, plans=None).start()
    try:
        with QuotaClient(server.address) as client:
            for user_id, expected in EXPECTED.items():
                events = [[e.sequence, e.time.isoformat(), e.kind, e.event_type, e.amount,
                           dict(e.metadata), e.reservation_id, e.allowed, e.limit_group_key,
                           e.threshold_percent] for e in client.iter_events(user_id)]
                # holds that expired while it was down expire at this start: after the old ones
                assert events[:len(expected["events"])] == expected["events"], user_id
                assert all(e[2] == "expire" for e in events[len(expected["events"]):])
            client.track("user-03", "openai.chat", 1)  # and it goes on from there
    finally:
        assert server.stop() == 0


def test_migrating_twice_or_over_a_kept_copy_is_refused_and_changes_nothing(old_dir: Path):
    assert _quotad("migrate", "--data-dir", str(old_dir)).returncode == 0
    again = _quotad("migrate", "--data-dir", str(old_dir))
    assert again.returncode == 2 and "already format 4" in again.stderr
    backup = old_dir.with_name("data.format3")
    restored = old_dir.with_name("restored")
    backup.rename(restored)
    restored.with_name("restored.format3").mkdir()
    refused = _quotad("migrate", "--data-dir", str(restored))
    assert refused.returncode == 2 and "exists" in refused.stderr
    assert (restored / "data.mdb").exists()
    assert not restored.with_name("restored.migrating").exists()
