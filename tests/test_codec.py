"""The log's binary records and their audit events read back exactly as they were written, for any text (quotes, control characters, non-ASCII) and every command the log
holds; a flipped bit or a record under another key is caught by the checksum."""

from __future__ import annotations

import re
import time
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotad.core import commands as c
from quotad.core import limits
from quotad.core.holds import HoldState
from quotad.core.machine import HoldRef, Reservation
from quotad.core.plans import Kind, LimitGroup, Match, MetadataMatch, Plan, Window
from quotad.storage import log_pb2
from quotad.api.convert import new_reservation_id
from quotad.storage.codec import (
    hold_row_key, hold_row_reservation_bytes, hold_row_slot, reservation_bytes,
    COMPACT_HOLD_AGE_NS_MAX, CorruptRecord, decode_counter_shape, decode_finished_hold,
    decode_record, encode_counter_shape, encode_finished_hold, encode_record, event_tail,
    event_tail_fields, hold_ref_from_message, hold_ref_to_message, idempotency_row_key,
    record_event, record_key, stored_event_entries, stored_record_rows,
)

texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
metadata = st.dictionaries(texts, st.text(st.characters(blacklist_categories=("Cs",)),
                                          max_size=8), max_size=3).map(
    lambda d: tuple(sorted(d.items())))
reservation_ids = st.text("0123456789abcdef", min_size=24, max_size=24).map(lambda h: "rsv_" + h)
NOW_NS = 1_700_000_000_123_456_789
PLAN = Plan(id="pro", name="Pro ✓", limit_groups=(
    LimitGroup(key="tokens", label="Tokens", unit="tokens", quota=10**12, window=Window.MONTH,
               match=Match(event_types=("openai.*",))),
    LimitGroup(key="premium", quota=0, window=Window.LIFETIME,
               match=Match(metadata=(MetadataMatch(key="model", values=("gpt-4o", "o1")),))),
))


def _commands(user_id, event_type, amount, metadata, key, reservation_id, commit_amount,
              flag) -> list:
    return [
        c.Reserve(app="default", user_id=user_id, event_type=event_type, amount=amount,
                  metadata=metadata, idempotency_key=key, reservation_id=reservation_id),
        c.Commit(app="default", reservation_id=reservation_id, amount=commit_amount,
                 idempotency_key=key),
        c.Release(app="a", reservation_id=reservation_id, idempotency_key=key),
        c.Extend(app="a", reservation_id=reservation_id, ttl_ns=5 * 10**9, idempotency_key=key),
        c.Track(app="default", user_id=user_id, event_type=event_type, amount=-amount,
                metadata=metadata, enforce=flag),
        c.ExpireHolds(expired=(c.ExpiredHold(app="default", reservation_id=reservation_id,
                                             user_id=user_id),)),
        c.ExpireHolds(),
        c.UpsertPlan(app="default", plan=PLAN),
        c.DeletePlan(app="default", plan_id="pro"),
        c.UpsertSubscription(app="default", user_id=user_id, plan_id="pro",
                             time_zone="Europe/Paris" if flag else ""),
        c.CreateKey(app="default", key_id="abcdefghijkl", kind="secret", name=event_type,
                    secret_sha256="0" * 64, token_signing_key="1" * 64),
        c.RevokeKey(app="" if flag else "default", key_id="abcdefghijkl"),
    ]


@settings(max_examples=200, deadline=None)
@given(user_id=texts, event_type=texts, amount=st.integers(1, 2**53), metadata=metadata,
       key=st.text(st.characters(blacklist_categories=("Cs",)), max_size=10),
       reservation_id=reservation_ids, commit_amount=st.none() | st.integers(0, 2**53),
       flag=st.booleans(), users=st.lists(st.integers(1, 2**32 - 1), max_size=3))
