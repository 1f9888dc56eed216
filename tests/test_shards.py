"""Slots and the shard map: range text round trips, every slot owned once, the JSON form,
and the file source's refusals."""

from __future__ import annotations

import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotad.cluster import FileShardMapSource, Ownership
from quotad.core.errors import FailedPrecondition
from quotad_contract.errors import ErrorReason
from quotad_contract.limits import SHARD_ADDRESS_BYTES_MAX, SHARD_ID_MAX, SLOTS
from quotad_contract.shards import (
    Shard, ShardMap, ShardMapError, format_slots, parse_slots, slot_of, slot_of_reservation,
)

slot_sets = st.frozensets(st.integers(0, SLOTS - 1), min_size=1)


@st.composite
def shard_maps(draw) -> ShardMap:
    """A partition of every slot among 1 to 8 shards, each owning at least one."""
    count = draw(st.integers(1, 8))
    order = list(range(SLOTS))
    random.Random(draw(st.integers(0, 2**32))).shuffle(order)
    cuts = sorted(draw(st.lists(st.integers(1, SLOTS - 1), min_size=count - 1,
                                max_size=count - 1, unique=True)))
    bounds = [0, *cuts, SLOTS]
    ids = draw(st.lists(st.integers(0, 10_000), min_size=count, max_size=count, unique=True))
    return ShardMap.of(Shard(ids[i], f"127.0.0.1:{5000 + i}",
                             frozenset(order[bounds[i]: bounds[i + 1]]))
                       for i in range(count))


@given(slot_sets)
def test_slot_ranges_round_trip_through_their_text(slots):
    text = format_slots(slots)
    assert parse_slots(text) == slots
    assert format_slots(parse_slots(text)) == text


@settings(max_examples=50, deadline=None)
@given(shard_maps(), st.text(max_size=20), st.text(max_size=40))
def test_every_slot_has_exactly_one_owner_and_the_json_form_round_trips(shard_map, app, user):
    slot = slot_of(app, user)
    assert 0 <= slot < SLOTS
    owners = [shard for shard in shard_map.shards if slot in shard.slots]
    assert owners == [shard_map.owner(slot)]
    assert sum(len(shard.slots) for shard in shard_map.shards) == SLOTS
    assert ShardMap.from_json(shard_map.to_json()) == shard_map


def test_a_slot_is_the_crc32_of_app_nul_user_modulo_the_slot_count():
    assert slot_of("default", "user-42") == zlib.crc32(b"default\0user-42") % 4096


@given(st.integers(0, SLOTS - 1), st.text("0123456789abcdef", min_size=21, max_size=21))
def test_a_reservation_ids_first_three_hex_digits_are_its_slot(slot, rest):
    assert slot_of_reservation(f"rsv_{slot:03x}{rest}") == slot


@pytest.mark.parametrize("reservation_id", ["", "rsv_", "rsv_ABC", "rsv_" + "g" * 24,
                                            "rsv_" + "0" * 23, "xyz_" + "0" * 24])
def test_an_id_not_of_the_contracts_form_names_no_slot(reservation_id):
    assert slot_of_reservation(reservation_id) is None


@pytest.mark.parametrize("text, problem", [
    ("", "not FIRST-LAST"), ("0-", "not FIRST-LAST"), ("a-b", "not FIRST-LAST"),
    ("5-4", "first <= last"), ("0-4096", "within 0-4095"), ("0-10,10-20", "overlaps"),
])
def test_bad_slot_ranges_are_refused_naming_the_range(text, problem):
    with pytest.raises(ShardMapError, match=problem):
        parse_slots(text)


def _shard(shard_id: int, slots: str, address: str = "127.0.0.1:1") -> dict:
    return {"id": shard_id, "address": address, "slots": slots}


def test_a_shard_id_and_an_address_at_their_limits_are_taken_and_one_past_is_refused():
    import json
    at_limit = [_shard(SHARD_ID_MAX, "0-4095", "h" * (SHARD_ADDRESS_BYTES_MAX - 2) + ":1")]
    taken = ShardMap.from_json(json.dumps({"shards": at_limit}))
    assert taken.owner(0).shard_id == SHARD_ID_MAX
    with pytest.raises(ShardMapError, match="is not 0 to"):
        ShardMap.from_json(json.dumps({"shards": [_shard(SHARD_ID_MAX + 1, "0-4095")]}))
    with pytest.raises(ShardMapError, match=f"at most {SHARD_ADDRESS_BYTES_MAX} bytes"):
        ShardMap.from_json(json.dumps({"shards": [
            _shard(0, "0-4095", "h" * (SHARD_ADDRESS_BYTES_MAX - 1) + ":1")]}))


@pytest.mark.parametrize("shards, problem", [
    ([_shard(0, "0-4094")], "slots 4095 are owned by no shard"),
    ([_shard(0, "0-4095"), _shard(1, "7")], "slot 7 is owned by shards 0 and 1"),
    ([_shard(0, "0-2000"), _shard(0, "2001-4095")], "shard id 0 appears twice"),
    ([_shard(0, "0-4095", "localhost")], "is not HOST:PORT"),
    ([_shard(0, "0-4095", "localhost:0")], "is not HOST:PORT"),
    ([_shard(0, "0-4095", "local host:1")], "is not HOST:PORT"),
    ([_shard(0, "0-4095", ":1")], "is not HOST:PORT"),
    ([_shard(0, "0-4095", "h" * 254 + ":1")], "at most 255 bytes"),
    ([_shard(-1, "0-4095")], "is not 0 to"),
    ([], "1 to 4096 shards"),
])
def test_a_bad_map_is_refused_naming_the_problem(shards, problem):
    import json
    with pytest.raises(ShardMapError, match=problem):
        ShardMap.from_json(json.dumps({"shards": shards}))


