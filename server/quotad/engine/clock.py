"""The server's clock: the time every command is applied at."""

from __future__ import annotations

import time
from collections.abc import Callable


class ServerClock:
    """Strictly increasing ns timestamps, above every time already in the log."""

    def __init__(self, floor_ns: int, wall_ns: Callable[[], int] = time.time_ns) -> None:
        self.last_ns = floor_ns
        self._wall_ns = wall_ns

    def now_ns(self) -> int:
        self.last_ns = max(self._wall_ns(), self.last_ns + 1)
        return self.last_ns
