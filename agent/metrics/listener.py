"""``[metrics] listen``: the metrics over plain HTTP on a TCP port, ``GET /metrics`` (Prometheus's default path).

Bound by the process systemd started, before anything else (a port in use is a configuration error, status 78),
and served by a thread in each serving process from the same listening socket: whichever is free takes a
scrape. One scrape at a time per process, each with a short deadline, so a client that does not finish its
request holds no more than that; nothing here reads the token (see agent.metrics.sampler).
"""

from __future__ import annotations

import contextlib
import errno
import http.server
import ipaddress
import socket
import threading
from collections.abc import Callable
from typing import Any

from agent.errors import ConfigError
from agent.log import get_logger
from agent.metrics import CONTENT_TYPE
from agent.metrics.settings import MetricsSettings

log = get_logger("tpp-agent.metrics")
CLIENT_SECONDS = 5.0  # for a scraper to send its request and take the answer
PATH = "/metrics"


def bind(settings: MetricsSettings) -> socket.socket | None:
    """The listening socket of ``[metrics] listen``, or None when it is not set."""
    if settings.listen is None:
        return None
    host, port = settings.listen
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart within TIME_WAIT; never shared
        sock.bind((host, port))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        hint = ("another program listens there (ss -ltnp): choose another port in [metrics] listen"
                if exc.errno == errno.EADDRINUSE else "check [metrics] listen")
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror}", hint=hint) from None
    if not ipaddress.ip_address(host).is_loopback:
        log.warning("metrics_listen_remote", address=f"{host}:{port}",
                    hint="anyone who reaches this address reads the metrics: no authentication")
    return sock


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = CLIENT_SECONDS
    render: Callable[[], bytes]  # set on the subclass made per listener

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != PATH:
            self._answer(404, b"not found: the metrics are at /metrics\n", "text/plain; charset=utf-8")
            return
        try:
            body = type(self).render()
        except Exception as exc:  # the scraper gets a 500, the process goes on
            log.error("metrics_render_failed", error=repr(exc)[:200])
            self._answer(500, b"the metrics could not be rendered: see the agent's log\n", "text/plain; charset=utf-8")
            return
        self._answer(200, body, CONTENT_TYPE)

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the scraper's requests are not the agent's requests: no log line per scrape


class Listener:
    """Serves ``sock`` (from :func:`bind`) on a thread until :meth:`stop`."""

    def __init__(self, sock: socket.socket, render: Callable[[], bytes]) -> None:
        self._sock = sock
        self._handler = type("Handler", (_Handler,), {"render": staticmethod(render)})
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _run(self) -> None:
        self._sock.settimeout(0.5)  # sees stop() within that; accept() takes the scrape at once meanwhile
        while not self._stopping.is_set():
            try:
                conn, address = self._sock.accept()
            except (TimeoutError, BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.EINVAL):  # the socket was closed: the process stops
                    return
                log.warning("metrics_accept_failed", error=exc.strerror)
                self._stopping.wait(0.1)
                continue
            with contextlib.suppress(OSError):
                conn.settimeout(CLIENT_SECONDS)
                self._handler(conn, address, None)
            with contextlib.suppress(OSError):
                conn.close()
