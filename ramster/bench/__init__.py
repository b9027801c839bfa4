"""Benchmarks: commands that print numbers (never timed tests)."""
