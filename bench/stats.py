"""Latency percentiles, log-spaced histograms, medians of runs."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999))

# Histogram bins: 20 per decade from 10 us to 100 s (latencies in milliseconds).
_BINS_PER_DECADE = 20
_LOW_MS, _HIGH_MS = 0.01, 100_000.0
_DECADES = round(math.log10(_HIGH_MS / _LOW_MS))
HISTOGRAM_EDGES_MS = [_LOW_MS * 10 ** (i / _BINS_PER_DECADE)
                      for i in range(_DECADES * _BINS_PER_DECADE + 1)]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 when there are none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(latencies_s: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9, mean and max in milliseconds, and the count."""
    values = sorted(latencies_s)
    summary = {name: percentile(values, q) * 1e3 for name, q in PERCENTILES}
    summary["mean"] = (sum(values) / len(values) * 1e3) if values else 0.0
    summary["max"] = values[-1] * 1e3 if values else 0.0
    summary["count"] = len(values)
    return summary


def histogram(latencies_s: Iterable[float]) -> list[int]:
    """Counts per bin of HISTOGRAM_EDGES_MS (values outside go to the first or last bin)."""
    counts = [0] * (len(HISTOGRAM_EDGES_MS) - 1)
    top = len(counts) - 1
    scale = _BINS_PER_DECADE
    for value in latencies_s:
        ms = value * 1e3
        index = int(math.floor(math.log10(ms / _LOW_MS) * scale)) if ms > _LOW_MS else 0
        counts[min(max(index, 0), top)] += 1
    return counts


def median_of(runs: Sequence[dict], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def least_squares_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """The slope of the least-squares line through (xs, ys); None with fewer than two distinct
    xs."""
    if len(xs) != len(ys) or len(xs) < 2:
        return None
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread
