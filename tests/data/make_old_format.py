"""Writes a data directory of an earlier data format, as the release that wrote it left it, for
`quotad migrate`'s tests: tests/data/formatN.tar.gz and formatN.json. It must run with that
release installed, not with this tree:

    format 3 (JSON records):                     git checkout ba92d53 && pip install -e .
    format 4 (events in an index of their own):  git checkout 73676eb && pip install -e '.[test]'
    format 5 (records hold their events):        git checkout 7c385c6 && pip install -e '.[test]'
    format 6 (rows filed by time):               git checkout bd2d996 && pip install -e '.[test]'
    format 7, snapshot format 3 (window bounds in a column per counter; tests/test_snapshot.py
    starts this server on it, no migration): git checkout 37db7a4 && pip install -e '.[test]'

    python tests/data/make_old_format.py tests/data/format3.tar.gz

formatN.json holds what that release answered last: every user's counters (GetUsage) and
audit events (ListEvents), which a migrated directory must answer the same.

The directory holds plans, subscriptions in two apps' worth of users, holds committed,
released, left live and expired, refunds, threshold crossings, keyed and unkeyed calls, a
snapshot part-way, records before it (the audit trail) and after it (killed, not stopped, so
that the log goes on past the last snapshot). It prints the state digest the release had.
"""

from __future__ import annotations

import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from quotad.testing import ServerProcess
from quotad_client import QuotaClient

PLANS = """
[[plans]]
id = "pro"
name = "Pro"
[[plans.limit_groups]]
key = "tokens"
label = "Tokens"
unit = "tokens"
quota = 1000
window = "month"
match = { event_types = ["openai.*"] }
[[plans.limit_groups]]
key = "premium"
quota = 300
window = "lifetime"
match = { metadata = { model = ["gpt-4o"] } }
"""


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (folder / "plans.toml").write_text(PLANS)
        data_dir = folder / "data"
        server = ServerProcess(data_dir, plans=folder / "plans.toml",
                               extra_args=("--snapshot-every-records", "40",
                                           "--log-state-digest")).start()
        client = QuotaClient(server.address)
        for n in range(12):
            client.subscribe(f"user-{n:02d}", "pro",
                             time_zone="Europe/Paris" if n % 3 else "UTC")
        for n in range(12):
            user = f"user-{n:02d}"
            model = "gpt-4o" if n % 2 else "gpt-4o-mini"
            hold = client.reserve(user, "openai.chat", 40, metadata={"model": model},
                                  idempotency_key=f"r-{n}")
            if n % 4 == 0:
                hold.commit(35, idempotency_key=f"c-{n}")
            elif n % 4 == 1:
                hold.release()
            elif n % 4 == 2:
                hold.extend(2)
            client.track(user, "openai.embed", 7 + n, metadata={"model": model})
            client.track(user, "openai.embed", -3)
        client.track("user-00", "openai.chat", 900, enforce=False)  # crosses 80 % and 100 %
        for n in range(40):
            client.track(f"user-{n % 12:02d}", "openai.chat", 1, idempotency_key=f"t-{n}")
        time.sleep(3)  # the extended holds expire
        client.track("user-01", "openai.chat", 1)
        answers = {}
        for n in range(12):
            user = f"user-{n:02d}"
            usage = client.usage(user)
            answers[user] = {
                "counters": [[c.key, c.quota, c.used, c.held, c.remaining,
                              c.window_start.isoformat(),
                              c.resets_at.isoformat() if c.resets_at else None]
                             for c in usage.counters],
                "events": [[e.sequence, e.time.isoformat(), e.kind, e.event_type, e.amount,
                            dict(e.metadata), e.reservation_id, e.allowed, e.limit_group_key,
                            e.threshold_percent] for e in client.iter_events(user)],
            }
        out.with_suffix("").with_suffix(".json").write_text(json.dumps(answers, indent=1))
        client.close()
        server.kill()
        with tarfile.open(out, "w:gz") as archive:
            archive.add(data_dir, arcname="data",
                        filter=lambda info: None if info.name.endswith(".lock") else info)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
