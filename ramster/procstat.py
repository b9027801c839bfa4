# CPU time from Linux's /proc/<pid>/stat and /proc/<pid>/task/<tid>/stat, shared by the node's
# per-thread metrics (node/threadcpu.py) and the benchmarks that time a server process
# (ramster/bench/nbd.py).  Fields 14 and 15 of the file (utime, stime) count clock ticks; the
# second field is the command name in parentheses, which may itself hold spaces and ')', so the
# fields are counted from the last ')'.
from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")  # the unit of utime and stime


def cpu_seconds(stat: Path) -> float | None:
    """utime + stime of one stat file, in seconds; None if it cannot be read (the process or
    thread has ended) or does not parse."""
    try:
        text = stat.read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # from field 3 (the state) on
    try:
        return (int(fields[11]) + int(fields[12])) / TICKS
    except (IndexError, ValueError):
        return None
