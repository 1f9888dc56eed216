"""quotad's benchmark harness: `python -m bench --help`.

Drives quotad through the project's own asyncio client (AsyncQuotaClient, as users would), and
in the same run its peers: Redis running the same reserve / commit / release as atomic Lua
scripts (once with appendfsync always, once with no persistence), and a bare grpc.aio echo
server answering the same messages. Targets are measured in alternation, run after run, and
every figure is the median of the runs; every comparison is a quotad / peer ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from . import redis_peer, report
from .targets import (
    DESCRIPTIONS,
    PEERS,
    ROOT,
    ClusterTarget,
    EchoTarget,
    QuotadTarget,
    RedisTarget,
    Target,
)
from .worker import PACE_LATE_S, WorkerError, WorkerPool
from .workloads import MIX_SHARES, WORKLOADS, ZipfUsers, parse_workloads

MAX_SECONDS_WITH_OPS = 600.0
DEFAULT_SECONDS = 10.0
SHARDS_BENCH_MAX = 16
"""--shards: the most shards one bench cluster has (each a process on this machine)."""
UNEVEN_SHARE = 1.2
"""A run says its shards were unevenly loaded when the busiest answered this many times its
even share of the operations."""
PACED_OPS_PER_S_MAX = 100_000.0
"""--ops-per-s-per-shard: the highest pace asked of one shard (well past what one serves)."""

EPILOG = f"""\
workloads (one unit = what one in-flight slot does before starting the next):
  pairs    Reserve + Commit (2 operations, 1 pair)
  release  Reserve + Release (2 operations, 1 pair)
  track    one Track (1 operation; pairs/s is not reported)
  mix      {', '.join(f'{share:.0%} {kind}' for kind, share in MIX_SHARES)} of units:
           a denied unit asks for the premium model (quota 0 in the bench plan, so quotad
           denies it); an expire unit reserves with a 1 s TTL and never settles. About 90 %
           of reserves are allowed, 10 % denied, 1 % left to expire.
  credits  Reserve + Commit as pairs, of a credits.chat event: a credit balance priced per
           model holds and spends its credits (quotad and echo only: Redis keeps no balances)
  Every user has the same plan: tokens (10^12/month, matches openai.*), premium_tokens
  (0/month, matches model=gpt-4o) and credits (a balance granted 10^15 a month, matches
  credits.*), so the denial rate does not drift with throughput.

targets:
  quotad         started by the bench on a fresh data directory per run (or --target)
  redis-always   redis-server, appendonly yes + appendfsync always, Lua scripts
  redis-none     redis-server, save "" + appendonly no, the same scripts
  echo           bench/echo_server.py: fixed responses of quotad's size, no state, no I/O
  quotad and echo are driven by AsyncQuotaClient with its defaults (it coalesces the calls
  in flight into Batch RPCs; --no-coalesce turns that off); Redis by redis.asyncio (one
  connection pool per process, one script call per operation, no pipelining). The Redis
  peer keeps no idempotency keys, no audit trail and no calendar windows; "server CPU" is
  the server process's own and leaves out quotad's forked snapshot children. The table
  states these under it. A Redis peer is skipped, with the reason printed, when
  redis-server or redis-py is missing (bench/install_redis.sh installs redis-server).

outputs (in --results DIR): results.json (config, machine, every run, medians, ratios),
results.md (the table), latency-<workload>.png, throughput-<workload>.png.

