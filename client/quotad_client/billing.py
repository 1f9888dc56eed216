"""Usage lines (ExportUsage) in the shapes billing systems take, one JSON object or CSV row
per line. Pure functions of a line: the same line always gives the same output, so an
export run twice deduplicates on its identifiers.

- Stripe meter events (`POST /v1/billing/meter_events`): `event_name`, `payload.value` (a
  decimal string; negative for a refund, since Stripe's adjustments can only cancel a whole
  event), `payload.stripe_customer_id`, `identifier` (Stripe deduplicates on it), and
  `timestamp` (Unix seconds).
- CloudEvents 1.0, JSON format: `specversion`, `id`, `source`, `type`
  (`dev.quotad.usage.commit` or `dev.quotad.usage.track`), `time`, `subject` (the user id),
  `datacontenttype`, `data` (the line's fields).
- CSV: a header row (`CSV_COLUMNS`), then one row per line; metadata as a JSON object.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import timezone
from typing import Any

from ._types import UsageLine

FORMATS = ("stripe-meter-events", "cloudevents", "csv")
IDENTIFIER_PREFIX = "quotad-"
"""A Stripe identifier is the line's id after this, so it names where it came from."""
CLOUDEVENT_TYPE_PREFIX = "dev.quotad.usage."
CLOUDEVENT_SOURCE_DEFAULT = "quotad"
CSV_COLUMNS = ("id", "time", "kind", "user_id", "billing_customer_id", "event_type", "amount",
               "reservation_id", "metadata")


def _time_text(line: UsageLine) -> str:
    """RFC 3339 in UTC, to the nanosecond the server gave (as microseconds: datetime's)."""
    return line.time.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def stripe_meter_event(line: UsageLine, event_name: str | None = None) -> dict[str, Any]:
    """A Stripe meter event; event_name None: the line's event type."""
    return {
        "event_name": event_name or line.event_type,
        "payload": {"value": str(line.amount),
                    "stripe_customer_id": line.billing_customer_id},
        "identifier": IDENTIFIER_PREFIX + line.id,
        "timestamp": int(line.time.timestamp()),
    }


def cloudevent(line: UsageLine, source: str = CLOUDEVENT_SOURCE_DEFAULT) -> dict[str, Any]:
    """A CloudEvents 1.0 event in its JSON format."""
    return {
        "specversion": "1.0",
        "id": line.id,
        "source": source,
        "type": CLOUDEVENT_TYPE_PREFIX + line.kind,
        "time": _time_text(line),
        "subject": line.user_id,
        "datacontenttype": "application/json",
        "data": {
            "kind": line.kind, "user_id": line.user_id,
            "billing_customer_id": line.billing_customer_id, "event_type": line.event_type,
            "amount": line.amount, "metadata": dict(line.metadata),
            "reservation_id": line.reservation_id, "sequence": line.sequence,
            "index": line.index,
        },
    }


def csv_row(line: UsageLine) -> list[str]:
    return [line.id, _time_text(line), line.kind, line.user_id, line.billing_customer_id,
            line.event_type, str(line.amount), line.reservation_id,
            json.dumps(dict(line.metadata), sort_keys=True, ensure_ascii=False)]


def csv_text(row: list[str] | tuple[str, ...]) -> str:
    """One CSV record (RFC 4180 quoting), with its line ending."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(row)
    return buffer.getvalue()


def json_line(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
