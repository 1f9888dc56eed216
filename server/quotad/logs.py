"""JSON log lines on stderr: one object per line, easy to grep and to ship."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")
"""The id of the call being handled (set by quotad.requests); empty outside a call."""


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id:
            line["request_id"] = request_id
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc's own debug lines (one per call) would drown the access log of --log-level debug.
    logging.getLogger("grpc").setLevel(max(root.level, logging.INFO))