paced load (--ops-per-s-per-shard R, with --shards): instead of starting the next unit as
soon as one ends (closed loop: the load follows the servers' speed), the client processes
start units on a fixed schedule (open loop): R operations/s for quotad alone and R x N for a
cluster of N shards, split evenly over --processes, with at most --concurrency units in flight
per process. Each shard then sees the same load whatever the shard count (with --zipf-s 0:
a Zipf spread puts its hot users on some shards), so the server CPU per operation compares
shard counts at equal batch sizes. Bounded: a unit due while --concurrency are in flight,
or operations due while a process was more than {PACE_LATE_S * 1000:g} ms behind, are not
sent but counted ("not sent"), and the achieved ops/s is what was answered.

examples:
  python -m bench --workload pairs --concurrency 64 --seconds 10 --runs 3
  python -m bench --workload pairs --peers none --shards 1,2,3 --zipf-s 0 \\
      --ops-per-s-per-shard 300 --processes 2 --seconds 10 --runs 3
  python -m bench --workload all --peers echo --seconds 5 --runs 1
  python -m bench --target 127.0.0.1:50051 --peers none --workload mix --ops 100000
"""


def doc_parser(module: str, doc: str, epilog_more: str = "") -> argparse.ArgumentParser:
    """A bench module's command line, its help made of its docstring: the first paragraph
    says what it measures, the paragraphs after its usage line close the help (then
    `epilog_more`)."""
    epilog = doc.split("\n\n", 2)[2] + ("\n" + epilog_more if epilog_more else "")
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0],
                                   epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _paced_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected operations per second, got {text!r}") \
            from None
    if not 0 < value <= PACED_OPS_PER_S_MAX:  # NaN fails too
        raise argparse.ArgumentTypeError(
            f"must be above 0 and at most {PACED_OPS_PER_S_MAX:,.0f} operations/s, got {text}")
    return value


def _workloads(text: str) -> list[str]:
    try:
        return parse_workloads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _peers(text: str) -> list[str]:
    if text.strip() in ("", "none"):
        return []
    if text.strip() == "all":
        return list(PEERS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {unknown}; choose from "
                                         f"{', '.join(PEERS)}, all or none")
    return list(dict.fromkeys(names))


def _shard_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or any(not 1 <= count <= SHARDS_BENCH_MAX for count in counts) \
            or len(set(counts)) < len(counts):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected shard counts 1 to {SHARDS_BENCH_MAX}, comma-separated, "
            "each once")
    return counts


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[1],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to run")
    what.add_argument("--workload", type=_workloads, default=["pairs"], metavar="NAME[,NAME]",
                      help=f"workload(s): {', '.join(WORKLOADS)}, a comma list, or all "
                           "(default: pairs); see below")
    what.add_argument("--target", type=_address, metavar="HOST:PORT",
                      help="measure the quotad already serving there instead of starting one "
                           "(the bench upserts its plan 'bench' and subscribes its users; no "
                           "API key, so a loopback server without keys)")
    what.add_argument("--peers", type=_peers, default=list(PEERS), metavar="LIST",
                      help="peers measured in the same run, a comma list of "
                           f"{', '.join(PEERS)}; all or none (default: all)")
    what.add_argument("--shards", type=_shard_counts, default=[], metavar="N[,N]",
                      help="also measure a cluster of N shards on loopback for each N (etcd "
                           "and N quotad processes, routed by the client; needs etcd on PATH, "
                           "see deploy/install_etcd.sh), and print throughput and server CPU "
                           "per operation by shard count")
    what.add_argument("--redis-server", default="redis-server", metavar="PATH",
                      help="the redis-server binary for the Redis peers (default: redis-server "
                           "on PATH)")
    load = parser.add_argument_group("the load")
    load.add_argument("--users", type=_positive_int, default=1000, metavar="N",
                      help="users, each subscribed to the bench plan before each run (on "
                           "quotad that takes about 1 s per 1,000 users here; default: 1000)")
    load.add_argument("--zipf-s", type=_non_negative_float, default=0.99, metavar="S",
                      help="Zipf exponent of the users' hot/cold spread: P(k-th user) ~ 1/k^S; "
                           "0 is uniform (default: 0.99)")
    load.add_argument("--concurrency", type=_positive_int, default=64, metavar="N",
                      help="units in flight per client process; with --ops-per-s-per-shard "
                           "the most in flight per process (default: 64)")
    load.add_argument("--ops-per-s-per-shard", type=_paced_rate, metavar="R",
                      help="paced (open-loop) load, with --shards and --seconds: the clients "
                           "start R operations/s for quotad alone (and each single-server "
                           "peer), R x N for a cluster of N shards, spread evenly over the "
                           "client processes; operations they cannot send in time are counted, "
                           "not queued (see below). Default: closed loop, each unit started "
                           "when the last one ends")
    load.add_argument("--processes", type=_positive_int, default=1, metavar="N",
                      help="client processes (multiprocessing, each with its own client and "
                           "connection; default: 1)")
    length = load.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=_positive_float, metavar="S",
                        help=f"measured length of each run (default: {DEFAULT_SECONDS:g})")
    length.add_argument("--ops", type=_positive_int, metavar="N",
                        help="operations per run instead of a length in time (split over the "
                             f"processes; a run still stops after {MAX_SECONDS_WITH_OPS:.0f} s)")
    load.add_argument("--runs", type=_positive_int, default=3, metavar="N",
                      help="runs per target, alternating targets; figures are medians "
                           "(default: 3)")
    load.add_argument("--track-enforce", action="store_true",
                      help="track workload: Track with enforce (atomic check-and-record) "
                           "instead of plain recording")
    load.add_argument("--no-idempotency-keys", action="store_true",
                      help="quotad and echo: turn off the client's automatic idempotency key "
                           "on each mutation (on by default, as for users; quotad stores each "
                           "key durably)")
    load.add_argument("--no-coalesce", action="store_true",
                      help="quotad and echo: send each call as its own unary RPC "
                           "(AsyncQuotaClient(coalesce=False)) instead of the client's default, "
                           "which gathers the calls in flight in a process into Batch RPCs")
    load.add_argument("--call-timeout", type=_positive_float, default=2.0, metavar="S",
                      help="deadline of one call, retries included (default: 2.0, the "
                           "client's default)")
    load.add_argument("--seed", type=int, default=1, metavar="N",
                      help="seed of the users and amounts picked (default: 1)")
    out = parser.add_argument_group("output")
    out.add_argument("--results", type=Path, metavar="DIR",
                     help="where results.json, results.md and the plots go (default: "
                          "bench/results/<timestamp>/, git-ignored)")
    out.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    out.add_argument("--no-progress", action="store_true",
                     help="no live progress bar on stderr (it is drawn only on a terminal "
                          "anyway; otherwise one line per run)")
    return parser


class Progress:
    """A live bar on stderr (on a terminal), then one line per run."""

    def __init__(self, pool: WorkerPool, enabled: bool) -> None:
        self._pool = pool
        self._live = enabled and sys.stderr.isatty()
        self._label = ""
        self._history: deque[tuple[float, int]] = deque()
        self._last_draw = 0.0

    def begin(self, label: str, seconds: float | None, ops: int | None) -> None:
        self._label, self._seconds, self._ops = label, seconds, ops
        self._started = time.monotonic()
        self._history.clear()
        self._last_draw = 0.0

    def tick(self) -> None:
        if not self._live:
            return
        now = time.monotonic()
        if now - self._last_draw < 0.2:
            return
        self._last_draw = now
        done, errors = self._pool.progress()
        elapsed = now - self._started
        self._history.append((now, done))
        while len(self._history) > 2 and now - self._history[0][0] > 2.0:
            self._history.popleft()
        then, before = self._history[0]
        rate = (done - before) / (now - then) if now > then else 0.0
        if self._ops:
            fraction = done / self._ops
        else:
            fraction = elapsed / self._seconds if self._seconds else 0.0
        fraction = min(1.0, max(0.0, fraction))
        bar = "█" * int(fraction * 24) + "░" * (24 - int(fraction * 24))
        sys.stderr.write(f"\r{self._label:<32} {bar} {fraction:4.0%} {elapsed:5.1f} s "
                         f"{done:>10,} ops {rate:>9,.0f} ops/s {errors:,} errors\x1b[K")
        sys.stderr.flush()

    def status(self, text: str) -> None:
        if self._live:
            sys.stderr.write(f"\r{text}\x1b[K")
            sys.stderr.flush()

    def end(self) -> None:
        if self._live:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _run_line(label: str, run: dict[str, Any]) -> str:
    pairs = f" {run['pairs_per_s']:>9,.0f} pairs/s" if run["pairs_per_s"] is not None else ""
    denied = (f"  denied {run['denied_share']:.1%}" if run.get("denied_share") else "")
    cpu = (f"  server CPU {run['server_cpu_util']:.0%}"
           if run.get("server_cpu_util") is not None else "")
    if run.get("ops_per_batch_rpc"):
        cpu += f"  {run['ops_per_batch_rpc']:.1f} ops/Batch RPC"
    if run.get("server_cpu_us_per_op") is not None:
        cpu += f"  {run['server_cpu_us_per_op']:.1f} µs server CPU/op"
    if run.get("asked_ops_per_s") is not None:
        cpu += f"  (asked {run['asked_ops_per_s']:,.0f} ops/s)"
    if run.get("ops_per_s_by_shard"):
        cpu += "  by shard " + " / ".join(f"{v:,.0f}" for v in run["ops_per_s_by_shard"].values())
    return (f"{label:<32} {run['ops_per_s']:>9,.0f} ops/s{pairs}  p50 {run['p50_ms']:7.2f} ms  "
            f"p99 {run['p99_ms']:7.2f} ms  p99.9 {run['p999_ms']:7.2f} ms  "
            f"{run['errors']:,} errors{denied}{cpu}")


def _paced_total(per_shard: float | None, target: Target) -> float | None:
    """The pace asked of a target in all: per_shard times its shards (1 for one server)."""
    if per_shard is None:
        return None
    return per_shard * (target.shards if isinstance(target, ClusterTarget) else 1)


REDIS_HAS_NO_CREDITS = "credit balances are quotad's alone: the Redis peer has none"


def _measures(kind: type[Target], workload: str) -> bool:
    """Whether a kind of target runs a workload: the Redis peer has no credit balances."""
    return not (issubclass(kind, RedisTarget) and workload == "credits")


def _make_targets(args: argparse.Namespace) -> tuple[list[Target], dict[str, str]]:
    targets: list[Target] = [QuotadTarget(args.target)]
    skipped: dict[str, str] = {}
    if args.shards:
        from quotad.cluster.etcd_process import ETCD_BINARY, INSTALL_HINT

        if shutil.which(ETCD_BINARY) is None:
            raise SystemExit(f"python -m bench: error: --shards: {INSTALL_HINT}")
        targets += [ClusterTarget(count) for count in args.shards]
    redis_reason = redis_peer.unavailable_reason(args.redis_server)
    for name in args.peers:
        if name == "echo":
            targets.append(EchoTarget())
        elif redis_reason is not None:
            skipped[name] = redis_reason
        elif not any(_measures(RedisTarget, workload) for workload in args.workload):
            skipped[name] = REDIS_HAS_NO_CREDITS
        else:
            targets.append(RedisTarget(name.split("-", 1)[1], args.redis_server))
    return targets, skipped


def _write_json(path: Path, document: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=1, default=str) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ops_per_s_per_shard is not None:
        if not args.shards:
            parser.error("--ops-per-s-per-shard paces the comparison by shard count: give "
                         "--shards too (e.g. --shards 1,2,3)")
        if args.ops is not None:
            parser.error("--ops-per-s-per-shard: a paced run lasts a time: give --seconds, "
                         "not --ops")
    if args.seconds is None and args.ops is None:
        args.seconds = DEFAULT_SECONDS
    workloads: list[str] = args.workload
    targets, skipped = _make_targets(args)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    skipped_workloads = {
        workload: (names, REDIS_HAS_NO_CREDITS) for workload in workloads
        if (names := [t.name for t in targets if not _measures(type(t), workload)])}
    for workload, (names, why) in skipped_workloads.items():
        print(f"not running {' and '.join(names)} on {workload}: {why}", file=sys.stderr)
    results_dir = args.results or ROOT / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S")
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / "results.json"
    bucket_s = min(1.0, max(0.1, (args.seconds or 10.0) / 25))
    redis_version = (redis_peer.server_version(args.redis_server)
                     if any(t.name.startswith("redis") for t in targets) else None)
    config = {
        "workloads": workloads, "target": args.target, "peers": args.peers,
        "users": args.users, "zipf_s": args.zipf_s, "concurrency": args.concurrency,
        "processes": args.processes, "seconds": args.seconds, "ops": args.ops,
        "runs": args.runs, "track_enforce": args.track_enforce,
        "idempotency_keys": not args.no_idempotency_keys, "coalesce": not args.no_coalesce,
        "call_timeout_s": args.call_timeout, "shards": args.shards,
        "ops_per_s_per_shard": args.ops_per_s_per_shard,
        "seed": args.seed, "mix_shares": dict(MIX_SHARES),
        "zipf_share_of_hottest_1pct": ZipfUsers(args.users, args.zipf_s,
                                                random.Random(0)).share_of_top(0.01),
        "argv": sys.argv[1:] if argv is None else argv,
    }
    document: dict[str, Any] = {
        "version": 1,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "finished": False,
        "config": config,
        "machine": report.machine(redis_version),
        "skipped": skipped,
        "skipped_workloads": skipped_workloads,
        "workloads": {w: {"targets": {t.name: {"description": t.description, "runs": [],
                                                "server": []}
                                       for t in targets if _measures(type(t), w)},
                          "ratios": {}}
                      for w in workloads},
    }
    how = f"{args.seconds:g} s" if args.seconds is not None else f"{args.ops:,} operations"
    load = (f"paced at {args.ops_per_s_per_shard:,g} ops/s per shard, at most "
            f"{args.concurrency} in flight" if args.ops_per_s_per_shard is not None
            else f"{args.concurrency} in flight")
    print(f"bench: {', '.join(workloads)} on {', '.join(t.name for t in targets)}; "
          f"{args.users:,} users (Zipf s={args.zipf_s:g}), {load} × "
          f"{args.processes} process(es), {how} × {args.runs} run(s); results in {results_dir}",
          flush=True)
    pool = WorkerPool(args.processes)
    progress = Progress(pool, not args.no_progress)
    timeout_s = ((args.seconds if args.seconds is not None else MAX_SECONDS_WITH_OPS)
                 + args.call_timeout * 4 + 60.0)
    try:
        for run_index in range(args.runs):
            for target in targets:  # alternate: drift on a shared machine hits every target
                progress.status(f"{target.name}: starting, setting up {args.users:,} users")
                target.start()
                try:
                    target.set_up(args.users)
                    progress.end()
                    for workload in (w for w in workloads if _measures(type(target), w)):
                        label = f"{target.name} run {run_index + 1}/{args.runs} {workload}"
                        job = {
                            "driver": target.driver(), "workload": workload,
                            "users": args.users, "zipf_s": args.zipf_s,
                            "concurrency": args.concurrency, "seconds": args.seconds,
                            "ops": args.ops, "max_seconds": MAX_SECONDS_WITH_OPS,
                            "bucket_s": bucket_s, "seed": args.seed,
                            "call_timeout_s": args.call_timeout,
                            "idempotency_keys": not args.no_idempotency_keys,
                            "coalesce": not args.no_coalesce,
                            "track_enforce": args.track_enforce,
                            "ops_per_s": _paced_total(args.ops_per_s_per_shard, target),
                        }
                        progress.begin(label, args.seconds, args.ops)
                        cpu_before = target.cpu_s()
                        measured: list[float | None] = []

                        def at_start(target: Target = target) -> None:
                            measured.append(target.cpu_s())

                        try:
                            # paced: the server CPU of the measured seconds alone (not the
                            # warm-up's, which would weigh on a low pace)
                            parts = pool.run(job, timeout_s=timeout_s, tick=progress.tick,
                                             on_start=at_start if job["ops_per_s"] else None)
                        finally:
                            progress.end()
                        cpu_after = target.cpu_s()
                        if measured:
                            cpu_before = measured[0]
                        server_cpu = (cpu_after - cpu_before
                                      if cpu_before is not None and cpu_after is not None
                                      else None)
                        summary, _ = report.merge_run(parts, workload=workload,
                                                      bucket_s=bucket_s,
                                                      server_cpu_s=server_cpu)
                        document["workloads"][workload]["targets"][target.name]["runs"].append(
                            summary)
                        print(_run_line(label, summary), flush=True)
                        busiest = summary.get("busiest_shard_share")
                        shards = len(summary.get("ops_per_s_by_shard", {}))
                        if busiest and shards > 1 and busiest > UNEVEN_SHARE * (1 / shards):
                            print(f"  uneven: the busiest shard answered {busiest:.0%} of the "
                                  f"operations ({1 / shards:.0%} each if even); --zipf-s 0 "
                                  "spreads the users evenly", flush=True)
                        if summary.get("not_sent_share"):
                            print(f"  behind: the clients did not send "
                                  f"{summary['not_sent_share']:.1%} of the operations asked "
                                  f"({summary['not_sent_busy_ops']:,} with every slot in "
                                  f"flight, {summary['not_sent_late_ops']:,} too late); "
                                  f"achieved {summary['ops_per_s']:,.0f} of "
                                  f"{summary['asked_ops_per_s']:,.0f} ops/s asked", flush=True)
                        _write_json(json_path, document)
                finally:
                    progress.status(f"{target.name}: stopping")
                    server_stats = {"covers_workloads": workloads, **target.stop()}
                    progress.end()
                for workload in (w for w in workloads if _measures(type(target), w)):
                    document["workloads"][workload]["targets"][target.name]["server"].append(
                        server_stats)
    except KeyboardInterrupt:
        print("\ninterrupted: servers stopped; partial results in " + str(json_path),
              file=sys.stderr)
        _write_json(json_path, document)
        return 130
    except (WorkerError, RuntimeError, TimeoutError, OSError) as error:
        print(f"bench failed: {error}", file=sys.stderr)
        _write_json(json_path, document)
        return 1
    finally:
        pool.close()

    for workload, entry in document["workloads"].items():
        for target_entry in entry["targets"].values():
            target_entry["median"] = report.medians(target_entry["runs"])
            per_txn = [s["records_per_txn"] for s in target_entry["server"]
                       if s.get("records_per_txn")]
            if per_txn:
                target_entry["median"]["records_per_txn"] = statistics.median(per_txn)
        entry["ratios"] = report.ratios(entry["targets"])
    document["asymmetries"] = report.asymmetries(document)
    table = report.markdown(document)
    document["table_markdown"] = table
    if not args.no_plots:
        written, why = report.plots(document, results_dir)
        document["plots"] = written
        if why:
            document["plots_skipped"] = why
            print(f"plots skipped: {why}", file=sys.stderr)
    document["machine"]["loadavg_at_end"] = report.loadavg()
    document["finished"] = True
    document["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_json(json_path, document)
    (results_dir / "results.md").write_text(table)

    print()
    for workload, entry in document["workloads"].items():
        for line in report.ratio_lines(workload, entry):
            print(line)
    print()
    print(table, end="")
    print(f"\nresults: {json_path}" + (f" (+ {len(document.get('plots', []))} plots)"
                                        if document.get("plots") else ""))
    return 0


__all__ = ["DESCRIPTIONS", "build_parser", "main"]
