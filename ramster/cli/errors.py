# The one exception CLI commands raise for a user mistake: main() prints it as one line, no trace.
from __future__ import annotations


class CliError(Exception):
    """A user-facing error: printed as 'ramster: error: <message>', exit status 2."""
