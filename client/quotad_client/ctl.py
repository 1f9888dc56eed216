"""`quotactl`: the admin command line, a thin shell over the quotad_client library.

Client side only: it reads plans files with the contract's parser and leaves every limit to
the server, so it needs nothing from the server package.

Exit codes: 0 done; 1 the server said no (one line on stderr: its code and message);
2 a usage error, a bad plans file, or quotad could not be reached.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import grpc

from quotad_client import (
    ApiKey, DeadlineExceeded, Event, InvalidArgument, NotFound, QuotaClient, QuotadError,
    Unavailable, plan_to_proto,
)
from quotad_client import billing
from quotad_client._convert import window_name
from quotad_client.moves import abort_move, move_slots
from quotad_contract import limits
from quotad_contract.plans import PlansFileError, load_plans_file
from quotad_contract.shards import ETCD_SCHEME, EtcdTarget, parse_slots
from quotad_contract.v1 import quotad_pb2 as pb

T = TypeVar("T")

TARGET_ENV = "QUOTAD_TARGET"
API_KEY_ENV = "QUOTAD_API_KEY"
TLS_ROOT_CERT_ENV = "QUOTAD_TLS_ROOT_CERT"
TARGET_DEFAULT = "127.0.0.1:50051"
TIMEOUT_S_DEFAULT = 5.0
FOLLOW_INTERVAL_S_DEFAULT = 1.0
FOLLOW_INTERVAL_S_MIN = 0.1
FOLLOW_INTERVAL_S_MAX = 60.0
EXIT_REFUSED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Something on our side of the wire: bad input, a bad file, no server there."""


# --- the connection ----------------------------------------------------------------------------

def connect(target: str, timeout_s: float, tls_root_cert: Path | None = None,
            tls: bool = False, cluster: bool = False) -> QuotaClient:
    """The client for every call. The API key comes only from QUOTAD_API_KEY (never a flag,
    which would show in `ps` and shell history) and travels as `authorization: Bearer`."""
    api_key = os.environ.get(API_KEY_ENV) or None
    root_cert = None
    if tls_root_cert is not None:
        try:
            root_cert = tls_root_cert.read_bytes()
        except OSError as error:
            raise UsageError(f"--tls-root-cert {tls_root_cert}: {error.strerror}") from error
    clustered = cluster or target.startswith(ETCD_SCHEME)
    return QuotaClient(target, api_key=api_key, timeout_s=timeout_s, retries=1,
                       tls_root_cert=root_cert, tls=tls, cluster=target if clustered else None)


def cluster_target_as_flags(argv: list[str]) -> list[str]:
    """`--cluster etcd://HOST:PORT/NAME` (or `--cluster=etcd://...`) is `--target
    etcd://... --cluster`: the bare `--cluster` (the target is a shard) stays a switch."""
    flags: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--cluster" and index + 1 < len(argv) and argv[index + 1].startswith(
                ETCD_SCHEME):
            flags += ["--target", argv[index + 1], "--cluster"]
            index += 2
            continue
        if arg.startswith("--cluster=" + ETCD_SCHEME):
            flags += ["--target", arg.removeprefix("--cluster="), "--cluster"]
        else:
            flags.append(arg)
        index += 1
    return flags


# --- output helpers ----------------------------------------------------------------------------

