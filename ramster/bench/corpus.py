# Page corpora: raw 4096-byte pages back to back, no header (see shared/corpus/README.md).
from __future__ import annotations

from pathlib import Path

from ramster.zcache import PAGE_SIZE


class CorpusError(ValueError):
    """A corpus file is missing, empty or not a whole number of pages."""


def load_corpus(path: str | Path) -> list[bytes]:
    """Every page of a corpus file, as bytes objects."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read corpus {path}: {exc.strerror or exc}") from None
    if not data or len(data) % PAGE_SIZE:
        raise CorpusError(
            f"corpus {path} holds {len(data)} bytes; expected a non-zero multiple of {PAGE_SIZE}"
        )
    view = memoryview(data)
    return [bytes(view[i : i + PAGE_SIZE]) for i in range(0, len(data), PAGE_SIZE)]