def test_every_logged_command_reads_back_as_it_was_written(user_id, event_type, amount,
                                                           metadata, key, reservation_id,
                                                           commit_amount, flag, users):
    for command in _commands(user_id, event_type, amount, metadata, key, reservation_id,
                             commit_amount, flag):
        events = tuple(c.AuditEvent(kind="threshold", app=getattr(command, "app", ""),
                                    user_id="", event_type=event_type, amount=amount,
                                    limit_group_key=event_type,
                                    threshold_percent=index + 1, window_start_ns=NOW_NS)
                       for index in range(len(users)))
        record = c.Record(42, NOW_NS, command, events, tuple(users))
        value = encode_record(record)
        read = decode_record(record_key(42), value)
        assert read == record and read.command == command and read.events == ()
        assert decode_record(record_key(42), value, with_events=True).events == events
        entries = stored_event_entries(record_key(42), value)
        _, reserved = stored_record_rows(record_key(42), value)
        assert entries == [(user.to_bytes(4, "big"), event_tail(NOW_NS, 42, index))
                           for index, user in enumerate(users)]
        assert [event_tail_fields(tail) for _, tail in entries] == [
            (NOW_NS, 42, index) for index in range(len(users))]
        assert reserved == (bytes.fromhex(reservation_id[4:])
                            if isinstance(command, c.Reserve) else None)


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(c.AUDIT_KINDS), event_type=texts,
       amount=st.integers(-(2**53), 2**53), metadata=metadata,
       reservation_id=st.none() | reservation_ids, allowed=st.booleans(), user_id=texts)
def test_audit_events_read_back_with_the_app_and_user_the_index_names(kind, event_type, amount,
                                                                      metadata, reservation_id,
                                                                      allowed, user_id):
    threshold = kind == "threshold"
    event = c.AuditEvent(kind=kind, app="default", user_id=user_id, event_type=event_type,
                         amount=amount, metadata=metadata,
                         reservation_id=reservation_id or "", allowed=allowed,
                         limit_group_key="tokens" if threshold else "",
                         threshold_percent=80 if threshold else 0,
                         window_start_ns=NOW_NS if threshold else 0)
    for command in _commands(user_id, event_type, abs(amount) or 1, metadata, "k",
                             reservation_id or "rsv_" + "00" * 12, None, allowed):
        value = encode_record(c.Record(5, NOW_NS, command, (event,), (1,)))
        assert record_event(record_key(5), value, 0, "default", user_id) == event
        with pytest.raises(CorruptRecord, match="audit event 1 is missing"):
            record_event(record_key(5), value, 1, "default", user_id)
        kind = type(command)
        from_record = not threshold and (reservation_id or "") == getattr(
            command, "reservation_id", "") and (
            kind in (c.Commit, c.Release, c.Extend) or kind in (c.Reserve, c.Track) and (
                event_type, amount, metadata) == (command.event_type, command.amount,
                                                  command.metadata))
        stored = log_pb2.Record.FromString(value[12:]).events[0]
        assert stored.from_record == from_record, command


idempotency_keys = (st.text("0123456789abcdef", max_size=40)
                    | st.text("0123456789abcdefABCDEF", max_size=40)
                    | st.text("0123456789abcdef \t\n", max_size=40)  # fromhex skips spaces
                    | st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))