def _out(line: str = "") -> None:
    print(line, flush=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        _out("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def _time(when: datetime | None) -> str:
    if when is None:
        return "never"
    return when.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _plain(value: Any) -> Any:
    """A client result as JSON values: dataclasses as objects, times as RFC 3339 (UTC)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name))
                for field in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if hasattr(value, "items"):  # metadata: a read-only mapping
        return {key: _plain(item) for key, item in value.items()}
    return value


def _json_out(value: Any) -> None:
    """One JSON value on one line (for `jq`, and one per line for a stream)."""
    _out(json.dumps(_plain(value), ensure_ascii=False, separators=(",", ":")))


def _match_text(match: pb.Match) -> str:
    parts = []
    if match.event_types:
        parts.append("events " + ", ".join(match.event_types))
    for constraint in match.metadata:
        parts.append(f"{constraint.key} in {', '.join(constraint.values)}")
    return "; ".join(parts) or "every event"


def _cost_text(group: pb.LimitGroup) -> str:
    """How the group counts: "amount x rate by model (gpt-4o 10, gpt-4o-mini 1; else 1)"."""
    if not group.HasField("cost"):
        return ""
    cost = group.cost
    rates = ", ".join(f"{value} {rate}" for value, rate in sorted(cost.rates.items()))
    default = (f"else {cost.default_rate}" if cost.HasField("default_rate")
               else "else no match")
    return f"; amount x rate by {cost.by} ({'; '.join(filter(None, (rates, default)))})"


def _group_text(group: pb.LimitGroup) -> str:
    unit = f" {group.unit}" if group.unit else ""
    label = f" ({group.label})" if group.label else ""
    soft = " (soft: never denies)" if _soft(group) else ""
    quota = "" if group.kind == pb.LIMIT_KIND_BALANCE else f"{group.quota}{unit} "
    return (f"{group.key}{label}: {quota}{_per_text(group)}{soft}; "
            f"{_match_text(group.match)}{_cost_text(group)}")


def _per_text(group: pb.LimitGroup) -> str:
    """"per month", for a rate bucket "a bucket refilled every 60 s", for a balance "a
    balance of grants, 1000 credits granted every month (rollover up to 200)"."""
    if group.kind == pb.LIMIT_KIND_RATE:
        return f"a bucket refilled every {_period_s(group)} s"
    if group.kind == pb.LIMIT_KIND_BALANCE:
        if not group.HasField("grant"):
            return "a balance of grants"
        grant = group.grant
        rollover = f" (rollover up to {grant.rollover_max})" if grant.rollover_max else ""
        priority = f" at priority {grant.priority}" if grant.priority else ""
        unit = f" {group.unit}" if group.unit else ""
        return (f"a balance of grants, {grant.amount}{unit} granted every "
                f"{window_name(grant.every)}{priority}{rollover}")
    return f"per {window_name(group.window)}"


def _period_s(group: pb.LimitGroup) -> int | float:
    period = group.period
    return period.seconds if not period.nanos else period.seconds + period.nanos / 1e9


def _soft(group: pb.LimitGroup) -> bool:
    return group.HasField("enforce") and not group.enforce


def _group_dict(g: pb.LimitGroup) -> dict[str, Any]:
    group: dict[str, Any] = {
        "key": g.key, "label": g.label, "unit": g.unit, "quota": g.quota,
        "window": window_name(g.window),
        "match": {"event_types": list(g.match.event_types),
                  "metadata": {m.key: list(m.values) for m in g.match.metadata}}}
    if g.kind == pb.LIMIT_KIND_RATE:  # as a plans file has it: a bucket has no window
        del group["window"]
        group["kind"], group["period_s"] = "rate", _period_s(g)
    if g.kind == pb.LIMIT_KIND_BALANCE:  # nor a balance, whose quota is its grants
        del group["window"], group["quota"]
        group["kind"] = "balance"
        if g.HasField("grant"):
            group["grant"] = {"amount": g.grant.amount, "every": window_name(g.grant.every),
                              "rollover_max": g.grant.rollover_max,
                              "priority": g.grant.priority}
    if _soft(g):  # as a plans file has it: only a soft limit says enforce
        group["enforce"] = False
    if g.HasField("cost"):
        group["cost"] = {"by": g.cost.by, "rates": dict(sorted(g.cost.rates.items()))}
        if g.cost.HasField("default_rate"):
            group["cost"]["default"] = g.cost.default_rate
    return group


def _plan_dict(plan: pb.Plan) -> dict[str, Any]:
    """A plan in the shape of plans.toml."""
    return {"id": plan.id, "name": plan.name,
            "limit_groups": [_group_dict(g) for g in plan.limit_groups]}


# --- plans -------------------------------------------------------------------------------------

def _group_changes(old: pb.LimitGroup, new: pb.LimitGroup) -> str:
    changes = []
    for name in ("label", "unit", "quota"):
        if getattr(old, name) != getattr(new, name):
            changes.append(f"{name} {getattr(old, name)!r} -> {getattr(new, name)!r}")
    if old.window != new.window:
        changes.append(f"window {window_name(old.window)} -> {window_name(new.window)}")
    if old.match != new.match:
        changes.append(f"match {_match_text(old.match)!r} -> {_match_text(new.match)!r}")
    if _soft(old) != _soft(new):
        changes.append(f"enforce {str(not _soft(old)).lower()} -> {str(not _soft(new)).lower()}")
    if old.cost != new.cost:
        changes.append(f"cost {_cost_text(old).removeprefix('; ') or 'none'!r} -> "
                       f"{_cost_text(new).removeprefix('; ') or 'none'!r}")
    if (old.kind, old.period, old.grant) != (new.kind, new.period, new.grant):
        changes.append(f"{_per_text(old)!r} -> {_per_text(new)!r}")
    return "; ".join(changes)


def plan_diff(current: pb.Plan | None, wanted: pb.Plan) -> tuple[str, list[str]]:
    """("new" | "changed" | "unchanged", readable lines) for putting `wanted` in place."""
    if current is None:
        return "new", [f"  + {_group_text(g)}" for g in wanted.limit_groups]
    if current == wanted:
        return "unchanged", []
    lines = []
    if current.name != wanted.name:
        lines.append(f"  ~ name {current.name!r} -> {wanted.name!r}")
    old_groups = {g.key: g for g in current.limit_groups}
    old_keys = set(old_groups)
    for group in wanted.limit_groups:
        old = old_groups.pop(group.key, None)
        if old is None:
            lines.append(f"  + {_group_text(group)}")
        elif old != group:
            lines.append(f"  ~ {group.key}: {_group_changes(old, group)}")
        else:
            lines.append(f"  = {group.key}: unchanged")
    lines.extend(f"  - {key}: removed (was {_group_text(old)})"
                 for key, old in old_groups.items())
    kept = [g.key for g in wanted.limit_groups if g.key in old_keys]
    if kept != [g.key for g in current.limit_groups if g.key in kept]:
        lines.append("  ~ order of limit groups (the first group with no room denies)")
    return "changed", lines


def _current_plan(client: QuotaClient, plan_id: str) -> pb.Plan | None:
    try:
        return plan_to_proto(client.get_plan(plan_id))
    except NotFound:
        return None


def cmd_plans_apply(client: QuotaClient, args: argparse.Namespace) -> int:
    try:
        wanted = load_plans_file(args.file)
    except PlansFileError as error:
        raise UsageError(str(error)) from error
    counts = {"new": 0, "changed": 0, "unchanged": 0}
    to_apply = []
    for plan in wanted:
        state, lines = plan_diff(_current_plan(client, plan.id), plan)
        counts[state] += 1
        name = f" ({plan.name})" if plan.name else ""
        _out(f"plan {plan.id}{name}: {state}")
        for line in lines:
            _out(line)
        if state != "unchanged":
            to_apply.append(plan)
    listed = {plan.id for plan in wanted}
    for other in client.list_plans():
        if other.id not in listed:
            _out(f"plan {other.id}: on the server, not in {args.file.name} (left as it is)")
    summary = ", ".join(f"{count} {state}" for state, count in counts.items())
    if args.dry_run:
        _out(f"{summary}; dry run: nothing applied")
        return 0
    for plan in to_apply:
        client.upsert_plan(plan)
    _out(f"{summary}; applied {len(to_apply)}" if to_apply else f"{summary}; nothing to apply")
    return 0


def cmd_plans_list(client: QuotaClient, args: argparse.Namespace) -> int:
    plans = client.list_plans()
    if args.json:
        _out(json.dumps([_plan_dict(plan_to_proto(p)) for p in plans], indent=2))
        return 0
    if not plans:
        _out("no plans")
        return 0
    _table(("ID", "NAME", "GROUPS"),
           [(p.id, p.name, ", ".join(g.key for g in p.limit_groups) or "-") for p in plans])
    return 0


def cmd_plans_show(client: QuotaClient, args: argparse.Namespace) -> int:
    plan = plan_to_proto(client.get_plan(args.plan_id))
    if args.json:
        _out(json.dumps(_plan_dict(plan), indent=2))
        return 0
    _out(f"plan {plan.id}" + (f" ({plan.name})" if plan.name else ""))
    for group in plan.limit_groups:
        _out(f"  {_group_text(group)}")
    if not plan.limit_groups:
        _out("  no limit groups: every event is admitted")
    return 0


def cmd_plans_delete(client: QuotaClient, args: argparse.Namespace) -> int:
    client.delete_plan(args.plan_id)
    _out(f"plan {args.plan_id}: deleted")
    return 0


# --- users -------------------------------------------------------------------------------------

def cmd_subscribe(client: QuotaClient, args: argparse.Namespace) -> int:
    result = client.subscribe(args.user_id, args.plan_id, args.time_zone,
                              billing_customer_id=args.billing_customer_id)
    subscription = result.subscription
    state = "subscribed" if result.changed else "unchanged, already subscribed"
    customer = (f", billing customer {subscription.billing_customer_id}"
                if subscription.billing_customer_id else "")
    _out(f"{subscription.user_id}: {state} to plan {subscription.plan_id} "
         f"(time zone {subscription.time_zone or 'UTC'}{customer})")
    return 0


def _subscriptions(client: QuotaClient, plan_id: str) -> Iterator[Any]:
    token = ""
    while True:
        page = client.list_subscriptions(plan_id=plan_id, page_token=token,
                                         page_size=limits.SUBSCRIPTIONS_PAGE_SIZE_MAX)
        yield from page.subscriptions
        if not page.next_page_token:
            return
        token = page.next_page_token


def cmd_subscriptions(client: QuotaClient, args: argparse.Namespace) -> int:
    found = 0
    for subscription in _subscriptions(client, args.plan):
        found += 1
        if args.json:
            _json_out(subscription)
        else:
            _out(f"{subscription.user_id}  plan={subscription.plan_id}  "
                 f"tz={subscription.time_zone or 'UTC'}  "
                 f"customer={subscription.billing_customer_id or '-'}")
    if not found and not args.json:
        _out("no subscriptions")
    return 0


def cmd_usage(client: QuotaClient, args: argparse.Namespace) -> int:
    usage = client.usage(args.user_id)
    if args.json:
        _json_out(usage)
        return 0
    _out(f"user {usage.user_id}, plan {usage.plan_id}")
    if not usage.counters:
        _out("no limit groups")
        return 0
    _table(("GROUP", "WINDOW", "USED", "HELD", "QUOTA", "REMAINING", "OVERAGE", "RESETS AT",
            "FULL AT"),
           [(c.key, c.kind if c.kind in ("rate", "balance") else c.window, str(c.used),
             str(c.held),
             str(c.quota), str(c.remaining), str(c.overage), _time(c.resets_at),
             _time(c.full_at) if c.kind == "rate" else "-") for c in usage.counters])
    return 0


def cmd_grant(client: QuotaClient, args: argparse.Namespace) -> int:
    result = client.grant_credits(args.user_id, args.group_key, args.amount,
                                  expires_at=args.expires_at, priority=args.priority,
                                  idempotency_key=args.idempotency_key)
    if args.json:
        _json_out(result)
        return 0
    grant, counter = result.grant, result.counter
    _out(f"{args.user_id}: granted {grant.granted} {args.group_key} as {grant.grant_id} "
         f"(priority {grant.priority}, expires {_time(grant.expires_at)}); balance "
         f"{counter.remaining} available of {counter.quota}, {counter.held} held")
    return 0


def cmd_grants(client: QuotaClient, args: argparse.Namespace) -> int:
    grants = client.list_grants(args.user_id, group_key=args.group)
    if args.json:
        for grant in grants:
            _json_out(grant)
        return 0
    if not grants:
        _out("no grants")
        return 0
    _table(("GRANT", "GROUP", "GRANTED", "REMAINING", "PRIORITY", "EXPIRES AT", "GRANTED AT",
            "STATE"),
           [(g.grant_id, g.group_key, str(g.granted), str(g.remaining), str(g.priority),
             _time(g.expires_at), _time(g.granted_at),
             ("expired" if g.expired else "live") + (", recurring" if g.recurring else ""))
            for g in grants])
    return 0


def _expires_at(text: str) -> datetime:
    """An ISO 8601 time (UTC unless it says), or a duration from now: "30d", "12h"."""
    found = _SINCE.match(text.strip())
    if found:
        return datetime.now(timezone.utc) + timedelta(
            **{_SINCE_UNITS[found.group(2)]: int(found.group(1))})
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a duration from now (90s, 15m, 12h, 30d, 1w) or an ISO "
            "8601 time such as 2026-12-31T00:00:00Z") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


_SINCE = re.compile(r"^(\d+)([smhdw])$")
_SINCE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def since_time(text: str, now: datetime | None = None) -> datetime:
    """"90s", "15m", "1h", "2d", "1w" ago, or an ISO 8601 time (UTC unless it says)."""
    found = _SINCE.match(text.strip())
    if found:
        ago = timedelta(**{_SINCE_UNITS[found.group(2)]: int(found.group(1))})
        return (now or datetime.now(timezone.utc)) - ago
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a duration such as 90s, 15m, 1h, 2d, 1w, or an ISO time "
            "such as 2025-06-01T12:00:00Z") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def _event_line(event: Event) -> str:
    parts = [_time(event.time).replace("Z", f".{event.time.microsecond // 1000:03d}Z"),
             event.kind, event.event_type or "-", f"amount={event.amount}"]
    if event.kind in ("reserve", "track"):
        parts.append("allowed" if event.allowed else "denied")
    if event.reservation_id:
        parts.append(f"reservation={event.reservation_id}")
    if event.kind == "threshold":
        parts.append(f"{event.limit_group_key} reached {event.threshold_percent}% "
                     f"(window from {_time(event.window_start)})")
    parts.extend(f"{key}={value}" for key, value in sorted(event.metadata.items()))
    return "  ".join(parts)


