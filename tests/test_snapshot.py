"""A snapshot holds the whole core: restoring it, then applying the same commands, gives the
same records and the same state as never having stopped. What cannot be read back whole is
refused, naming the snapshot and what is wrong, never loaded in part."""

from __future__ import annotations

import array
import contextlib
import json
import subprocess
import sys
import tarfile
import zlib
from datetime import datetime
from pathlib import Path

import pytest

from core_helpers import T0, Harness, digest, group, plan
from quotad.core import limits
from quotad.core.commands import ForgetSlots, GrantCredits, UpsertSubscription
from quotad.core.machine import Core
from quotad.core.plans import Cost, Kind, RecurringGrant, Window
from quotad.core.values import replace
from quotad.engine.recovery import recover
from quotad.storage import snapshot_child, snapshot_pb2
from quotad.storage.codec import state_digest
from quotad.storage.snapshot import (
    FORMAT_VERSION, MAGIC, core_from_snapshot, core_with_delta, encode_core, snapshot_of,
)
from quotad.storage.snapshot_json import core_to_plain
from quotad.storage.wal import (
    CorruptSnapshot, Snapshot, WriteAheadLog, encode_snapshot, snapshot_body,
)
from quotad_contract.shards import slot_of
from quotad_client import QuotaClient
from server_process import ROOT, ServerProcess

S = limits.NS_PER_S
DATA = ROOT / "tests" / "data"


KEYED_GRANT = GrantCredits(app="app", user_id="dave", group_key="credits", amount=500,
                           expires_at_ns=T0 + 7200 * S, priority=1, idempotency_key="k-grant")


def _busy_harness() -> Harness:
    h = Harness()
    h.setup(plan("p", group("tokens", 1000, Window.DAY, ["openai.*"]),
                 group("premium", 100, Window.MONTH, metadata={"model": ["gpt-4o"]}),
                 group("ever", 10**6, Window.LIFETIME)),
            "alice", time_zone="Europe/Paris")
    h.subscribe("bob", "p", time_zone="Asia/Kolkata")
    h.subscribe("zoë ☃", "p")
    live = h.reserve("alice", 80, metadata={"model": "gpt-4o"}, key="k-live", ttl_ns=600 * S)
    assert live.allowed
    committed = h.reserve("alice", 50)
    h.commit(committed.reservation_id, 70, key="k-commit")
    released = h.reserve("bob", 20)
    h.release(released.reservation_id)
    h.reserve("bob", 10, ttl_ns=1 * S)
    h.advance(2 * S)
    h.expire()
    h.track("bob", 5, enforce=True, key="k-track")
    h.track("zoë ☃", 900)  # past 80 %: a threshold fired, kept in the counter
    h.reserve("alice", 5000, key="k-denied")  # denied, remembered under its key
    h.extend(live.reservation_id, 900 * S)
    priced = replace(group("spend", 10**6, Window.DAY, ["openai.*"]),
                     cost=Cost(by="model", rates=(("gpt-4o", 10),), default_rate=2))
    h.upsert_plan(plan("priced", priced))
    h.run(UpsertSubscription(app=h.app, user_id="carol", plan_id="priced",
                             billing_customer_id="cus_123"))
    assert h.reserve("carol", 7, metadata={"model": "gpt-4o"}, ttl_ns=600 * S).allowed
    assert h.reserve("carol", 3, ttl_ns=600 * S).allowed  # at the default rate
    credits = replace(group("credits", 0, Window.LIFETIME, ["image.*"]), kind=Kind.BALANCE,
                      grant=RecurringGrant(amount=100, every=Window.DAY, rollover_max=20))
    h.upsert_plan(plan("credits", credits))
    h.subscribe("dave", "credits", time_zone="America/New_York")
    h.run(KEYED_GRANT)
    for amount, expires_at_ns, priority in ((50, h.now + 5 * S, 3), (70, None, 2)):
        h.run(GrantCredits(app=h.app, user_id="dave", group_key="credits", amount=amount,
                           expires_at_ns=expires_at_ns, priority=priority))
    h.track("dave", 620, "image.render")  # all but 50 of the 70 and the 50
    assert h.reserve("dave", 60, "image.render", ttl_ns=600 * S).allowed
    h.advance(5 * S)
    h.expire()  # the 50 expired: 10 of it kept for the hold, which the rest cannot cover
    h.track("dave", -10, "image.render")
    return h


