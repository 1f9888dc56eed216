"""CPU per row put into an LMDB table of this server's options, by the order of the keys: what
a table keyed by a digest costs against one keyed by time, once the table is large.

    .venv/bin/python -m bench.lmdb_inserts [--rows-before 1000000] [--transactions 200]
                                           [--rows-per-transaction 500] [--runs 3]

For each order, a fresh table is filled with --rows-before rows of 14-byte keys and 8-byte
values (unmeasured), then --transactions synced write transactions each put
--rows-per-transaction more: keys at random (a digest), or keys that grow (a time, then a
digest, as the idempotency table files the clients' keys). Prints the median of the runs in
microseconds per row, the process's user and system CPU apart (getrusage: the system CPU is
the kernel copying each dirty 4 KiB page and writing it back at the sync), and the KiB the
process had written to the disk per transaction (/proc/self/io's write_bytes: the dirty
pages, with what the file system adds).
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import statistics
import tempfile
import time
from pathlib import Path

import lmdb

from quotad.storage.wal import LMDB_OPTIONS

from .harness import doc_parser

ORDERS = ("random", "growing")
KIB = 1024


def _io_write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def _keys(order: str, start: int, count: int) -> list[bytes]:
    digests = [hashlib.blake2b(n.to_bytes(8, "big"), digest_size=8).digest()
               for n in range(start, start + count)]
    if order == "random":
        return [digest[:6] + digest for digest in digests]
    return sorted((start + n).to_bytes(6, "big") + digest for n, digest in enumerate(digests))


def run_once(order: str, rows_before: int, transactions: int, per_transaction: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-lmdb-") as folder:
        options = {**LMDB_OPTIONS, "max_dbs": 1}
        env = lmdb.open(folder, map_size=16 * 1024**3, **options)
        try:
            value = bytes(8)
            for at in range(0, rows_before, 100_000):
                with env.begin(write=True) as txn:
                    for key in sorted(_keys(order, at, min(100_000, rows_before - at))):
                        txn.put(key, value)
            env.sync(True)
            before = resource.getrusage(resource.RUSAGE_SELF)
            written_before, started = _io_write_bytes(), time.perf_counter()
            for n in range(transactions):
                keys = _keys(order, rows_before + n * per_transaction, per_transaction)
                with env.begin(write=True) as txn:
                    for key in sorted(keys):
                        txn.put(key, value)
            after = resource.getrusage(resource.RUSAGE_SELF)
            wall_s = time.perf_counter() - started
            written = _io_write_bytes() - written_before
        finally:
            env.close()
    rows = transactions * per_transaction
    return {"user_us": 1e6 * (after.ru_utime - before.ru_utime) / rows,
            "system_us": 1e6 * (after.ru_stime - before.ru_stime) / rows,
            "wall_us": 1e6 * wall_s / rows,
            "kib_per_txn": written / KIB / transactions}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = doc_parser("bench.lmdb_inserts", __doc__)
    parser.add_argument("--rows-before", type=_positive_int, default=1_000_000, metavar="N",
                        help="rows in the table before the measured puts (default: 1000000)")
    parser.add_argument("--transactions", type=_positive_int, default=200, metavar="N",
                        help="measured transactions (default: 200)")
    parser.add_argument("--rows-per-transaction", type=_positive_int, default=500,
                        metavar="N", help="rows put in each (default: 500)")
    parser.add_argument("--runs", type=_positive_int, default=3, metavar="N",
                        help="runs of each order, alternated; medians (default: 3)")
    args = parser.parse_args(argv)
    results: dict[str, list[dict]] = {order: [] for order in ORDERS}
    for run in range(args.runs):
        for order in ORDERS:
            results[order].append(run_once(order, args.rows_before, args.transactions,
                                           args.rows_per_transaction))
            print(f"run {run + 1} of {args.runs}: {order} done", flush=True)
    print(f"rows put into a table of {args.rows_before:,}, {args.rows_per_transaction} per "
          f"synced transaction, median of {args.runs} runs (range)")
    print(f"{'keys':10} {'user us/row':>16} {'system us/row':>18} {'wall us/row':>16} "
          f"{'KiB written/txn':>22}")
    for order, runs in results.items():
        cells = []
        for figure, form in (("user_us", ".2f"), ("system_us", ".2f"), ("wall_us", ".2f"),
                             ("kib_per_txn", ".0f")):
            values = [run[figure] for run in runs]
            cells.append(f"{statistics.median(values):{form}} ({min(values):{form}}-"
                         f"{max(values):{form}})")
        print(f"{order:10} {cells[0]:>16} {cells[1]:>18} {cells[2]:>16} {cells[3]:>22}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
