"""Running an app under waitress: listen, then load; on SIGTERM stop accepting, drain, exit 0.

    app = create_app(source, load_now=False)
    sys.exit(serve(app))          # host, port, threads and shutdown timeout from the app's ServeConfig

We drive waitress's event loop ourselves (its own run() has no graceful stop): once the socket
listens the model starts loading (the app's /ready says when it is done); SIGTERM or SIGINT
closes the listening sockets, lets every request already received finish and its response be
written (up to shutdown_timeout_s), drains the batcher and returns 0.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from flask import Flask

from jaxclf.serve.config import override
from jaxclf.serve.service import Service

logger = logging.getLogger(__name__)

IDLE_POLLS = 3  # idle polls in a row that mean nothing is in flight any more


def serve(app: Flask, **overrides: Any) -> int:
    """Serve `app` until SIGTERM/SIGINT; returns the process exit code.

    overrides: ServeConfig fields (host, port, threads, shutdown_timeout_s) instead of the app's.
    0 after a clean shutdown, 1 if the model failed to load, 2 if the address cannot be bound.
    """
    from waitress import wasyncore
    from waitress.server import BaseWSGIServer, create_server

    service: Service = app.extensions["jaxclf"]
    config = override(service.serve_config, **overrides)
    socket_map: dict = {}  # ours, so we can drive waitress's event loop ourselves
    try:
        server = create_server(app, map=socket_map, host=config.host, port=config.port, threads=config.threads,
                               ident="jaxclf")
    except OSError as e:
        logger.error("cannot listen on %s:%s: %s; pick another --port or stop what holds it",
                     config.host, config.port, e)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    listeners = [obj for obj in socket_map.values() if isinstance(obj, BaseWSGIServer)]
    for listener in listeners:  # more than one when a host name resolves to several addresses
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

    logger.info("shutting down: no new connections; finishing requests in flight")
    service.draining = True
    # Close only the listening sockets (the base-class close): waitress's own close() also closes the
    # trigger its worker threads use to wake this loop, which the responses still need.
    for listener in listeners:
        wasyncore.dispatcher.close(listener)
    _drain(pump, socket_map, server.task_dispatcher, config.shutdown_timeout_s)
    service.close()
    server.task_dispatcher.shutdown(cancel_pending=False, timeout=5)
    wasyncore.close_all(socket_map)
    logger.info("shut down cleanly")
    return 0


def _drain(pump, socket_map: dict, dispatcher, timeout_s: float) -> None:
    """Run the event loop until no request is queued, running or being written, or `timeout_s` passes."""
    def idle() -> bool:
        channels = [c for c in socket_map.values() if hasattr(c, "requests")]
        return not dispatcher.queue and all(
            not c.requests and c.request is None and not c.total_outbufs_len for c in channels)

    deadline = time.monotonic() + timeout_s
    quiet = 0
    while quiet < IDLE_POLLS and time.monotonic() < deadline:
        pump(0.05)
        quiet = quiet + 1 if idle() else 0
    if quiet < IDLE_POLLS:
        logger.warning("shutdown timeout (%.0fs) reached with requests still in flight", timeout_s)
