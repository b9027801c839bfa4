# One node subprocess for the client tests (the blocking Client cannot share a test's loop).
from __future__ import annotations

from collections.abc import Iterator

import pytest

from ramster.client.local import LocalNode


@pytest.fixture(scope="module")
def local_node() -> Iterator[LocalNode]:
    with LocalNode("--pool-limit", "256Mi") as node:
        yield node
