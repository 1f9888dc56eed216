"""Routing a client's calls across the shards of a cluster (``cluster="HOST:PORT"``).

The client asks any shard for the map (GetShardMap), keeps one channel per shard, and sends
each call to the shard that owns it: a call naming a user by the user's slot, one naming a
hold (commit, release, extend) by its reservation id's first hex digits. A subscription
list asks every shard for the page and merges theirs (`merged_subscription_page`); a usage
export asks every shard in turn, and its cursor holds each shard's own (`ExportCursor`). Any
other call that names neither (plans, keys) goes to the shard the client was given: plans and
keys are the catalog every shard takes.
A WRONG_SHARD refusal (the map moved) makes the client fetch the map again, first from the
shard that refused (its map is at least as new as its refusal; the shard the client was given
may not have the new map yet), and send the call once more.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from google.protobuf.message import Message

from quotad_contract.errors import ErrorReason
from quotad_contract.limits import SUBSCRIPTIONS_PAGE_SIZE_DEFAULT
from quotad_contract.shards import Shard, ShardMap, slot_of, slot_of_reservation
from quotad_contract.v1 import quotad_pb2

from ._types import SubscriptionPage

WRONG_SHARD = ErrorReason.WRONG_SHARD
GET_SHARD_MAP = "GetShardMap"


@dataclass(frozen=True, slots=True)
class Routes:
    """The shard map as the client last fetched it, and the app its key acts in (a user's
    slot is computed with it)."""

    shard_map: ShardMap
    app: str
    answered_by: str
    """The map's address of the shard that answered: the client reaches it where it asked
    (a server alone names its listen address, which may be a wildcard such as 0.0.0.0)."""

    @classmethod
    def from_proto(cls, response: quotad_pb2.GetShardMapResponse) -> Routes:
        shard_map = ShardMap.of(
            Shard(shard.shard_id, shard.address,
                  frozenset(slot for part in shard.slots
                            for slot in range(part.first, part.last + 1)))
            for shard in response.shards)
        return cls(shard_map, response.app, shard_map.shard(response.shard_id).address)

    def address_for(self, request: Message) -> str | None:
        """The address of the shard that owns the request's user or hold; None when it
        names neither."""
        slot = request_slot(self.app, request)
        return None if slot is None else self.shard_map.owner(slot).address

    def address_for_user(self, user_id: str) -> str:
        return self.shard_map.owner(slot_of(self.app, user_id)).address

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(shard.address for shard in self.shard_map.shards)


def map_sources(refused_by: str | None, target: str, known: Sequence[str]) -> list[str]:
    """The shards to ask for the map again, in order, each once: the one that refused a call
    as another's first (it refused by a map at least as new as the call needs, where the
    shard the client was given may not have that map yet), then the given one, then the
    others known."""
    first = (refused_by,) if refused_by is not None else ()
    return list(dict.fromkeys((*first, target, *known)))


def request_slot(app: str, request: Message) -> int | None:
    """The slot a request is routed by: its reservation id's (a well-formed one), else its
    user's; None when it has neither."""
    fields = request.DESCRIPTOR.fields_by_name
    if "reservation_id" in fields:
        return slot_of_reservation(getattr(request, "reservation_id"))
    if "user_id" in fields and getattr(request, "user_id"):
        return slot_of(app, getattr(request, "user_id"))
    return None


def merged_subscription_page(pages: Sequence[SubscriptionPage],
                             page_size: int) -> SubscriptionPage:
    """One page of a cluster's subscriptions from each shard's page after the same token
    (every shard orders by user id, and the token is the last user id a page showed): the
    first page_size of them all, in user id order. The cluster's first N users after the
    token are among each shard's first N, so the page is exact; its token is its last user
    id while any shard has more."""
    size = page_size or SUBSCRIPTIONS_PAGE_SIZE_DEFAULT
    merged = sorted((subscription for page in pages for subscription in page.subscriptions),
                    key=lambda subscription: subscription.user_id)
    page = merged[:size]
    more = len(merged) > size or any(page.next_page_token for page in pages)
    return SubscriptionPage(tuple(page), page[-1].user_id if more and page else "")


EXPORT_CURSOR_PREFIX = "shards:"
_SHARD_CURSOR = re.compile(r"(\d{1,9})=(\d{1,20})")


def export_cursors(cursor: str) -> dict[int, str]:
    """Each shard's own export cursor in a cluster's (``shards:0=123,2=45``; empty: every shard
    from the oldest record its log keeps). A shard the cursor does not name exports from its
    oldest. ValueError for anything else, such as one shard's bare cursor."""
    if not cursor:
        return {}
    if not cursor.startswith(EXPORT_CURSOR_PREFIX):
        raise ValueError(f"cursor {cursor[:64]!r} is not a cluster's export cursor: a cluster "
                         f"export resumes from the {EXPORT_CURSOR_PREFIX}... cursor it gave")
    cursors: dict[int, str] = {}
    parts = cursor.removeprefix(EXPORT_CURSOR_PREFIX)
    for part in parts.split(",") if parts else ():
        matched = _SHARD_CURSOR.fullmatch(part)
        if matched is None or int(matched[1]) in cursors:
            raise ValueError(f"cursor {cursor[:64]!r}: {part[:32]!r} is not SHARD_ID=CURSOR "
                             "(each shard once)")
        cursors[int(matched[1])] = matched[2]
    return cursors


def export_cursor(cursors: Mapping[int, str]) -> str:
    """The cluster's export cursor that holds each shard's (those with one), by shard id."""
    return EXPORT_CURSOR_PREFIX + ",".join(
        f"{shard_id}={cursors[shard_id]}" for shard_id in sorted(cursors) if cursors[shard_id])