@pytest.mark.parametrize("text, problem", [
    ("{", "not JSON"), ("[]", "must be an object"), ('{"shards": [1]}', "shards\\[0\\]"),
    ('{"shards": [{"id": "0", "address": "h:1", "slots": "0-4095"}]}', "id must be an integer"),
    ('{"shards": [{"id": 0, "address": "h:1", "slots": [0]}]}', "slots must be a string"),
])
def test_malformed_json_is_refused_naming_the_problem(text, problem):
    with pytest.raises(ShardMapError, match=problem):
        ShardMap.from_json(text)


def test_the_file_source_reads_the_json_form(tmp_path):
    shard_map = ShardMap.of([Shard(0, "127.0.0.1:7000", parse_slots("0-1364,4000-4095")),
                             Shard(1, "127.0.0.1:7001", parse_slots("1365-3999"))])
    path = tmp_path / "map.json"
    path.write_text(shard_map.to_json())
    assert FileShardMapSource(path).load() == shard_map
    with pytest.raises(ShardMapError, match="cannot read"):
        FileShardMapSource(tmp_path / "none.json").load()


def test_ownership_refuses_other_shards_users_naming_the_owner():
    shard_map = ShardMap.of([Shard(0, "127.0.0.1:7000", parse_slots("0-2047")),
                             Shard(1, "127.0.0.1:7001", parse_slots("2048-4095"))])
    mine = Ownership.of(shard_map, 0)
    users = [f"user-{n}" for n in range(64)]
    theirs = next(u for u in users if slot_of("app", u) >= 2048)
    ours = next(u for u in users if slot_of("app", u) < 2048)
    mine.check_user("app", ours)
    with pytest.raises(FailedPrecondition) as refused:
        mine.check_user("app", theirs)
    assert refused.value.reason is ErrorReason.WRONG_SHARD
    assert dict(refused.value.metadata) == {"slot": str(slot_of("app", theirs)),
                                            "shard_id": "1", "address": "127.0.0.1:7001"}
    with pytest.raises(FailedPrecondition):
        mine.check_reservation("rsv_fff" + "0" * 21)
    mine.check_reservation("rsv_000" + "0" * 21)
    mine.check_reservation("not-an-id")   # left to the request's own check
    mine.check_user("app", "")
    for address in ("my_host.internal:7000", "[::1]:7000", "0.0.0.0:7000"):
        assert Ownership.alone(address).shard_map.owner(0).address == address
    alone = Ownership.alone("127.0.0.1:7000")
    alone.check_user("app", theirs)
    alone.check_reservation("rsv_fff" + "0" * 21)
    with pytest.raises(ShardMapError, match="no shard 9"):
        Ownership.of(shard_map, 9)


# --- a cluster's subscription list, merged from its shards' pages ------------------------------

@settings(max_examples=200, deadline=None)
@given(users=st.sets(st.text("abcxyz019", min_size=1, max_size=4), max_size=60),
       shards=st.integers(1, 4), page_size=st.integers(0, 9), seed=st.integers(0, 2**16))
def test_merged_subscription_pages_list_every_user_once_in_order(users, shards, page_size,
                                                                 seed):
    """Each shard answers as the server does (its first N users after the token, `more` when
    it has others); paging through the merged pages gives every user once, in order."""
    from quotad_client._cluster import merged_subscription_page
    from quotad_client._types import Subscription, SubscriptionPage
    from quotad_contract.limits import SUBSCRIPTIONS_PAGE_SIZE_DEFAULT

    rng = random.Random(seed)
    owned: list[list[str]] = [[] for _ in range(shards)]
    for user in users:
        owned[rng.randrange(shards)].append(user)

    def shard_page(mine: list[str], token: str) -> SubscriptionPage:
        after = sorted(user for user in mine if user > token)
        size = page_size or SUBSCRIPTIONS_PAGE_SIZE_DEFAULT
        page = after[:size]
        return SubscriptionPage(
            tuple(Subscription(user_id=user, plan_id="p", time_zone="UTC") for user in page),
            page[-1] if len(after) > size else "")

    listed, token = [], ""
    for _ in range(len(users) + 2):  # bounded: each page but the last holds a user
        page = merged_subscription_page([shard_page(mine, token) for mine in owned], page_size)
        listed += [subscription.user_id for subscription in page.subscriptions]
        token = page.next_page_token
        if not token:
            break
    assert listed == sorted(users)


@settings(max_examples=200, deadline=None)
@given(cursors=st.dictionaries(st.integers(0, 10**6), st.integers(0, 2**63).map(str),
                               max_size=20))
def test_a_cluster_export_cursor_gives_back_each_shards_own(cursors):
    from quotad_client._cluster import export_cursor, export_cursors

    assert export_cursors(export_cursor(cursors)) == cursors


@pytest.mark.parametrize("cursor", [
    "123",  # one shard's bare cursor
    "shards:0",  # no cursor
    "shards:0=1,0=2",  # a shard twice
    "shards:x=1",
    "shards:0=-1",
    "shards:0=1,",
    "shards:0=1;1=2",
])
def test_a_cluster_export_cursor_not_of_the_form_is_refused_naming_it(cursor):
    from quotad_client._cluster import EXPORT_CURSOR_PREFIX, export_cursors

    with pytest.raises(ValueError, match=EXPORT_CURSOR_PREFIX if cursor == "123" else "SHARD_ID"):
        export_cursors(cursor)