def _resigned(encoded: bytes, body: bytes) -> bytes:
    """A stored snapshot with another body and a checksum that holds: what a bug, not a
    torn write, would store."""
    return encode_snapshot(int.from_bytes(encoded[16:24], "big"), body)


def test_a_restored_snapshot_equals_the_state_it_was_taken_from():
    h = _busy_harness()
    restored = core_from_snapshot(snapshot_of(h.core))
    assert digest(restored) == digest(h.core)
    carol = restored.apps[h.app].users["carol"]
    assert carol.subscription.billing_customer_id == "cus_123"
    assert sorted(ref.rate for hold in restored.apps[h.app].reservations.values()
                  if hold.user_id == "carol" for ref in hold.holds) == [2, 10]
    assert state_digest(restored) == state_digest(h.core)
    assert restored.apps[h.app].users["alice"].counters == h.core.apps[h.app].users[
        "alice"].counters
    assert list(restored.expiry) == list(h.core.expiry)  # rebuilt from the live holds
    dave = restored.apps[h.app].users["dave"].counter("credits", Window.LIFETIME)
    assert dave == h.core.apps[h.app].users["dave"].counter("credits", Window.LIFETIME)
    assert dave.balance is not None and any(g.expired and g.kept for g in dave.balance.grants)
    assert list(restored.grant_expiry) == list(h.core.grant_expiry) != []  # rebuilt too


@pytest.mark.parametrize("reserving", ["nobody", "everyone", "every other user"])
def test_users_with_as_many_counters_each_or_not_load_each_with_their_own(reserving: str):
    """A load cuts each user's counters from one column: users who all have as many (none,
    or two each) are cut in bulk, users of different counts one by one; each user gets back
    the counters it had, in its layout's order."""
    h = Harness()
    users = [f"user-{number}" for number in range(7)]
    h.setup(plan("p", group("tokens", 1000, Window.DAY, ["openai.*"]),
                 group("ever", 10**6, Window.LIFETIME)), *users)
    for number, user in enumerate(users):
        if reserving == "everyone" or (reserving == "every other user" and number % 2):
            h.reserve(user, 10 + number)
    restored = core_from_snapshot(snapshot_of(h.core))
    counts = set()
    for user in users:
        loaded, original = restored.apps[h.app].users[user], h.core.apps[h.app].users[user]
        assert list(loaded.counter_items()) == list(original.counter_items())
        counts.add(len(loaded.counters))
    assert counts == {"nobody": {0}, "everyone": {2}, "every other user": {0, 2}}[reserving]
    assert digest(restored) == digest(h.core)


def test_a_restored_core_makes_the_same_records_as_the_original_from_then_on():
    h = _busy_harness()
    restored = core_from_snapshot(snapshot_of(h.core))
    follow_up = [
        h.reserve_command("alice", 80, "openai.chat", {"model": "gpt-4o"}, key="k-live",
                          ttl_ns=600 * S),
        h.track_command("bob", -3),
        h.reserve_command("bob", 7, ttl_ns=1 * S),
        h.reserve_command("dave", 400, "image.render", key="k-dave"),
        h.track_command("dave", -30, "image.render"),
        KEYED_GRANT,
    ]
    for command in follow_up:
        h.advance(1 * S)
        original = h.core.apply(command, h.now)
        again = restored.apply(command, h.now)
        assert (original.result, original.error, original.records) == (
            again.result, again.error, again.records)
    h.advance(limits.RESERVATION_RETENTION_NS + 10 * S)  # past every expiry and the holds' retention
    final = h.reserve_command("alice", 1)
    assert h.core.apply(final, h.now).records == restored.apply(final, h.now).records
    final_credits = h.track_command("dave", 1, "image.render")  # a new day's recurring grant
    assert h.core.apply(final_credits, h.now) == restored.apply(final_credits, h.now)
    assert digest(restored) == digest(h.core)


def test_an_empty_core_round_trips():
    core = core_from_snapshot(snapshot_of(Core()))
    assert state_digest(core) == state_digest(Core())


@pytest.fixture
def wal(tmp_path: Path):
    """A log in the test's own directory, closed after the test."""
    log = WriteAheadLog(tmp_path)
    yield log
    log.close()


def _delta_message(encoded: bytes):
    body = snapshot_body(encoded)
    return snapshot_pb2.CoreSnapshot.FromString(zlib.decompress(body[len(MAGIC) + 2:]))


