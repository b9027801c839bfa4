# A node in the calling process, for the scripts that time its event loop from inside
# (loop_steps.py, get_stages.py): on 127.0.0.1, a port of the system's choosing, no metrics
# listener, a 2 GiB pool and a throwaway data directory.
from __future__ import annotations

import tempfile
from pathlib import Path

from node.server import Node
from node.settings import HostPort, Settings


async def started_node(name: str) -> Node:
    """A started node named `name` (its data directory is a new temporary one)."""
    node = Node(
        Settings(
            listen=HostPort("127.0.0.1", 0),
            metrics_listen=None,
            data_dir=Path(tempfile.mkdtemp(prefix=f"{name}-")),
            pool_limit=2 << 30,
            node_id=name,
        )
    )
    await node.start()
    return node
