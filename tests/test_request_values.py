"""Every request becomes a value that validates itself: bad input to each names every bad field
at once and builds nothing, and a field's rule is the same wherever the field arrives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from quotad.api import convert
from quotad.api.http_api import query_user_id
from quotad.core import commands as c
from quotad.core import limits
from quotad.core.errors import InvalidArgument
from quotad_contract.v1 import quotad_pb2 as pb
from test_server_e2e import admin

S = limits.NS_PER_S
RESERVATION_ID = "rsv_" + "0" * 24


def fields_of(build: Callable[[], Any]) -> list[str]:
    """The fields a refused build names, in order; fails if anything was built."""
    with pytest.raises(InvalidArgument) as refused:
        built = build()
        pytest.fail(f"built {built!r}")
    return [violation.field for violation in refused.value.violations]


# --- each new request value: every bad field at once ------------------------------------------


def test_list_events_names_every_bad_field_at_once():
    assert fields_of(lambda: c.ListEvents(
        app="", user_id="", start_time_ns=-1, end_time_ns=limits.TIME_NS_MAX + 1,
        page_size=limits.EVENTS_PAGE_SIZE_MAX + 1, page_token="~")) == [
        "app", "user_id", "page_size", "start_time", "end_time", "page_token"]


def test_list_events_refuses_an_end_not_after_its_start_and_a_token_it_never_gave():
    assert fields_of(lambda: c.ListEvents(app="a", user_id="u", start_time_ns=5 * S,
                                          end_time_ns=5 * S)) == ["end_time"]
    for token in ("ab", "zz" * c.EVENT_CURSOR_BYTES, "00" * (c.EVENT_CURSOR_BYTES + 1)):
        assert fields_of(lambda: c.ListEvents(app="a", user_id="u", page_token=token)) == [
            "page_token"]
    assert fields_of(lambda: c.ListEvents(app="a", user_id="u", page_size=-1)) == ["page_size"]


def test_a_list_events_query_reads_the_whole_index_by_default_and_clamps_what_it_cannot_hold():
    everything = c.ListEvents(app="a", user_id="u")
    assert (everything.range_ns, everything.cursor, everything.events_per_page) == (
        (0, limits.END_OF_TIME_NS), b"", limits.EVENTS_PAGE_SIZE_DEFAULT)
    token = "ab" * c.EVENT_CURSOR_BYTES
    late = c.ListEvents(app="a", user_id="u", start_time_ns=3 * S,
                        end_time_ns=limits.TIME_NS_MAX, page_size=7, page_token=token)
    assert late.range_ns == (3 * S, limits.END_OF_TIME_NS - 1)
    assert (late.cursor, late.events_per_page) == (bytes.fromhex(token), 7)


def test_watch_usage_names_every_bad_field_at_once():
    assert fields_of(lambda: c.WatchUsage(app="x" * (limits.APP_ID_BYTES_MAX + 1),
                                          user_id="", after_sequence=-1)) == [
        "app", "user_id", "after_sequence"]
    assert c.WatchUsage(app="a", user_id="u").after_sequence == 0


def test_mint_user_token_names_every_bad_field_at_once_and_takes_its_ttl_edges():
    assert fields_of(lambda: c.MintUserToken(
        app="", user_id="u" * (limits.USER_ID_BYTES_MAX + 1),
        ttl_ns=limits.USER_TOKEN_TTL_NS_MAX + 1)) == ["app", "user_id", "ttl"]
    for ttl_ns in (limits.USER_TOKEN_TTL_NS_MIN, limits.USER_TOKEN_TTL_NS_MAX):
        assert c.MintUserToken(app="a", user_id="u", ttl_ns=ttl_ns).ttl_ns == ttl_ns
    assert c.MintUserToken(app="a", user_id="u").ttl_ns == limits.USER_TOKEN_TTL_NS_DEFAULT


def test_a_key_spec_names_every_bad_field_at_once():
    assert fields_of(lambda: c.KeySpec(app="", kind="root",
                                       name="n" * (limits.KEY_NAME_BYTES_MAX + 1))) == [
        "app", "kind", "name"]
    assert c.KeySpec(app="a", kind="public").name == ""


# --- conversion maps shapes; the values judge --------------------------------------------------


def test_a_reserve_with_every_field_bad_names_each_one_once():
    request = pb.ReserveRequest(
        user_id="", event_type="e" * (limits.EVENT_TYPE_BYTES_MAX + 1), amount=0,
        metadata={f"k{i:02d}": "v" for i in range(limits.METADATA_ENTRIES_MAX + 1)},
        ttl=Duration(seconds=1, nanos=-1),
        idempotency_key="k" * (limits.IDEMPOTENCY_KEY_BYTES_MAX + 1))
    assert sorted(fields_of(lambda: convert.reserve("a", request))) == [
        "amount", "event_type", "idempotency_key", "metadata", "ttl", "user_id"]


@pytest.mark.parametrize("entries", [{}, {"model": "gpt-4o"}, {"": "v"},
                                     {"z": "1", "a": "2", "m": "3"}])
def test_a_metadata_map_becomes_its_pairs_sorted_by_key(entries):
    for to_command, message in ((convert.reserve, pb.ReserveRequest),
                                (convert.track, pb.TrackRequest)):
        request = message(user_id="u", event_type="e", amount=1, metadata=entries)
        if "" in entries:  # a key must have a byte: refused, as any bad field
            assert fields_of(lambda: to_command("a", request)) == ["metadata"]
        else:
            assert to_command("a", request).metadata == tuple(sorted(entries.items()))


@pytest.mark.parametrize("ttl", [Duration(seconds=2, nanos=-1), Duration(seconds=1, nanos=S),
                                 Duration(seconds=-5), Duration(seconds=0, nanos=S - 1)])
def test_a_malformed_or_out_of_range_duration_is_a_bad_ttl_everywhere(ttl):
    assert fields_of(lambda: convert.reserve("a", pb.ReserveRequest(
        user_id="u", event_type="e", amount=1, ttl=ttl))) == ["ttl"]
    assert fields_of(lambda: convert.extend("a", pb.ExtendRequest(
        reservation_id=RESERVATION_ID, ttl=ttl))) == ["ttl"]
    assert fields_of(lambda: convert.mint_user_token("a", pb.MintUserTokenRequest(
        user_id="u", ttl=ttl))) == ["ttl"]


def test_fields_left_out_mean_what_the_contract_says():
    assert convert.reserve("a", pb.ReserveRequest(
        user_id="u", event_type="e", amount=1)).ttl_ns == limits.TTL_NS_DEFAULT
    assert fields_of(lambda: convert.extend("a", pb.ExtendRequest(
        reservation_id=RESERVATION_ID))) == ["ttl"]
    assert fields_of(lambda: convert.upsert_plan("a", pb.UpsertPlanRequest())) == ["plan"]
    assert convert.list_events("a", pb.ListEventsRequest(user_id="u")) == c.ListEvents(
        app="a", user_id="u")
    assert fields_of(lambda: convert.list_events("a", pb.ListEventsRequest(
        user_id="u", start_time=Timestamp(seconds=1, nanos=-1),
        end_time=Timestamp(seconds=253_402_300_800)))) == ["start_time", "end_time"]
    assert convert.key_spec("a", pb.CreateKeyRequest(kind=pb.KEY_KIND_SECRET)).kind == "secret"
    assert fields_of(lambda: convert.key_spec("a", pb.CreateKeyRequest(kind=99))) == ["kind"]


# --- one user_id rule, wherever a user id arrives ----------------------------------------------


USER_ID_CARRIERS: dict[str, Callable[[str], Any]] = {
    "Reserve": lambda user_id: c.Reserve(app="a", user_id=user_id, event_type="e", amount=1,
                                         reservation_id=RESERVATION_ID),
    "Track": lambda user_id: c.Track(app="a", user_id=user_id, event_type="e", amount=1),
    "GetUsage": lambda user_id: c.GetUsage(app="a", user_id=user_id),
    "UpsertSubscription": lambda user_id: c.UpsertSubscription(app="a", user_id=user_id,
                                                               plan_id="p"),
    "GetSubscription": lambda user_id: c.GetSubscription(app="a", user_id=user_id),
    "ListEvents": lambda user_id: c.ListEvents(app="a", user_id=user_id),
    "WatchUsage": lambda user_id: c.WatchUsage(app="a", user_id=user_id),
    "MintUserToken": lambda user_id: c.MintUserToken(app="a", user_id=user_id),
    "HTTP usage": lambda user_id: query_user_id(f"user_id={user_id}"),
}


@pytest.mark.parametrize("carrier", USER_ID_CARRIERS)
def test_every_request_that_carries_a_user_id_keeps_the_same_rule(carrier):
    build = USER_ID_CARRIERS[carrier]
    widest = "é" * (limits.USER_ID_BYTES_MAX // 2)  # 256 UTF-8 bytes, 128 characters
    build(widest)
    build("u")
    for bad in ("", widest + "u"):
        assert fields_of(lambda: build(bad)) == ["user_id"]


# --- through the real server -------------------------------------------------------------------


def test_the_server_names_every_bad_list_events_field_at_once(server):
    with pytest.raises(grpc.RpcError) as refused:
        admin(server.address).ListEvents(pb.ListEventsRequest(
            user_id="", page_size=-1, page_token="~", start_time=Timestamp(seconds=-1),
            end_time=Timestamp(seconds=1, nanos=S)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    rpc_status.from_call(refused.value).details[0].Unpack(bad)
    assert [v.field for v in bad.field_violations] == [
        "user_id", "page_size", "start_time", "end_time", "page_token"]
