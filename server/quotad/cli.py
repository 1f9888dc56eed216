"""`quotad`: the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from . import limits, logs
from .plans_file import PlansFileError
from .server import Config, serve
from .codec import state_digest
from .wal import MAP_SIZE_BYTES_DEFAULT, DataDirLocked, Log
from .writer import (
    AUDIT_RETENTION_NS_DEFAULT, SNAPSHOT_EVERY_RECORDS_DEFAULT, SNAPSHOT_EVERY_S_DEFAULT, recover,
)

NS_PER_DAY = 24 * 3600 * 1_000_000_000


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="quotad",
        description="quotad: a per-end-user quota authority for AI products, over gRPC.",
    )
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "serve", help="run the server",
        description="Run the quota server. It replays its log from --data-dir, loads --plans, "
                    "then serves QuotaService and AdminService until SIGTERM.",
    )
    run.add_argument("--listen", default="127.0.0.1:50051", metavar="HOST:PORT",
                     help="address to serve on; port 0 picks a free one (default: %(default)s). "
                          "Without API keys only a loopback address is allowed.")
    run.add_argument("--data-dir", type=Path, default=Path("./quotad-data"), metavar="DIR",
                     help="LMDB directory holding the log; one server per directory "
                          "(default: %(default)s)")
    run.add_argument("--plans", type=Path, metavar="FILE.toml",
                     help="plans to load at start-up, idempotently (see examples/plans.toml)")
    run.add_argument("--map-size-gib", type=float, default=MAP_SIZE_BYTES_DEFAULT / 1024**3,
                     metavar="GIB", help="largest size the LMDB file may grow to "
                                         "(default: %(default)s)")
    run.add_argument("--snapshot-every-records", type=int,
                     default=SNAPSHOT_EVERY_RECORDS_DEFAULT, metavar="N",
                     help="write a snapshot of the state after this many log records "
                          "(default: %(default)s)")
    run.add_argument("--snapshot-every-s", type=float, default=SNAPSHOT_EVERY_S_DEFAULT,
                     metavar="SECONDS", help="... or after this many seconds with new records "
                                             "(default: %(default)s)")
    run.add_argument("--audit-retention-days", type=float,
                     default=AUDIT_RETENTION_NS_DEFAULT / NS_PER_DAY, metavar="DAYS",
                     help="keep log records (the audit trail) at least this long "
                          "(default: %(default)s)")
    run.add_argument("--metrics-listen", default="", metavar="HOST:PORT",
                     help="serve Prometheus metrics over HTTP there (port 0 picks one); "
                          "off by default")
    run.add_argument("--http-listen", default="", metavar="HOST:PORT",
                     help="also serve GET /v1/usage?user_id=U as JSON over HTTP there, for web "
                          "pages showing what a user has left (port 0 picks one); off by default")
    run.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                     help="an origin such as https://app.example.com whose pages may read "
                          "--http-listen (exact match; repeat for several); none by default, "
                          "so browsers withhold the answers from every other site's pages")
    run.add_argument("--http-read-timeout-s", type=float,
                     default=limits.HTTP_REQUEST_READ_TIMEOUT_S, metavar="SECONDS",
                     help="an HTTP request must arrive whole within this long of its first "
                          "byte, else 408 and the connection is closed (default: %(default)s)")
    run.add_argument("--reflection", action="store_true", help="enable gRPC server reflection")
    run.add_argument("--log-state-digest", action="store_true",
                     help="log a digest of the whole state at start and stop, to verify that "
                          "a restart recovers exactly the state the last run ended with")
    run.add_argument("--log-level", default="info",
                     choices=["debug", "info", "warning", "error"], help="(default: %(default)s)")
    check = commands.add_parser(
        "verify", help="check a stopped server's data directory",
        description="Check every log record of a data directory (checksum, sequence, no gaps) "
                    "and replay them all. Prints a JSON summary; exits 0 if clean, 1 if not. "
                    "Takes the directory's lock: stop the server first.",
    )
    check.add_argument("--data-dir", type=Path, default=Path("./quotad-data"), metavar="DIR",
                       help="(default: %(default)s)")
    return root


def verify(data_dir: Path) -> int:
    if not (data_dir / "data.mdb").exists():
        print(f"quotad: {data_dir} holds no quotad data", file=sys.stderr)
        return 2
    log_ = Log(data_dir)
    started = time.monotonic()
    try:
        core = recover(log_, repair=False)
    except Exception as error:
        print(json.dumps({"clean": False, "error": str(error)}))
        return 1
    finally:
        log_.close()
    print(json.dumps({"clean": True, "records": core.sequence, "state_digest": state_digest(core),
                      "seconds": round(time.monotonic() - started, 3)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "verify":
        try:
            return verify(args.data_dir)
        except DataDirLocked as error:
            print(f"quotad: {error}", file=sys.stderr)
            return 2
    logs.configure(args.log_level)
    try:
        config = Config(listen=args.listen, data_dir=args.data_dir, plans=args.plans,
                        map_size_bytes=int(args.map_size_gib * 1024**3),
                        reflection=args.reflection, log_state_digest=args.log_state_digest,
                        snapshot_every_records=args.snapshot_every_records,
                        snapshot_every_s=args.snapshot_every_s,
                        audit_retention_ns=int(args.audit_retention_days * NS_PER_DAY),
                        metrics_listen=args.metrics_listen, http_listen=args.http_listen,
                        cors_origins=tuple(args.cors_origin),
                        http_read_timeout_s=args.http_read_timeout_s)
        return asyncio.run(serve(config))
    except (ValueError, PlansFileError, DataDirLocked) as error:
        print(f"quotad: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
