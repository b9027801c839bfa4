# ramster.remote: the ramster layer.  Pure policy on top of the unforked zcache: which peer takes
# an evicted zpage, where each remote copy lives, what to re-replicate when a peer goes, and what
# a holder keeps for whom.  No sockets here (h11-style): node/ performs the I/O it asks for.
from ramster.remote.config import RemoteConfig
from ramster.remote.events import FetchSource
from ramster.remote.foreign import ForeignStore, OwnerTag
from ramster.remote.layer import RamsterLayer
from ramster.remote.membership import Membership, Peer, PeerEvent

__all__ = [
    "FetchSource",
    "ForeignStore",
    "Membership",
    "OwnerTag",
    "Peer",
    "PeerEvent",
    "RamsterLayer",
    "RemoteConfig",
]
