"""ExportUsage and `quotactl export`: every format parses to its documented shape, an export's
totals are the usage the server reports (across a restart and a resumed cursor), the same
range exported twice gives the same ids, and a cursor older than the log is refused."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from quotad.engine.recovery import recover
from quotad.storage.snapshot import snapshot_of
from quotad.storage.wal import Retention, Snapshot, WriteAheadLog
from quotad_client import billing, ctl
from quotad_contract.v1 import quotad_pb2 as pb
from test_ctl import quotactl
from test_server_e2e import admin, plan_with, quota, usage

STRIPE_KEYS = {"event_name", "payload", "identifier", "timestamp"}
CLOUDEVENT_REQUIRED = {"specversion", "id", "source", "type", "time", "subject", "data"}


def subscribe(address: str, user_id: str, customer: str | None = None) -> None:
    stub = admin(address)
    stub.UpsertPlan(pb.UpsertPlanRequest(plan=plan_with(10**9)))
    request = pb.UpsertSubscriptionRequest(user_id=user_id, plan_id="p")
    if customer is not None:
        request.billing_customer_id = customer
    stub.UpsertSubscription(request)


def spend(address: str, user_id: str, *, commit: int, track: int, refund: int) -> None:
    """A committed hold (reserved more), a released hold and a denied track (neither
    exported), a track and a refund."""
    stub = quota(address)
    held = stub.Reserve(pb.ReserveRequest(user_id=user_id, event_type="openai.chat",
                                          amount=commit + 5, metadata={"model": "gpt-4o"}))
    stub.Commit(pb.CommitRequest(reservation_id=held.reservation_id, amount=commit))
    dropped = stub.Reserve(pb.ReserveRequest(user_id=user_id, event_type="openai.chat",
                                             amount=7))
    stub.Release(pb.ReleaseRequest(reservation_id=dropped.reservation_id))
    denied = stub.Track(pb.TrackRequest(user_id=user_id, event_type="image", amount=10**10,
                                        enforce=True))
    assert not denied.allowed
    stub.Track(pb.TrackRequest(user_id=user_id, event_type="image", amount=track))
    stub.Track(pb.TrackRequest(user_id=user_id, event_type="image", amount=-refund))


def export(address: str, cursor: str = "") -> tuple[list[pb.UsageLine], str]:
    lines, next_cursor = [], None
    for message in admin(address).ExportUsage(pb.ExportUsageRequest(cursor=cursor), timeout=30):
        lines.extend(message.lines)
        next_cursor = message.next_cursor
    assert next_cursor is not None, "every export ends with a message carrying its cursor"
    return lines, next_cursor


def used(address: str, user_id: str) -> int:
    (counter,) = usage(address, user_id).counters
    return counter.used


def ctl_export(address: str, fmt: str, *args: str) -> tuple[str, str]:
    """stdout, and the cursor from the last line of stderr."""
    result = quotactl(address, "export", "--format", fmt, *args)
    assert result.returncode == 0, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(ctl.NEXT_CURSOR_PREFIX), result.stderr
    return result.stdout, last.removeprefix(ctl.NEXT_CURSOR_PREFIX)


def test_each_format_parses_to_its_documented_shape(start_server):
    address = start_server(plans=None).address
    subscribe(address, "ann", customer="cus_ann")
    subscribe(address, "bob")
    spend(address, "ann", commit=30, track=4, refund=3)
    spend(address, "bob", commit=8, track=2, refund=1)
    lines, cursor = export(address)
    assert len(lines) == 6

    stripe, stripe_cursor = ctl_export(address, "stripe-meter-events")
    events = [json.loads(text) for text in stripe.splitlines()]
    assert len(events) == 6 and stripe_cursor == cursor
    for event, line in zip(events, lines):
        assert set(event) == STRIPE_KEYS and set(event["payload"]) == {
            "value", "stripe_customer_id"}
        assert event["event_name"] == line.event_type
        assert event["payload"]["value"] == str(line.amount)
        assert event["payload"]["stripe_customer_id"] == line.billing_customer_id
        assert event["identifier"] == f"quotad-{line.sequence}-{line.index}"
        assert event["timestamp"] == line.time.seconds
    assert [e["payload"]["stripe_customer_id"] for e in events[:3]] == ["cus_ann"] * 3
    assert [int(e["payload"]["value"]) for e in events[:3]] == [30, 4, -3]
    named, _ = ctl_export(address, "stripe-meter-events", "--event-name", "tokens")
    assert {json.loads(text)["event_name"] for text in named.splitlines()} == {"tokens"}

    cloud, _ = ctl_export(address, "cloudevents", "--source", "/quotad/prod")
    events = [json.loads(text) for text in cloud.splitlines()]
    assert len(events) == 6
    for event, line in zip(events, lines):
        assert CLOUDEVENT_REQUIRED <= set(event) and event["specversion"] == "1.0"
        assert event["id"] == line.id and event["source"] == "/quotad/prod"
        assert event["type"] == ("dev.quotad.usage.commit"
                                 if line.kind == pb.EVENT_KIND_COMMIT
                                 else "dev.quotad.usage.track")
        # to the microsecond, as datetime keeps it: the server's nanoseconds cut, not rounded
        assert datetime.fromisoformat(event["time"]) == line.time.ToDatetime(
            tzinfo=timezone.utc)
        assert event["subject"] == line.user_id
        assert event["data"]["amount"] == line.amount
        assert event["data"]["metadata"] == dict(line.metadata)
    assert len({event["id"] for event in events}) == 6

    table, _ = ctl_export(address, "csv")
    rows = list(csv.reader(io.StringIO(table)))
    assert tuple(rows[0]) == billing.CSV_COLUMNS
    assert [(row[0], row[3], int(row[6])) for row in rows[1:]] == [
        (line.id, line.user_id, line.amount) for line in lines]
    assert json.loads(rows[1][8]) == {"model": "gpt-4o"}


def test_totals_equal_reported_usage_across_a_restart_and_a_resumed_cursor(start_server,
                                                                          tmp_path: Path):
    data_dir = tmp_path / "data"
    server = start_server(data_dir, plans=None)
    for user in ("ann", "bob"):
        subscribe(server.address, user, customer=f"cus_{user}")
    spend(server.address, "ann", commit=30, track=4, refund=3)
    spend(server.address, "bob", commit=8, track=2, refund=1)
    first, cursor = export(server.address)
    again, again_cursor = export(server.address)
    assert [line.id for line in again] == [line.id for line in first] and again_cursor == cursor
    assert export(server.address, cursor) == ([], cursor)  # nothing new: nothing to bill

    server.stop()
    server = start_server(data_dir, plans=None)
    spend(server.address, "ann", commit=11, track=6, refund=2)
    spend(server.address, "bob", commit=5, track=3, refund=0 + 1)
    second, final_cursor = export(server.address, cursor)
    assert second and int(final_cursor) > int(cursor)
    assert {line.id for line in first}.isdisjoint(line.id for line in second)

    whole, whole_cursor = export(server.address)  # one export of the range gives the same
    assert [line.id for line in whole] == [line.id for line in first + second]
    assert whole_cursor == final_cursor
    for user in ("ann", "bob"):
        exported = sum(line.amount for line in first + second if line.user_id == user)
        assert exported == used(server.address, user)
        assert {line.billing_customer_id for line in whole if line.user_id == user} == {
            f"cus_{user}"}


def test_an_export_until_a_time_resumes_from_there_without_gaps(start_server):
    address = start_server(plans=None).address
    subscribe(address, "ann")
    spend(address, "ann", commit=10, track=3, refund=1)
    lines, _ = export(address)
    split = lines[1].time
    head = list(admin(address).ExportUsage(pb.ExportUsageRequest(end_time=split)))
    assert [line.id for m in head for line in m.lines] == [lines[0].id]
    rest, _ = export(address, head[-1].next_cursor)
    assert [line.id for line in rest] == [line.id for line in lines[1:]]


def _refusal(error: grpc.RpcError) -> tuple[grpc.StatusCode, str, list[str]]:
    status = rpc_status.from_call(error)
    reason, fields = "", []
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    return error.code(), reason, fields


def test_a_cursor_older_than_the_log_is_refused_and_an_empty_one_starts_at_the_oldest_kept(
        start_server, tmp_path: Path):
    data_dir = tmp_path / "data"
    server = start_server(data_dir, plans=None)
    subscribe(server.address, "ann", customer="cus_kept")
    spend(server.address, "ann", commit=10, track=3, refund=1)
    _, old_cursor = export(server.address)
    server.stop()
    wal = WriteAheadLog(data_dir)  # what the retention does to records past it
    try:
        core = recover(wal, repair=False)
        wal.append([], Snapshot(core.sequence, snapshot_of(core)))
        wal.prune(core.sequence, Retention(before_ns=2**63))
        assert wal.first_sequence() == 0
    finally:
        wal.close()
    server = start_server(data_dir, plans=None)
    spend(server.address, "ann", commit=2, track=1, refund=1)
    with pytest.raises(grpc.RpcError) as refused:
        export(server.address, str(int(old_cursor) - 1))
    assert _refusal(refused.value)[:2] == (grpc.StatusCode.FAILED_PRECONDITION,
                                           "EXPORT_CURSOR_PRUNED")
    assert "audit retention" in refused.value.details()
    assert "--audit-retention-gib" in refused.value.details()
    lines, _ = export(server.address, old_cursor)  # nothing it covers was pruned
    assert [line.amount for line in lines] == [2, 1, -1]
    assert {line.billing_customer_id for line in lines} == {"cus_kept"}  # from the snapshot
    assert [line.id for line in export(server.address)[0]] == [line.id for line in lines]
    result = quotactl(server.address, "export", "--format", "csv", "--since", "1")
    assert result.returncode == ctl.EXIT_REFUSED
    assert "EXPORT_CURSOR_PRUNED" in result.stderr or "FAILED_PRECONDITION" in result.stderr


@pytest.mark.parametrize("cursor", ["x", "-1", "1" * 21, "99999"])
def test_a_cursor_that_is_not_one_is_invalid_argument_naming_cursor(server, cursor):
    with pytest.raises(grpc.RpcError) as refused:
        export(server.address, cursor)
    assert _refusal(refused.value) == (grpc.StatusCode.INVALID_ARGUMENT, "", ["cursor"])


def test_billing_customer_id_is_kept_unless_set_and_survives_a_restart(start_server,
                                                                      tmp_path: Path):
    data_dir = tmp_path / "data"
    server = start_server(data_dir, plans=None)
    subscribe(server.address, "ann", customer="cus_1")
    subscribe(server.address, "ann")  # unset: kept
    stub = admin(server.address)
    got = stub.GetSubscription(pb.GetSubscriptionRequest(user_id="ann")).subscription
    assert got.billing_customer_id == "cus_1"
    subscribe(server.address, "bob", customer="cus_2")
    subscribe(server.address, "bob", customer="")  # empty: cleared
    server.stop()
    server = start_server(data_dir, plans=None)
    stub = admin(server.address)
    assert [(s.user_id, s.billing_customer_id) for s in stub.ListSubscriptions(
        pb.ListSubscriptionsRequest()).subscriptions] == [("ann", "cus_1"), ("bob", "")]
