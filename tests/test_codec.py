"""The log's record encoder writes exactly the JSON that json.dumps of to_plain writes, for
any text (quotes, backslashes, control characters, non-ASCII), so records read back the same
and a record's bytes never depend on which encoder wrote them."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from quotad.core import commands as c
from quotad.storage.codec import (
    CHECKSUM_BYTES, decode_record, encode_record_and_events, record_key, to_plain,
)

_HEADER_BYTES = CHECKSUM_BYTES + 16
texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
metadata = st.dictionaries(texts, st.text(st.characters(blacklist_categories=("Cs",)),
                                          max_size=8), max_size=3).map(
    lambda d: tuple(sorted(d.items())))
reservation_ids = st.text("0123456789abcdef", min_size=24, max_size=24).map(lambda h: "rsv_" + h)


def _json_dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@settings(max_examples=200, deadline=None)
@given(user_id=texts, event_type=texts, amount=st.integers(1, 2**53), metadata=metadata,
       key=st.text(st.characters(blacklist_categories=("Cs",)), max_size=10),
       reservation_id=reservation_ids, commit_amount=st.none() | st.integers(0, 2**53),
       allowed=st.booleans())
def test_records_encode_as_json_dumps_of_their_plain_form(user_id, event_type, amount, metadata,
                                                          key, reservation_id, commit_amount,
                                                          allowed):
    event = c.AuditEvent(kind="reserve", app="default", user_id=user_id, event_type=event_type,
                         amount=amount, metadata=metadata, reservation_id=reservation_id,
                         allowed=allowed)
    commands = [
        c.Reserve(app="default", user_id=user_id, event_type=event_type, amount=amount,
                  metadata=metadata, idempotency_key=key, reservation_id=reservation_id),
        c.Commit(app="default", reservation_id=reservation_id, amount=commit_amount,
                 idempotency_key=key),
        c.Track(app="default", user_id=user_id, event_type=event_type, amount=-amount,
                metadata=metadata, enforce=allowed),
        c.ExpireHolds(expired=(c.ExpiredHold(app="default", reservation_id=reservation_id,
                                             user_id=user_id),)),
    ]
    for command in commands:
        for events in ((), (event,), (event, event)):
            record = c.Record(42, 1_700_000_000_123_456_789, command, events)
            value, event_values = encode_record_and_events(record)
            document = {"type": type(command).__name__, "fields": to_plain(command)}
            if events:
                document["events"] = to_plain(events)
            assert value[_HEADER_BYTES:] == _json_dumps(document)
            assert event_values == [_json_dumps(to_plain(e)) for e in events]
            assert decode_record(record_key(42), value) == record
