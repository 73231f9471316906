"""What the shell front shares: its exit codes and the error for a user's mistake. Below
cli.py and every command module, so a command never imports cli.py (which imports it)."""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class UsageError(Exception):
    """A user's mistake found before any work started; exits 2 with this message."""
