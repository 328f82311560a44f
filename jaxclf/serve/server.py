"""Serve a jaxclf app with waitress until SIGTERM/SIGINT, then shut down gracefully.

    app = create_app(path, load_now=False)
    sys.exit(serve(app))          # host, port, threads, limits and shutdown times from the app's ServeConfig

We drive waitress's event loop ourselves (its own run() has no graceful stop): once the socket
listens the model starts loading (the app's /ready says when it is done). On SIGTERM or SIGINT:

1. /ready answers 503 at once; for `pre_drain_s` the server still accepts and serves everything
   (load balancers learn of a terminating pod seconds after it got SIGTERM);
2. the listening sockets close and requests already received finish, their responses written;
3. the batchers drain, and the process exits 0.

All of it within `shutdown_timeout_s` of the signal. A request still unfinished then (a client
that stalled halfway through sending it) is dropped; a model load or reload still running makes it
exit 1 at once (Kubernetes would SIGKILL it at its grace period anyway, without logging why).

waitress enforces the request limits before the app sees a byte: the body size (so a large body
is refused, not buffered to disk first), the header size, the connections and their idle time.
Its own refusals (413, 431, a malformed request) are answered in the app's JSON error format, and
reach a client that is still sending: the rest of its request is read and dropped before the close.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Any

from flask import Flask

from jaxclf.serve.config import ServeConfig, override
from jaxclf.serve.service import Service

logger = logging.getLogger(__name__)

IDLE_POLLS = 3  # idle polls in a row that mean nothing is in flight any more
# After refusing a request (413, 431, 400) waitress closes the connection with the rest of the request
# unread, and closing a socket on unread bytes resets it: a client still sending its body then never
# reads the answer. So the channel drains what keeps arriving, up to these bounds, before it closes
# (a "lingering close", as nginx's lingering_time / Apache's lingering_close do); a client that goes
# quiet instead is closed by waitress's idle sweep (channel_timeout_s).
LINGER_S = 5.0
LINGER_BYTES = 64 << 20
CLOSE_RESERVE_FRACTION = 0.2  # of the shutdown time kept from the request drain for the batchers to stop
CLOSE_RESERVE_MAX_S = 3.0


def waitress_options(config: ServeConfig) -> dict[str, Any]:
    """The waitress adjustments a ServeConfig sets."""
    return {"host": config.host, "port": config.port, "threads": config.threads, "ident": "jaxclf",
            "max_request_body_size": config.max_body_bytes, "max_request_header_size": config.max_header_bytes,
            "connection_limit": config.connection_limit, "channel_timeout": config.channel_timeout_s,
            # waitress drops X-Forwarded-For unless told otherwise; with trusted proxies the app decides whom
            # to believe (jaxclf.serve.limits: only the entries those proxies appended)
            "clear_untrusted_proxy_headers": not config.trusted_proxies,
            # waitress closes timed-out channels when it next looks: every cleanup_interval seconds
            "cleanup_interval": max(1, min(30, int(config.channel_timeout_s / 2)))}


def json_error_channel(service: Service, config: ServeConfig) -> type:
    """A waitress channel class whose own error answers (413, 431, 400, 500) are the app's JSON errors."""
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    messages = {413: f"request body is over the limit of max_body_bytes={config.max_body_bytes} bytes",
                431: f"request line and headers are over the limit of max_header_bytes={config.max_header_bytes} "
                     f"bytes"}

    class JsonErrorTask(ErrorTask):
        def execute(self) -> None:
            error = self.request.error
            code = re.sub(r"[^a-z0-9]+", "_", error.reason.lower()).strip("_")
            message = messages.get(error.code) or str(error.body)[:200]
            body = json.dumps({"error": {"code": code, "message": message}}).encode()
            self.status = f"{error.code} {error.reason}"
            self.response_headers.extend([("Content-Type", "application/json"), ("X-Request-ID", uuid.uuid4().hex),
                                          ("X-Content-Type-Options", "nosniff")])
            self.channel.linger_on_close = True  # before the answer is written: the loop may close right after
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)
            service.record_refusal(error.code, self.channel.addr[0] if self.channel.addr else None, code)

    class JsonErrorChannel(HTTPChannel):
        error_task_class = JsonErrorTask
        linger_on_close = False  # set by an error answer: drain the unread request before closing
        drain_deadline: float | None = None  # time.monotonic() bound while draining; None when not
        drained = 0

        def handle_close(self) -> None:
            if self.linger_on_close and self.drain_deadline is None and self.connected:
                try:
                    self.socket.shutdown(socket.SHUT_WR)  # the answer is flushed: FIN after it
                except OSError:
                    return super().handle_close()
                self.drain_deadline = time.monotonic() + LINGER_S
                self.will_close = self.close_when_flushed = False
                return
            super().handle_close()

        def readable(self) -> bool:
            return True if self.drain_deadline is not None else super().readable()

        def writable(self) -> bool:  # while draining: only when waitress's idle sweep asks to close
            return self.will_close if self.drain_deadline is not None else super().writable()

        def handle_read(self) -> None:
            if self.drain_deadline is None:
                return super().handle_read()
            try:
                data = self.recv(1 << 16)  # b"" at the client's end of stream, which closes the channel
            except OSError:
                data = b""
            self.drained += len(data)
            if self.connected and (not data or self.drained > LINGER_BYTES
                                   or time.monotonic() > self.drain_deadline):
                super().handle_close()

    return JsonErrorChannel