def _events_after(client: QuotaClient, user_id: str, start: datetime | None,
                  after_sequence: int) -> Iterator[Event]:
    for event in client.iter_events(user_id, start=start, page_size=limits.EVENTS_PAGE_SIZE_MAX):
        if event.sequence > after_sequence:
            yield event


def cmd_events(client: QuotaClient, args: argparse.Namespace) -> int:
    """With --follow, Ctrl-C (SIGINT) and SIGTERM end the loop between two polls: a signal
    only sets a flag, so it never interrupts a call in the middle (a KeyboardInterrupt inside
    gRPC's blocking call could leave its channel unable to close, and the process unable to
    exit)."""
    last_sequence, start = 0, args.since
    show = _json_out if args.json else (lambda event: _out(_event_line(event)))
    stop = threading.Event()
    if args.follow:
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signal_number, lambda *_: stop.set())
    for event in _events_after(client, args.user_id, start, last_sequence):
        show(event)
        last_sequence, start = event.sequence, event.time
    if not args.follow:
        return 0
    # Event times only grow (the server's clock is strictly increasing), so each poll asks
    # from the last time seen and skips what it already printed.
    while not stop.wait(args.interval_s):
        for event in _events_after(client, args.user_id, start, last_sequence):
            show(event)
            last_sequence, start = event.sequence, event.time
    return 0


