"""A soak: quotad under a steady load for minutes, watching what each operation costs it in
memory and on disk.

    python -m bench.soak --minutes 30 [--concurrency 128] [--processes 2] [--sample-s 5]

Drives the pairs workload (Reserve + Commit, the users picked with bench/workloads.py's Zipf
spread, or uniformly with --zipf-s 0) through AsyncQuotaClient with its defaults: the calls in
flight in a process coalesced into Batch RPCs, an idempotency key on every mutation (stored
durably by quotad). quotad is started on a fresh data directory (or --target HOST:PORT --pid
PID --data-dir DIR measures a running one, which must have no API keys).

Every --sample-s seconds it reads the server's anonymous resident memory (RssAnon in
/proc/PID/status: the heap, what a leak grows; the forked snapshot children are read
separately), the data directory's bytes on disk (allocated blocks, as du counts them, and the
apparent size, the sum of file sizes) and the operations completed so far.

At the end it prints operations/s, the RSS and disk bytes per operation (the slope of a
least-squares line through the samples after the warm-up), the RSS growth in % (from the
sample at --rss-growth-from-minutes, or the warm-up's end in a shorter run, to the last), for
a server it started how long its log's size bound (its start line's) holds at that rate, and
a PASS / FAIL line for each target; and writes results.json and soak.png (RSS and disk over
time, throughput below) into --results DIR.

A fresh server's log only grows: it prunes nothing younger than the keys' retention, 24 h.
--aged-records N gives the server a log that reached it: before it starts, N keyed reserve +
commit records are written into its data directory by the real core and log (as
bench.recovery builds one), spread evenly over --aged-minutes of server time whose start is
24 h ago when the build ends, with a whole snapshot of them; the server is started with
--audit-retention-days 1, so while the soak writes new records it prunes the aged ones as they
pass 24 h, at the rate they were spread. With that rate at or above the soak's, the data
directory should stay where it is (pruned pages are reused) and the server's CPU per operation
includes pruning's: a server that has served at full rate for a day, and keeps on.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from quotad.core import limits

from . import procfs, recovery, report, stats
from .harness import (doc_parser, _address, _non_negative_float, _positive_float, _positive_int, _write_json)
from .targets import ROOT, QuotadTarget, process_cpu_s
from .worker import WorkerError, WorkerPool

WARMUP_DEFAULT_S = 60.0
WARMUP_DEFAULT_SHARE = 0.2
LIVE_LINE_EVERY_S = 30.0  # off a terminal: one progress line this often
MB = 1e6
DAY_S = 24 * 3600.0
NS_PER_S = 10**9
NS_PER_DAY = 86400 * NS_PER_S

EPILOG = """\
outputs (in --results DIR, default bench/results/soak-<timestamp>/, git-ignored):
  results.json  the config, the machine, every sample, the figures and the verdicts
  soak.png      RSS and disk bytes over time; throughput per sample below (needs matplotlib)

examples:
  python -m bench.soak --minutes 3
  python -m bench.soak --minutes 60 --warmup-minutes 5 --sample-s 10
  python -m bench.soak --target 127.0.0.1:50051 --pid 4242 --data-dir ./quotad-data --minutes 10
  python -m bench.soak --minutes 10 --aged-records 15000000 --aged-minutes 12
