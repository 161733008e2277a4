"""Every failure the service can answer with, mapped to a gRPC status in one place.

| raised | status |
|---|---|
| `RequestError` (bad field; names it) | INVALID_ARGUMENT |
| `Unauthenticated` | UNAUTHENTICATED |
| `Overloaded` (every replica's queue full) | RESOURCE_EXHAUSTED |
| `NoReplica` (incl. `Fenced`), `ReplicaFailed`, a dead actor | UNAVAILABLE |
| `NonFiniteLogits` (the request's logits were NaN or infinite; not resumed: any replica computes the same) | INTERNAL |
| anything else | INTERNAL |

The OpenAI HTTP front answers with the HTTP status `HTTP_STATUS` gives each gRPC code
(400, 401, 429, 503, 504, 500), so both fronts say the same thing about the same failure.
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


class DeadlineExceeded(ServiceError):
    """The request ran past its deadline (`server.request_timeout_s`)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(ServiceError):
    """A name the client gave (a model, a path) that this service does not have."""

    code = grpc.StatusCode.NOT_FOUND


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


# gRPC code → (HTTP status, OpenAI error type); a code not listed is a 500 server_error
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


def http_status_for(exc: BaseException) -> tuple[int, str, str]:
    """The HTTP status, OpenAI error type and message to answer `exc` with."""
    code, message = status_for(exc)
    status, kind = HTTP_STATUS.get(code, (500, "server_error"))
    return status, kind, message
