"""`quotad migrate` brings a data directory that the format-3, 4, 5 or 6 release wrote
(tests/data/formatN.tar.gz, made by tests/data/make_old_format.py with that release) to this
format: the same state, the same audit trail and first answers, served by this server; the old
data kept and never written."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from datetime import datetime
from pathlib import Path

import lmdb
import pytest

from quotad.engine.recovery import durable_idempotency, recover
from quotad.storage import log_pb2
from quotad.storage.codec import (
    decode_event, decode_record, event_tail, hold_row_key, idempotency_row_key, key_sequence,
)
from quotad.storage.wal import EVENTS_INDEXED_THROUGH_KEY, FORMAT_VERSION, WriteAheadLog
from quotad_client import QuotaClient
from server_process import ROOT, ServerProcess

DATA = ROOT / "tests" / "data"
OLD_FORMATS = ("3", "4", "5", "6")
EXPECTED = {old: json.loads((DATA / f"format{old}.json").read_text()) for old in OLD_FORMATS}
COMMAND_TIMEOUT_S = 60


def _quotad(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quotad", *args], capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S, cwd=ROOT)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(params=OLD_FORMATS)
def old_format(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def old_dir(tmp_path: Path, old_format: str) -> Path:
    with tarfile.open(DATA / f"format{old_format}.tar.gz") as archive:
        archive.extractall(tmp_path, filter="data")
    return tmp_path / "data"


def test_this_server_refuses_an_old_format_naming_the_command_that_migrates_it(
        old_dir: Path, old_format: str):
    before = _digest(old_dir / "data.mdb")
    done = _quotad("serve", "--listen", "127.0.0.1:0", "--data-dir", str(old_dir))
    assert done.returncode == 2
    assert f"format {old_format}" in done.stderr
    assert f"quotad migrate --data-dir {old_dir}" in done.stderr
    assert _digest(old_dir / "data.mdb") == before


def test_a_migrated_directory_holds_the_same_counters_and_every_record(old_dir: Path,
                                                                       old_format: str):
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
    assert sorted(users) == sorted(EXPECTED[old_format])
    for user_id, expected in EXPECTED[old_format].items():
        window = {group.key: group.window
                  for group in core.apps["default"].plans["pro"].limit_groups}
        for key, _quota, used, held, _remaining, window_start, _resets in expected["counters"]:
            counter = users[user_id].counter(key, window[key])
            stored = (0, 0) if counter is None else (counter.used, counter.held)
            assert stored == (used, held), (user_id, key)
            if counter is not None:
                assert counter.window_start_ns == int(
                    datetime.fromisoformat(window_start).timestamp()) * 10**9


def test_this_server_serves_a_migrated_directory_with_its_whole_audit_trail(old_dir: Path,
                                                                          old_format: str):
    assert _quotad("migrate", "--data-dir", str(old_dir)).returncode == 0
    server = ServerProcess(old_dir, plans=None, extra_args=KEEP_THE_FIXTURES).start()
    try:
        with QuotaClient(server.address) as client:
            for user_id, expected in EXPECTED[old_format].items():
                events = [[e.sequence, e.time.isoformat(), e.kind, e.event_type, e.amount,
                           dict(e.metadata), e.reservation_id, e.allowed, e.limit_group_key,
                           e.threshold_percent] for e in client.iter_events(user_id)]
                # holds that expired while it was down expire at this start: after the old ones
                assert events[:len(expected["events"])] == expected["events"], user_id
                assert all(e[2] == "expire" for e in events[len(expected["events"]):])
            client.track("user-03", "openai.chat", 1)  # and it goes on from there
    finally:
        assert server.stop() == 0


def test_its_help_names_the_formats_it_migrates_from_and_to():
    shown = " ".join(_quotad("migrate", "--help").stdout.split())
    formats = " ".join(OLD_FORMATS[:-1]).replace(" ", ", ") + f" or {OLD_FORMATS[-1]}"
    assert f"format {formats} in this server's format ({FORMAT_VERSION.decode()})" in shown


def test_migrating_twice_or_over_a_kept_copy_is_refused_and_changes_nothing(old_dir: Path,
                                                                           old_format: str):
    assert _quotad("migrate", "--data-dir", str(old_dir)).returncode == 0
    again = _quotad("migrate", "--data-dir", str(old_dir))
    assert again.returncode == 2 and "already format 7" in again.stderr
    backup = old_dir.with_name(f"data.format{old_format}")
    restored = old_dir.with_name("restored")
    backup.rename(restored)
    restored.with_name(f"restored.format{old_format}").mkdir()
    refused = _quotad("migrate", "--data-dir", str(restored))
    assert refused.returncode == 2 and "exists" in refused.stderr
    assert (restored / "data.mdb").exists()
    assert not restored.with_name("restored.migrating").exists()


KEEP_THE_FIXTURES = ("--audit-retention-days", "36500")
"""The fixtures were made once, on a day that recedes: a server prunes what is past its audit
retention as it starts, so the servers here keep every record, whatever the fixture's age."""