def _whole_then_more(h: Harness) -> bytes:
    """A whole snapshot of the busy state, then more commands: a few users changed, one new,
    one gone (its slot moved away), the rest untouched."""
    for n in range(40):
        h.subscribe(f"idle-{n}", "p")
    h.subscribe("gus", "credits")  # a grant that expires long after, and nothing else
    h.run(GrantCredits(app=h.app, user_id="gus", group_key="credits", amount=5,
                       expires_at_ns=h.now + 30 * 86_400 * S))
    whole = snapshot_of(h.core)
    h.core.clear_users_changed()
    h.advance(1 * S)
    h.track("alice", 3)
    h.subscribe("erin", "p", time_zone="Asia/Tokyo")
    h.track("erin", 7)
    h.subscribe("frank", "p")  # subscribed, nothing else
    h.subscribe("zoë ☃", "priced")  # a plan changed, nothing else
    h.run(GrantCredits(app=h.app, user_id="dave", group_key="credits", amount=9))
    h.advance(limits.RESERVATION_RETENTION_NS)
    h.expire()  # every live hold expires: their users change
    h.run(ForgetSlots(slots=(slot_of(h.app, "bob"),)))
    return whole


def test_a_delta_read_over_its_whole_snapshot_is_the_state_it_was_taken_from():
    h = _busy_harness()
    whole = _whole_then_more(h)
    whole_sequence = core_from_snapshot(whole).sequence
    delta = snapshot_of(h.core, delta_of_sequence=whole_sequence)
    restored = core_with_delta(core_from_snapshot(whole), delta)
    assert digest(restored) == digest(h.core)
    assert state_digest(restored) == state_digest(h.core)
    assert list(restored.expiry) == list(h.core.expiry)
    assert list(restored.grant_expiry) == list(h.core.grant_expiry)
    assert "gus" in {user_id for _, _, user_id, _, _ in restored.grant_expiry}  # from the whole
    # it holds the users changed since the whole one, and the one gone by its id alone
    (app,) = _delta_message(delta).apps
    assert sorted(app.users.user_ids) == sorted(h.core.users_changed[h.app] - {"bob"})
    assert {"erin", "frank", "zoë ☃"} <= set(app.users.user_ids) and not any(
        user_id.startswith("idle-") for user_id in app.users.user_ids)
    assert list(app.removed_user_ids) == ["bob"] and "bob" not in restored.apps[h.app].users
    # and the core read back counts them as changed: the next delta holds them again
    assert restored.users_changed == h.core.users_changed
    assert len(delta) < len(whole)


def test_a_core_restored_from_a_delta_makes_the_same_records_from_then_on():
    h = _busy_harness()
    whole = _whole_then_more(h)
    delta = snapshot_of(h.core, delta_of_sequence=core_from_snapshot(whole).sequence)
    restored = core_with_delta(core_from_snapshot(whole), delta)
    for command in (h.track_command("alice", 2), h.track_command("idle-3", 5),
                    h.reserve_command("erin", 4), h.track_command("dave", 1, "image.render")):
        h.advance(1 * S)
        assert h.core.apply(command, h.now) == restored.apply(command, h.now)
    assert digest(restored) == digest(h.core)


def test_a_delta_holds_the_users_whose_credit_grants_expired_since_the_whole_snapshot():
    """Nothing but the expiry of a grant changes the user: the delta holds them all the same."""
    h = _busy_harness()
    h.run(GrantCredits(app=h.app, user_id="dave", group_key="credits", amount=40,
                       expires_at_ns=h.now + 10 * S))
    whole, whole_sequence = snapshot_of(h.core), h.core.sequence
    h.core.clear_users_changed()
    h.advance(20 * S)
    h.expire()
    assert h.core.users_changed == {h.app: {"dave"}}
    restored = core_with_delta(core_from_snapshot(whole), snapshot_of(h.core, whole_sequence))
    assert digest(restored) == digest(h.core)


def test_a_delta_of_another_whole_snapshot_or_read_as_a_whole_one_is_refused():
    h = _busy_harness()
    whole = _whole_then_more(h)
    whole_sequence = core_from_snapshot(whole).sequence
    delta = snapshot_of(h.core, delta_of_sequence=whole_sequence - 1)
    with pytest.raises(CorruptSnapshot, match=f"a delta of the snapshot at sequence "
                                              f"{whole_sequence - 1}, not of the one at "
                                              f"{whole_sequence}"):
        core_with_delta(core_from_snapshot(whole), delta)
    with pytest.raises(CorruptSnapshot, match="not a whole one"):
        core_from_snapshot(snapshot_of(h.core, delta_of_sequence=whole_sequence))


