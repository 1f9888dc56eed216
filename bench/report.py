"""Turning runs into figures: per-run summaries, medians, quotad / peer ratios, the machine, the
markdown table for the README, and the PNG plots (matplotlib, Agg backend; skipped with a
note when matplotlib is not installed)."""

from __future__ import annotations

import os
import platform
import sys
from array import array
from pathlib import Path
from typing import Any

from . import stats
from .worker import OPS, PACE_LATE_S

SUMMARY_KEYS = ("ops_per_s", "pairs_per_s", "p50_ms", "p90_ms", "p99_ms", "p999_ms",
                "server_cpu_util", "server_cpu_us_per_op", "client_cpu_util", "denied_share",
                "ops_per_batch_rpc", "asked_ops_per_s", "not_sent_share", "busiest_shard_share")
RANGE_KEYS = ("ops_per_s", "server_cpu_util", "server_cpu_us_per_op", "ops_per_batch_rpc",
              "p50_ms", "p99_ms", "not_sent_share")
"""The figures whose range over the runs (lowest, highest) goes with their median."""
RATIO_KEYS = ("ops_per_s", "pairs_per_s", "p50_ms", "p99_ms")


def merge_run(parts: list[dict[str, Any]], *, workload: str, bucket_s: float,
              server_cpu_s: float | None) -> tuple[dict[str, Any], list[float]]:
    """The summary of one run (all processes) and its raw latencies (seconds, all ops)."""
    start = min(part["start"] for part in parts)
    end = max(part["end"] for part in parts)
    ops = sum(part["ops"] for part in parts)
    pairs = sum(part["pairs"] for part in parts)
    elapsed = max(end - start, 1e-9)
    errors: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    for part in parts:
        for name, count in part["errors"].items():
            errors[name] = errors.get(name, 0) + count
        for name, count in part["outcomes"].items():
            outcomes[name] = outcomes.get(name, 0) + count
    by_op: dict[str, list[float]] = {op: [] for op in OPS}
    for part in parts:
        for op, raw in part["latencies"].items():
            by_op[op].extend(array("d", raw))
    everything = [value for op in OPS for value in by_op[op]]
    timeline = [0] * max(len(part["timeline"]) for part in parts)
    for part in parts:
        for index, count in enumerate(part["timeline"]):
            timeline[index] += count
    latency = stats.latency_summary(everything)
    reserves = outcomes.get("allowed", 0) + outcomes.get("denied", 0)
    summary: dict[str, Any] = {
        "seconds": elapsed,
        "ops": ops,
        "pairs": pairs,
        "ops_per_s": ops / elapsed,
        "pairs_per_s": (pairs / elapsed) if workload != "track" else None,
        "p50_ms": latency["p50"], "p90_ms": latency["p90"], "p99_ms": latency["p99"],
        "p999_ms": latency["p999"], "mean_ms": latency["mean"], "max_ms": latency["max"],
        "latency_ms_by_op": {op: stats.latency_summary(values)
                             for op, values in by_op.items() if values},
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "outcomes": outcomes,
        "denied_share": (outcomes.get("denied", 0) / reserves) if reserves else None,
        "allowed_share": (outcomes.get("allowed", 0) / reserves) if reserves else None,
        "expired_share": (outcomes.get("left_to_expire", 0) / reserves) if reserves else None,
        "histogram_counts": stats.histogram(everything),
        "throughput_bucket_s": bucket_s,
        # the last bucket is cut short by the end of the run: left out
        "throughput_ops_per_s": [count / bucket_s for count in timeline[:-1]] or
                                [ops / elapsed],
        "client_cpu_s": sum(part["client_cpu_s"] for part in parts),
        "client_cpu_util": sum(part["client_cpu_s"] for part in parts) / elapsed,
        "server_cpu_s": server_cpu_s,
        "server_cpu_util": (server_cpu_s / elapsed) if server_cpu_s is not None else None,
        "server_cpu_us_per_op": (server_cpu_s / ops * 1e6
                                 if server_cpu_s is not None and ops else None),
        "stopped_early": any(part["stopped_early"] for part in parts),
    }
    batches = [part.get("batches_sent") for part in parts]
    if all(isinstance(b, int) for b in batches) and sum(batches):
        summary["batch_rpcs"] = sum(batches)
        summary["ops_per_batch_rpc"] = ops / sum(batches)
    by_shard: dict[str, int] = {}
    for part in parts:
        for shard, count in part.get("ops_by_shard", {}).items():
            by_shard[shard] = by_shard.get(shard, 0) + count
    if by_shard:
        summary["ops_per_s_by_shard"] = {shard: count / elapsed
                                         for shard, count in sorted(by_shard.items(),
                                                                    key=lambda kv: int(kv[0]))}
        # 1 / shards when the shards see the same load; the busiest one's share otherwise
        summary["busiest_shard_share"] = max(by_shard.values()) / sum(by_shard.values())
    if parts[0].get("paced_ops_per_s") is not None:
        asked = sum(part["asked_ops"] for part in parts)
        busy = sum(part["not_sent_busy_ops"] for part in parts)
        late = sum(part["not_sent_late_ops"] for part in parts)
        summary["asked_ops_per_s"] = sum(part["paced_ops_per_s"] for part in parts)
        summary["not_sent_busy_ops"] = busy
        summary["not_sent_late_ops"] = late
        summary["not_sent_share"] = (busy + late) / asked if asked else 0.0
    return summary, everything


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {key: stats.median_of(runs, key) for key in SUMMARY_KEYS}
    out["errors"] = sum(run["errors"] for run in runs)
    out["runs"] = len(runs)
    out["ranges"] = {key: [min(values), max(values)] for key in RANGE_KEYS
                     if (values := [run[key] for run in runs if run.get(key) is not None])}
    shards = sorted({shard for run in runs for shard in run.get("ops_per_s_by_shard", {})},
                    key=int)
    if shards:
        out["ops_per_s_by_shard"] = {
            shard: stats.median_of([run.get("ops_per_s_by_shard", {}) for run in runs], shard)
            for shard in shards}
    return out


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """quotad / peer for each peer, from the medians (>1 ops/s: quotad faster)."""
    quotad = results.get("quotad", {}).get("median")
    if not quotad:
        return {}
    return {name: {key: stats.ratio(quotad.get(key), entry["median"].get(key))
                   for key in RATIO_KEYS}
            for name, entry in results.items() if name != "quotad"}