# --- export ------------------------------------------------------------------------------------

NEXT_CURSOR_PREFIX = "quotactl: next cursor: "
"""The last line `quotactl export` writes on stderr, followed by the cursor to resume from."""


def _export_writer(args: argparse.Namespace) -> Callable[[Any], str]:
    if args.format == "stripe-meter-events":
        return lambda line: billing.json_line(billing.stripe_meter_event(line, args.event_name))
    if args.format == "cloudevents":
        return lambda line: billing.json_line(billing.cloudevent(line, args.source))
    return lambda line: billing.csv_text(billing.csv_row(line)).rstrip("\n")


def cmd_export(client: QuotaClient, args: argparse.Namespace) -> int:
    """Writes every line, then the next cursor on stderr; the cursor of the last message
    received is written even when the stream fails, so nothing is exported twice."""
    write = _export_writer(args)
    if args.format == "csv":
        _out(billing.csv_text(billing.CSV_COLUMNS).rstrip("\n"))
    cursor, uncustomered = args.since, 0
    try:
        for page in client.export_usage(cursor=args.since, end=args.until, app=args.app,
                                        timeout_s=None):
            for line in page.lines:
                _out(write(line))
                uncustomered += not line.billing_customer_id
            cursor = page.next_cursor
    finally:
        if uncustomered and args.format == "stripe-meter-events":
            print(f"quotactl: {uncustomered} lines have no billing customer id (quotactl "
                  "subscribe --billing-customer-id)", file=sys.stderr)
        print(f"{NEXT_CURSOR_PREFIX}{cursor}", file=sys.stderr, flush=True)
    return 0