"""


def build_parser() -> argparse.ArgumentParser:
    parser = doc_parser("bench.soak", __doc__, EPILOG)
    what = parser.add_argument_group("what to run")
    what.add_argument("--minutes", type=_positive_float, default=3.0, metavar="M",
                      help="length of the soak in minutes (default: 3)")
    what.add_argument("--target", type=_address, metavar="HOST:PORT",
                      help="soak the quotad already serving there (loopback, no API keys) "
                           "instead of starting one; needs --pid and --data-dir")
    what.add_argument("--pid", type=_positive_int, metavar="PID",
                      help="with --target: the server's process id, for its memory")
    what.add_argument("--data-dir", type=Path, metavar="DIR",
                      help="with --target: the server's data directory, for its bytes on disk")
    what.add_argument("--quotad-arg", action="append", default=[], metavar="ARG",
                      help="one more `quotad serve` argument for the server the soak starts, "
                           "repeatable (e.g. --quotad-arg=--snapshot-every-records=50000)")
    aged = parser.add_argument_group(
        "a log at its retention (the steady state of a server that has served for a day)")
    aged.add_argument("--aged-records", type=_positive_int, metavar="N",
                      help="before the server starts, give its data directory N keyed reserve "
                           "+ commit records (at least 3,001), evenly spread over --aged-minutes "
                           "of server time from 24 h ago, the keys' retention, and a whole "
                           "snapshot of them; the server, started with --audit-retention-days 1, "
                           "prunes them as they pass 24 h while the soak writes new ones")
    aged.add_argument("--aged-minutes", type=_positive_float, default=10.0, metavar="M",
                      help="the server time the aged records span: spread over it at about the "
                           "soak's rate, they pass the retention as fast as it writes (default: "
                           "10)")
    load = parser.add_argument_group("the load")
    load.add_argument("--concurrency", type=_positive_int, default=128, metavar="N",
                      help="pairs in flight per client process (default: 128, so 256 over "
                           "the default 2 processes)")
    load.add_argument("--processes", type=_positive_int, default=2, metavar="N",
                      help="client processes, each with its own client (default: 2)")
    load.add_argument("--users", type=_positive_int, default=1000, metavar="N",
                      help="users, subscribed to the bench plan before the soak (default: 1000)")
    load.add_argument("--zipf-s", type=_non_negative_float, default=0.99, metavar="S",
                      help="Zipf exponent of the users' spread: P(k-th user) ~ 1/k^S; 0 is "
                           "uniform (default: 0.99)")
    load.add_argument("--call-timeout", type=_positive_float, default=2.0, metavar="S",
                      help="deadline of one call, retries included (default: 2.0, the "
                           "client's default)")
    load.add_argument("--seed", type=int, default=1, metavar="N",
                      help="seed of the users and amounts picked (default: 1)")
    measure = parser.add_argument_group("measuring")
    measure.add_argument("--sample-s", type=_positive_float, default=5.0, metavar="S",
                         help="seconds between two samples of memory, disk and operations "
                              "(default: 5)")
    measure.add_argument("--warmup-minutes", type=_non_negative_float, metavar="M",
                         help="samples before this are left out of the fits (default: 1 "
                              "minute, or 20 %% of the soak if that is shorter)")
    measure.add_argument("--rss-growth-from-minutes", type=_non_negative_float, default=5.0,
                         metavar="M",
                         help="the RSS growth is measured from the sample at this minute to the "
                              "last (default: 5; from the warm-up's end when the soak is not "
                              "longer than this)")
    measure.add_argument("--max-rss-growth-pct", type=float, default=5.0, metavar="PCT",
                         help="target: RSS growth at most this, in %% (default: 5)")
    measure.add_argument("--max-disk-bytes-per-op", type=float, default=300.0, metavar="B",
                         help="target: bytes on disk per operation at most this (default: 300)")
    out = parser.add_argument_group("output")
    out.add_argument("--results", type=Path, metavar="DIR",
                     help="where results.json and soak.png go (default: "
                          "bench/results/soak-<timestamp>/, git-ignored)")
    out.add_argument("--no-plots", action="store_true", help="write no PNG plot")
    return parser


class Sampler:
    """Samples the server every sample_s (called from the worker pool's wait loop)."""

    def __init__(self, pool: WorkerPool, pid: int, data_dir: Path, sample_s: float,
                 duration_s: float) -> None:
        self._pool, self._pid, self._data_dir = pool, pid, data_dir
        self._sample_s, self._duration_s = sample_s, duration_s
        self.samples: list[dict[str, Any]] = []
        self._started = 0.0
        self._cpu_started_s = 0.0
        self._live = sys.stderr.isatty()
        self._last_line = -LIVE_LINE_EVERY_S

    def tick(self) -> None:
        now = time.monotonic()
        if not self.samples:
            self._started = now
            self._cpu_started_s = process_cpu_s(self._pid) or 0.0
        elif now - self._started < len(self.samples) * self._sample_s:
            return
        self.take(now)

    def take(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        ops, errors = self._pool.progress()
        memory = procfs.memory_bytes(self._pid) or {}
        children = procfs.child_pids(self._pid)
        children_rss = sum((procfs.memory_bytes(child) or {}).get("RssAnon", 0)
                           for child in children)
        apparent, allocated = procfs.directory_bytes(self._data_dir)
        cpu_s = process_cpu_s(self._pid)
        sample = {
            "t_s": now - self._started, "ops": ops, "errors": errors,
            "rss_anon_bytes": memory.get("RssAnon"), "rss_bytes": memory.get("VmRSS"),
            "children": len(children), "children_rss_anon_bytes": children_rss,
            "disk_allocated_bytes": allocated, "disk_apparent_bytes": apparent,
            "server_cpu_s": cpu_s - self._cpu_started_s if cpu_s is not None else None,
        }
        self.samples.append(sample)
        self._progress(sample)
        return sample

    def _progress(self, sample: dict[str, Any]) -> None:
        if not self._live and sample["t_s"] - self._last_line < LIVE_LINE_EVERY_S:
            return
        self._last_line = sample["t_s"]
        previous = self.samples[-2] if len(self.samples) > 1 else sample
        span_s = sample["t_s"] - previous["t_s"]
        rate = (sample["ops"] - previous["ops"]) / span_s if span_s > 0 else 0.0
        line = (f"soak {sample['t_s'] / 60:5.1f}/{self._duration_s / 60:g} min "
                f"{sample['ops']:>11,} ops {rate:>8,.0f} ops/s  "
                f"RSS {(sample['rss_anon_bytes'] or 0) / MB:8.1f} MB  "
                f"disk {sample['disk_allocated_bytes'] / MB:8.1f} MB  "
                f"{sample['errors']:,} errors")
        sys.stderr.write(f"\r{line}\x1b[K" if self._live else line + "\n")
        sys.stderr.flush()

    def end_line(self) -> None:
        if self._live:
            sys.stderr.write("\n")


AGED_BUILD_NS_PER_RECORD = 40_000
"""What the aged log's build is expected to take per record at most (~38 us here, 26,000
records/s): the first record is stamped this much per record less than 24 h before the build
starts, so that it reaches 24 h about when the build ends (a slower build: the first records
are past 24 h when the server starts, and go in its first pruning)."""


def prepare_aged_log(data_dir: Path, records: int, minutes: float) -> dict[str, Any]:
    """The aged log (--aged-records), then a wait, at most what its build was allowed, until
    its first record is 24 h old (the retention the server is started with): from then on its
    records pass the retention at the rate they were spread."""
    span_ns = int(minutes * 60 * NS_PER_S)
    first_ns = time.time_ns() - limits.LOG_KEPT_NS_MIN + records * AGED_BUILD_NS_PER_RECORD
    print(f"aged log: {records:,} keyed records over {minutes:g} min of server time, the "
          "first 24 h old once built", flush=True)
    started = time.monotonic()
    count = recovery.build_aged(data_dir, records, first_ns, span_ns)
    build_s = time.monotonic() - started
    wait_s = max(0.0, (first_ns + limits.LOG_KEPT_NS_MIN - time.time_ns()) / NS_PER_S)
    if wait_s > 0:
        print(f"aged log: built in {build_s:.0f} s; waiting {wait_s:.0f} s for its first record "
              "to be 24 h old", flush=True)
        time.sleep(wait_s)
    return {"records": count, "first_ns": first_ns, "span_s": span_ns / NS_PER_S,
            "build_s": build_s, "waited_s": wait_s}


def analyse(samples: list[dict[str, Any]], *, warmup_s: float,
            rss_growth_from_s: float) -> dict[str, Any]:
    """The figures of a soak from its samples (see the module's docstring)."""
    duration_s = samples[-1]["t_s"] if samples else 0.0
    after = [s for s in samples if s["t_s"] >= warmup_s and s["rss_anon_bytes"] is not None]
    figures: dict[str, Any] = {"duration_s": duration_s, "warmup_s": warmup_s,
                               "samples": len(samples), "samples_after_warmup": len(after)}
    if len(after) < 2:
        figures["why_no_fit"] = (f"{len(after)} sample(s) after the warm-up of {warmup_s:g} s: "
                                 "run longer, or sample more often")
        return figures
    ops = [s["ops"] for s in after]
    for key in ("rss_anon", "disk_allocated", "disk_apparent"):
        figures[f"{key}_bytes_per_op"] = stats.least_squares_slope(
            ops, [s[f"{key}_bytes"] for s in after])
    span_s = after[-1]["t_s"] - after[0]["t_s"]
    figures["ops_per_s_after_warmup"] = (ops[-1] - ops[0]) / span_s if span_s > 0 else None
    growth_from_s = rss_growth_from_s if duration_s > rss_growth_from_s else warmup_s
    reference = next(s for s in after if s["t_s"] >= growth_from_s) if any(
        s["t_s"] >= growth_from_s for s in after) else after[0]
    figures["rss_growth_from_s"] = reference["t_s"]
    figures["rss_anon_at_growth_start_bytes"] = reference["rss_anon_bytes"]
    figures["rss_anon_last_bytes"] = after[-1]["rss_anon_bytes"]
    figures["rss_growth_pct"] = ((after[-1]["rss_anon_bytes"] - reference["rss_anon_bytes"])
                                 / reference["rss_anon_bytes"] * 100)
    figures["rss_anon_peak_bytes"] = max(s["rss_anon_bytes"] for s in after)
    figures["children_seen"] = max(s["children"] for s in samples)
    figures["children_rss_anon_peak_bytes"] = max(s["children_rss_anon_bytes"] for s in samples)
    return figures


def sizing(figures: dict[str, Any], log_bytes_max: int | None) -> dict[str, Any] | None:
    """How long the server's log bound (its start line's) holds at the rate and disk bytes
    per operation measured: the days of audit trail it keeps, and whether the keys' 24 h
    (what no bound prunes) fit under it. None without a bound or a fit."""
    rate = figures.get("ops_per_s_after_warmup")
    per_op = figures.get("disk_allocated_bytes_per_op")
    if not (log_bytes_max and rate and per_op and per_op > 0):
        return None
    bytes_per_day = rate * per_op * DAY_S
    return {"log_bytes_max": log_bytes_max, "bytes_per_day": bytes_per_day,
            "days_kept": log_bytes_max / bytes_per_day,
            "keys_day_fits": bytes_per_day <= log_bytes_max,
            "hours_to_fill": log_bytes_max / (rate * per_op) / 3600}


def verdicts(figures: dict[str, Any], max_rss_growth_pct: float,
             max_disk_bytes_per_op: float) -> list[dict[str, Any]]:
    checks = []
    growth = figures.get("rss_growth_pct")
    checks.append({"name": "rss_growth_pct", "value": growth, "limit": max_rss_growth_pct,
                   "passed": growth is not None and growth <= max_rss_growth_pct,
                   "text": f"RSS growth from {_minutes(figures.get('rss_growth_from_s'))} to the "
                           f"end <= {max_rss_growth_pct:g} %"})
    per_op = figures.get("disk_allocated_bytes_per_op")
    checks.append({"name": "disk_bytes_per_op", "value": per_op, "limit": max_disk_bytes_per_op,
                   "passed": per_op is not None and per_op <= max_disk_bytes_per_op,
                   "text": f"disk bytes per operation <= {max_disk_bytes_per_op:g}"})
    return checks


def plot(samples: list[dict[str, Any]], warmup_s: float, path: Path) -> str | None:
    """Draws soak.png; why it was not drawn, if so."""
    plt, why = report.pyplot()
    if plt is None:
        return why
    minutes = [s["t_s"] / 60 for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    top.plot(minutes, [(s["rss_anon_bytes"] or 0) / MB for s in samples],
             label="server RSS (anonymous)")
    top.plot(minutes, [s["disk_allocated_bytes"] / MB for s in samples],
             label="data directory on disk (allocated)")
    top.plot(minutes, [s["disk_apparent_bytes"] / MB for s in samples], linestyle="--",
             label="data directory (apparent size)")
    if any(s["children"] for s in samples):
        top.plot(minutes, [s["children_rss_anon_bytes"] / MB for s in samples], linestyle=":",
                 label="snapshot children RSS (anonymous)")
    top.set_ylabel("MB")
    top.set_ylim(bottom=0)
    top.set_title("quotad soak: memory and disk")
    rates = [(b["ops"] - a["ops"]) / (b["t_s"] - a["t_s"]) if b["t_s"] > a["t_s"] else 0.0
             for a, b in zip(samples, samples[1:])]
    bottom.step(minutes[1:], rates, where="pre", color="tab:green")
    bottom.set_ylabel("operations/s")
    bottom.set_xlabel("minutes")
    bottom.set_ylim(bottom=0)
    for axis in (top, bottom):
        axis.axvline(warmup_s / 60, color="grey", linestyle=":", linewidth=1)
        axis.grid(True, alpha=0.3)
    top.legend(fontsize="small", loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _minutes(seconds: float | None) -> str:
    return "—" if seconds is None else f"minute {seconds / 60:.2f}"


def _fmt(value: float | None, digits: int = 0, unit: str = "") -> str:
    return "—" if value is None else f"{value:,.{digits}f}{unit}"


def print_figures(figures: dict[str, Any], run: dict[str, Any], server: dict[str, Any],
                  checks: list[dict[str, Any]], aged: dict[str, Any] | None = None) -> None:
    print(f"operations/s        {_fmt(run['ops_per_s'])} (pairs/s {_fmt(run['pairs_per_s'])}; "
          f"after the warm-up {_fmt(figures.get('ops_per_s_after_warmup'))})")
    print(f"operations          {run['ops']:,} in {run['seconds']:.1f} s, "
          f"{run['errors']:,} errors {run['error_kinds'] or ''}")
    if "why_no_fit" in figures:
        print(f"no fit: {figures['why_no_fit']}")
    else:
        print(f"RSS per operation   {_fmt(figures['rss_anon_bytes_per_op'], 1)} bytes "
              f"(anonymous, least squares over {figures['samples_after_warmup']} samples after "
              f"{figures['warmup_s']:g} s)")
        print(f"disk per operation  {_fmt(figures['disk_allocated_bytes_per_op'], 1)} bytes "
              f"allocated, {_fmt(figures['disk_apparent_bytes_per_op'], 1)} bytes apparent")
        print(f"RSS growth          {figures['rss_growth_pct']:+.1f} % "
              f"({figures['rss_anon_at_growth_start_bytes'] / MB:,.1f} MB at "
              f"{_minutes(figures['rss_growth_from_s'])} -> "
              f"{figures['rss_anon_last_bytes'] / MB:,.1f} MB; peak "
              f"{figures['rss_anon_peak_bytes'] / MB:,.1f} MB)")
        if figures["children_seen"]:
            print(f"snapshot children   up to {figures['children_seen']} at a sample, their "
                  f"RSS up to {figures['children_rss_anon_peak_bytes'] / MB:,.1f} MB "
                  "(anonymous, shared copy-on-write with the server; not in the figures above)")
    if server.get("stop_s") is not None:
        print(f"server stop         {server['stop_s']:.1f} s from SIGTERM to exit")
    elif server.get("stop_error"):
        print(f"server stop         {server['stop_error']}")
    if run.get("server_cpu_util") is not None:
        per_op = (f", {run['server_cpu_us_per_op']:,.1f} µs per operation"
                  if run.get("server_cpu_us_per_op") is not None else "")
        print(f"server CPU          {run['server_cpu_util']:.0%} of one core{per_op}")
    if aged is not None:
        pruned = server.get("log_records_pruned")
        print(f"aged log            {aged['records']:,} records over {aged['span_s'] / 60:g} "
              f"min of server time from 24 h ago (built in {aged['build_s']:.0f} s); "
              f"pruned while serving: {'—' if pruned is None else f'{pruned:,}'}")
    sized = figures.get("sizing")
    if sized:
        day_gb = sized["bytes_per_day"] / 1e9
        print(f"log size bound      {sized['log_bytes_max'] / 1024**3:,.1f} GiB; at this rate a "
              f"day of records is {day_gb:,.1f} GB: "
              + (f"it keeps {sized['days_kept']:,.1f} days of audit trail (at most "
                 "--audit-retention-days), for as long as the server runs"
                 if sized["keys_day_fits"] else
                 f"the keys' 24 h do not fit; the log passes it after "
                 f"{sized['hours_to_fill']:,.1f} h and grows until its disk or map is full "
                 f"(give the log {day_gb / limits.LOG_RETENTION_BYTES_SHARE:,.0f} GB of disk; "
                 "README, Limits)"))
    for check in checks:
        value = "—" if check["value"] is None else f"{check['value']:,.1f}"
        print(f"{'PASS' if check['passed'] else 'FAIL'}  {check['text']}: {value}")


def stop(target: QuotadTarget) -> dict[str, Any]:
    """Stops the server the soak started: its stop line's figures and how long it took."""
    if target.external:
        return {}
    started = time.monotonic()
    try:
        stats = target.stop()
    except subprocess.TimeoutExpired as error:  # killed by now; its directory is still there
        target.stop()
        return {"stop_error": f"did not exit within {error.timeout:g} s of SIGTERM, killed"}
    return {**stats, "stop_s": time.monotonic() - started}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.target and (args.pid is None or args.data_dir is None):
        parser.error("--target needs --pid and --data-dir (the soak reads its memory and disk)")
    if not args.target and (args.pid is not None or args.data_dir is not None):
        parser.error("--pid and --data-dir go with --target")
    if args.target and (args.quotad_arg or args.aged_records):
        parser.error("--quotad-arg and --aged-records are for a server the soak starts, "
                     "not with --target")
    if args.aged_records is not None and args.aged_records < recovery.AGED_RECORDS_MIN:
        parser.error(f"--aged-records must be at least {recovery.AGED_RECORDS_MIN:,} (the "
                     f"plan, {recovery.AGED_USERS:,} users subscribed and a pair each)")
    duration_s = args.minutes * 60
    warmup_s = (args.warmup_minutes * 60 if args.warmup_minutes is not None
                else min(WARMUP_DEFAULT_S, WARMUP_DEFAULT_SHARE * duration_s))
    results_dir = args.results or ROOT / "bench" / "results" / time.strftime("soak-%Y%m%d-%H%M%S")
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / "results.json"
    config = {key: (str(value) if isinstance(value, Path) else value)
              for key, value in vars(args).items()}
    config.update(workload="pairs", warmup_s=warmup_s, idempotency_keys=True, coalesce=True,
                  users_spread="uniform" if args.zipf_s == 0 else f"Zipf s={args.zipf_s:g}")
    document: dict[str, Any] = {"version": 1, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                "finished": False, "config": config,
                                "machine": report.machine(None)}
    print(f"soak: pairs for {args.minutes:g} min on quotad; {args.users:,} users "
          f"({config['users_spread']}), {args.concurrency} in flight x {args.processes} "
          f"process(es) through AsyncQuotaClient (coalescing, idempotency keys); a sample every "
          f"{args.sample_s:g} s, warm-up {warmup_s:g} s; results in {results_dir}", flush=True)
    aged_dir = None
    quotad_args = tuple(args.quotad_arg)
    if args.aged_records:
        aged_dir = tempfile.TemporaryDirectory(prefix="bench-soak-aged-")
        document["aged"] = prepare_aged_log(Path(aged_dir.name) / "data", args.aged_records,
                                      args.aged_minutes)
        quotad_args = (f"--audit-retention-days={limits.LOG_KEPT_NS_MIN / NS_PER_DAY:g}",
                       *quotad_args)
    target = QuotadTarget(args.target, extra_args=quotad_args,
                          data_dir=Path(aged_dir.name) / "data" if aged_dir else None)
    pool: WorkerPool | None = None
    sampler: Sampler | None = None
    try:
        target.start()
        pid = args.pid or target.pid
        data_dir = args.data_dir or target.data_dir
        assert pid is not None and data_dir is not None
        target.set_up(args.users)
        pool = WorkerPool(args.processes)
        sampler = Sampler(pool, pid, data_dir, args.sample_s, duration_s)
        job = {"driver": target.driver(), "workload": "pairs", "users": args.users,
               "zipf_s": args.zipf_s, "concurrency": args.concurrency, "seconds": duration_s,
               "ops": None, "max_seconds": duration_s, "bucket_s": max(1.0, args.sample_s),
               "seed": args.seed, "call_timeout_s": args.call_timeout,
               "idempotency_keys": True, "coalesce": True, "track_enforce": False,
               "keep_latencies": False}
        parts = pool.run(job, timeout_s=duration_s + args.call_timeout * 4 + 60,
                         tick=sampler.tick)
        sampler.take()
        sampler.end_line()
        server_cpu_s = sampler.samples[-1]["server_cpu_s"]
        run, _ = report.merge_run(parts, workload="pairs", bucket_s=job["bucket_s"],
                                  server_cpu_s=server_cpu_s)
    except KeyboardInterrupt:
        print("\ninterrupted: server stopped; samples so far in " + str(json_path),
              file=sys.stderr)
        return 130
    except (WorkerError, RuntimeError, TimeoutError, OSError) as error:
        print(f"soak failed: {error}", file=sys.stderr)
        return 1
    finally:
        if pool is not None:
            pool.close()
        document["samples"] = sampler.samples if sampler is not None else []
        _write_json(json_path, document)  # before the stop, which may take long
        document["server"] = stop(target)
        _write_json(json_path, document)
        if aged_dir is not None:
            aged_dir.cleanup()

    for key in ("histogram_counts", "latency_ms_by_op"):  # no latencies kept in a soak
        run.pop(key, None)
    figures = analyse(document["samples"], warmup_s=warmup_s,
                      rss_growth_from_s=args.rss_growth_from_minutes * 60)
    figures["sizing"] = sizing(figures, document["server"].get("log_bytes_max"))
    checks = verdicts(figures, args.max_rss_growth_pct, args.max_disk_bytes_per_op)
    document.update(run=run, figures=figures, verdicts=checks)
    print_figures(figures, run, document["server"], checks, document.get("aged"))
    if not args.no_plots:
        why = plot(document["samples"], warmup_s, results_dir / "soak.png")
        document["plot"] = None if why else "soak.png"
        if why:
            document["plot_skipped"] = why
            print(f"plot skipped: {why}", file=sys.stderr)
    document["machine"]["loadavg_at_end"] = report.loadavg()
    document["finished"] = True
    document["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_json(json_path, document)
    print(f"results: {json_path}" + (" (+ soak.png)" if document.get("plot") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