@settings(max_examples=300, deadline=None)
@given(key=idempotency_keys, reservation_id=reservation_ids)
def test_an_idempotency_key_reads_back_as_the_exact_text_sent(key, reservation_id):
    commands = [command for command in _commands("u", "e", 5, (), key, reservation_id, None,
                                                 True)
                if hasattr(command, "idempotency_key") and not isinstance(command, c.Track)]
    commands.append(c.Track(app="default", user_id="u", event_type="e", amount=1,
                            idempotency_key=key))
    commands.append(c.GrantCredits(app="default", user_id="u", group_key="credits", amount=5,
                                   idempotency_key=key))
    packed = len(key) % 2 == 0 and all(char in "0123456789abcdef" for char in key)
    for command in commands:
        answer = _ANSWERS.get(type(command))
        value = encode_record(c.Record(5, NOW_NS, command, (), (), answer))
        read = decode_record(record_key(5), value)
        assert read.command == command and read.command.idempotency_key == key
        message = log_pb2.Record.FromString(value[12:])
        part = getattr(message, message.WhichOneof("command"))
        assert part.idempotency_key == ("" if packed else key)
        assert part.idempotency_key_hex == (bytes.fromhex(key) if packed else b"")
        row, _ = stored_record_rows(record_key(5), value)
        assert row == (idempotency_row_key(command.app, type(command).__name__, key)
                       if key and answer is not None else None)


def test_a_record_with_its_idempotency_key_as_text_still_reads_back():
    """Records written before keys were packed hold every key as text."""
    command = c.Commit(app="default", reservation_id="rsv_" + "ab" * 12,
                       idempotency_key="0123456789abcdef0123456789abcdef")
    value = encode_record(c.Record(5, NOW_NS, command, (), (), _ANSWERS[c.Commit]))
    message = log_pb2.Record.FromString(value[12:])
    message.commit.ClearField("idempotency_key_hex")
    message.commit.idempotency_key = command.idempotency_key
    body = message.SerializeToString()
    time_bytes = NOW_NS.to_bytes(8, "big")
    checksum = zlib.crc32(body, zlib.crc32(time_bytes, zlib.crc32(record_key(5))))
    old = checksum.to_bytes(4, "big") + time_bytes + body
    assert decode_record(record_key(5), old).command == command
    assert stored_record_rows(record_key(5), old)[0] == idempotency_row_key(
        "default", "Commit", command.idempotency_key)


_ANSWERS = {
    c.Reserve: c.ReserveResult(allowed=False, reservation_id="", expires_at_ns=0, counters=(),
                               denied_by="tokens"),
    c.Commit: c.CommitResult(counters=(), committed=5, returned=0, expired=False),
    c.Release: c.ReleaseResult(counters=()),
    c.Extend: c.ExtendResult(expires_at_ns=NOW_NS + 1),
    c.Track: c.TrackResult(allowed=True, counters=(), denied_by=""),
}


def test_a_reserve_record_with_a_20_byte_user_and_one_metadata_entry_is_small():
    def reserve(idempotency_key: str) -> c.Reserve:
        return c.Reserve(app="default", user_id="u" * 20, event_type="openai.chat",
                         amount=1000, metadata=(("model", "gpt-4o"),),
                         idempotency_key=idempotency_key, reservation_id="rsv_" + "ab" * 12)
    command = reserve("k" * 32)
    event = c.AuditEvent(kind="reserve", app="default", user_id="u" * 20,
                         event_type="openai.chat", amount=1000, metadata=(("model", "gpt-4o"),),
                         reservation_id="rsv_" + "ab" * 12)
    value = encode_record(c.Record(7, NOW_NS, command, (event,), (1,)))
    hex_keyed = encode_record(c.Record(7, NOW_NS, reserve("0123456789abcdef" * 2), (event,),
                                       (1,)))
    print(f"\nReserve record with its audit event: {len(value)} bytes, "
          f"{len(hex_keyed)} with a key of 32 hex digits")
    assert len(value) <= 150
    assert len(hex_keyed) == len(value) - 16  # the digits stored as the 16 bytes they spell


def test_a_flipped_bit_or_a_record_under_another_key_is_corrupt():
    command = c.Track(app="default", user_id="u", event_type="e", amount=5)
    value = bytearray(encode_record(c.Record(9, NOW_NS, command)))
    with pytest.raises(CorruptRecord, match="checksum"):
        decode_record(record_key(10), bytes(value))
    value[-1] ^= 1
    with pytest.raises(CorruptRecord, match="checksum"):
        decode_record(record_key(9), bytes(value))
    with pytest.raises(CorruptRecord, match="shorter than a header"):
        decode_record(record_key(9), b"\x00" * 5)


