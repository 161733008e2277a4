"""The exceptions of the shards package; every one says what to do next."""

from __future__ import annotations


class ShardsError(Exception):
    """Root of every error raised by `shards`."""


class CheckpointError(ShardsError):
    """A checkpoint directory that cannot be served: missing file, bad config field, bad tensor."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint's architecture or one of its config fields is not supported."""

    def __init__(self, field: str, value: object, supported: str) -> None:
        super().__init__(f"unsupported {field}={value!r} in config.json; supported: {supported}")
        self.field, self.value, self.supported = field, value, supported

    def __reduce__(self):  # keeps the error intact across Ray's pickling
        return (type(self), (self.field, self.value, self.supported))


class RequestError(ShardsError, ValueError):
    """A generation request that can never run (bad field); names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def __reduce__(self):
        return (type(self), (self.field, self.message))


class Overloaded(ShardsError):
    """The replica's queue is full: every KV slot is busy and `max_queue` requests already wait.

    Nothing was started, so the request may go to another replica at once.
    """


class DoesNotFit(ShardsError):
    """A stage's weights and KV slots need more memory than its device has free: refused before
    anything is allocated, with the numbers and the settings that would make it fit."""


class NonFiniteLogits(ShardsError):
    """The model's logits for a request were NaN or infinite (a float16 overflow, a broken weight):
    that request ends with this error instead of a token drawn from them; the replica and the other
    requests go on. Another replica would compute the same, so it is not resumed elsewhere."""


class ReplicaFailed(ShardsError):
    """A pipeline replica lost a stage or its transport; its requests cannot finish there."""


class TransportError(ReplicaFailed):
    """A stage-to-stage send or receive failed or timed out (a peer died or hung)."""
