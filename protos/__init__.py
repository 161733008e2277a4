"""The gRPC API: ringpipe.v1 protos and their generated stubs (see the coordinator issue)."""