def serve(app: Flask, **overrides: Any) -> int:
    """Serve `app` until SIGTERM/SIGINT; returns the process exit code.

    overrides: ServeConfig fields (host, port, threads, shutdown_timeout_s, ...) instead of the app's.
    0 after a shutdown, 1 if the model failed to load or a load was still running at the shutdown
    deadline, 2 if the address cannot be bound.
    """
    from waitress import wasyncore
    from waitress.server import BaseWSGIServer, create_server

    service: Service = app.extensions["jaxclf"]
    config = override(service.serve_config, **overrides)
    socket_map: dict = {}  # ours, so we can drive waitress's event loop ourselves
    try:
        server = create_server(app, map=socket_map, **waitress_options(config))
    except OSError as e:
        logger.error("cannot listen on %s:%s: %s; pick another --port or stop what holds it",
                     config.host, config.port, e)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    listeners = [obj for obj in socket_map.values() if isinstance(obj, BaseWSGIServer)]
    channel_class = json_error_channel(service, config)
    for listener in listeners:  # more than one when a host name resolves to several addresses
        listener.channel_class = channel_class
        print(f"jaxclf: listening on http://{listener.effective_host}:{listener.effective_port}", flush=True)
    service.start_loading()

    def pump(timeout: float) -> None:
        wasyncore.loop(timeout=timeout, map=socket_map, count=1)

    while not stop.is_set() and service.load_error is None:
        pump(0.2)
    if service.load_error is not None:
        logger.error("%s", service.load_error)
        server.task_dispatcher.shutdown()
        wasyncore.close_all(socket_map)
        return 1
    stopped = _shut_down(pump, socket_map, listeners, server.task_dispatcher, service, config)
    wasyncore.close_all(socket_map)
    if not stopped:  # a thread may be inside XLA: a normal interpreter exit would wait for it, or abort
        logger.error("shutdown_timeout_s=%gs reached with a model still loading; exiting now",
                     config.shutdown_timeout_s)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(1)
    logger.info("shut down cleanly")
    return 0


def _shut_down(pump, socket_map: dict, listeners: list, dispatcher, service: Service, config: ServeConfig) -> bool:
    """Pre-drain, drain, close: all within shutdown_timeout_s. False if a load or reload is still running."""
    from waitress import wasyncore

    deadline = time.monotonic() + config.shutdown_timeout_s
    service.draining = True  # /ready answers 503 from now on
    if config.pre_drain_s:
        logger.info("shutting down: /ready answers 503; still serving for pre_drain_s=%gs", config.pre_drain_s)
        until = time.monotonic() + config.pre_drain_s
        while time.monotonic() < until:
            pump(min(0.05, max(0.0, until - time.monotonic())))
    logger.info("shutting down: no new connections; finishing requests in flight")
    # Close only the listening sockets (the base-class close): waitress's own close() also closes the
    # trigger its worker threads use to wake this loop, which the responses still need.
    for listener in listeners:
        wasyncore.dispatcher.close(listener)
    reserve = min(CLOSE_RESERVE_MAX_S, CLOSE_RESERVE_FRACTION * config.shutdown_timeout_s)
    _drain(pump, socket_map, dispatcher, deadline - reserve)
    stopped = service.close(deadline)
    dispatcher.shutdown(cancel_pending=False, timeout=max(0.0, deadline - time.monotonic()))
    return stopped


def _drain(pump, socket_map: dict, dispatcher, deadline: float) -> None:
    """Run the event loop until no request is queued, running or being written, or `deadline` passes."""
    def idle() -> bool:
        channels = [c for c in socket_map.values() if hasattr(c, "requests")]
        return not dispatcher.queue and all(
            not c.requests and c.request is None and not c.total_outbufs_len for c in channels)

    quiet = 0
    while quiet < IDLE_POLLS and time.monotonic() < deadline:
        pump(0.05)
        quiet = quiet + 1 if idle() else 0
    if quiet < IDLE_POLLS:
        logger.warning("shutdown: requests still in flight at the drain deadline; dropping them")
