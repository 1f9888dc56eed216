"""The servers a bench run measures, each started and stopped by the bench (or, for quotad,
an external one given by --target), and the gRPC driver shared by quotad and the echo peer.

A target gives the worker processes a `driver` spec (a plain dict that crosses the process
boundary); `make_driver` turns it into an async driver with reserve / commit / release / track.
"""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from quotad.testing import ServerProcess

from . import redis_peer
from .workloads import DEFAULT_TTL_S, EVENT_TYPE, EVENT_TYPES, PLAN, user_id

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0
SETUP_CONCURRENCY = 64

DESCRIPTIONS = {
    "quotad": "quotad (LMDB WAL, fsync per group commit)",
    "redis-always": "Redis + Lua (AOF, appendfsync always)",
    "redis-none": "Redis + Lua (no persistence)",
    "echo": "echo (bare grpc.aio, same messages)",
}
PEERS = ("redis-always", "redis-none", "echo")


def add_server_arguments(parser: Any, quotad_example: str, echo_example: str) -> None:
    """--quotad-arg and --echo-arg: one more argument for the server each bench starts,
    repeatable (read back as args.quotad_arg and args.echo_arg, lists)."""
    parser.add_argument("--quotad-arg", action="append", default=[], metavar="ARG",
                        help="one more `quotad serve` argument, repeatable "
                             f"(e.g. --quotad-arg={quotad_example})")
    parser.add_argument("--echo-arg", action="append", default=[], metavar="ARG",
                        help="one more bench.echo_server argument, repeatable "
                             f"(e.g. --echo-arg={echo_example})")


def process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), None when unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Target:
    name: str
    description: str

    def start(self) -> None: ...
    def set_up(self, users: int) -> None: ...
    def driver(self) -> dict[str, Any]: ...
    def stop(self) -> dict[str, Any]: ...

    @property
    def pid(self) -> int | None:
        return None

    def cpu_s(self) -> float | None:
        """CPU seconds its server processes used so far (None: unknown)."""
        return process_cpu_s(self.pid)


class QuotadTarget(Target):
    """quotad on a fresh data directory each start (or an external server at `external`)."""

    name = "quotad"

    def __init__(self, external: str | None = None, extra_args: tuple[str, ...] = (),
                 data_dir: Path | None = None) -> None:
        self.external = external
        self.extra_args = extra_args
        """More `quotad serve` flags for the server this target starts."""
        self.given_data_dir = data_dir
        """The data directory the server this target starts serves (kept after it stops);
        None: a fresh one, removed after."""
        self.description = DESCRIPTIONS["quotad"] + (f" at {external}" if external else "")
        self._server: ServerProcess | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self.address = external or ""

    @property
    def pid(self) -> int | None:
        if self._server is None or self._server.process is None:
            return None
        return int(self._server.process.pid)

    @property
    def data_dir(self) -> Path | None:
        """The data directory of the quotad this target started (None: external, or stopped)."""
        return self._server.data_dir if self._server is not None else None

    def start(self) -> None:
        if self.external:
            return
        if self.given_data_dir is not None:
            data_dir = self.given_data_dir
        else:
            self._dir = tempfile.TemporaryDirectory(prefix="bench-quotad-")
            data_dir = Path(self._dir.name) / "data"
        server = ServerProcess(data_dir, extra_args=self.extra_args)
        self._server = server
        try:
            server.start()
        except BaseException:
            self.stop()
            raise
        self.address = server.address

    def set_up(self, users: int) -> None:
        asyncio.run(_set_up_quotad(self.address, users))

    def driver(self) -> dict[str, Any]:
        return {"kind": "grpc", "address": self.address}

    def stop(self) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        if self._server is not None:
            try:
                if self._server.process is not None and self._server.process.poll() is None:
                    stats["exit_code"] = self._server.stop()
                bounds = [line for line in self._server.log_lines if str(
                    line.get("message", "")).startswith("the log's live data is kept under")]
                if bounds:  # the size bound pruning keeps the log under, as it started
                    stats["log_bytes_max"] = bounds[-1].get("audit_retention_bytes")
                stopped = [line for line in self._server.log_lines
                           if line.get("message") == "stopped"]
                if stopped:
                    line = stopped[-1]
                    stats["log_records_written"] = line.get("records_written")
                    stats["log_records_pruned"] = line.get("records_pruned")
                    stats["log_batches"] = line.get("batches")
                    if line.get("batches"):
                        stats["records_per_txn"] = line["records_written"] / line["batches"]
            finally:
                self._server.close()
                self._server = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
        return stats


