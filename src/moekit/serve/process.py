"""The ``moekit serve`` process: a listening socket, uvicorn, and SIGINT/SIGTERM that stop it cleanly.

``serve`` binds (or takes) the socket, builds the app of ``moekit.serve.server`` and runs uvicorn until a
signal; the signal first tells the model thread to stop between tokens, then ``serve`` returns normally.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import signal
import socket
import threading
from collections.abc import Callable

from moekit.errors import MoekitError
from moekit.models.loading import LoadedModel
from moekit.serve.requests import DEFAULT_MAX_BODY_BYTES
from moekit.serve.server import create_app


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; a one-line MoekitError when the port is invalid or in use."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise MoekitError(f"--port must be in 0..65535, not {port}")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise MoekitError(f"cannot listen on {host}: {exc}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise MoekitError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def serve(lm: LoadedModel, host: str = "127.0.0.1", port: int = 8000, engine=None, log_level: str = "warning",
          model_name: str | None = None, on_ready: Callable[[], None] | None = None,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_prompt_tokens: int | None = None,
          sock: socket.socket | None = None) -> None:
    """Serve ``lm`` until SIGINT/SIGTERM, then shut down cleanly (returns normally). ``sock``: an already
    listening socket (see ``listen``); without it, ``host:port`` is bound here."""
    import uvicorn

    sock = sock or listen(host, port)
    app = create_app(lm, engine=engine, model_name=model_name, max_body_bytes=max_body_bytes,
                     max_prompt_tokens=max_prompt_tokens)
    config = uvicorn.Config(app, host=host, port=sock.getsockname()[1], log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5)
    server = _Server(config)
    server.on_ready = on_ready
    server.on_stop = app.state.moekit.stopping.set
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def _make_server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGINT/SIGTERM ends ``run`` normally (uvicorn re-raises the signal) and
        first tells the model thread to stop between tokens (``on_stop``)."""

        on_ready: Callable[[], None] | None = None
        on_stop: Callable[[], None] | None = None

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            previous = {s: signal.signal(s, self._on_signal) for s in sigs}
            try:
                yield
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)

        def _on_signal(self, sig, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            if self.on_stop is not None:
                self.on_stop()

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.on_ready is not None and self.started:
                self.on_ready()

    return Server


class _ServerProxy:
    def __call__(self, config):
        return _make_server_class()(config)


_Server = _ServerProxy()
