"""Every failure the service can answer with, mapped to a gRPC status in one place.

| raised | status |
|---|---|
| `RequestError` (bad field; names it) | INVALID_ARGUMENT |
| `Unauthenticated` | UNAUTHENTICATED |
| `Overloaded` (every replica's queue full) | RESOURCE_EXHAUSTED |
| `NoReplica` (incl. `Fenced`), `ReplicaFailed`, a dead actor | UNAVAILABLE |
| `NonFiniteLogits` (the request's logits were NaN or infinite; not resumed: any replica computes the same) | INTERNAL |
| anything else | INTERNAL |
"""

from __future__ import annotations

import grpc
import ray

from shards.errors import Overloaded, ReplicaFailed, RequestError


class ServiceError(Exception):
    """A failure whose gRPC status is known where it is raised."""

    code = grpc.StatusCode.INTERNAL


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class NoReplica(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Fenced(NoReplica):
    """The replica serving a request left the membership: nothing more is taken from it."""


class ClusterFull(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


REPLICA_LOST = (ReplicaFailed, ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


def cause_of(exc: BaseException) -> BaseException:
    """What an actor raised, for an exception Ray wrapped on the way back; else `exc` itself."""
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, BaseException):
        return exc.cause
    return exc


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message to answer `exc` with."""
    exc = cause_of(exc)
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, RequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, REPLICA_LOST):
        return grpc.StatusCode.UNAVAILABLE, f"replica failed: {exc}"
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
