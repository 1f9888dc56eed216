"""Whether the service takes calls: not while starting, draining, or after a storage failure."""

from __future__ import annotations

import enum
import ipaddress
from typing import Protocol

from quotad.api.auth import Authenticator
from quotad.cluster import Ownership
from quotad.cluster.catalog import Catalog
from quotad.core.errors import Refusal
from quotad.engine.writer import Writer


class Unavailable(Refusal):
    """The service takes no calls now: starting, draining, its storage failed, or (a shard of
    a cluster) it does not hold its lease."""

    code = "UNAVAILABLE"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Fence(Protocol):
    """What a shard of a cluster must hold to serve: its shard id's lease in etcd."""

    def held(self) -> bool:
        ...

    def refusal(self) -> str:
        """Why calls are refused while it is not held."""
        ...


class GateState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    FAILED = "failed"


class Gate:
    """Whether the service takes calls: not while starting, draining, or after a failure."""

    def __init__(self) -> None:
        self.writer: Writer | None = None
        self.auth: Authenticator | None = None
        """Set with the writer, once the core it reads keys from exists."""
        self.state = GateState.STARTING
        self.ownership: Ownership | None = None
        """The slots this server owns: set before it serves (a server alone owns all)."""
        self.fence: Fence | None = None
        """A shard of a cluster in etcd: calls pass only while it holds its lease."""
        self.catalog: Catalog | None = None
        """A shard of a cluster in etcd: where UpsertPlan, DeletePlan, CreateKey and RevokeKey
        write (every shard applies them)."""

    @property
    def serving(self) -> bool:
        return self.state is GateState.SERVING and (self.fence is None or self.fence.held())

    def open_writer(self) -> Writer:
        if self.fence is not None and not self.fence.held():
            raise Unavailable(self.fence.refusal())
        if self.state is not GateState.SERVING or self.writer is None or self.writer.failed:
            raise Unavailable(f"quotad is {self.state.value}"
                              if self.state is not GateState.SERVING else "quotad storage failed")
        return self.writer