@pytest.mark.parametrize("age_ns", [0, COMPACT_HOLD_AGE_NS_MAX - 1, COMPACT_HOLD_AGE_NS_MAX])
def test_a_finished_hold_row_reads_back_whole_with_or_without_its_reserve_record(age_ns):
    reserve = c.Reserve(app="default", user_id="u" * 20, event_type="openai.chat", amount=700,
                        metadata=(("model", "gpt-4o"),), idempotency_key="k",
                        reservation_id="rsv_" + "ab" * 12)
    stored = encode_record(c.Record(7, NOW_NS, reserve))
    hold = Reservation(app="default", reservation_id=reserve.reservation_id,
                       user_id=reserve.user_id, event_type=reserve.event_type, amount=700,
                       metadata=reserve.metadata,
                       holds=(HoldRef("tokens", Window.MONTH, NOW_NS - 10**12),),
                       sequence=7, created_at_ns=NOW_NS, expires_at_ns=NOW_NS + 60 * 10**9,
                       status=HoldState.COMMITTED, finished_at_ns=NOW_NS + age_ns)
    value = encode_finished_hold(hold, 9, 0, NOW_NS + age_ns)
    compact = age_ns < COMPACT_HOLD_AGE_NS_MAX
    assert log_pb2.FinishedHold.FromString(value).from_reserve_record == compact
    reads = []

    def reserve_record(sequence):
        reads.append(sequence)
        return decode_record(record_key(sequence), stored) if sequence == 7 else None
    def record_time_ns(sequence):
        return {7: NOW_NS, 9: NOW_NS + age_ns}.get(sequence)
    raw = bytes.fromhex(reserve.reservation_id[4:])
    assert decode_finished_hold(raw, value, 9, reserve_record, record_time_ns) == hold
    assert reads == ([7] if compact else [])
    assert decode_finished_hold(raw, value, 8, reserve_record, record_time_ns) is None
    if compact:
        with pytest.raises(CorruptRecord, match="Reserve record"):
            decode_finished_hold(raw, value, 9, lambda sequence: None, record_time_ns)
        with pytest.raises(CorruptRecord, match="record that finished"):
            decode_finished_hold(raw, value, 9, reserve_record, lambda sequence: None)


@settings(max_examples=200, deadline=None)
@given(age_ns=st.integers(0, COMPACT_HOLD_AGE_NS_MAX - 1) | st.integers(
           COMPACT_HOLD_AGE_NS_MAX, 2 * COMPACT_HOLD_AGE_NS_MAX),
       ttl_ns=st.integers(10**9, 3600 * 10**9), extended_by_ns=st.sampled_from([0, 0, 1, 10**9]),
       expired_before_ns=st.sampled_from([0, 0, 1, 10**9]), remembered=st.booleans())
