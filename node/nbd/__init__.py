# The node's NBD front end: block devices (NBD exports) served from the node's own engine, so a
# kernel (nbd-client), qemu or libnbd can use the cluster as remote swap or a disk.
#
# ramster.nbd speaks the protocol (sans-IO); here is the I/O and the engine work, in layers:
# server.py listens and counts, connection.py is one client (socket to machine to groups to
# replies), plan.py maps blocks to engine keys and cuts queued requests into groups that one
# engine call serves, blocks.py carries a group out on an export's pool, tls.py makes the
# port's TLS context.
from node.nbd.server import NbdServer, serve_nbd
from node.nbd.tls import NbdTls

__all__ = ["NbdServer", "NbdTls", "serve_nbd"]