# --- the machine -------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _filesystem_of(path: str) -> str | None:
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    best, fs = "", None
    real = os.path.realpath(path)
    for fields in mounts:
        if len(fields) >= 3 and (real == fields[1] or real.startswith(fields[1].rstrip("/") + "/")):
            if len(fields[1]) >= len(best):
                best, fs = fields[1], fields[2]
    return fs


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def machine(redis_version: str | None) -> dict[str, Any]:
    import tempfile

    import grpc

    try:
        import redis
        redis_py = redis.__version__
    except ImportError:
        redis_py = None
    try:
        mem_kib = next(int(line.split()[1]) for line in
                       Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem_kib = 0
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(mem_kib / 1024**2, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
        "redis_server": redis_version,
        "redis_py": redis_py,
        "temp_dir": tempfile.gettempdir(),
        "temp_dir_filesystem": _filesystem_of(tempfile.gettempdir()),
        "loadavg_at_start": loadavg(),
    }


# --- text --------------------------------------------------------------------------------------

def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _pct(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value * 100:.{digits}f} %"


def markdown(document: dict[str, Any]) -> str:
    config, box = document["config"], document["machine"]
    how = (f"{config['seconds']:g} s" if config["seconds"] is not None
           else f"{config['ops']:,} operations")
    lines = [
        f"Machine: {box['nproc']} CPUs (nproc), {box['cpu_model']}, {box['memory_gib']} GiB; "
        f"Linux {box['kernel']}; Python {box['python']}, grpcio {box['grpcio']}"
        + (f"; redis-server {box['redis_server']}, redis-py {box['redis_py']}"
           if box.get("redis_server") else "")
        + (f"; data on {box['temp_dir_filesystem']}" if box.get("temp_dir_filesystem") else "")
        + ". Clients and servers share the machine"
        + (f" (1-minute load average {box['loadavg_at_start'][0]:.2f} before the bench)."
           if box.get("loadavg_at_start") else "."),
        "",
        f"{config['users']:,} users (Zipf s={config['zipf_s']:g}), {config['concurrency']} in "
        f"flight × {config['processes']} client process(es), {how} per run, "
        f"{config['runs']} run(s) per target alternating; medians.",
        "",
        "| workload | target | ops/s | pairs/s | p50 ms | p90 ms | p99 ms | p99.9 ms | denied "
        "| errors | server CPU | client CPU | ops per RPC | quotad / target ops/s "
        "| quotad / target p99 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for workload, entry in document["workloads"].items():
        for name, target in entry["targets"].items():
            m = target["median"]
            r = entry["ratios"].get(name, {}) if name != "quotad" else {
                "ops_per_s": 1.0, "p99_ms": 1.0}
            lines.append(
                f"| {workload} | {target['description']} | {_num(m['ops_per_s'])} "
                f"| {_num(m['pairs_per_s'])} | {_num(m['p50_ms'], 2)} | {_num(m['p90_ms'], 2)} "
                f"| {_num(m['p99_ms'], 2)} | {_num(m['p999_ms'], 2)} "
                f"| {_pct(m['denied_share'], 1)} | {m['errors']:,} | {_pct(m['server_cpu_util'])} "
                f"| {_pct(m['client_cpu_util'])} | {_num(m['ops_per_batch_rpc'], 1)} "
                f"| {_ratio(r.get('ops_per_s'))} "
                f"| {_ratio(r.get('p99_ms'))} |")
    lines += [
        "",
        "Latencies are of single calls (each Reserve, Commit, Release, Track), as the client "
        "sees them. quotad / target: above 1 for ops/s, quotad is faster; above 1 for p99, "
        "quotad is slower. CPU: share of one core (server process; all client processes). "
        "Ops per RPC: operations per Batch RPC when the client coalesces (— : one per call).",
    ]
    lines += shard_lines(document)
    lines += ["", *asymmetries(document)]
    if document.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{name}: {why}"
                                             for name, why in document["skipped"].items())]
    if document.get("skipped_workloads"):
        lines += ["", "Not run: " + "; ".join(
            f"{' and '.join(names)} on {workload} ({why})"
            for workload, (names, why) in document["skipped_workloads"].items())]
    return "\n".join(lines) + "\n"