def test_a_compact_finished_hold_row_reads_its_finish_and_expiry_from_its_records(
        age_ns, ttl_ns, extended_by_ns, expired_before_ns, remembered):
    """A young hold's row leaves out when it finished when that is its writing record's time
    (not so for an expired hold committed later), and its expiry when that is its Reserve
    record's time plus ttl_ns (not so once extended, or when the writer did not know it)."""
    reserve = c.Reserve(app="default", user_id="u", event_type="e", amount=7, ttl_ns=ttl_ns,
                        reservation_id="rsv_" + "cd" * 12)
    stored = {7: c.Record(7, NOW_NS, reserve), 9: c.Record(9, NOW_NS + age_ns, c.Commit(
        app="default", reservation_id=reserve.reservation_id))}
    written_at_ns = NOW_NS + age_ns
    hold = Reservation(app="default", reservation_id=reserve.reservation_id, user_id="u",
                       event_type="e", amount=7, metadata=(),
                       holds=(HoldRef("tokens", Window.DAY, NOW_NS - 5),), sequence=7,
                       created_at_ns=NOW_NS, expires_at_ns=NOW_NS + ttl_ns + extended_by_ns,
                       status=HoldState.COMMITTED,
                       finished_at_ns=written_at_ns - min(expired_before_ns, age_ns))
    reserve_expires_at_ns = NOW_NS + ttl_ns if remembered else 0
    value = encode_finished_hold(hold, 9, 0, written_at_ns, reserve_expires_at_ns)
    message = log_pb2.FinishedHold.FromString(value)
    compact = age_ns < COMPACT_HOLD_AGE_NS_MAX
    assert message.from_reserve_record == compact
    assert message.HasField("finished_at_ns") == (
        not compact or hold.finished_at_ns != written_at_ns)
    assert message.HasField("expires_at_ns") == (
        not compact or not remembered or extended_by_ns != 0)
    raw = bytes.fromhex(reserve.reservation_id[4:])

    def record_time_ns(sequence):
        return stored[sequence].now_ns if sequence in stored else None
    assert decode_finished_hold(raw, value, 9, stored.get, record_time_ns) == hold
    # A row written before either was left out (both set) still reads back the same.
    message.finished_at_ns, message.expires_at_ns = hold.finished_at_ns, hold.expires_at_ns
    assert decode_finished_hold(raw, message.SerializeToString(), 9, stored.get,
                                record_time_ns) == hold


@settings(max_examples=100, deadline=None)
@given(allowed=st.booleans(), same_hold=st.booleans(), used=st.integers(0, 10**12),
       held=st.integers(0, 10**12), denied_by=texts)
def test_first_answers_read_back_as_they_were_given(allowed, same_hold, used, held, denied_by):
    reserve = c.Reserve(app="default", user_id="u", event_type="openai.chat", amount=5,
                        ttl_ns=30 * 10**9, idempotency_key="k",
                        reservation_id="rsv_" + "cd" * 12)
    counters = (c.CounterView(key="tokens", label="Tokens", unit="tokens", window=Window.MONTH,
                              quota=10**12, used=used, held=held,
                              remaining=max(0, 10**12 - used - held),
                              window_start_ns=NOW_NS - 10**15, resets_at_ns=NOW_NS + 10**15),)
    if allowed:
        reservation_id = reserve.reservation_id if same_hold else "rsv_" + "ef" * 12
        expires_at_ns = NOW_NS + reserve.ttl_ns + (0 if same_hold else 1)
        denied_by = ""
    else:
        reservation_id, expires_at_ns = "", 0
    answers = [
        (reserve, c.ReserveResult(allowed=allowed, reservation_id=reservation_id,
                                  expires_at_ns=expires_at_ns, counters=counters,
                                  denied_by=denied_by)),
        (c.Commit(app="default", reservation_id=reserve.reservation_id, idempotency_key="k"),
         c.CommitResult(counters=counters, committed=5, returned=0, expired=not allowed)),
        (c.Track(app="default", user_id="u", event_type="e", amount=-3, idempotency_key="k"),
         c.TrackResult(allowed=allowed, counters=counters, denied_by=denied_by)),
    ]
    for command, answer in answers:
        record = c.Record(3, NOW_NS, command, (), (), answer)
        assert decode_record(record_key(3), encode_record(record)).answer == answer


def _shapes_table():
    """A shapes table in a dict: shape_id for encode_record, lookup for decode_record."""
    table: dict[bytes, bytes] = {}

    def shape_id(shape):
        found, value = encode_counter_shape(shape)
        assert table.setdefault(found, value) == value
        return found
    return table, shape_id, lambda found: decode_counter_shape(table[found])


