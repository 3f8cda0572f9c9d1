"""RoutingTrace: the on-disk, memory-mappable record of routing decisions."""

from moekit.trace.routing_trace import FORMAT_VERSION, RoutingTrace

__all__ = ["FORMAT_VERSION", "RoutingTrace"]