async def _set_up_quotad(address: str, users: int, cluster: str | None = None) -> None:
    from quotad_client import AsyncQuotaClient, NotFound

    client = (AsyncQuotaClient(cluster=cluster, timeout_s=30.0) if cluster
              else AsyncQuotaClient(address, timeout_s=30.0))
    async with client:
        await client.upsert_plan(PLAN)
        next_user = 0

        async def subscribe(user: str) -> None:
            """In a cluster the plan reaches the other shards through etcd: until it has,
            theirs answer NOT_FOUND."""
            deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
            while True:
                try:
                    await client.subscribe(user, PLAN["id"])
                    return
                except NotFound:
                    if cluster is None or asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.05)

        async def subscriber() -> None:
            nonlocal next_user
            while next_user < users:
                index, next_user = next_user, next_user + 1
                await subscribe(user_id(index))

        await asyncio.gather(*(subscriber() for _ in range(min(users, SETUP_CONCURRENCY))))


class ClusterTarget(Target):
    """A cluster on loopback, fresh each start: one etcd (quotad.cluster.etcd_process), the
    shard map written by `quotad cluster init` (slots split evenly), and `shards` quotad
    processes serving with --cluster. Driven through AsyncQuotaClient(cluster=...), which
    routes each call to its user's shard; its server CPU is the shards' together (etcd's
    apart: nothing on a call's path talks to it)."""

    def __init__(self, shards: int) -> None:
        assert shards >= 1
        self.shards = shards
        self.name = f"cluster-{shards}"
        self.description = f"quotad cluster: {shards} shard(s) + etcd, routed by the client"
        self.target = ""
        self._servers: list[ServerProcess] = []
        self._etcd: Any = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def pids(self) -> list[int]:
        return [server.process.pid for server in self._servers if server.process is not None]

    def cpu_s(self) -> float | None:
        used = [process_cpu_s(pid) for pid in self.pids]
        return None if not used or None in used else sum(used)  # type: ignore[arg-type]

    def etcd_cpu_s(self) -> float | None:
        process = getattr(self._etcd, "process", None)
        return process_cpu_s(process.pid) if process is not None else None

    def start(self) -> None:
        from quotad.cluster.etcd_process import EtcdProcess, free_ports

        self._dir = tempfile.TemporaryDirectory(prefix="bench-cluster-")
        folder = Path(self._dir.name)
        try:
            self._etcd = EtcdProcess(folder / "etcd" / "data").start()
            self.target = f"etcd://{self._etcd.endpoint}/bench"
            addresses = [f"127.0.0.1:{port}" for port in free_ports(self.shards)]
            init = subprocess.run(
                [sys.executable, "-m", "quotad", "cluster", "init", "--cluster", self.target,
                 "--shards", str(self.shards),
                 *[flag for address in addresses for flag in ("--address", address)]],
                capture_output=True, text=True, timeout=START_TIMEOUT_S, cwd=ROOT)
            if init.returncode != 0:
                raise RuntimeError(f"quotad cluster init failed: {init.stderr.strip()}")
            for shard_id, address in enumerate(addresses):
                server = ServerProcess(folder / f"shard-{shard_id}",
                                       extra_args=("--cluster", self.target,
                                                   "--shard-id", str(shard_id)))
                self._servers.append(server)
                server.launch(address)
            for server in self._servers:
                server.wait_for("serving", START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise

    def set_up(self, users: int) -> None:
        asyncio.run(_set_up_quotad("", users, cluster=self.target))

    def driver(self) -> dict[str, Any]:
        return {"kind": "grpc", "address": "", "cluster": self.target}

    def stop(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"shards": self.shards, "etcd_cpu_s": self.etcd_cpu_s()}
        written = batches = 0
        for server in self._servers:
            try:
                if server.process is not None and server.process.poll() is None:
                    server.stop()
                stopped = [line for line in server.log_lines if line.get("message") == "stopped"]
                if stopped:
                    written += stopped[-1].get("records_written") or 0
                    batches += stopped[-1].get("batches") or 0
            finally:
                server.close()
        self._servers = []
        if batches:
            stats["records_per_txn"] = written / batches
        if self._etcd is not None:
            self._etcd.stop()
            self._etcd.close()
            self._etcd = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
        return stats


class EchoTarget(Target):
    """bench/echo_server.py in its own process, driven through the same quotad client."""

    name = "echo"
    description = DESCRIPTIONS["echo"]

    def __init__(self, extra_args: tuple[str, ...] = ()) -> None:
        self._process: subprocess.Popen[str] | None = None
        self.address = ""
        self.extra_args = extra_args
        """More echo_server flags (--option, --maximum-concurrent-rpcs)."""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.echo_server", "--listen", "127.0.0.1:0",
             *self.extra_args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], START_TIMEOUT_S)
        line = self._process.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"the echo server did not start (printed {line!r})")
        self.address = f"127.0.0.1:{int(line)}"

    def set_up(self, users: int) -> None:
        pass

    def driver(self) -> dict[str, Any]:
        return {"kind": "grpc", "address": self.address}

    def stop(self) -> dict[str, Any]:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait(timeout=30)
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None
        return {}