@settings(max_examples=100, deadline=None)
@given(label=texts, unit=texts, quota=st.integers(0, 10**15), used=st.integers(0, 10**12),
       window=st.sampled_from(list(Window)), rate=st.booleans(),
       resets_after_ns=st.none() | st.integers(1, 10**16)
       | st.integers(1, 10**7).map(lambda s: s * 10**9),
       window_start_ns=st.sampled_from([NOW_NS - 10**12, 1_700_000_000 * 10**9, 0]))
def test_an_answer_names_its_counters_shapes_and_reads_back_as_it_was_given(
        label, unit, quota, used, window, rate, resets_after_ns, window_start_ns):
    def record_at(sequence: int, used: int) -> c.Record:
        counters = tuple(
            c.CounterView(key=key, label=label, unit=unit, window=window, quota=quota,
                          used=used, held=1, remaining=max(0, quota - used - 1),
                          window_start_ns=window_start_ns,
                          resets_at_ns=(None if resets_after_ns is None
                                        else window_start_ns + resets_after_ns),
                          kind=Kind.RATE if rate else Kind.QUOTA,
                          full_at_ns=NOW_NS + 5 if rate else None)
            for key in ("tokens", "premium_tokens"))
        return c.Record(sequence, NOW_NS, command, (), (), c.CommitResult(
            counters=counters, committed=5, returned=0, expired=False))
    command = c.Commit(app="default", reservation_id="rsv_" + "ab" * 12, idempotency_key="k")
    record = record_at(3, used)
    table, shape_id, lookup = _shapes_table()
    value = encode_record(record, shape_id)
    assert len(table) == 2
    heads: dict = {}  # each counter's unchanging part, remembered as it is first encoded
    assert encode_record(record, shape_id, heads) == value and len(heads) == 2
    assert encode_record(record, shape_id, heads) == value  # copied from heads
    later = record_at(4, used + 7)
    assert encode_record(later, shape_id, heads) == encode_record(later, shape_id)
    assert decode_record(record_key(4), encode_record(later, shape_id, heads), lookup) == later
    assert all(counter.shape and not counter.key and not counter.label
               for counter in log_pb2.Record.FromString(value[12:]).answer.counters)
    assert decode_record(record_key(3), value, lookup) == record
    assert decode_record(record_key(3), value).answer is None  # no lookup: the command alone
    assert decode_record(record_key(3), value).command == command
    whole = encode_record(record)
    assert decode_record(record_key(3), whole) == record
    assert len(whole) - len(value) >= 2 * (len("tokens") + len(label) + len(unit))
    with pytest.raises(CorruptRecord):  # a shape the table does not hold
        decode_record(record_key(3), value, lambda found: {}[found])


