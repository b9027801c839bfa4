"""RAMster: a distributed, compressed memory service."""

__version__ = "0.1.0"