def _migrated(tmp_path: Path, old_format: str) -> tuple[lmdb.Environment, WriteAheadLog]:
    """The fixture of that format migrated in tmp_path/data: the old data (read-only) and
    the new log."""
    with tarfile.open(DATA / f"format{old_format}.tar.gz") as archive:
        archive.extractall(tmp_path, filter="data")
    assert _quotad("migrate", "--data-dir", str(tmp_path / "data")).returncode == 0
    return (lmdb.open(str(tmp_path / f"data.format{old_format}"), readonly=True, lock=False,
                      max_dbs=8), WriteAheadLog(tmp_path / "data"))


def test_from_format_4_every_record_keeps_its_command_answer_and_events(tmp_path: Path):
    old, new = _migrated(tmp_path, "4")
    try:
        with old.begin(buffers=False) as txn:
            tables = {name: old.open_db(name.encode(), txn=txn, create=False)
                      for name in ("log", "events", "holds", "idempotency", "snapshot")}
            old_records = [decode_record(key, value)
                           for key, value in txn.cursor(db=tables["log"])]
            old_index = dict(txn.cursor(db=tables["events"]))  # user, time, sequence, index
            old_rows = {name: dict(txn.cursor(db=tables[name]))
                        for name in ("holds", "idempotency", "snapshot")}
        migrated = list(new.records())
        assert [(r.sequence, r.now_ns, r.command, r.event_users, r.answer)
                for r in migrated] == [(r.sequence, r.now_ns, r.command, r.event_users, r.answer)
                                       for r in old_records]
        assert sum(r.answer is not None for r in migrated) > 30  # keyed calls' first answers
        with new.env.begin(buffers=False) as txn:
            index = {user + tail for user, tail in txn.cursor(db=new.event_index_db)}
            assert index == set(old_index) and len(index) > 80
            assert dict(txn.cursor(db=new.snapshot_db)) == old_rows["snapshot"]
            assert dict(txn.cursor(db=new.holds_db)) == {  # filed under the time first
                hold_row_key(key): value for key, value in old_rows["holds"].items()}
            assert dict(txn.cursor(db=new.idempotency_db)) == _filed_anew(
                old_rows["idempotency"], old_records)
            for key, value in txn.cursor(db=new.log_db):
                record = decode_record(key, value, with_events=True)
                app = getattr(record.command, "app", "")
                assert list(record.events) == [
                    decode_event(log_pb2.Event.FromString(old_index[
                        user.to_bytes(4, "big") + event_tail(record.now_ns, record.sequence, i)]),
                        app, "", lambda: record.command)
                    for i, user in enumerate(record.event_users)]
    finally:
        new.close()
        old.close()


def _filed_anew(old_rows: dict[bytes, bytes], records: list) -> dict[bytes, bytes]:
    """The old idempotency rows under this format's keys: each the key of its record's key."""
    by_sequence = {record.sequence: record.command for record in records}
    rows = {}
    for sequence_key in old_rows.values():
        command = by_sequence[key_sequence(sequence_key)]
        rows[idempotency_row_key(command.app, type(command).__name__,
                                 command.idempotency_key)] = sequence_key
    return rows


