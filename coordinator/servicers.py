"""What Serve's gRPC proxy registers for ringpipe: each service's methods, taking the request's raw bytes.

Serve's proxy (`gRPCOptions.grpc_servicer_functions`, a public option) calls these
functions with a mock servicer and keeps each handler's `request_deserializer`.
The generated `add_*Servicer_to_server` functions deserialize in the proxy,
where bytes that are no valid message fail inside grpc before Serve or ringpipe
sees them: the client gets UNKNOWN ("Unexpected error"). Registered here without
a deserializer, the proxy passes the bytes on (pickled as they are, cheaper than
a message), and the coordinator decodes them (`coordinator.request.decode`):
bytes that are not a valid request are INVALID_ARGUMENT naming `request`, from
the same error table as every other bad field. The wire format is unchanged:
any gRPC client with the generated stubs calls these services as before.

Kept light on purpose: the proxy imports this module (grpc and the stubs only).
"""

from __future__ import annotations

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2

from protos.ringpipe.v1 import admin_pb2, inference_pb2


def _add_taking_bytes(service: ServiceDescriptor, servicer, server) -> None:
    """Register `service` on `server` as its generated function does, minus request deserialization."""
    handlers = {}
    for method in service.methods:
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: client streaming is not served through the proxy")
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        response = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=None,
                                     response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def add_inference(servicer, server) -> None:
    _add_taking_bytes(inference_pb2.DESCRIPTOR.services_by_name["Inference"], servicer, server)


def add_admin(servicer, server) -> None:
    _add_taking_bytes(admin_pb2.DESCRIPTOR.services_by_name["Admin"], servicer, server)


def add_health(servicer, server) -> None:
    _add_taking_bytes(health_pb2.DESCRIPTOR.services_by_name["Health"], servicer, server)