def test_recovery_reads_the_latest_delta_over_the_whole_snapshot(wal: WriteAheadLog):
    h = _busy_harness()
    wal.append(h.records)
    wal.append([], Snapshot(h.core.sequence, snapshot_of(h.core)))
    whole_sequence = h.core.sequence
    h.core.clear_users_changed()
    for n, user in enumerate(("alice", "bob", "alice")):
        written = len(h.records)
        h.advance(1 * S)
        h.track(user, n + 1)
        wal.append(h.records[written:], Snapshot(
            h.core.sequence, snapshot_of(h.core, whole_sequence), whole_sequence))
    h.advance(1 * S)
    written = len(h.records)
    h.track("zoë ☃", 1)
    wal.append(h.records[written:])
    assert wal.snapshot_sequence() == h.core.sequence - 1  # the last delta's
    assert wal.whole_snapshot_sequence() == whole_sequence
    recovered = recover(wal, repair=False)
    assert digest(recovered) == digest(h.core)
    assert recovered.users_changed == {h.app: {"alice", "bob", "zoë ☃"}}
    # a whole snapshot replaces the delta too
    wal.append([], Snapshot(h.core.sequence, snapshot_of(h.core)))
    assert wal.load_delta() is None
    assert digest(recover(wal, repair=False)) == digest(h.core)


def test_a_delta_is_stored_only_over_the_whole_snapshot_it_is_a_delta_of(wal: WriteAheadLog):
    h = _busy_harness()
    wal.append(h.records)
    with pytest.raises(ValueError, match="whole snapshot stored is at 0"):
        wal.append([], Snapshot(h.core.sequence, snapshot_of(h.core, 3), 3))
    assert wal.load_delta() is None


