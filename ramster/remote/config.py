# Settings of the ramster layer, validated once.
from __future__ import annotations

from dataclasses import dataclass

from ramster.remote.foreign import MAX_SPLIT


class RemoteConfigError(ValueError):
    """A ramster-layer setting is out of range."""


@dataclass(frozen=True)
class RemoteConfig:
    replicas: int = 2  # copies of each remotified persistent zpage (peers, or peers + disk)
    heartbeat_interval: float = 0.5  # seconds between liveness/capacity exchanges
    down_after: float = 3.0  # seconds of silence before a peer is marked down
    forget_after: float = 60.0  # seconds down before a member is forgotten (if nothing needs it)
    outbox_limit: int = 8192  # evicted zpages waiting to be sent; beyond it evict() refuses
    outbox_limit_bytes: int = 16 << 20  # and their bytes (kept in RAM beyond the pool limit)
    send_batch: int = 256  # zpages per PutZpages message
    # the longest zpage a holder can take (a blob split over two of its slots), less what the
    # owner's transport adds (node/sealing.py); evict() leaves longer ones to the next evictor
    largest_zpage: int = MAX_SPLIT
    # journal records that may wait in memory while the disk is full (32 bytes each); beyond
    # it evict() refuses, so a node that keeps writing on a full disk does not grow without end
    journal_waiting_limit: int = 1 << 18

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= 8:
            raise RemoteConfigError(f"replicas must be between 1 and 8, got {self.replicas}")
        if not 0 < self.heartbeat_interval < self.down_after:
            raise RemoteConfigError(
                "heartbeat_interval must be positive and shorter than down_after, got "
                f"{self.heartbeat_interval} and {self.down_after}"
            )
        if self.forget_after < self.down_after:
            raise RemoteConfigError(
                f"forget_after must be at least down_after, got {self.forget_after} and "
                f"{self.down_after}"
            )
        limits = (self.outbox_limit, self.outbox_limit_bytes, self.send_batch)
        if min(*limits, self.largest_zpage, self.journal_waiting_limit) < 1:
            raise RemoteConfigError(
                "outbox_limit, outbox_limit_bytes, send_batch, largest_zpage and "
                "journal_waiting_limit must be positive"
            )
