"""Failover: controller, heartbeats, membership and takeover (see the failover issue)."""
