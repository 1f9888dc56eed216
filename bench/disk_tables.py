"""Where a stopped quotad's data directory spends its bytes: each LMDB table's entries, key and
value bytes, and the pages it holds, per log record.

    python -m bench.disk_tables --data-dir DIR [--operations N]

With --operations (e.g. the soak's count), every figure is also given per operation. The
pages are what the file grows by: a table's page bytes over its key + value bytes is how full
its pages are (LMDB splits a page in two when an insert does not fit, so tables written in
key order fill their pages and tables written at random keys keep them ~half empty).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lmdb

TABLES = ("log", "events", "holds", "idempotency", "shapes", "snapshot", "meta")


def table_bytes(data_dir: Path) -> list[dict[str, int | str]]:
    """One row per table: entries, key bytes, value bytes, pages and page bytes."""
    env = lmdb.open(str(data_dir), readonly=True, lock=False, max_dbs=8, subdir=True)
    try:
        rows = []
        for name in TABLES:
            try:
                db = env.open_db(name.encode(), create=False)
            except lmdb.NotFoundError:  # a directory from before the table
                continue
            with env.begin(db=db, buffers=True) as txn:
                stat = txn.stat(db)
                key_bytes = value_bytes = 0
                for key, value in txn.cursor():
                    key_bytes += len(key)
                    value_bytes += len(value)
            pages = stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
            rows.append({"table": name, "entries": stat["entries"], "key_bytes": key_bytes,
                         "value_bytes": value_bytes, "pages": pages,
                         "page_bytes": pages * stat["psize"]})
        return rows
    finally:
        env.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.disk_tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, metavar="DIR",
                        help="a quotad data directory; the server must be stopped")
    parser.add_argument("--operations", type=int, metavar="N",
                        help="operations that wrote it: adds bytes per operation")
    args = parser.parse_args(argv)
    if not (args.data_dir / "data.mdb").is_file():
        parser.error(f"{args.data_dir} holds no data.mdb")
    rows = table_bytes(args.data_dir)
    records = next(int(row["entries"]) for row in rows if row["table"] == "log") or 1
    per = f"per op (of {args.operations:,})" if args.operations else ""
    print(f"{'table':12} {'entries':>10} {'key B':>12} {'value B':>12} {'page B':>12} "
          f"{'fill':>5} {'page B/record':>13} {per:>18}")
    for row in rows + [{"table": "total", **{key: sum(int(r[key]) for r in rows) for key in
                        ("entries", "key_bytes", "value_bytes", "pages", "page_bytes")}}]:
        used = int(row["key_bytes"]) + int(row["value_bytes"])
        page_bytes = int(row["page_bytes"])
        fill = f"{used / page_bytes:.0%}" if page_bytes else "-"
        per_op = f"{page_bytes / args.operations:.1f}" if args.operations else ""
        print(f"{row['table']:12} {row['entries']:>10,} {row['key_bytes']:>12,} "
              f"{row['value_bytes']:>12,} {page_bytes:>12,} {fill:>5} "
              f"{page_bytes / records:>13.1f} {per_op:>18}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
