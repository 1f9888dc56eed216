"""The time zones a subscription may name: the IANA zones the tzdata package ships.

A subscription's zone anchors its calendar windows, and the log replays them on whatever host
the server moves to. So a zone name means the same everywhere: exactly the names listed in
tzdata's own `zones` file (the package quotad installs, whatever the host has), such as
`Europe/Paris`, `UTC` or `America/Argentina/Buenos_Aires`; the old names tzdata keeps for
compatibility (`US/Pacific`, `Etc/GMT+5`) are in that list too. Not the host's files beside
them: `localtime` (whatever `/etc/localtime` is on this host), `posixrules`, the `posix/` and
`right/` trees (`right/` counts leap seconds, which no clock here does). Nor `Factory`, which
tzdata lists but which names no place: it stands for "the zone was never set", a mistake in a
subscription.

Standard library only: the server's pure core and the client both import it.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

NOT_A_PLACE = frozenset({"Factory"})
"""In tzdata's list, refused all the same."""


@lru_cache(maxsize=1)
def time_zone_names() -> frozenset[str]:
    """Every zone name a subscription may take."""
    listed = resources.files("tzdata").joinpath("zones").read_text(encoding="utf-8").split()
    return frozenset(listed) - NOT_A_PLACE


def time_zone_problem(name: str) -> str | None:
    """Why `name` is not a zone a subscription may take; None if it is one."""
    if name in time_zone_names():
        return None
    return (f"unknown time zone {name!r}: expected an IANA zone name of the tzdata package, "
            "such as 'Europe/Paris' or 'UTC'")