def _with_range(median: dict[str, Any], key: str, digits: int, shown: Any = None) -> str:
    """A median with its range over the runs: "80.2 (78.1-83.0)"; the median alone for one
    run. shown(value, digits) writes each figure (default: a number)."""
    shown = shown or _num
    value = median.get(key)
    if value is None:
        return "—"
    low_high = median.get("ranges", {}).get(key)
    if not low_high or median.get("runs", 1) < 2:
        return shown(value, digits)
    return (f"{shown(value, digits)} ({shown(low_high[0], digits)}–"
            f"{shown(low_high[1], digits)})")


def shard_lines(document: dict[str, Any]) -> list[str]:
    """With --shards: quotad alone, then each cluster, by shard count: throughput and the
    server CPU per operation (the shards' together), medians with their ranges over the
    runs; with --ops-per-s-per-shard also the rate asked, what was not sent, and what each
    shard answered. None without --shards."""
    config = document["config"]
    if not config.get("shards"):
        return []
    paced = config.get("ops_per_s_per_shard")
    lines = ["", "By shard count (quotad alone is one process without etcd; a cluster's server "
             "CPU is its shards' together, etcd's apart; medians, (lowest–highest) of the runs):"]
    if paced:
        lines += [
            "",
            f"Paced (open loop): {paced:,g} operations/s asked of each shard (N × {paced:,g} "
            f"in all for N shards, {paced:,g} for quotad alone), spread evenly over "
            f"{config['processes']} client process(es), at most {config['concurrency']} units "
            "in flight in each; server CPU over the measured seconds. Not sent: operations the "
            "clients skipped because they fell behind (that many units in flight, or more than "
            f"{PACE_LATE_S * 1000:g} ms behind their schedule); the achieved ops/s is what was "
            "answered. Each shard: ops/s each shard answered, by shard id (users spread by "
            "Zipf load the shards unevenly; --zipf-s 0 spreads them evenly).",
            "",
            "| workload | shards | asked ops/s | achieved ops/s | not sent | each shard ops/s "
            "| server CPU (cores) | server CPU µs per operation | ops per Batch | p50 ms "
            "| p99 ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    else:
        lines += ["",
                  "| workload | shards | ops/s | server CPU (cores) | server CPU µs per operation "
                  "| ops per Batch |",
                  "|---|---:|---:|---:|---:|---:|"]
    for workload, entry in document["workloads"].items():
        for name, target in entry["targets"].items():
            if name != "quotad" and not name.startswith("cluster-"):
                continue
            m = target["median"]
            shards = "1 (alone)" if name == "quotad" else name.split("-", 1)[1]
            ops = _with_range(m, "ops_per_s", 0)
            cores = _with_range(m, "server_cpu_util", 2)
            per_op = _with_range(m, "server_cpu_us_per_op", 1)
            batch = _with_range(m, "ops_per_batch_rpc", 1)
            if paced:
                each = " / ".join(_num(v) for v in m.get("ops_per_s_by_shard", {}).values())
                lines.append(
                    f"| {workload} | {shards} | {_num(m['asked_ops_per_s'])} | {ops} "
                    f"| {_with_range(m, 'not_sent_share', 1, _pct)} | {each or '—'} | {cores} "
                    f"| {per_op} | {batch} | {_num(m['p50_ms'], 2)} | {_num(m['p99_ms'], 2)} |")
            else:
                lines.append(f"| {workload} | {shards} | {ops} | {cores} | {per_op} | {batch} |")
    return lines


def asymmetries(document: dict[str, Any]) -> list[str]:
    """What differs between the targets besides their servers, as markdown bullets: how each
    is driven, what work the Redis peer leaves out, and what "server CPU" leaves out."""
    config = document["config"]
    names = {name for entry in document["workloads"].values() for name in entry["targets"]}
    grpc_targets = " and ".join(n for n in ("quotad", "echo") if n in names) or "quotad"
    redis = any(name.startswith("redis") for name in names)
    if config.get("coalesce", True):
        driven = (f"- Driving: {grpc_targets} through AsyncQuotaClient, which coalesces the "
                  "calls in flight into Batch RPCs (ops per RPC above)")
    else:
        driven = f"- Driving: {grpc_targets} through AsyncQuotaClient, one RPC per call"
    lines = [driven + ("; Redis is not pipelined: one script call (EVALSHA), one round trip, "
                       "per operation." if redis else ".")]
    if redis:
        keys = ("with an idempotency key on every mutation"
                if config.get("idempotency_keys", True) else "here without idempotency keys")
        lines.append(
            "- Work: the Redis peer keeps no idempotency keys, no audit trail and no calendar "
            "windows (one counter per group; its client tells it which groups an event "
            f"matches); quotad ({keys}) records an audit event per change, counts per "
            "window, and matches the plan's rules itself.")
    lines.append(
        "- Server CPU: the server process's own user + system time (/proc/PID/stat utime + "
        "stime). What it forks is left out: quotad's snapshot children (one per 100,000 "
        "records by default, encoding the whole state) do not count against quotad, nor "
        "would a Redis AOF rewrite.")
    return lines


def ratio_lines(workload: str, entry: dict[str, Any]) -> list[str]:
    lines = []
    for name, r in entry["ratios"].items():
        parts = [f"ops/s {_ratio(r['ops_per_s'])}"]
        if r.get("pairs_per_s") is not None:
            parts.append(f"pairs/s {_ratio(r['pairs_per_s'])}")
        parts += [f"p50 {_ratio(r['p50_ms'])}", f"p99 {_ratio(r['p99_ms'])}"]
        lines.append(f"{workload}: quotad / {name}: " + ", ".join(parts))
    return lines


# --- plots -------------------------------------------------------------------------------------

def pyplot() -> tuple[Any, str | None]:
    """matplotlib.pyplot on the Agg backend, or None and why it cannot be had."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "matplotlib is not installed (pip install -e '.[bench]')"
    return plt, None


def plots(document: dict[str, Any], directory: Path) -> tuple[list[str], str | None]:
    """PNG files written (names), and why none were, if so."""
    plt, why = pyplot()
    if plt is None:
        return [], why
    written = []
    edges = stats.HISTOGRAM_EDGES_MS
    for workload, entry in document["workloads"].items():
        fig, ax = plt.subplots(figsize=(9, 5))
        for name, target in entry["targets"].items():
            counts = [sum(run["histogram_counts"][i] for run in target["runs"])
                      for i in range(len(edges) - 1)]
            total = sum(counts)
            if not total:
                continue
            used = [i for i, c in enumerate(counts) if c]
            lo, hi = max(0, used[0] - 1), min(len(counts), used[-1] + 2)
            ax.stairs([c / total * 100 for c in counts[lo:hi]], edges[lo:hi + 1],
                      label=f"{name} (p50 {target['median']['p50_ms']:.2f} ms, "
                            f"p99 {target['median']['p99_ms']:.2f} ms)")
        ax.set_xscale("log")
        ax.set_xlabel("latency of one call (ms, log scale)")
        ax.set_ylabel("% of calls")
        ax.set_title(f"{workload}: latency of every call, all runs")
        ax.legend(fontsize="small")
        ax.grid(True, which="both", alpha=0.3)
        name = f"latency-{workload}.png"
        fig.tight_layout()
        fig.savefig(directory / name, dpi=100)
        plt.close(fig)
        written.append(name)

        fig, ax = plt.subplots(figsize=(9, 5))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for color, (name, target) in zip(colors * 4, entry["targets"].items()):
            for run_index, run in enumerate(target["runs"]):
                series = run["throughput_ops_per_s"]
                step = run["throughput_bucket_s"]
                ax.plot([(i + 0.5) * step for i in range(len(series))], series, color=color,
                        alpha=0.8, linewidth=1.2,
                        label=name if run_index == 0 else None,
                        linestyle=("-", "--", ":", "-.")[run_index % 4])
        ax.set_xlabel("seconds into the run")
        ax.set_ylabel("operations/s")
        ax.set_title(f"{workload}: throughput over time (one line per run)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
        ax.grid(True, alpha=0.3)
        name = f"throughput-{workload}.png"
        fig.tight_layout()
        fig.savefig(directory / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written, None
