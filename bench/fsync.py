"""The disk's floor under a durable answer: LMDB write transactions alone, synced on commit,
with quotad's options, on a fresh directory (by default under the system's temp directory;
--dir to measure another disk).

    .venv/bin/python -m bench.fsync [--commits 2000] [--records 1,100] [--dir PATH]

For each records-per-transaction size it prints the commit latency p50 / p99, commits/s,
records/s, and this process's CPU (user + system, getrusage) per commit: what a synced commit
costs the server beyond its wall time, mostly in the kernel. One record of ~400 bytes is about a Reserve with its audit event. A unary
call at one in flight cannot be answered faster than the p50 with one record.
"""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import lmdb
from quotad.storage.wal import LMDB_OPTIONS

from .harness import doc_parser

RECORD_BYTES = 400


def measure(directory: Path, commits: int, records: int) -> dict[str, float]:
    env = lmdb.open(str(directory), map_size=4 * 1024**3, **LMDB_OPTIONS)
    log_db = env.open_db(b"log")
    value = os.urandom(RECORD_BYTES)
    sequence = 0
    latencies_s = []
    usage = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    for _ in range(commits):
        began = time.perf_counter()
        with env.begin(write=True, db=log_db) as txn:
            for _ in range(records):
                sequence += 1
                txn.put(sequence.to_bytes(8, "big"), value, append=True)
        latencies_s.append(time.perf_counter() - began)
    elapsed_s = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    system_s = after.ru_stime - usage.ru_stime
    env.close()
    latencies_s.sort()
    return {"p50_ms": statistics.median(latencies_s) * 1e3,
            "p99_ms": latencies_s[int(len(latencies_s) * 0.99)] * 1e3,
            "commits_per_s": commits / elapsed_s, "records_per_s": commits * records / elapsed_s,
            "cpu_us": cpu_s / commits * 1e6, "system_us": system_s / commits * 1e6}


def main() -> None:
    parser = doc_parser("bench.fsync", __doc__)
    parser.add_argument("--commits", type=int, default=2000, metavar="N",
                        help="synced transactions per size (default: 2000)")
    parser.add_argument("--records", default="1,100", metavar="N[,N]",
                        help=f"records of {RECORD_BYTES} bytes per transaction (default: 1,100)")
    parser.add_argument("--dir", type=Path, metavar="PATH",
                        help="directory to make the temporary LMDB in (default: the temp dir)")
    options = parser.parse_args()
    print(f"{'records/txn':>11} {'p50 ms':>8} {'p99 ms':>8} {'commits/s':>10} {'records/s':>10}"
          f" {'CPU us/commit':>13} {'of it system':>12}")
    for records in (int(text) for text in options.records.split(",")):
        with tempfile.TemporaryDirectory(dir=options.dir, prefix="bench-fsync-") as directory:
            figures = measure(Path(directory), options.commits, records)
        print(f"{records:>11} {figures['p50_ms']:>8.3f} {figures['p99_ms']:>8.3f} "
              f"{figures['commits_per_s']:>10,.0f} {figures['records_per_s']:>10,.0f}"
              f" {figures['cpu_us']:>13.0f} {figures['system_us']:>12.0f}")


if __name__ == "__main__":
    main()
