"""Coordinator: hash ring, routing and the gRPC service (see the coordinator issue)."""