def test_from_format_5_every_table_is_copied_and_every_key_filed_anew(tmp_path: Path):
    old, new = _migrated(tmp_path, "5")
    try:
        with old.begin(buffers=False) as txn, new.env.begin(buffers=False) as new_txn:
            for name, db in (("log", new.log_db), ("snapshot", new.snapshot_db),
                             ("shapes", new.shapes_db)):
                old_db = old.open_db(name.encode(), txn=txn, create=False)
                assert list(new_txn.cursor(db=db)) == list(txn.cursor(db=old_db)), name
            old_holds = dict(txn.cursor(db=old.open_db(b"holds", txn=txn, create=False)))
            assert len(old_holds) > 5
            assert dict(new_txn.cursor(db=new.holds_db)) == {
                hold_row_key(key): value for key, value in old_holds.items()}
            old_index = old.open_db(b"event_index", txn=txn, create=False, dupsort=True,
                                    dupfixed=True)
            assert list(new_txn.cursor(db=new.event_index_db)) == list(txn.cursor(
                db=old_index))
            old_rows = dict(txn.cursor(db=old.open_db(b"idempotency", txn=txn, create=False)))
            records = [decode_record(key, value) for key, value in txn.cursor(
                db=old.open_db(b"log", txn=txn, create=False))]
            assert len(old_rows) > 30  # keyed calls: the fixture's own keys and the client's
            assert any(row.startswith(bytes(6)) for row in dict(new_txn.cursor(
                db=new.idempotency_db)))
            assert dict(new_txn.cursor(db=new.idempotency_db)) == _filed_anew(old_rows, records)
    finally:
        new.close()
        old.close()
    first = next(record for record in records if type(record.command).__name__ == "Reserve"
                 and record.command.idempotency_key == "r-4")
    wal = WriteAheadLog(tmp_path / "data")  # a repeat's lookup finds the key's first record
    try:  # (the server's core asks it; a live repeat would be new once the fixture is 24 h old)
        found = durable_idempotency(wal)("default", "Reserve", "r-4", wal.last_sequence())
        assert found is not None and found.created_at_ns == first.now_ns
        assert found.request == first.command  # and its first answer, counters and all:
        assert found.result.allowed and found.result.reservation_id == first.command.reservation_id
        assert [counter.key for counter in found.result.counters] == ["tokens"]
    finally:
        wal.close()
    server = ServerProcess(tmp_path / "data", plans=None,  # and the directory serves
                           extra_args=KEEP_THE_FIXTURES).start()
    try:
        with QuotaClient(server.address) as client:
            assert client.usage("user-04").counters
    finally:
        assert server.stop() == 0


def test_from_format_6_every_table_is_copied_and_the_index_holds_every_record(
        tmp_path: Path):
    old, new = _migrated(tmp_path, "6")
    try:
        with old.begin(buffers=False) as txn, new.env.begin(buffers=False) as new_txn:
            for name, db in (("log", new.log_db), ("snapshot", new.snapshot_db),
                             ("shapes", new.shapes_db), ("holds", new.holds_db),
                             ("idempotency", new.idempotency_db)):
                old_db = old.open_db(name.encode(), txn=txn, create=False)
                rows = list(txn.cursor(db=old_db))
                assert list(new_txn.cursor(db=db)) == rows and rows, name
            old_index = old.open_db(b"event_index", txn=txn, create=False, dupsort=True,
                                    dupfixed=True)
            assert list(new_txn.cursor(db=new.event_index_db)) == list(txn.cursor(
                db=old_index))
            through = new_txn.get(EVENTS_INDEXED_THROUGH_KEY, db=new.meta_db)
            assert key_sequence(through) == new.last_sequence_in(new_txn) > 0
    finally:
        new.close()
        old.close()
