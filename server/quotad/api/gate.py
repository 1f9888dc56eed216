"""Whether the service takes calls: not while starting, draining, or after a storage failure."""

from __future__ import annotations

import enum
import ipaddress

from quotad.api.auth import Authenticator
from quotad.cluster import Ownership
from quotad.core.errors import Refusal
from quotad.engine.writer import Writer


class Unavailable(Refusal):
    """The service takes no calls now: starting, draining, or its storage failed."""

    code = "UNAVAILABLE"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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

    @property
    def serving(self) -> bool:
        return self.state is GateState.SERVING

    def open_writer(self) -> Writer:
        if self.state is not GateState.SERVING or self.writer is None or self.writer.failed:
            raise Unavailable(f"quotad is {self.state.value}"
                              if self.state is not GateState.SERVING else "quotad storage failed")
        return self.writer
