"""What starting or reaching the service can fail with, each an expected condition the CLI answers
in one line. Kept apart from `cluster.serve` so the CLI can name them without importing Ray Serve."""

from __future__ import annotations


class NoService(Exception):
    """The Ray cluster joined runs no ringpipe service (no controller)."""


class NotServing(TimeoutError):
    """The gRPC endpoint did not answer SERVING in time; the message says what to look at."""


class PortTaken(Exception):
    """A port the service must listen on is in use; the message names the setting that moves it."""