class RedisTarget(Target):
    def __init__(self, mode: str, binary: str) -> None:
        self.name = f"redis-{mode}"
        self.description = DESCRIPTIONS[self.name]
        self._server = redis_peer.RedisServer(mode, binary=binary)

    @property
    def pid(self) -> int | None:
        return self._server.pid

    def start(self) -> None:
        self._server.start()

    def set_up(self, users: int) -> None:
        self._server.set_up(users)

    def driver(self) -> dict[str, Any]:
        return {"kind": "redis", "address": self._server.address}

    def stop(self) -> dict[str, Any]:
        try:
            stats = self._server.info() if self._server.process is not None else {}
        except Exception as error:  # noqa: BLE001 - stats are a nicety; stopping matters
            stats = {"info_error": str(error)}
        self._server.stop()
        return stats


class GrpcDriver:
    """quotad (or the echo peer) through the project's own AsyncQuotaClient."""

    def __init__(self, address: str, call_timeout_s: float, idempotency_keys: bool,
                 coalesce: bool, cluster: str | None = None) -> None:
        self._address = address
        self._cluster = cluster
        """A cluster target (etcd://...): the client routes each call to its shard."""
        self._timeout_s = call_timeout_s
        self._keys = idempotency_keys
        self._coalesce = coalesce
        self._metadata: dict[str, dict[str, str]] = {}
        self._shard_ids: dict[str, int] = {}

    async def open(self) -> None:
        from quotad_client import AsyncQuotaClient

        # the client's defaults (coalescing included), unless --no-coalesce
        options: dict[str, Any] = {} if self._coalesce else {"coalesce": False}
        if self._cluster:
            options["cluster"] = self._cluster
        else:
            options["target"] = self._address
        self._client = AsyncQuotaClient(timeout_s=self._timeout_s,
                                        auto_idempotency_keys=self._keys, **options)

    async def close(self) -> None:
        await self._client.close()

    def batches_sent(self) -> int | None:
        """Batch RPCs the client's coalescing sent so far, to every shard (None: not
        coalescing, or unknown). In a cluster the client keeps a coalescer per shard: the
        first shard's is the target's, the others' sit with their channels."""
        coalescers = [getattr(self._client, "_coalescer", None)]
        coalescers += [entry[2] for entry in getattr(self._client, "_shards", {}).values()]
        sent = [getattr(coalescer, "batches_sent", None) for coalescer in coalescers
                if coalescer is not None]
        return sum(sent) if sent and all(isinstance(n, int) for n in sent) else None

    def shard_of(self, user: str) -> int | None:
        """The id of the shard that owns the user in the client's map (None: not a cluster,
        or no map fetched yet)."""
        shard = self._shard_ids.get(user)
        if shard is None and self._cluster:
            routes = getattr(self._client, "_routes", None)
            if routes is None:
                return None
            from quotad_contract.shards import slot_of

            shard = self._shard_ids[user] = routes.shard_map.owner(
                slot_of(routes.app, user)).shard_id
        return shard

    def _meta(self, model: str) -> dict[str, str]:
        meta = self._metadata.get(model)
        if meta is None:
            meta = self._metadata[model] = {"model": model}
        return meta

    async def reserve(self, user: str, amount: int, model: str, ttl_s: float,
                      groups: tuple[str, ...]) -> tuple[bool, str]:
        hold = await self._client.reserve(user, EVENT_TYPES.get(model, EVENT_TYPE), amount,
                                          metadata=self._meta(model),
                                          ttl_s=None if ttl_s == DEFAULT_TTL_S else ttl_s,
                                          raise_on_deny=False)
        return hold.allowed, hold.reservation_id

    async def commit(self, hold_id: str, actual: int) -> None:
        await self._client.commit(hold_id, actual)

    async def release(self, hold_id: str) -> None:
        await self._client.release(hold_id)

    async def track(self, user: str, amount: int, model: str, enforce: bool,
                    groups: tuple[str, ...]) -> bool:
        result = await self._client.track(user, EVENT_TYPES.get(model, EVENT_TYPE), amount,
                                          metadata=self._meta(model),
                                          enforce=enforce, raise_on_deny=False)
        return result.allowed


def make_driver(spec: dict[str, Any], *, concurrency: int, call_timeout_s: float,
                idempotency_keys: bool, coalesce: bool) -> Any:
    if spec["kind"] == "grpc":
        return GrpcDriver(spec["address"], call_timeout_s, idempotency_keys, coalesce,
                          spec.get("cluster"))
    if spec["kind"] == "redis":
        return redis_peer.RedisDriver(spec["address"], concurrency, call_timeout_s)
    raise ValueError(f"unknown driver kind {spec['kind']!r}")