# --- keys --------------------------------------------------------------------------------------

def _key_line(key: ApiKey) -> str:
    revoked = f"  revoked {_time(key.revoked_at)}" if key.revoked_at is not None else ""
    return (f"{key.key_id}  {key.kind}  app={key.app}  name={key.name or '-'}  "
            f"created {_time(key.created_at)}{revoked}")


def cmd_keys_create(client: QuotaClient, args: argparse.Namespace) -> int:
    created = client.create_key(args.kind, name=args.name, app=args.app)
    _out(_key_line(created.key))
    _out(created.secret)
    print("quotactl: the key above is shown only now; store it safely", file=sys.stderr)
    return 0


def cmd_keys_revoke(client: QuotaClient, args: argparse.Namespace) -> int:
    _out(_key_line(client.revoke_key(args.key_id)))
    return 0


def cmd_keys_list(client: QuotaClient, args: argparse.Namespace) -> int:
    keys = client.list_keys(app=args.app)
    if args.json:
        _out(json.dumps(_plain(keys), indent=2))
        return 0
    for key in keys:
        _out(_key_line(key))
    if not keys:
        _out("no keys")
    return 0


# --- the command line --------------------------------------------------------------------------

def _interval_s(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not FOLLOW_INTERVAL_S_MIN <= value <= FOLLOW_INTERVAL_S_MAX:
        raise argparse.ArgumentTypeError(
            f"{text!r}: must be {FOLLOW_INTERVAL_S_MIN} to {FOLLOW_INTERVAL_S_MAX} seconds")
    return value


def _timeout_s(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 300:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 and at most 300 seconds")
    return value


def cmd_cluster_move_slots(client: QuotaClient, args: argparse.Namespace) -> int:
    if not args.target.startswith(ETCD_SCHEME):
        raise UsageError("cluster move-slots needs the cluster in etcd: --cluster "
                         "etcd://HOST:PORT/NAME")
    slots = parse_slots(args.slots)  # a ShardMapError (ValueError) names what is wrong
    api_key = os.environ.get(API_KEY_ENV) or None
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    credentials = None
    if args.tls_root_cert is not None or args.tls:
        root_cert = args.tls_root_cert.read_bytes() if args.tls_root_cert is not None else None
        credentials = grpc.ssl_channel_credentials(root_cert)
    if args.abort:
        abort_move(EtcdTarget.parse(args.target), args.from_id, args.to_id, slots,
                   metadata=metadata, timeout_s=args.timeout_s, credentials=credentials,
                   progress=lambda line: print(line, flush=True))
        print(f"gave up moving {len(slots)} slots from shard {args.from_id} to shard "
              f"{args.to_id}: shard {args.from_id} serves them")
        return 0
    report = move_slots(EtcdTarget.parse(args.target), args.from_id, args.to_id, slots,
                        metadata=metadata, timeout_s=args.timeout_s, credentials=credentials,
                        progress=lambda line: print(line, flush=True))
    print(f"moved {len(slots)} slots from shard {args.from_id} to shard {args.to_id}: "
          f"{report.users} users, {report.holds} holds, {report.keys} idempotency keys")
    return 0


def _add(commands: Any, name: str, run: Callable[..., int], summary: str, description: str,
         example: str) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=summary, description=textwrap.fill(description, 79),
                                  epilog=f"example:\n  {example}",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    command.set_defaults(run=run)
    return command


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="quotactl",
        description=textwrap.fill(
            "Administer a quotad server: plans, subscriptions, usage, the audit trail and API "
            f"keys. The API key, if the server needs one, is read only from ${API_KEY_ENV}.",
            79),
        epilog="exit status: 0 done, 1 the server refused (its code and message on stderr),\n"
               "2 bad usage or quotad unreachable.\n\nexample:\n"
               "  QUOTAD_API_KEY=sk_... quotactl --target quotad.internal:50051 usage u1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    root.add_argument("--target", default=os.environ.get(TARGET_ENV) or TARGET_DEFAULT,
                      metavar="HOST:PORT",
                      help=f"the quotad server (default: ${TARGET_ENV}, else {TARGET_DEFAULT})")
    root.add_argument("--cluster", action="store_true",
                      help="--target is any shard of a cluster, or `--cluster "
                           "etcd://HOST:PORT/NAME` (the same as --target etcd://...) a cluster "
                           "whose map is read from etcd: send a command about a user "
                           "(subscribe, usage, events) to the shard that owns the user; "
                           "subscriptions and export ask every shard and merge their "
                           "answers; plans and keys go to one shard (--target's, or the first "
                           "of etcd's map)")
    root.add_argument("--timeout-s", type=_timeout_s, default=TIMEOUT_S_DEFAULT,
                      metavar="SECONDS",
                      help="time budget of each call, retries included (default: %(default)s)")
    root.add_argument("--tls-root-cert", type=Path, metavar="CA.pem",
                      default=Path(os.environ[TLS_ROOT_CERT_ENV])
                      if os.environ.get(TLS_ROOT_CERT_ENV) else None,
                      help="connect over TLS, trusting this PEM certificate (the server's own, "
                           f"or its CA) (default: ${TLS_ROOT_CERT_ENV}, else plaintext)")
    root.add_argument("--tls", action="store_true",
                      help="connect over TLS, trusting the system's certificate authorities")
    groups = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plans = groups.add_parser("plans", help="apply, list, show and delete plans",
                              description="Apply plans from a TOML file, list, show or delete them.")
    plan_commands = plans.add_subparsers(dest="plans_command", required=True, metavar="COMMAND")
    apply = _add(plan_commands, "apply", cmd_plans_apply, "put the plans of a TOML file in place",
                 "Compare each plan of FILE.toml (the format of examples/plans.toml) with the "
                 "server's and print the difference per limit group (+ added, ~ changed, "
                 "= unchanged, - removed), then apply the plans that differ. Running it again "
                 "prints 'unchanged' and changes nothing. Plans on the server but not in the "
                 "file are listed and left as they are.",
                 "quotactl plans apply examples/plans.toml --dry-run")
    apply.add_argument("file", type=Path, metavar="FILE.toml")
    apply.add_argument("--dry-run", action="store_true",
                       help="print the difference, apply nothing")
    plans_list = _add(plan_commands, "list", cmd_plans_list, "list the plans",
                      "List every plan: id, name and the keys of its limit groups.",
                      "quotactl plans list --json")
    plans_list.add_argument("--json", action="store_true",
                            help="print a JSON array of plans, each in the shape of a "
                                 "plans.toml entry")
    show = _add(plan_commands, "show", cmd_plans_show, "show one plan",
                "Show one plan's limit groups: quota, unit, window and what each counts.",
                "quotactl plans show pro --json")
    show.add_argument("plan_id", metavar="ID")
    show.add_argument("--json", action="store_true",
                      help="print JSON in the shape of a plans.toml entry")
    delete = _add(plan_commands, "delete", cmd_plans_delete, "delete a plan",
                  "Delete a plan. A plan that a subscription still names is refused "
                  "(FAILED_PRECONDITION PLAN_IN_USE): move its subscribers first.",
                  "quotactl plans delete old-pro")
    delete.add_argument("plan_id", metavar="ID")

    subscribe = _add(groups, "subscribe", cmd_subscribe, "put a user on a plan",
                     "Subscribe USER to PLAN (replacing their plan, if any). Calendar windows "
                     "(day, week, month) start at midnight in the user's time zone.",
                     "quotactl subscribe u1 pro --time-zone Europe/Paris")
    subscribe.add_argument("user_id", metavar="USER")
    subscribe.add_argument("plan_id", metavar="PLAN")
    subscribe.add_argument("--time-zone", default="UTC", metavar="TZ",
                           help="IANA time zone name (default: %(default)s)")
    subscribe.add_argument("--billing-customer-id", metavar="ID",
                           help="who pays in the billing system (a Stripe customer id), "
                                "carried into exports; '' clears it (default: keep the "
                                "subscription's own)")

    subscriptions = _add(groups, "subscriptions", cmd_subscriptions, "list subscriptions",
                         "List the app's subscriptions in user id order, or one plan's: "
                         "user, plan, time zone and billing customer.",
                         "quotactl subscriptions --plan pro --json")
    subscriptions.add_argument("--plan", default="", metavar="PLAN",
                               help="only this plan's subscribers (default: every plan's)")
    subscriptions.add_argument("--json", action="store_true",
                               help="one JSON object per subscription, one per line")

    usage = _add(groups, "usage", cmd_usage, "show a user's counters",
                 "Show USER's counters, one row per limit group of their plan: used, held by "
                 "live reservations, quota, remaining, and when the window resets (UTC).",
                 "quotactl usage u1")
    usage.add_argument("user_id", metavar="USER")
    usage.add_argument("--json", action="store_true",
                       help="print the counters as one JSON object")

    grant = _add(groups, "grant", cmd_grant, "grant credits to a user's balance",
                 "Grant AMOUNT credits to USER's balance group GROUP (a limit group of kind "
                 "balance): a new grant, spent by priority (lowest first), then earliest "
                 "expiry, then oldest. Give --idempotency-key (an order id) so that running "
                 "it again grants nothing more.",
                 "quotactl grant u1 credits 5000 --expires-at 30d --idempotency-key order-42")
    grant.add_argument("user_id", metavar="USER")
    grant.add_argument("group_key", metavar="GROUP")
    grant.add_argument("amount", type=int, metavar="AMOUNT")
    grant.add_argument("--expires-at", type=_expires_at, metavar="30d|ISO-TIME",
                       help="when the grant expires: a duration from now or a time "
                            "(default: never)")
    grant.add_argument("--priority", type=int, default=0, metavar="N",
                       help="spent lowest first, 0 to 1000 (default: %(default)s)")
    grant.add_argument("--idempotency-key", metavar="KEY",
                       help="a repeat with the same key grants nothing more")
    grant.add_argument("--json", action="store_true",
                       help="print the grant and the balance's counter as one JSON object")
    grants = _add(groups, "grants", cmd_grants, "list a user's credit grants",
                  "List USER's credit grants: live ones in spend order, then expired ones "
                  "kept for refunds, with what each granted and has left.",
                  "quotactl grants u1 --group credits")
    grants.add_argument("user_id", metavar="USER")
    grants.add_argument("--group", default="", metavar="GROUP",
                        help="only this balance group's (default: every balance group's)")
    grants.add_argument("--json", action="store_true",
                        help="one JSON object per grant, one per line")

    events = _add(groups, "events", cmd_events, "print a user's audit trail",
                  "Print USER's events (reserve, commit, release, expire, extend, track, "
                  "threshold: a limit group reaching 80 % or 100 % of its quota), "
                  "oldest first, one per line. With -f, keep polling for new ones until "
                  "Ctrl-C or SIGTERM.",
                  "quotactl events u1 --since 1h -f")
    events.add_argument("user_id", metavar="USER")
    events.add_argument("--since", type=since_time, metavar="1h|ISO-TIME",
                        help="only events from then on: a duration ago (90s, 15m, 1h, 2d, 1w) "
                             "or a time such as 2025-06-01T12:00:00Z (default: all)")
    events.add_argument("-f", "--follow", action="store_true",
                        help="keep printing new events as they come")
    events.add_argument("--json", action="store_true",
                        help="one JSON object per event, one per line")
    events.add_argument("--interval-s", type=_interval_s, default=FOLLOW_INTERVAL_S_DEFAULT,
                        metavar="SECONDS",
                        help=f"with -f, how often to poll ({FOLLOW_INTERVAL_S_MIN} to "
                             f"{FOLLOW_INTERVAL_S_MAX}; default: %(default)s)")

    keys = groups.add_parser("keys", help="create, revoke and list API keys",
                             description="Manage API keys: sk_ (secret) keys may do everything "
                                         "in their app; pk_ (public) keys may only read the "
                                         "usage of the user a signed user token names.")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    create = _add(key_commands, "create", cmd_keys_create, "create a key",
                  "Create a key and print its id, then the whole key on its own line: it is "
                  "shown only this once.",
                  "quotactl keys create --kind secret --name backend")
    create.add_argument("--kind", required=True, choices=["public", "secret"])
    create.add_argument("--app", default="", help="the app the key belongs to (default: the "
                                                  "caller's own; another needs the admin key)")
    create.add_argument("--name", default="", help="a name to tell keys apart")
    revoke = _add(key_commands, "revoke", cmd_keys_revoke, "revoke a key at once",
                  "Revoke a key: calls with it fail from now on.",
                  "quotactl keys revoke 3f9a1c")
    revoke.add_argument("key_id", metavar="KEY_ID")
    listing = _add(key_commands, "list", cmd_keys_list, "list keys",
                   "List the keys of an app (never their secrets).", "quotactl keys list")
    listing.add_argument("--app", default="", help="(default: the caller's own app)")
    listing.add_argument("--json", action="store_true", help="print a JSON array of keys")

    export = _add(groups, "export", cmd_export, "export committed and tracked usage for billing",
                  "Write one line per committed or tracked amount (a refund negative) recorded "
                  "after CURSOR, oldest first: Stripe meter events or CloudEvents 1.0 as JSON "
                  "Lines, or CSV with a header. Each line has a stable id, so exporting a range "
                  "twice never bills twice. The last line on stderr is "
                  f"'{NEXT_CURSOR_PREFIX}N': pass N as --since next time to continue exactly "
                  "where this export ended. The server keeps its log for its audit retention: "
                  "an older cursor is refused (EXPORT_CURSOR_PRUNED). With --cluster, every "
                  "shard's usage, shard after shard; ids are SHARD_ID:..., and the cursor "
                  "(shards:0=N0,1=N1,...) holds each shard's.",
                  "quotactl export --since 1042 --format stripe-meter-events > usage.jsonl")
    export.add_argument("--since", default="", metavar="CURSOR",
                        help="the cursor a previous export printed (default: from the oldest "
                             "record the server keeps)")
    export.add_argument("--until", type=since_time, metavar="ISO-TIME|1h",
                        help="only usage recorded before this time (a time, or a duration "
                             "ago); the cursor then resumes from there (default: all)")
    export.add_argument("--format", required=True, choices=billing.FORMATS)
    export.add_argument("--app", default="",
                        help="the app to export (default: the caller's own; another needs "
                             "the admin key)")
    export.add_argument("--event-name", default=None, metavar="NAME",
                        help="stripe-meter-events: the meter's event_name for every line "
                             "(default: each line's event type)")
    export.add_argument("--source", default=billing.CLOUDEVENT_SOURCE_DEFAULT, metavar="URI",
                        help="cloudevents: the events' source (default: %(default)s)")

    cluster = groups.add_parser("cluster", help="change a cluster's shard map",
                                description="Commands on a cluster in etcd (--cluster "
                                            "etcd://HOST:PORT/NAME).")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True,
                                              metavar="COMMAND")
    move = _add(cluster_commands, "move-slots", cmd_cluster_move_slots,
                "move slots, with their users' state, to another shard",
                "Move the slots RANGE from shard FROM to shard TO, under load, with every "
                "user's state of those slots: counters, live holds (with their absolute "
                "expiry), finished holds, idempotency entries. The steps: (1) read the shard "
                "map and its etcd revision, and check that FROM owns every slot; (2) freeze "
                "the slots on FROM: from then on it refuses their users' calls UNAVAILABLE "
                "SLOTS_MOVING, having done nothing (clients send them again after 50 ms); "
                "(3) export their users' state from FROM in chunks, each taken into TO's log "
                "(AdoptSlots); (4) flip the map in one etcd transaction that fails, flipping "
                "nothing, if the map changed since (1); (5) once FROM and TO follow the new "
                "map, FROM forgets those users. Each step is printed. Every step may be run "
                "again: after a crash, run the same command again (a move whose flip was "
                "done goes on with (5)). A move refused before (2) changed nothing. --abort gives "
                "up a move before its flip: FROM takes the slots' calls again and TO forgets "
                "what it adopted.",
                "quotactl --cluster etcd://127.0.0.1:2379/prod cluster move-slots --from 0 "
                "--to 2 --slots 0-99,105")
    move.add_argument("--from", dest="from_id", type=int, required=True, metavar="A",
                      help="the shard id the slots leave")
    move.add_argument("--to", dest="to_id", type=int, required=True, metavar="B",
                      help="the shard id the slots go to")
    move.add_argument("--slots", required=True, metavar="RANGE",
                      help="comma-separated FIRST-LAST ranges or single slots, 0 to "
                           f"{limits.SLOTS - 1} (0-99,105,200-299)")
    move.add_argument("--abort", action="store_true",
                      help="give up a move of these slots that was not flipped (refused once "
                           "it was: run the move again to finish it)")
    return root


