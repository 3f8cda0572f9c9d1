"""moekit: see, steer, compress, serve and build Mixture-of-Experts language models."""

__version__ = "0.1.0"

from moekit.errors import MoekitError, NotAnMoEModel, TraceError, UnsupportedArchitecture  # noqa: E402
from moekit.models import LoadedModel, MoEMap, load  # noqa: E402
from moekit.routing import RoutingControl, record, route  # noqa: E402
from moekit.trace import RoutingTrace  # noqa: E402

__all__ = [
    "LoadedModel", "MoEMap", "MoekitError", "NotAnMoEModel", "RoutingControl", "RoutingTrace", "TraceError",
    "UnsupportedArchitecture", "__version__", "load", "record", "route",
]
