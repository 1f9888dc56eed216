"""`quotad`: the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from quotad.core import limits
from quotad_contract import limits as limits_contract
from quotad import health_check, logs
from quotad.health_check import HEALTH_TIMEOUT_S_DEFAULT
from quotad.cluster.limits import (
    ETCD_CONNECT_TIMEOUT_S, LEASE_TTL_S_DEFAULT, LEASE_TTL_S_MAX, LEASE_TTL_S_MIN,
)
from quotad_contract.plans import PlansFileError
from quotad.storage.codec import state_digest
from quotad.storage.wal import (
    FORMAT_VERSION as DATA_FORMAT_VERSION, MAP_SIZE_BYTES_DEFAULT, DataDirLocked,
    DataFormatMismatch, WriteAheadLog,
)
from quotad.engine.recovery import recover
from quotad.engine.writer import (
    AUDIT_RETENTION_NS_DEFAULT, SNAPSHOT_EVERY_RECORDS_DEFAULT, SNAPSHOT_EVERY_S_DEFAULT,
)

# Nothing above imports grpc, so that main() can set how grpc starts before it is imported:
# the server (and config_file, which describes its Config) are imported in the functions.
FORK_SUPPORT_ENV = "GRPC_ENABLE_FORK_SUPPORT"
ADMIN_KEY_ENV = "QUOTAD_ADMIN_KEY"
SERVE_EPILOG = """\
Every flag may also be set in a TOML file given with --config; keys are the flag names
with underscores, flags on the command line win over the file, and relative paths in the
file are relative to the file's folder. An unknown key or a wrong type is refused (exit 2).
Example (examples/quotad.toml lists every key with its default):

    listen = "127.0.0.1:50051"
    data_dir = "quotad-data"
    plans = "plans.toml"
    metrics_listen = "127.0.0.1:9090"
    log_level = "info"

    quotad serve --config quotad.toml --log-level debug
