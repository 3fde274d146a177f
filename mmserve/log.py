"""Logging for every mmserve process: one format, the request id on every line.

The request id (the gateway's X-Request-Id, carried as gRPC metadata) lives
in a context variable that asyncio copies into every task a request spawns,
so any log line written while serving a request carries it without the code
having to pass it around.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("mmserve_request_id", default="-")
#: Fields a handler adds to its request's one summary log line (token counts, timings, ...).
request_fields_var: contextvars.ContextVar[dict[str, object] | None] = contextvars.ContextVar("mmserve_request_fields", default=None)


def note(**fields: object) -> None:
    """Add fields to the current request's summary log line."""
    current = request_fields_var.get()
    if current is not None:
        current.update(fields)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class _JsonFormatter(logging.Formatter):
    """One JSON object per line; structured `extra={"fields": {...}}` is merged in."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def setup_logging(service: str, *, level: str = "INFO", json_logs: bool = False) -> None:
    """Configure the root logger for one service process (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if json_logs:
        handler.setFormatter(_JsonFormatter())
    else:
        fmt = f"%(asctime)s %(levelname)s {service} [%(request_id)s] %(name)s: %(message)s"
        handler.setFormatter(_TextFormatter(fmt))
        handler.formatter.converter = time.gmtime  # type: ignore[union-attr]
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_mmserve", False):
            root.removeHandler(old)
    handler._mmserve = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
