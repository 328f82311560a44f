"""The HTTP service: create_app builds a Flask app around a Service (one InferenceEngine, or several for A/B).

    app = create_app("runs/default/model", engine=EngineConfig(max_batch_size=16), serve=ServeConfig(max_texts=8))
    app = create_app(engine_object, max_texts=8, rate_limit=5)     # single fields, by name
    jaxclf.serve.server.serve(app)                                  # waitress, until SIGTERM

One process, many waitress threads, one batcher per model version. A model path or source is
loaded in a background thread (at once, or with load_now=False when serve() has the socket
listening), so /health answers at once and /ready answers 503 + Retry-After until every bucket
is compiled. Nothing forks after JAX has started.

The endpoints live in jaxclf.serve.routes; this module adds the request hooks (request id, client
address, rate limit, CORS, metrics, access log) and the error handlers that turn every failure into
JSON {"error": {"code", "message"}}. Every response carries an X-Request-ID header. Whatever
escapes Flask, even a BaseException such as a Rust panic in `tokenizers`, is still answered: a
JSON 500 naming the request id (AnswerEveryRequest).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from typing import Any, Iterable, Mapping

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from jaxclf.config import ConfigError
from jaxclf.serve.access import endpoint_label, loggable, method_label
from jaxclf.serve.config import EngineConfig, ServeConfig, override
from jaxclf.serve.engine import InferenceEngine
from jaxclf.serve.limits import client_address, client_key
from jaxclf.serve.responses import ApiError, error_response
from jaxclf.serve.routes import blueprint
from jaxclf.serve.service import Service
from jaxclf.serve.slot import ModelSource

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("jaxclf.access")

UNLIMITED_PATHS = ("/health", "/ready", "/metrics")  # probes and scrapes are never rate limited
CORS_ALLOW_HEADERS = "Content-Type, X-Request-ID, X-Request-Key"  # what a browser on another origin may send
CORS_EXPOSE_HEADERS = "X-Request-ID, Retry-After"  # what its scripts may read
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def create_app(model: InferenceEngine | ModelSource | str | os.PathLike, engine: EngineConfig | None = None,
               serve: ServeConfig | None = None, *, load_now: bool = True,
               engine_options: Mapping[str, Any] | None = None, **serve_options: Any) -> Flask:
    """The Flask app serving `model`: an InferenceEngine, a model directory, or a jaxclf.serve.slot source
    (e.g. RegistrySource for NAME@ALIAS references with an A/B split).

    engine / serve: the EngineConfig the engines are built with and the ServeConfig of the HTTP
    side; engine_options / serve_options change single fields of them by name. A path or source
    is loaded in a background thread; with load_now=False that waits for
    `app.extensions["jaxclf"].start_loading()` (serve() calls it once the socket listens).
    """
    engine_config = override(engine or EngineConfig(), **dict(engine_options or {}))
    serve_config = override(serve or ServeConfig(), **serve_options)
    if isinstance(model, InferenceEngine) and engine_options:
        raise ConfigError("engine_options apply to engines the app builds; this app was given a built engine")
    service = Service(model, engine_config, serve_config)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = serve_config.max_body_bytes  # waitress refuses larger bodies first
    app.wsgi_app = AnswerEveryRequest(app.wsgi_app)
    app.extensions["jaxclf"] = service
    app.register_blueprint(blueprint)
    _register_request_hooks(app, service)
    _register_error_handlers(app, service)
    if load_now:
        service.start_loading()
    return app


def _is_exit(e: BaseException) -> bool:
    """An exception that asks the process or generator to stop, which must propagate as it is."""
    return isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit))


class AnswerEveryRequest:
    """WSGI middleware: an exception that escapes Flask still gets a JSON 500 with the request id.

    Flask handles Exception; a BaseException such as pyo3's PanicException (a Rust panic in
    `tokenizers`) passes through it, and waitress then logs it and never answers: the client
    hangs and a SIGTERM drain waits its whole timeout. The routes turn those into errors Flask
    handles; this is the net under everything else.
    """

    def __init__(self, wsgi_app):
        self.wsgi_app = wsgi_app

    def __call__(self, environ: dict, start_response) -> Iterable[bytes]:
        started = []

        def start(status, headers, exc_info=None):
            started.append(status)
            return start_response(status, headers, exc_info)

        try:
            return self.wsgi_app(environ, start)
        except BaseException as e:
            if _is_exit(e) or started:  # a response already begun cannot be replaced: the server closes it
                raise
            given = environ.get("HTTP_X_REQUEST_ID", "")
            request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
            logger.exception("unhandled %s outside the request handlers (request id %s)", type(e).__name__,
                             request_id)
            body = json.dumps({"error": {"code": "internal_error", "message": f"internal error; the server log "
                                         f"has the details under request id {request_id}"}}).encode()
            start_response("500 INTERNAL SERVER ERROR", [
                ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                ("X-Request-ID", request_id), ("X-Content-Type-Options", "nosniff")])
            return [body]


def _add_cors_headers(response: Response, origins: frozenset[str]) -> None:
    origin = request.headers.get("Origin")
    if not origin or ("*" not in origins and origin not in origins):
        return
    response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
    response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
    response.headers.add("Vary", "Origin")
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = CORS_ALLOW_HEADERS
        response.headers["Access-Control-Max-Age"] = "600"


def _register_request_hooks(app: Flask, service: Service) -> None:
    """Request id and rate limit before every request; headers, metrics and the access log after."""

    @app.before_request
    def start() -> None:
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        g.started = time.perf_counter()
        g.client = client_address(request.remote_addr, request.headers.get("X-Forwarded-For"),
                                  service.trusted_proxies)
        limiter = service.limiter
        if limiter is not None and request.method != "OPTIONS" and request.path not in UNLIMITED_PATHS:
            wait = limiter.acquire(client_key(g.client))
            if wait > 0:
                raise ApiError(429, "rate_limited", f"more than {limiter.rate:g} requests/s (burst "
                                                    f"{limiter.burst:g}) from this client; retry in {wait:.2f}s",
                               retry_after=wait)

    @app.after_request
    def finish(response: Response) -> Response:
        request_id = g.get("request_id") or uuid.uuid4().hex
        response.headers["X-Request-ID"] = request_id
        response.headers["X-Content-Type-Options"] = "nosniff"
        _add_cors_headers(response, service.cors_origins)
        # Labels from fixed sets only: each distinct value is a series kept (and scraped) for ever.
        endpoint = endpoint_label(request.url_rule.rule if request.url_rule is not None else None)
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        service.metrics.requests.labels(endpoint, method_label(request.method), str(response.status_code)).inc()
        service.metrics.latency.labels(endpoint).observe(elapsed)
        access_logger.info('%s "%s %s" %d %.1fms id=%s', loggable(g.get("client") or request.remote_addr, 64),
                           loggable(request.method, 32), loggable(request.path), response.status_code,
                           1000 * elapsed, request_id)
        return response


def _http_error_message(e: HTTPException, service: Service) -> str:
    method, path = request.method[:32], request.path[:256]  # what the client sent, echoed back clipped
    if e.code == 404:
        return f"no such endpoint: {method} {path}; see /openapi.json"
    if e.code == 405:
        return f"{method} is not allowed on {path}; allowed: {', '.join(e.valid_methods or [])}"
    if e.code == 413:
        return f"request body is over the limit of max_body_bytes={service.max_body_bytes} bytes"
    return e.description or e.name


def _register_error_handlers(app: Flask, service: Service) -> None:
    """Every error becomes JSON {"error": {"code", "message"}}; an unexpected one hides its details."""

    @app.errorhandler(ApiError)
    def api_error(e: ApiError) -> Response:
        return error_response(e.status, e.code, e.message, e.retry_after)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        if e.code is None or e.code < 400:  # redirects (e.g. a trailing slash) stay as they are
            return e
        code = re.sub(r"[^a-z0-9]+", "_", (e.name or "error").lower()).strip("_")
        response = error_response(e.code, code, _http_error_message(e, service))
        if e.code == 405 and e.valid_methods:
            response.headers["Allow"] = ", ".join(e.valid_methods)
        return response

    @app.errorhandler(Exception)
    def unexpected(e: Exception) -> Response:
        request_id = g.get("request_id", "?")
        logger.exception("unhandled error in %s %s (request id %s)", request.method, request.path, request_id)
        return error_response(500, "internal_error", f"internal error; the server log has the details "
                                                     f"under request id {request_id}")
