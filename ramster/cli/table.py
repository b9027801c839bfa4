# Plain-text tables for node commands: columns padded to their widest cell, numbers right-aligned.
from __future__ import annotations

from collections.abc import Sequence


def is_number(cell: str) -> bool:
    return cell.replace(",", "").replace(".", "", 1).isdigit()


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(header), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    right = [all(is_number(row[i]) for row in cells[1:]) for i in range(len(header))]
    for row in cells:
        line = "  ".join(
            cell.rjust(w) if r else cell.ljust(w)
            for cell, w, r in zip(row, widths, right, strict=True)
        )
        print(line.rstrip())