def test_the_logs_remembered_counter_heads_stay_within_their_limit_and_encode_the_same(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past COUNTER_HEADS_REMEMBERED_MAX the memo forgets them all; every record still encodes
    to the bytes it does field by field."""
    monkeypatch.setattr(limits, "COUNTER_HEADS_REMEMBERED_MAX", 2)
    table, shape_id, lookup = _shapes_table()
    heads: dict = {}
    command = c.Release(app="a", reservation_id="rsv_" + "ab" * 12, idempotency_key="k")
    records = [c.Record(n + 1, NOW_NS, command, (), (), c.ReleaseResult(counters=(
        c.CounterView(key="tokens", label="Tokens", unit="tokens", window=Window.DAY,
                      quota=1000, used=n, held=0, remaining=1000 - n,
                      window_start_ns=n * 86_400 * 10**9,
                      resets_at_ns=(n + 1) * 86_400 * 10**9),)))
               for n in range(5)]
    for record in records + records[::-1]:
        value = encode_record(record, shape_id, heads)
        assert value == encode_record(record, shape_id)
        assert decode_record(record_key(record.sequence), value, lookup) == record
        assert 1 <= len(heads) <= 2


def test_an_answer_with_counters_stored_whole_still_reads_back():
    """Records written before shapes hold every counter whole, its reset as a time."""
    counter = c.CounterView(key="tokens", label="Tokens", unit="tokens", window=Window.MONTH,
                            quota=10**6, used=5, held=0, remaining=10**6 - 5,
                            window_start_ns=NOW_NS - 10**15, resets_at_ns=NOW_NS + 10**15)
    record = c.Record(3, NOW_NS, c.Release(app="a", reservation_id="rsv_" + "ab" * 12,
                                           idempotency_key="k"),
                      (), (), c.ReleaseResult(counters=(counter,)))
    message = log_pb2.Record.FromString(encode_record(record)[12:])
    stored = message.answer.counters[0]
    stored.ClearField("resets_after_ns")
    stored.resets_at_ns = counter.resets_at_ns
    body = message.SerializeToString()
    time_bytes = NOW_NS.to_bytes(8, "big")
    checksum = zlib.crc32(body, zlib.crc32(time_bytes, zlib.crc32(record_key(3))))
    old = checksum.to_bytes(4, "big") + time_bytes + body
    assert decode_record(record_key(3), old) == record
    assert decode_record(record_key(3), old, _shapes_table()[2]) == record


@settings(max_examples=100, deadline=None)
@given(ttl_ns=st.integers(10**9, 3600 * 10**9) | st.integers(1, 3600).map(lambda s: s * 10**9),
       window_start_ns=st.integers(0, 2**62) | st.integers(0, 2**32).map(lambda s: s * 10**9))
def test_times_in_whole_seconds_are_stored_as_seconds_and_read_back_exactly(ttl_ns,
                                                                            window_start_ns):
    reserve = c.Reserve(app="default", user_id="u", event_type="e", amount=5, ttl_ns=ttl_ns,
                        reservation_id="rsv_" + "ab" * 12)
    extend = c.Extend(app="default", reservation_id=reserve.reservation_id, ttl_ns=ttl_ns)
    whole = ttl_ns % 10**9 == 0
    for command in (reserve, extend):
        value = encode_record(c.Record(5, NOW_NS, command))
        assert decode_record(record_key(5), value).command == command
        part = getattr(log_pb2.Record.FromString(value[12:]), type(command).__name__.lower())
        assert (part.ttl_s, part.ttl_ns) == ((ttl_ns // 10**9, 0) if whole else (0, ttl_ns))
    ref = HoldRef("tokens", Window.MONTH, window_start_ns, 3)
    message = log_pb2.HoldRef()
    hold_ref_to_message(ref, message)
    assert hold_ref_from_message(message) == ref
    if window_start_ns % 10**9 == 0:
        assert message.window_start_ns == 0


@given(st.binary(min_size=12, max_size=12))
def test_a_holds_table_key_puts_the_time_first_and_gives_back_the_reservation_id(raw: bytes):
    key = hold_row_key(raw)
    assert len(key) == 12 and hold_row_reservation_bytes(key) == raw
    text = raw.hex()
    assert key.hex().startswith(text[3:12])  # the time, then the slot and the rest
    assert hold_row_slot(key) == int(text[:3], 16)


def test_reservation_ids_carry_their_slot_then_the_time_they_were_made_at():
    before_ms = time.time_ns() // 10**6
    ids = [new_reservation_id(slot) for slot in (0, 7, 4095)]
    after_ms = time.time_ns() // 10**6
    assert all(re.fullmatch(r"rsv_[0-9a-f]{24}", rid) for rid in ids)
    assert [int(rid[4:7], 16) for rid in ids] == [0, 7, 4095]
    for rid in ids:
        assert before_ms % 16**9 <= int(rid[7:16], 16) <= after_ms % 16**9
    assert len({rid[16:] for rid in ids}) == 3  # 48 random bits each
    keys = [hold_row_key(reservation_bytes(rid)) for rid in ids]
    time.sleep(0.002)
    later = hold_row_key(reservation_bytes(new_reservation_id(0)))
    assert all(later > key for key in keys)  # a hold made later is filed after