"""

def admin_key(key_file: Path | None, environ: dict[str, str]) -> str:
    """The admin key from --admin-key-file or QUOTAD_ADMIN_KEY (not both); empty: none."""
    from quotad import config_file
    from_env = environ.get(ADMIN_KEY_ENV, "")
    if key_file is None:
        return from_env
    if from_env:
        raise ValueError(f"--admin-key-file and {ADMIN_KEY_ENV} are both set: use one")
    try:
        config_file.require_owner_only(key_file, "the --admin-key-file, but")
        key = key_file.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ValueError(f"--admin-key-file {key_file}: {error.strerror}") from error
    if not key:
        raise ValueError(f"--admin-key-file {key_file}: the file is empty")
    return key


def parser(file_defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The command line; file_defaults (from --config) replace the serve flags' defaults."""
    from quotad import config_file
    root = argparse.ArgumentParser(
        prog="quotad",
        description="quotad: a per-end-user quota authority for AI products, over gRPC.",
    )
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "serve", help="run the server",
        description="Run the quota server. It replays its log from --data-dir, loads --plans, "
                    "then serves QuotaService and AdminService until SIGTERM.",
        epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", type=Path, metavar="FILE.toml",
                     help="read settings from this TOML file first (see below)")
    run.add_argument("--listen", default="127.0.0.1:50051", metavar="HOST:PORT",
                     help="address to serve on; port 0 picks a free one (default: %(default)s). "
                          "Without API keys only a loopback address is allowed.")
    run.add_argument("--data-dir", type=Path, default=Path("./quotad-data"), metavar="DIR",
                     help="LMDB directory holding the log; one server per directory "
                          "(default: %(default)s)")
    run.add_argument("--plans", type=Path, metavar="FILE.toml",
                     help="plans to load at start-up, idempotently (see examples/plans.toml)")
    run.add_argument("--map-size-gib", type=float, default=MAP_SIZE_BYTES_DEFAULT / 1024**3,
                     metavar="GIB", help="largest size the LMDB file may grow to: address "
                                         "space, not disk (default: %(default)s)")
    run.add_argument("--snapshot-every-records", type=int,
                     default=SNAPSHOT_EVERY_RECORDS_DEFAULT, metavar="N",
                     help="write a snapshot of the state after this many log records: a "
                          "restart after a crash replays at most about this many, and each "
                          "snapshot costs a forked child CPU in proportion to the users it "
                          "holds: all of them for a whole one (seconds at a million), those "
                          "changed since the last whole one for a delta (each logged as "
                          "'snapshot made' with it), so a larger N costs less per operation "
                          "and makes a slower restart (default: %(default)s)")
    run.add_argument("--snapshot-every-s", type=float, default=SNAPSHOT_EVERY_S_DEFAULT,
                     metavar="SECONDS", help="... or after this many seconds with new records "
                                             "(default: %(default)s)")
    run.add_argument("--audit-retention-days", type=float,
                     default=AUDIT_RETENTION_NS_DEFAULT / config_file.NS_PER_DAY, metavar="DAYS",
                     help="keep log records (the audit trail) at least this long, unless "
                          "--audit-retention-gib needs their room (default: %(default)s)")
    run.add_argument("--audit-retention-gib", type=float, default=0.0, metavar="GIB",
                     help="keep the log's live data under this: past it the oldest records go "
                          "even inside --audit-retention-days, never those of "
                          "--idempotency-retention-hours (keys' first answers); below "
                          "--map-size-gib (default: %(default)s: three quarters of the log's "
                          "room on its disk at start, or of --map-size-gib if smaller)")
    run.add_argument("--idempotency-retention-hours", type=float,
                     default=limits.IDEMPOTENCY_RETENTION_NS_MIN / config_file.NS_PER_HOUR,
                     metavar="HOURS",
                     help="answer a repeated idempotency key with its first answer this long "
                          "after its first use, 24 to 2,160 (90 days); its log records stay as "
                          "long, whatever --audit-retention-gib (default: %(default)s)")
    run.add_argument("--metrics-listen", default="", metavar="HOST:PORT",
                     help="serve Prometheus metrics over HTTP there (port 0 picks one); "
                          "off by default")
    run.add_argument("--admin-key-file", type=Path, metavar="FILE",
                     help="file holding only the admin key (at least 32 characters; readable "
                          "by its owner only). The admin key turns API keys on: every call then "
                          "needs 'authorization: Bearer <key>', and any --listen is allowed. "
                          f"Or set {ADMIN_KEY_ENV}; never give a key on the command line")
    run.add_argument("--tls-cert", type=Path, metavar="CERT.pem",
                     help="serve TLS with this PEM certificate chain (with --tls-key)")
    run.add_argument("--tls-key", type=Path, metavar="KEY.pem",
                     help="the PEM private key of --tls-cert")
    run.add_argument("--http-listen", default="", metavar="HOST:PORT",
                     help="also serve GET /v1/usage?user_id=U as JSON over HTTP there, for web "
                          "pages showing what a user has left (HTTPS with --tls-cert/--tls-key; "
                          "port 0 picks one); off by default")
    run.add_argument("--cors-origin", action="append", default=[],
                     metavar="ORIGIN",
                     help="an origin such as https://app.example.com whose pages may read "
                          "--http-listen (exact match; repeat for several); none by default, "
                          "so browsers withhold the answers from every other site's pages")
    run.add_argument("--http-allowed-host", action="append", default=[], metavar="HOST",
                     help="with API keys: a Host header --http-listen answers, such as "
                          "quota.example.com (any port) or quota.example.com:8443; repeat for "
                          "several. Any other Host gets 421, which stops DNS rebinding. None "
                          "by default: every Host. Without API keys only loopback names and "
                          "addresses (localhost, 127.0.0.0/8, [::1]) are answered, always")
    run.add_argument("--http-read-timeout-s", type=float,
                     default=limits.HTTP_REQUEST_READ_TIMEOUT_S, metavar="SECONDS",
                     help="an HTTP request must arrive whole within this long of its first "
                          "byte, else 408 and the connection is closed (default: %(default)s)")
    run.add_argument("--admission-operations", type=int, default=limits.ADMISSION_OPERATIONS,
                     metavar="N",
                     help="at most N operations admitted and not yet answered (a Batch counts "
                          "its operations, other calls one; WatchUsage and health checks are "
                          "not counted); past it a call is refused at once with "
                          "RESOURCE_EXHAUSTED OVERLOADED and a retry delay, having done "
                          f"nothing, rather than queued past its deadline. "
                          f"{limits.ADMISSION_OPERATIONS_MIN} to "
                          f"{limits.ADMISSION_OPERATIONS_MAX:,}; a Batch of more than N "
                          "operations is always refused (default: %(default)s)")
    run.add_argument("--commit-delay-ms", type=int, default=limits.COMMIT_DELAY_MS_DEFAULT,
                     metavar="MS",
                     help="while calls overlap, a small batch of records (unary calls) waits "
                          "MS milliseconds for more before its transaction is written and "
                          "synced: each of its calls waits that much longer, and the "
                          "transaction's fixed cost is shared by more calls, so a server busy "
                          "with many unary calls in flight spends less CPU on each and "
                          "answers more of them. The wait is taken only while it gathers at "
                          f"least {limits.COMMIT_DELAY_JOINED_PER_MS_MIN} records a "
                          "millisecond (with few callers, a rare probe); calls that come one "
                          "at a time never wait. "
                          f"0 (none) to {limits.COMMIT_DELAY_MS_MAX} (default: %(default)s)")
    run.add_argument("--pending-calls-per-method", type=int,
                     default=limits.PENDING_CALLS_PER_METHOD, metavar="N",
                     help="at most N calls of one method received and not yet taken by a "
                          "handler (grpc's queue in front of quotad): one arriving while N "
                          "wait is refused by grpc at once, before any work (the caller sees "
                          "CANCELLED), rather than left to wait past its deadline. Each method "
                          "of the data path (Reserve, Commit, Release, Extend, Track, "
                          "GetUsage, Batch, WatchUsage) has its own queue; the others share "
                          "one. "
                          f"{limits.PENDING_CALLS_PER_METHOD_MIN} to "
                          f"{limits.PENDING_CALLS_PER_METHOD_MAX:,} (default: %(default)s)")
    run.add_argument("--shard-map", type=Path, metavar="FILE.json",
                     help="serve as one shard of a cluster: the shard map, a JSON file "
                          '{"shards": [{"id": 0, "address": "HOST:PORT", "slots": '
                          '"0-1364,4000-4095"}, ...]} in which every slot 0 to 4095 is owned by '
                          "exactly one shard, ids are unique and addresses HOST:PORT (a bad "
                          "map exits 2 naming the problem). A call for a user of another "
                          "shard's slot is refused, having changed nothing, with "
                          "FAILED_PRECONDITION WRONG_SHARD naming that shard; GetShardMap "
                          "answers the map. Needs --shard-id. Default: none, a server alone "
                          "owning every user")
    run.add_argument("--shard-id", type=int, metavar="N",
                     help="this shard's id in --shard-map or --cluster")
    run.add_argument("--cluster", metavar="etcd://HOST:PORT/NAME",
                     help="serve as one shard of a cluster whose control plane is etcd: the "
                          "shard map is read from etcd (written by `quotad cluster init`) and "
                          "followed as it changes. The shard serves only while it holds its "
                          "shard id's etcd lease: a second process with the same --shard-id "
                          "waits for it, NOT_SERVING, and a shard that cannot renew it stops "
                          "serving (UNAVAILABLE) before it could expire. Needs --shard-id; "
                          "not with --shard-map. etcd must answer within "
                          f"{ETCD_CONNECT_TIMEOUT_S:g} s at start (else exit 2)")
    run.add_argument("--lease-ttl-s", type=int, default=LEASE_TTL_S_DEFAULT, metavar="SECONDS",
                     help=f"with --cluster: the TTL of the shard's etcd lease, renewed every "
                          f"third of it; {LEASE_TTL_S_MIN} to {LEASE_TTL_S_MAX} "
                          "(default: %(default)s)")
    run.add_argument("--reflection", action=argparse.BooleanOptionalAction, default=False,
                     help="enable gRPC server reflection (default: off)")
    run.add_argument("--log-state-digest", action=argparse.BooleanOptionalAction, default=False,
                     help="log a digest of the whole state at start and stop, to verify that "
                          "a restart recovers exactly the state the last run ended with")
    run.add_argument("--log-level", default="info", choices=config_file.LOG_LEVELS,
                     help="debug logs one line per call and one per HTTP answer (an access "
                          "log); info logs one line per refused call, naming its peer, app "
                          "and key id (default: %(default)s)")
    if file_defaults:
        run.set_defaults(**file_defaults)
    check = commands.add_parser(
        "verify", help="check a stopped server's data directory",
        description="Check every log record of a data directory (checksum, sequence, no gaps) "
                    "and replay them all. Prints a JSON summary; exits 0 if clean, 1 if not. "
                    "Takes the directory's lock: stop the server first.",
    )
    check.add_argument("--data-dir", type=Path, default=Path("./quotad-data"), metavar="DIR",
                       help="(default: %(default)s)")
    move = commands.add_parser(
        "migrate", help="bring a stopped server's data directory to this server's format",
        description="Rewrite a data directory of format 3, 4, 5 or 6 in this server's format "
                    f"({DATA_FORMAT_VERSION.decode()}), "
                    "offline: DIR is read, the new data is written beside it and swapped in "
                    "once whole; the old directory is kept as DIR.formatN (N: its format). "
                    "Prints its progress on stderr. Takes the "
                    "directory's lock: stop the server first. Prints a JSON summary; exits 2 "
                    "with the reason if it cannot migrate, leaving DIR as it was.",
    )
    move.add_argument("--data-dir", type=Path, default=Path("./quotad-data"), metavar="DIR",
                      help="(default: %(default)s)")
    probe = commands.add_parser(
        "health", help="ask a running server whether it serves (grpc.health.v1)",
        description="Ask a running server over grpc.health.v1 whether it serves, for container "
                    "and orchestrator health checks. Prints what it answered; exits 0 when it "
                    "is SERVING, 1 otherwise (starting, draining, unreachable, no answer in "
                    "time). Needs no API key.",
    )
    probe.add_argument("--target", default="127.0.0.1:50051", metavar="HOST:PORT",
                       help="the server's gRPC address (default: %(default)s)")
    probe.add_argument("--tls-root-cert", type=Path, metavar="CA.pem",
                       help="connect over TLS, trusting this PEM root certificate "
                            "(default: plaintext)")
    probe.add_argument("--timeout-s", type=float, default=HEALTH_TIMEOUT_S_DEFAULT,
                       metavar="SECONDS", help="wait at most this long for the answer "
                                               "(default: %(default)s)")
    _cluster_commands(commands)
    return root


