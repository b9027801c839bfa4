# Exceptions raised by the zcache engine.
#
# Every refusal of *bad input* is an exception subclassing ZCacheError and a builtin that fits
# (ValueError, LookupError) so callers can map them to status codes without string matching.
# A put refused by policy ("the frontdoor bouncer") is NOT an exception: it is a normal outcome
# returned as a PutResult, because refusals are frequent and cheap to report.
from __future__ import annotations


class ZCacheError(Exception):
    """Base of every error the engine raises."""


class InvalidKey(ZCacheError, ValueError):
    """A key component is out of range or of the wrong type."""


class InvalidPage(ZCacheError, ValueError):
    """A page is not exactly PAGE_SIZE bytes of a bytes-like object."""


class InvalidConfig(ZCacheError, ValueError):
    """An engine or pool setting is out of range."""


class UnknownPool(ZCacheError, LookupError):
    """The pool id names no pool (never created, or destroyed)."""


class PageError(ZCacheError):
    """A stored page cannot be returned; a batch get reports it per page instead of raising."""


class CorruptPage(PageError):
    """A stored zpage failed its checksum or does not belong to the key it is filed under."""


class PageUnavailable(PageError):
    """The page exists but no copy of it can be reached now (its holders are unreachable)."""


class InvariantViolation(ZCacheError):
    """The engine's structures are inconsistent (a bug, never user error)."""
