# Structured logs: every record is an event name plus fields.  On a terminal they read as
# `HH:MM:SS level event key=value ...`; anywhere else (containers, files, pipes) as one JSON object
# per line, e.g. {"ts": ..., "level": "info", "event": "listening", "port": 7070}, which is what
# tests and log shippers parse.  Call sites use log_event(), never string formatting.
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LOGGER = logging.getLogger("ramster.node")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        pairs = " ".join(f"{k}={v}" for k, v in getattr(record, "fields", {}).items())
        line = f"{stamp} {record.levelname.lower():7} {record.getMessage()} {pairs}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(level: str) -> None:
    """Log the node's events and the ramster layer's ("ramster.remote") the same way."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if sys.stderr.isatty() else JsonFormatter())
    parent = logging.getLogger("ramster")
    parent.handlers[:] = [handler]
    parent.setLevel(level.upper())
    parent.propagate = False


def log_event(
    event: str, level: int = logging.INFO, exc_info: BaseException | None = None, **fields: Any
) -> None:
    LOGGER.log(level, event, exc_info=exc_info, extra={"fields": fields})
