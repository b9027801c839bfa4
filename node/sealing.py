# Sealed remote pages: a zpage that leaves its owner is encrypted and authenticated with
# AES-256-GCM under a key only the owner holds, so a holder can neither read it, forge one, nor
# hand back another version of it.
#
# The key is the owner node's secret, made once and kept in its data directory beside
# identity.json (`sealing.key`, 32 random bytes, created with mode 0600 and refused if anyone
# else can read it).  A data directory that is lost takes the key with it, which is right: the
# pages it sealed belong to a node that no longer exists.
#
# Associated data binds each blob to where and what it is: the owner's node id, the pool and the
# owner's location number, which names one version of one page (a new put of a key gets a new
# location, and a location is never handed out twice).  A holder that returns the blob of
# another page, pool or owner, or an older version of the same page, fails authentication; the
# page's key, inside the sealed zpage, is checked again by zcache when it opens the page.  The
# epoch is *not* bound: it names the holder's restart generation as the owner saw it, and it
# changes under a live copy (an owner back from a restart starts at epoch 1 and `Reclaim` moves
# copies to it), so binding it would make good copies unreadable; the location already pins the
# version.  A blob that fails to open is a damaged copy: the driver counts it and tries the next
# holder.
#
# Nonces are a 96-bit counter started at a random point per process (per Sealer), so they never
# repeat within a process, and two processes' ranges overlap only with probability about
# (sealed pages) / 2**96, far below random per-page nonces' birthday bound of about 2**32 seals.
#
# Trade-off: 28 bytes per sealed zpage (12 of nonce, 16 of tag) and one AES-GCM pass each way
# (AES-NI: a few microseconds per zpage, against LZ4's ~20 µs to compress a page).  A raw
# (incompressible) zpage is 4114 bytes, 4142 sealed: more than a holder's slot, so the holder
# keeps it in two (ramster/remote/foreign.py); RemoteConfig.largest_zpage, set from OVERHEAD by
# node/cluster.py, is what fits that.
# The cipher, and with it the cryptography package (~8 MiB of a node's RSS), is loaded when a
# clustered node makes its Sealer at startup: a node without peers never pays for it, and one
# with peers pays at its start rather than with its first remote page.
from __future__ import annotations

import secrets
import stat
import struct
from pathlib import Path

from ramster.atomicfile import replace_file

SEALING_KEY_FILE = "sealing.key"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + TAG_BYTES
_NONCE_SPACE = 1 << (8 * NONCE_BYTES)
_WHERE = struct.Struct("<IQ")  # pool, location


class SealingKeyError(OSError):
    """The sealing key cannot be read or made; the message says why."""


def load_sealing_key(data_dir: Path) -> bytes:
    """The node's sealing key from `data_dir`, made on first use (mode 0600, written to a
    temporary file and renamed, so a crash never leaves half a key)."""
    path = data_dir / SEALING_KEY_FILE
    if path.exists():
        return _read_key(path)
    key = secrets.token_bytes(KEY_BYTES)
    try:
        replace_file(path, key, mode=0o600)
    except OSError as exc:
        raise SealingKeyError(f"cannot create {path}: {exc.strerror}") from None
    return key


def _read_key(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        key = path.read_bytes()
    except OSError as exc:
        raise SealingKeyError(f"cannot read {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SealingKeyError(f"{path} is readable by others (mode {mode & 0o777:o}): chmod 600")
    if len(key) != KEY_BYTES:
        raise SealingKeyError(f"{path} is damaged: a sealing key is {KEY_BYTES} bytes")
    return key


class Sealer:
    """Seals and opens one owner's zpages (see the header)."""

    def __init__(self, key: bytes, owner: str) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)
        self._owner = owner.encode()
        self._nonce = secrets.randbelow(_NONCE_SPACE)

    def _associated(self, pool_id: int, location: int) -> bytes:
        return _WHERE.pack(pool_id, location) + self._owner

    def seal(self, pool_id: int, location: int, zpage: bytes) -> bytes:
        """`zpage` sealed as the page version `location` of pool `pool_id`: nonce, then
        ciphertext and tag."""
        self._nonce = (self._nonce + 1) % _NONCE_SPACE
        nonce = self._nonce.to_bytes(NONCE_BYTES, "little")
        return nonce + self._aead.encrypt(nonce, zpage, self._associated(pool_id, location))

    def open(self, pool_id: int, location: int, blob: bytes | memoryview) -> bytes | None:
        """The zpage sealed in `blob` (a view is read in place), or None if it is not this
        owner's seal of exactly that page version."""
        if len(blob) < OVERHEAD:
            return None
        where = self._associated(pool_id, location)
        from cryptography.exceptions import InvalidTag

        try:
            zpage: bytes = self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], where)
        except InvalidTag:
            return None
        return zpage