CLUSTER_EPILOG = """\
A cluster's control plane is etcd; its keys are under /quotad/NAME/ of the etcd at
HOST:PORT. On one machine:

    quotad cluster up --shards 3 --data-dir ./cluster       # etcd and 3 shards, Ctrl-C stops
    QuotaClient(cluster="etcd://127.0.0.1:2379/local")      # what it prints

Across machines, once etcd runs:

    quotad cluster init --cluster etcd://10.0.0.9:2379/prod --shards 3 \\
        --address 10.0.0.1:50051 --address 10.0.0.2:50051 --address 10.0.0.3:50051
    quotad serve --cluster etcd://10.0.0.9:2379/prod --shard-id 0 ...   # on 10.0.0.1, ...
"""


def _cluster_commands(commands: Any) -> None:
    cluster = commands.add_parser(
        "cluster", help="set up or run a cluster of shards coordinated by etcd",
        description="A cluster of quotad shards: users split by slot over single-writer "
                    "processes, with etcd holding the shard map and each shard's lease.",
        epilog=CLUSTER_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    init = actions.add_parser(
        "init", help="write a cluster's initial shard map to etcd",
        description="Write the shard map of a new cluster to etcd: one shard per --address "
                    "(ids 0, 1, ... in order), the 4096 slots split evenly in contiguous "
                    "ranges. Refused, with nothing changed, when a map is already there "
                    "(unless --replace) or any argument is wrong (exit 2). Prints the map.",
        epilog="--replace only rewrites who owns which slot: users' data stays on the shard "
               "that has it. Use it before a cluster holds data, not to move slots.")
    init.add_argument("--cluster", required=True, metavar="etcd://HOST:PORT/NAME",
                      help="the etcd to write to, and the cluster's NAME (its keys are under "
                           "/quotad/NAME/)")
    init.add_argument("--shards", type=int, required=True, metavar="N",
                      help="how many shards (one --address each)")
    init.add_argument("--address", action="append", default=[], required=True,
                      metavar="HOST:PORT",
                      help="where clients reach shard 0, then 1, ... (repeat N times); the "
                           "address each shard serves on (its --listen, a wildcard aside)")
    init.add_argument("--replace", action="store_true",
                      help="overwrite a map already there (see below)")
    from quotad.cluster import up
    up.add_parser(actions)


def cluster_init(args: argparse.Namespace) -> int:
    """`quotad cluster init`: 0 with the map printed, 2 with the reason (nothing changed)."""
    from quotad.cluster import control
    from quotad.cluster.etcd import EtcdUnavailable
    from quotad_contract.shards import EtcdTarget, ShardMapError, check_address

    try:
        target = EtcdTarget.parse(args.cluster)
        if not 1 <= args.shards <= limits_contract.SHARDS_MAX:
            raise ShardMapError(f"--shards must be 1 to {limits_contract.SHARDS_MAX}")
        if len(args.address) != args.shards:
            raise ShardMapError(f"--shards {args.shards} needs {args.shards} --address "
                                f"(one per shard, in id order), got {len(args.address)}")
        for address in args.address:
            check_address(address)
        if len(set(args.address)) != len(args.address):
            raise ShardMapError("each --address must be a different shard's")
    except ShardMapError as error:
        print(f"quotad cluster init: {error}", file=sys.stderr)
        return 2

    async def write() -> Any:
        etcd = await control.connect(target)
        try:
            return await control.init_map(etcd, target, args.address, replace=args.replace)
        finally:
            await etcd.close()

    try:
        shard_map = asyncio.run(write())
    except (ShardMapError, EtcdUnavailable) as error:
        print(f"quotad cluster init: {error}", file=sys.stderr)
        return 2
    print(shard_map.to_json())
    print(f"quotad cluster init: wrote the shard map of {args.shards} shard(s) to {target}",
          file=sys.stderr)
    return 0


def verify(data_dir: Path) -> int:
    if not (data_dir / "data.mdb").exists():
        print(f"quotad: {data_dir} holds no quotad data", file=sys.stderr)
        return 2
    wal = WriteAheadLog(data_dir)
    started = time.monotonic()
    try:
        core = recover(wal, repair=False)
    except Exception as error:
        print(json.dumps({"clean": False, "error": str(error)}))
        return 1
    finally:
        wal.close()
    print(json.dumps({"clean": True, "records": core.sequence, "state_digest": state_digest(core),
                      "seconds": round(time.monotonic() - started, 3)}))
    return 0


Result = TypeVar("Result")


def run_server(main: Coroutine[Any, Any, Result]) -> Result:
    """Runs the server's coroutine to its end on uvloop's event loop (libuv's, in C), where
    installed (everywhere but Windows); on asyncio's own otherwise. gRPC's asyncio server
    takes each call through several turns of the loop, and uvloop's are cheaper: at 64 unary
    Reserves in flight ~9 % less server CPU per call (`bench.unary`, README Measured); the
    Batch path's share of loop turns per operation is small, and its figures did not move."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    # Snapshots are written by a forked child process (storage/snapshot_child.py) that never
    # uses gRPC. gRPC's own fork handlers would restart its threads in that child, polling
    # descriptors the parent still serves on. grpc reads this once, when it is first imported,
    # which is below: the server is imported only now. Set here, in the server's process, and
    # not on importing quotad, since a library must leave its user's process as it finds it.
    os.environ.setdefault(FORK_SUPPORT_ENV, "false")
    args = parser().parse_args(argv)
    if args.command == "cluster":
        if args.cluster_command == "init":
            return cluster_init(args)
        from quotad.cluster import up
        return up.main(args)
    if args.command == "health":
        return health_check.check(args.target, tls_root_cert=args.tls_root_cert,
                                  timeout_s=args.timeout_s)
    from quotad import config_file
    from quotad.config_file import ConfigFileError
    from quotad.server import Config, serve

    if sys.flags.optimize:  # serve and verify both apply commands to the core
        print("quotad: refusing to run under python -O or PYTHONOPTIMIZE (sys.flags.optimize="
              f"{sys.flags.optimize}): it strips the asserts that check the core's invariants",
              file=sys.stderr)
        return 2
    if args.command == "migrate":
        from quotad import migrate
        try:
            return migrate.run(args.data_dir)
        except DataDirLocked as error:
            print(f"quotad migrate: {error}", file=sys.stderr)
            return 2
    if args.command == "verify":
        try:
            return verify(args.data_dir)
        except (DataDirLocked, DataFormatMismatch) as error:
            print(f"quotad: {error}", file=sys.stderr)
            return 2
    if args.config is not None:
        try:
            args = parser(config_file.load(args.config)).parse_args(argv)
        except ConfigFileError as error:
            print(f"quotad: --config {error}", file=sys.stderr)
            return 2
    logs.configure(args.log_level)
    try:
        settings = config_file.config_kwargs(vars(args))
        key = admin_key(args.admin_key_file, dict(os.environ))
        if key and settings.get("admin_key"):
            raise ValueError("the admin key is set twice (the --config file and "
                             f"--admin-key-file or {ADMIN_KEY_ENV}): use one")
        config = Config(**{**settings, **({"admin_key": key} if key else {})})
        return run_server(serve(config))
    except (ValueError, PlansFileError, DataDirLocked, DataFormatMismatch) as error:
        print(f"quotad: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
