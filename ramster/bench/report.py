# Output of benchmarks: a JSON object for machines, an aligned table for people, and progress on
# stderr (only when it is a terminal, so logs and pipes stay clean).
from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from typing import Any


def emit(result: Mapping[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=False))
        return
    width = max(len(k) for k in result)
    for key, value in result.items():
        if isinstance(value, float):
            text = f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
        elif isinstance(value, Mapping):
            text = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        else:
            text = str(value)
        print(f"{key.ljust(width)}  {text}")


class Progress:
    """Rate-limited 'label done/total' line on stderr when stderr is a terminal."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = total
        self.enabled = sys.stderr.isatty()
        self._last = 0.0

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= 0.5 or done == self.total:
            self._last = now
            end = "\n" if done == self.total else ""
            print(f"\r{self.label} {done:,}/{self.total:,}", end=end, file=sys.stderr, flush=True)


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (this one by default); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return 0