def test_recovery_replays_the_log_from_the_whole_snapshot_when_the_delta_is_corrupt(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    h = _busy_harness()
    wal = WriteAheadLog(tmp_path)
    try:
        wal.append(h.records)
        whole_sequence = h.core.sequence
        wal.append([], Snapshot(whole_sequence, snapshot_of(h.core)))
        written = len(h.records)
        h.advance(1 * S)
        h.track("alice", 4)
        delta = snapshot_of(h.core, whole_sequence)
        wal.append(h.records[written:], Snapshot(
            h.core.sequence, _resigned(delta, snapshot_body(delta)[:-9]), whole_sequence))
        with pytest.raises(CorruptSnapshot, match=f"the delta snapshot at sequence "
                                                  f"{h.core.sequence}"):
            recover(wal, repair=False)  # as quotad verify reads it: refused
        with caplog.at_level("WARNING", logger="quotad.writer"):
            recovered = recover(wal)  # as the server starts: left, and the log replayed
        assert digest(recovered) == digest(h.core)
        assert any("left out a delta snapshot" in r.getMessage() for r in caplog.records)
    finally:
        wal.close()
    verified = subprocess.run([sys.executable, "-m", "quotad", "verify", "--data-dir",
                               str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert verified.returncode == 1, verified.stderr
    summary = json.loads(verified.stdout)
    assert not summary["clean"] and "the delta snapshot at sequence" in summary["error"]


def test_a_snapshot_stored_in_the_log_loads_back_at_its_sequence(wal: WriteAheadLog):
    h = _busy_harness()
    wal.append(h.records)
    wal.append([], Snapshot(h.core.sequence, snapshot_of(h.core)))
    stored = wal.load_snapshot()
    assert stored is not None and stored.sequence == h.core.sequence
    assert state_digest(core_from_snapshot(stored.encoded)) == state_digest(h.core)


def test_a_json_snapshot_from_before_the_binary_format_still_loads(wal: WriteAheadLog):
    h = _busy_harness()
    body = zlib.compress(json.dumps(core_to_plain(h.core)).encode("utf-8"), 1)
    wal.append(h.records)
    wal.append([], Snapshot(h.core.sequence, encode_snapshot(h.core.sequence, body)))
    recovered = recover(wal, repair=False)
    assert digest(recovered) == digest(h.core)


def test_a_snapshot_made_by_the_forked_child_loads_to_the_same_state(tmp_path: Path):
    h = _busy_harness()
    child = snapshot_child.start(h.core, tmp_path)
    try:
        made = snapshot_child.finish(child)
    finally:
        snapshot_child.close(child)
    assert child.sequence == h.core.sequence and not child.path.exists()
    assert state_digest(core_from_snapshot(made.encoded)) == state_digest(h.core)
    assert made.cpu_s > 0  # the child's own, from its reap: it encoded the whole state


def test_a_snapshot_with_a_flipped_byte_is_refused_by_its_checksum():
    h = _busy_harness()
    encoded = bytearray(snapshot_of(h.core))
    encoded[len(encoded) // 2] ^= 0x01
    with pytest.raises(CorruptSnapshot, match=f"at sequence {h.core.sequence} fails its checksum"):
        core_from_snapshot(bytes(encoded))


def test_a_snapshot_shorter_than_its_header_is_refused():
    with pytest.raises(CorruptSnapshot, match="shorter than its header"):
        core_from_snapshot(snapshot_of(Core())[:20])


def test_a_truncated_body_is_refused_even_when_its_checksum_holds():
    h = _busy_harness()
    encoded = snapshot_of(h.core)
    body = snapshot_body(encoded)
    with pytest.raises(CorruptSnapshot, match=f"snapshot at sequence {h.core.sequence}: "
                                              "unreadable"):
        core_from_snapshot(_resigned(encoded, body[:len(body) // 2]))
    with pytest.raises(CorruptSnapshot, match="neither binary nor JSON"):
        core_from_snapshot(_resigned(encoded, b"QSN"))


def test_a_column_of_the_wrong_length_is_refused_naming_it():
    from quotad.storage import snapshot_pb2

    h = _busy_harness()
    encoded = snapshot_of(h.core)
    message = snapshot_pb2.CoreSnapshot.FromString(zlib.decompress(snapshot_body(encoded)[6:]))
    message.apps[0].counters.used = message.apps[0].counters.used[:-8]  # one row short
    body = MAGIC + FORMAT_VERSION.to_bytes(2, "big") + zlib.compress(
        message.SerializeToString())
    with pytest.raises(CorruptSnapshot, match="column used"):
        core_from_snapshot(_resigned(encoded, body))


ZERO_USER_COLUMNS = ("plan_index", "zone_index", "live_holds", "layout_index")
ZERO_COUNTER_COLUMNS = ("held", "threshold_percent_fired", "window_start_index",
                        "window_end_index")


def test_columns_of_zeros_load_as_any_column_does():
    """Users of one plan and zone, no live hold, no threshold fired, counters of one window
    each: those columns are 0 in every row, and a load makes their rows at once; the state
    is the one written, and a short column of zeros, or indexes into an empty table, are
    still refused."""
    h = Harness()
    h.setup(plan("p", group("tokens", 1000, Window.DAY, ["*"])), "u0")
    for number in range(1, 40):
        h.subscribe(f"u{number}", "p")
    for number in range(40):
        h.track(f"u{number}", number + 1)
    encoded = snapshot_of(h.core)
    message = _message(encoded)
    (app_message,) = message.apps
    columns = ([getattr(app_message.users, name) for name in ZERO_USER_COLUMNS]
               + [getattr(app_message.counters, name) for name in ZERO_COUNTER_COLUMNS])
    assert all(column and column == bytes(len(column)) for column in columns)
    assert state_digest(core_from_snapshot(encoded)) == state_digest(h.core)

    app_message.counters.held = app_message.counters.held[:-8]  # one row short
    with pytest.raises(CorruptSnapshot, match="column held"):
        core_from_snapshot(_with_message(encoded, message))
    message = _message(encoded)
    del message.apps[0].users.plan_ids[:]  # every row index 0, of a table with no entry
    with pytest.raises(CorruptSnapshot, match="column plans index: 0 past the table's 0"):
        core_from_snapshot(_with_message(encoded, message))


@pytest.mark.parametrize("row", ["past the rows", "repeated"])
def test_a_balance_of_a_counter_row_past_the_rows_or_repeated_is_refused(row: str):
    h = _busy_harness()
    encoded = snapshot_of(h.core)
    message = snapshot_pb2.CoreSnapshot.FromString(zlib.decompress(snapshot_body(encoded)[6:]))
    counters = message.apps[0].counters
    rows = len(counters.used) // 8
    (balance,) = counters.balances
    if row == "past the rows":
        balance.counter_row = rows
    else:
        counters.balances.add().CopyFrom(balance)
    body = MAGIC + FORMAT_VERSION.to_bytes(2, "big") + zlib.compress(
        message.SerializeToString())
    with pytest.raises(CorruptSnapshot, match=f"a balance of counter row "
                                              f"{balance.counter_row}, past the {rows} rows "
                                              f"or not after the row before"):
        core_from_snapshot(_resigned(encoded, body))


def test_a_snapshot_of_another_format_version_is_refused_naming_both():
    encoded = snapshot_of(Core())
    body = MAGIC + (FORMAT_VERSION + 1).to_bytes(2, "big") + encode_core(Core())[6:]
    with pytest.raises(CorruptSnapshot, match=f"format {FORMAT_VERSION + 1}, this server reads "
                                              f"3 and {FORMAT_VERSION}"):
        core_from_snapshot(_resigned(encoded, body))


def _as_format_3(encoded: bytes) -> bytes:
    """The same snapshot as the release before wrote it (format 3): every counter's window
    bounds in a column of their own, where format 4 indexes tables of the distinct ones."""
    message = snapshot_pb2.CoreSnapshot.FromString(zlib.decompress(snapshot_body(encoded)[6:]))
    for app in message.apps:
        counters = app.counters
        for table, index, column in (("window_starts_ns", "window_start_index",
                                      "window_start_ns"),
                                     ("window_ends_ns", "window_end_index", "window_end_ns")):
            values = array.array("q", getattr(counters, table))
            rows = array.array("I", getattr(counters, index))
            setattr(counters, column, array.array("q", (values[i] for i in rows)).tobytes())
            counters.ClearField(table)
            counters.ClearField(index)
    body = MAGIC + (3).to_bytes(2, "big") + zlib.compress(message.SerializeToString())
    return _resigned(encoded, body)


def test_a_snapshot_the_release_before_wrote_is_read_the_same():
    h = _busy_harness()
    whole = _whole_then_more(h)
    delta = snapshot_of(h.core, delta_of_sequence=core_from_snapshot(whole).sequence)
    assert sys.byteorder == "little"  # the columns' own order, as _as_format_3 reads them
    old_whole, old_delta = _as_format_3(whole), _as_format_3(delta)
    assert len(old_whole) != len(whole)
    assert digest(core_from_snapshot(old_whole)) == digest(core_from_snapshot(whole))
    restored = core_with_delta(core_from_snapshot(old_whole), old_delta)
    assert digest(restored) == digest(h.core)
    assert list(restored.grant_expiry) == list(h.core.grant_expiry)


def test_a_data_directory_the_release_before_left_starts_with_its_snapshot(tmp_path: Path):
    """tests/data/format7-snapshot3.tar.gz: a directory the release before left, killed, its
    snapshot in format 3 and records after it (tests/data/make_old_format.py). This server
    recovers from it with no migration the counters that release had, serves its audit
    trail, and its own snapshot at a clean stop is format 4, read back the same."""
    expected = json.loads((DATA / "format7-snapshot3.json").read_text())
    with tarfile.open(DATA / "format7-snapshot3.tar.gz") as archive:
        archive.extractall(tmp_path, filter="data")
    data_dir = tmp_path / "data"
    with contextlib.closing(WriteAheadLog(data_dir)) as wal:
        stored = wal.load_snapshot()
        assert stored is not None and snapshot_body(stored.encoded)[len(MAGIC):6] == b"\0\3"
        assert 0 < stored.sequence < wal.last_sequence()  # the log goes on past it
        core = recover(wal, repair=False)
    app = core.apps["default"]
    window = {group.key: group.window for group in app.plans["pro"].limit_groups}
    assert sorted(app.users) == sorted(expected)
    for user_id, answered in expected.items():
        for key, _quota, used, held, _remaining, window_start, _resets in answered["counters"]:
            counter = app.users[user_id].counter(key, window[key])
            if counter is None:  # never counted in: nothing stored
                assert (used, held) == (0, 0), (user_id, key)
                continue
            assert (counter.used, counter.held) == (used, held), (user_id, key)
            assert counter.window_start_ns == int(
                datetime.fromisoformat(window_start).timestamp()) * 10**9
    server = ServerProcess(data_dir, plans=None,
                           extra_args=("--audit-retention-days", "36500")).start()
    try:
        with QuotaClient(server.address) as client:
            for user_id, answered in expected.items():
                events = [[e.sequence, e.time.isoformat(), e.kind, e.event_type, e.amount,
                           dict(e.metadata), e.reservation_id, e.allowed, e.limit_group_key,
                           e.threshold_percent] for e in client.iter_events(user_id)]
                # holds that expired while it was down expire at this start: after the old ones
                assert events[:len(answered["events"])] == answered["events"], user_id
                assert all(e[2] == "expire" for e in events[len(answered["events"]):])
    finally:
        assert server.stop() == 0
    with contextlib.closing(WriteAheadLog(data_dir)) as wal:
        stored = wal.load_snapshot()
        assert stored is not None and stored.sequence == wal.last_sequence()
        assert snapshot_body(stored.encoded)[len(MAGIC):6] == FORMAT_VERSION.to_bytes(2, "big")
        assert state_digest(core_from_snapshot(stored.encoded)) == state_digest(recover(wal))


def test_counters_share_each_distinct_window_bound_once_loaded():
    """As in the core that wrote them: 128 bytes less per user of two counters than an int
    object per bound per counter."""
    h = _busy_harness()
    for n in range(30):
        h.subscribe(f"user-{n}", "p", time_zone=("Europe/Paris", "Asia/Tokyo")[n % 2])
        h.track(f"user-{n}", 1)
    restored = core_from_snapshot(snapshot_of(h.core))
    counters = [counter for user in restored.apps[h.app].users.values()
                for counter in user.counters]
    assert len(counters) > 60
    for bound in ("window_start_ns", "window_end_ns"):
        values = [getattr(counter, bound) for counter in counters]
        assert len({id(value) for value in values}) == len(set(values)) < len(counters) / 4


def _message(encoded: bytes) -> snapshot_pb2.CoreSnapshot:
    return snapshot_pb2.CoreSnapshot.FromString(zlib.decompress(snapshot_body(encoded)[6:]))


def _with_message(encoded: bytes, message: snapshot_pb2.CoreSnapshot) -> bytes:
    body = MAGIC + FORMAT_VERSION.to_bytes(2, "big") + zlib.compress(
        message.SerializeToString())
    return _resigned(encoded, body)


def test_loaded_users_share_the_counter_layouts_the_snapshot_tables():
    """Each user's layout is read from the snapshot's table of the distinct ones, not from
    its rows, and users with the same slots in the same order share one, as in the core
    that wrote them; a snapshot without the table (as written before it) reads the same."""
    h = _busy_harness()
    encoded = snapshot_of(h.core)
    app_message = next(a for a in _message(encoded).apps if a.app == h.app)
    layouts_written = len(app_message.users.layout_slot_counts) // 4
    restored = core_from_snapshot(encoded)
    users = restored.apps[h.app].users
    by_slots: dict[tuple[object, ...], set[int]] = {}
    for user_id, user in users.items():
        assert user.layout == h.core.apps[h.app].users[user_id].layout
        by_slots.setdefault(tuple(user.layout), set()).add(id(user.layout))
    assert all(len(ids) == 1 for ids in by_slots.values())
    assert len(by_slots) == layouts_written < len(users)
    message = _message(encoded)
    for app in message.apps:
        for column in ("layout_index", "layout_slot_counts", "layout_slots"):
            app.users.ClearField(column)
    without_table = core_from_snapshot(_with_message(encoded, message))
    assert digest(without_table) == digest(restored) == digest(h.core)
    assert {id(user.layout) for user in without_table.apps[h.app].users.values()} == {
        id(user.layout) for user in users.values()}  # the same shared layouts


@pytest.mark.parametrize("damage, expected", [
    ("slot order", "the users' layouts and their counters' slots differ"),
    ("another layout", "the users' layouts and their counters' slots differ"),
    ("one slot twice", "a user with two counters at one slot"),
    ("a slot past the table", "column layout slots index: 1000000 past the table's"),
    ("a slot too few", "column layout slots index: .* bytes for .* rows of 4"),
])
def test_layouts_that_disagree_with_the_counters_rows_are_refused(damage: str, expected: str):
    h = _busy_harness()
    encoded = snapshot_of(h.core)
    message = _message(encoded)
    users = next(a for a in message.apps if a.app == h.app).users
    slots = array.array("I", users.layout_slots)
    counts = array.array("I", users.layout_slot_counts)
    chosen = array.array("I", users.layout_index)
    two = next(n for n, count in enumerate(counts) if count >= 2)  # a layout of 2 slots or more
    at = sum(counts[:two])
    if damage == "slot order":  # its first two slots the other way round
        slots[at], slots[at + 1] = slots[at + 1], slots[at]
    elif damage == "another layout":  # a user of it placed by another
        chosen[list(chosen).index(two)] = (two + 1) % len(counts)
    elif damage == "one slot twice":
        slots[at + 1] = slots[at]
    elif damage == "a slot past the table":
        slots[0] = 10**6
    else:
        counts[two] += 1
    users.layout_slots, users.layout_slot_counts = slots.tobytes(), counts.tobytes()
    users.layout_index = chosen.tobytes()
    with pytest.raises(CorruptSnapshot, match=expected):
        core_from_snapshot(_with_message(encoded, message))


def test_a_user_with_two_counters_at_one_slot_is_refused_without_the_layouts_table():
    """A snapshot written before the table, whose rows file two of a user's counters at one
    slot: refused, where a dict of them would have kept one and lost the other."""
    h = _busy_harness()
    encoded = snapshot_of(h.core)
    message = _message(encoded)
    app = next(a for a in message.apps if a.app == h.app)
    for column in ("layout_index", "layout_slot_counts", "layout_slots"):
        app.users.ClearField(column)
    counts = array.array("I", app.users.counter_counts)
    rows = array.array("I", app.counters.group_index)
    at = sum(counts[:next(n for n, count in enumerate(counts) if count >= 2)])
    rows[at + 1] = rows[at]
    app.counters.group_index = rows.tobytes()
    with pytest.raises(CorruptSnapshot, match="a user with two counters at one slot"):
        core_from_snapshot(_with_message(encoded, message))


def test_a_window_bound_index_past_its_table_is_refused_naming_it():
    h = _busy_harness()
    encoded = snapshot_of(h.core)
    message = snapshot_pb2.CoreSnapshot.FromString(zlib.decompress(snapshot_body(encoded)[6:]))
    counters = message.apps[0].counters
    past = len(counters.window_ends_ns) // 8
    counters.window_end_index = counters.window_end_index[:-4] + past.to_bytes(4, "little")
    body = MAGIC + FORMAT_VERSION.to_bytes(2, "big") + zlib.compress(
        message.SerializeToString())
    with pytest.raises(CorruptSnapshot, match=f"column window ends index: {past} past the "
                                              f"table's {past} entries"):
        core_from_snapshot(_resigned(encoded, body))


@pytest.mark.parametrize("version", [3, FORMAT_VERSION])
def test_window_bound_columns_of_the_other_format_are_refused_naming_them(version: int):
    h = _busy_harness()
    encoded = snapshot_of(h.core)
    if version == 3:
        encoded = _as_format_3(encoded)
    message = snapshot_pb2.CoreSnapshot.FromString(zlib.decompress(snapshot_body(encoded)[6:]))
    counters = message.apps[0].counters
    column = "window_start_index" if version == 3 else "window_end_ns"
    setattr(counters, column, bytes(len(counters.used)))  # what the other format would hold
    body = MAGIC + version.to_bytes(2, "big") + zlib.compress(message.SerializeToString())
    with pytest.raises(CorruptSnapshot, match=f"a format {version} snapshot with column "
                                              f"{column}"):
        core_from_snapshot(_resigned(encoded, body))


def test_a_snapshot_holding_another_sequence_than_its_header_is_refused():
    h = _busy_harness()
    body = encode_core(h.core)
    with pytest.raises(CorruptSnapshot, match="holds the state at sequence"):
        core_from_snapshot(encode_snapshot(h.core.sequence + 1, body))


def test_recovery_refuses_a_corrupt_stored_snapshot_and_changes_nothing(wal: WriteAheadLog):
    h = _busy_harness()
    encoded = snapshot_of(h.core)
    wal.append(h.records)
    wal.append([], Snapshot(h.core.sequence, _resigned(encoded, snapshot_body(encoded)[:-9])))
    with pytest.raises(CorruptSnapshot, match=f"at sequence {h.core.sequence}"):
        recover(wal)
    assert wal.last_sequence() == h.core.sequence


@pytest.mark.parametrize("by", ["pidfd", "pid"])
def test_a_snapshot_child_is_killed_through_a_handle_that_names_it_alone(tmp_path: Path,
                                                                        by: str):
    """stop() signals the child while it is ours to reap (alive, or a zombie), and nothing
    once it is reaped: its pid may name another process by then, its pidfd never does.
    Where the system has no pidfd, stop() falls back to the pid ("pid")."""
    h = _busy_harness()
    child = snapshot_child.start(h.core, tmp_path)
    handle = child if by == "pidfd" else child._replace(pidfd=None)
    try:
        assert child.pidfd is not None or not sys.platform.startswith("linux")
        assert snapshot_child.stop(handle)  # not reaped yet: signalled
        with contextlib.suppress(snapshot_child.SnapshotChildFailed):  # killed, or done before
            snapshot_child.finish(handle)
        assert not snapshot_child.stop(handle)  # reaped: nothing is signalled
    finally:
        snapshot_child.close(child)
    assert not child.path.exists()
