"""How long the log has room left: a warning while, at the rate the LMDB file has been growing,
it would fill its map (`--map-size-gib`) or the disk under it within a day.

Pure: the server samples the file's bytes in use (LMDB's high-water mark: pages freed by
pruning are reused below it, so it stops growing once the audit retention is reached), the map
and the disk's free bytes, and passes the time in. A full map or disk stops the server
(fail-stop, Guarantees); this says so hours before, in the log, with what to change.

Below the log's size bound (--audit-retention-gib), pruning stops the growth at the bound
while the records every prune keeps (those of the keys' retention, a day by default) fit under
it: the map is then out of reach, and only a disk with less room than the bound is warned of.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from quotad.core import limits


@dataclass(frozen=True)
class LogFillsSoon:
    """What a warning says: the bytes in use, the bound that runs out first ("map" or
    "disk"), the bytes left before it, the growth rate and when it fills at that rate."""

    used_bytes: int
    bound: str
    left_bytes: int
    growth_bytes_per_s: float
    fills_in_s: float


class LogHeadroom:
    """The growth rate of the bytes in use, smoothed over LOG_GROWTH_SMOOTHING_S (an
    exponentially weighted mean: two numbers, whatever the sampling); a warning when that rate
    fills the map or the disk within LOG_FULL_WARN_WITHIN_S, at most once per
    LOG_FULL_WARN_REPEAT_S."""

    def __init__(self, live_bytes_max: int = 0) -> None:
        assert live_bytes_max >= 0
        self._live_bytes_max = live_bytes_max
        """The log's size bound (0: none)."""
        self._last: tuple[float, int] | None = None
        self.growth_bytes_per_s = 0.0
        self._warned_at_s: float | None = None

    def sample(self, now_s: float, used_bytes: int, map_bytes: int, disk_free_bytes: int,
               kept_ns: int = limits.LOG_KEPT_NS_MIN) -> LogFillsSoon | None:
        """Takes a sample (now_s from a monotonic clock); the warning when one is due.
        kept_ns: how long every record stays whatever the bound, as pruning keeps it now
        (Writer.kept_ns)."""
        assert used_bytes >= 0 and map_bytes > 0 and disk_free_bytes >= 0
        assert kept_ns >= limits.LOG_KEPT_NS_MIN
        last, self._last = self._last, (now_s, used_bytes)
        if last is None or now_s <= last[0]:
            return None
        elapsed_s = now_s - last[0]
        rate = (used_bytes - last[1]) / elapsed_s  # < 0 never: LMDB's file does not shrink
        weight = 1.0 - math.exp(-elapsed_s / limits.LOG_GROWTH_SMOOTHING_S)
        self.growth_bytes_per_s += weight * (rate - self.growth_bytes_per_s)
        if self.growth_bytes_per_s <= 0:
            return None
        kept_bytes = self.growth_bytes_per_s * kept_ns / limits.NS_PER_S
        if used_bytes < self._live_bytes_max and kept_bytes < self._live_bytes_max:
            if disk_free_bytes >= self._live_bytes_max - used_bytes:
                return None  # pruning stops the growth at the bound, before the disk or map
            bound, left = "disk", disk_free_bytes
        else:
            map_left = max(0, map_bytes - used_bytes)
            bound, left = ("map", map_left) if map_left <= disk_free_bytes else (
                "disk", disk_free_bytes)
        fills_in_s = left / self.growth_bytes_per_s
        if fills_in_s > limits.LOG_FULL_WARN_WITHIN_S:
            return None
        if (self._warned_at_s is not None
                and now_s - self._warned_at_s < limits.LOG_FULL_WARN_REPEAT_S):
            return None
        self._warned_at_s = now_s
        return LogFillsSoon(used_bytes, bound, left, self.growth_bytes_per_s, fills_in_s)
