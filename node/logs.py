# Structured logs: every record is an event name plus fields.  On a terminal they read as
# `HH:MM:SS level event key=value ...`; anywhere else (containers, files, pipes) as one JSON object
# per line, e.g. {"ts": ..., "level": "info", "event": "listening", "port": 7070}, which is what
# tests and log shippers parse.  Call sites use log_event(), never string formatting.  An event a
# client can cause at will goes through a LogThrottle: a line a second at most, counting the rest.
from __future__ import annotations

import json
import logging
import math
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


class LogThrottle:
    """One event's lines at most once every `seconds`: for an event a client can cause at will
    (reading a block lost in a crash, writing on a full disk), which must not flood the log.
    What it held back is counted, for the next line to say."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.last = -math.inf  # when a line went out (time.monotonic())
        self.held = 0

    def log(self, event: str, level: int, count: int = 1, **fields: Any) -> None:
        """log_event() of `event` for `count` more occurrences, if a line may go out now (with
        `unlogged`: those held back since the last one); else they are held back."""
        now = time.monotonic()
        if now - self.last < self.seconds:
            self.held += count
            return
        unlogged, self.held, self.last = self.held, 0, now
        log_event(event, level, **fields, unlogged=unlogged)