def _refusal(error: QuotadError) -> str:
    text = f"{error.code.name}: {error.message}" if error.message else error.code.name
    if isinstance(error, InvalidArgument) and error.field_violations:
        fields = "; ".join(f"{field}: {why}" for field, why in error.field_violations)
        if fields not in text:
            text += f" ({fields})"
    return text.replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(cluster_target_as_flags(
        sys.argv[1:] if argv is None else list(argv)))
    try:
        with connect(args.target, args.timeout_s, args.tls_root_cert, args.tls,
                     args.cluster) as client:
            return int(args.run(client, args))
    except (Unavailable, DeadlineExceeded) as error:
        tls_hint = (f"; no server there, or one that requires TLS: --tls-root-cert CA.pem "
                    f"(or ${TLS_ROOT_CERT_ENV}), or --tls to trust the system's roots"
                    if getattr(error, "may_need_tls", False) else "")
        print(f"quotactl: cannot reach quotad at {args.target}: {_refusal(error)}{tls_hint}",
              file=sys.stderr)
        return EXIT_USAGE
    except QuotadError as error:
        print(f"quotactl: {_refusal(error)}", file=sys.stderr)
        return EXIT_REFUSED
    except (UsageError, ValueError, TypeError) as error:
        print(f"quotactl: {error}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.RpcError as error:  # anything the client did not map
        print(f"quotactl: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `quotactl events u1 | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
