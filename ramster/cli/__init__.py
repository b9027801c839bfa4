"""The `ramster` command line."""
