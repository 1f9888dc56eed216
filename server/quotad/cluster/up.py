"""`quotad cluster up`: a whole cluster on one machine, for a laptop. etcd and N shards on
loopback, under one data directory, one command; SIGINT (Ctrl-C) or SIGTERM stops them all,
the shards first (each drains and gives its lease back), then etcd.

    DIR/cluster.json      the layout: the cluster's name, etcd's ports, the shards' addresses
    DIR/etcd/data         etcd's data (DIR/etcd/etcd.log its log)
    DIR/shard-N/          shard N's data directory (DIR/shard-N.log its log)

The first run writes cluster.json and the shard map; a later run with the same DIR starts
the same cluster again, on the same ports, with its data. Importing this module imports no
grpc (the command line builds its parser from it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from quotad.cluster.etcd_process import EtcdProcess, free_ports
from quotad.cluster.limits import CLUSTER_UP_SHARDS_MAX, LEASE_TTL_S_MAX, LEASE_TTL_S_MIN
from quotad_contract.shards import EtcdTarget, ShardMapError, split_evenly

LAYOUT_FILE = "cluster.json"
SHARD_START_TIMEOUT_S = 60.0
SHARD_STOP_TIMEOUT_S = 30.0
POLL_S = 0.1
ETCD_PORT_DEFAULT = 2379
SHARD_PORT_DEFAULT = 50051
NAME_DEFAULT = "local"


def add_parser(actions: Any) -> None:
    up = actions.add_parser(
        "up", help="run etcd and N shards on this machine, until Ctrl-C",
        description="Run a whole cluster on loopback: etcd, the shard map (slots split "
                    "evenly), and N shards, each `quotad serve --cluster ... --shard-id I`. "
                    "Prints the cluster target (etcd://127.0.0.1:PORT/NAME) on stdout once "
                    "every shard serves; Ctrl-C (SIGINT) or SIGTERM stops the shards, then "
                    "etcd, and exits 0. A later run with the same --data-dir starts the same "
                    "cluster again (its ports and data; --shards must match). Needs etcd on "
                    "PATH (Debian: apt-get install etcd-server).")
    up.add_argument("--shards", type=int, required=True, metavar="N",
                    help=f"how many shards, 1 to {CLUSTER_UP_SHARDS_MAX}")
    up.add_argument("--data-dir", type=Path, default=Path("./cluster"), metavar="DIR",
                    help="where etcd's and every shard's data go (default: %(default)s)")
    up.add_argument("--name", default=NAME_DEFAULT, metavar="NAME",
                    help="the cluster's name in etcd (default: %(default)s)")
    up.add_argument("--etcd-port", type=int, default=ETCD_PORT_DEFAULT, metavar="PORT",
                    help="etcd's client port on 127.0.0.1, its peer port the next one; 0 picks "
                         "free ones (default: %(default)s)")
    up.add_argument("--port", type=int, default=SHARD_PORT_DEFAULT, metavar="PORT",
                    help="shard 0's port on 127.0.0.1, shard I's PORT+I; 0 picks free ones "
                         "(default: %(default)s)")
    up.add_argument("--plans", type=Path, metavar="FILE.toml",
                    help="plans every shard loads at start (see examples/plans.toml)")
    up.add_argument("--lease-ttl-s", type=int, default=None, metavar="SECONDS",
                    help="the shards' --lease-ttl-s (default: serve's)")


class UpError(Exception):
    """Why the cluster cannot come up (exit 2), nothing left running."""


def layout(args: argparse.Namespace) -> dict[str, Any]:
    """The cluster's layout: DIR/cluster.json's when there is one, else from the flags (and
    written there)."""
    if not 1 <= args.shards <= CLUSTER_UP_SHARDS_MAX:
        raise UpError(f"--shards must be 1 to {CLUSTER_UP_SHARDS_MAX}")
    for flag, port in (("--etcd-port", args.etcd_port), ("--port", args.port)):
        if not 0 <= port <= 65535 - CLUSTER_UP_SHARDS_MAX:
            raise UpError(f"{flag} must be 0 to {65535 - CLUSTER_UP_SHARDS_MAX}")
    if args.lease_ttl_s is not None and not LEASE_TTL_S_MIN <= args.lease_ttl_s <= LEASE_TTL_S_MAX:
        raise UpError(f"--lease-ttl-s must be {LEASE_TTL_S_MIN} to {LEASE_TTL_S_MAX} seconds")
    try:
        EtcdTarget.parse(f"etcd://127.0.0.1:1/{args.name}")
    except ShardMapError:
        raise UpError(f"--name {args.name!r}: letters, digits, '.', '_', '-' only") from None
    path = args.data_dir / LAYOUT_FILE
    if path.exists():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if len(recorded["addresses"]) != args.shards:
            raise UpError(f"{args.data_dir} holds a cluster of {len(recorded['addresses'])} "
                          f"shard(s), not {args.shards}: give --shards "
                          f"{len(recorded['addresses'])}, or another --data-dir")
        return recorded
    picked = iter(free_ports(2 + args.shards))  # different ports, whichever are used
    etcd_port = args.etcd_port or next(picked)
    recorded = {
        "name": args.name, "etcd_client_port": etcd_port,
        "etcd_peer_port": (etcd_port + 1) if args.etcd_port else next(picked),
        "addresses": [f"127.0.0.1:{args.port + shard_id if args.port else next(picked)}"
                      for shard_id in range(args.shards)]}
    args.data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recorded, indent=2) + "\n", encoding="utf-8")
    return recorded


def write_map(target: EtcdTarget, addresses: list[str]) -> None:
    """The map of these shards, unless etcd holds it already (a later run): UpError when it
    holds another."""
    from quotad.cluster import control  # grpc: imported once the command runs
    from quotad.cluster.etcd import EtcdUnavailable

    async def run() -> None:
        etcd = await control.connect(target)
        try:
            await control.init_map(etcd, target, addresses, replace=False)
        except control.ShardMapExists:
            shard_map, _ = await control.load_map(etcd, target)
            if shard_map != split_evenly(addresses):
                raise UpError(f"{target} holds another shard map than {LAYOUT_FILE}'s "
                              "shards: start with another --data-dir") from None
        finally:
            await etcd.close()
    try:
        asyncio.run(run())
    except (EtcdUnavailable, ShardMapError) as error:
        raise UpError(str(error)) from None


class Shards:
    """The shard processes, each in its own session (Ctrl-C reaches `cluster up` only, which
    stops them in order)."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self._files: list[IO[bytes]] = []

    def start(self, args: argparse.Namespace, target: EtcdTarget, addresses: list[str]) -> None:
        for shard_id, address in enumerate(addresses):
            log_path = args.data_dir / f"shard-{shard_id}.log"
            command = [sys.executable, "-m", "quotad", "serve", "--listen", address,
                       "--data-dir", str(args.data_dir / f"shard-{shard_id}"),
                       "--cluster", str(target), "--shard-id", str(shard_id)]
            if args.plans is not None:
                command += ["--plans", str(args.plans)]
            if args.lease_ttl_s is not None:
                command += ["--lease-ttl-s", str(args.lease_ttl_s)]
            log_file = open(log_path, "ab")  # noqa: SIM115 -- closed in stop()
            self._files.append(log_file)
            self.logs.append(log_path)
            self.processes.append(subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                start_new_session=True))

    def wait_serving(self, stopping: list[int]) -> None:
        """Until every shard has logged "serving"; UpError if one exits or takes too long."""
        offsets = [path.stat().st_size if path.exists() else 0 for path in self.logs]
        waiting = set(range(len(self.processes)))
        deadline = time.monotonic() + SHARD_START_TIMEOUT_S
        while waiting and time.monotonic() < deadline and not stopping:
            for shard_id in sorted(waiting):
                if self.processes[shard_id].poll() is not None:
                    raise UpError(f"shard {shard_id} exited ({self.processes[shard_id].returncode})"
                                  f" while starting; see {self.logs[shard_id]}")
                with open(self.logs[shard_id], "rb") as log_file:
                    log_file.seek(offsets[shard_id])
                    if any(json.loads(line).get("message") == "serving"
                           for line in log_file if line.startswith(b"{")):
                        waiting.discard(shard_id)
            time.sleep(POLL_S)
        if waiting and not stopping:
            raise UpError(f"shard(s) {sorted(waiting)} did not serve within "
                          f"{SHARD_START_TIMEOUT_S:g} s; see their logs in the data directory")

    def exited(self) -> int | None:
        for shard_id, process in enumerate(self.processes):
            if process.poll() is not None:
                return shard_id
        return None

    def stop(self) -> list[int]:
        """SIGTERM to every shard (each drains), SIGKILL past SHARD_STOP_TIMEOUT_S: the exit
        codes."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = []
        deadline = time.monotonic() + SHARD_STOP_TIMEOUT_S
        for process in self.processes:
            try:
                codes.append(process.wait(timeout=max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append(process.wait(timeout=SHARD_STOP_TIMEOUT_S))
        for log_file in self._files:
            log_file.close()
        return codes


def main(args: argparse.Namespace) -> int:
    """Runs the cluster until SIGINT or SIGTERM: 0 when stopped so, 1 when a shard or etcd
    exited on its own, 2 when it cannot come up (the reason on stderr)."""
    stopping: list[int] = []

    def stop(signum: int, frame: object) -> None:
        stopping.append(signum)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    try:
        recorded = layout(args)
    except UpError as error:
        print(f"quotad cluster up: {error}", file=sys.stderr)
        return 2
    etcd = EtcdProcess(args.data_dir / "etcd" / "data", client_port=recorded["etcd_client_port"],
                       peer_port=recorded["etcd_peer_port"],
                       log_path=args.data_dir / "etcd" / "etcd.log")
    shards = Shards()
    target = EtcdTarget("127.0.0.1", recorded["etcd_client_port"], recorded["name"])
    try:
        etcd.start()
        write_map(target, recorded["addresses"])
        shards.start(args, target, recorded["addresses"])
        shards.wait_serving(stopping)
    except (UpError, RuntimeError, OSError) as error:
        print(f"quotad cluster up: {error}", file=sys.stderr)
        shards.stop()
        etcd.close()
        return 2
    if not stopping:
        print(target, flush=True)
        print(f"quotad cluster up: etcd at {etcd.endpoint}, {len(recorded['addresses'])} "
              f"shard(s) at {', '.join(recorded['addresses'])}; logs and data in "
              f"{args.data_dir}. Ctrl-C stops them all.", file=sys.stderr, flush=True)
    failed = ""
    while not stopping:
        exited = shards.exited()
        if exited is not None:
            failed = f"shard {exited} exited; see {shards.logs[exited]}"
            break
        if etcd.process is not None and etcd.process.poll() is not None:
            failed = f"etcd exited; see {etcd.log_path}"
            break
        time.sleep(POLL_S)
    codes = shards.stop()
    etcd.stop()
    if failed:
        print(f"quotad cluster up: {failed}; stopped the rest", file=sys.stderr)
        return 1
    print(f"quotad cluster up: stopped (shards exited {codes})", file=sys.stderr)
    return 0 if all(code == 0 for code in codes) else 1


__all__ = ["add_parser", "main"]
