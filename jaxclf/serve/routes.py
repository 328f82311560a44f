"""The HTTP endpoints: one table (ENDPOINTS) that the blueprint, the `/` index and /openapi.json all read.

A handler takes the app's Service and, when its endpoint declares a request schema, the JSON
body already checked against it; it returns a Response or raises ApiError. Every answer is JSON
except /metrics (Prometheus text) and /ui (HTML).
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Mapping

from flask import Blueprint, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import jaxclf
from jaxclf.serve import api_schema
from jaxclf.serve.api_schema import Endpoint, ref
from jaxclf.serve.documents import DocumentTooLongError
from jaxclf.serve.engine import InferenceEngine
from jaxclf.serve.errors import DeadlineExceeded, EngineClosedError, InferenceError, QueueFullError
from jaxclf.serve.responses import RETRY_AFTER_S, ApiError, json_response
from jaxclf.serve.service import Service
from jaxclf.serve.slot import Arm
from jaxclf.serve.ui_page import HTML as UI_HTML

# How an engine error reaches the client: (status, code, retry).
_ENGINE_ERRORS = ((QueueFullError, 503, "queue_full", True), (DeadlineExceeded, 503, "deadline_exceeded", True),
                  (EngineClosedError, 503, "shutting_down", True), (DocumentTooLongError, 413, "text_too_long", False),
                  (InferenceError, 500, "inference_failed", False))
# Which schema violation answers which status and code; anything else is 400 invalid_request.
_VIOLATIONS = {"maxLength": (413, "text_too_long"), "maxItems": (413, "too_many_texts"),
               "minLength": (422, "empty_text"), "minItems": (422, "empty_list")}
# The routing key is not a text: its own codes ((field, keyword) -> status, code).
_FIELD_VIOLATIONS = {("key", "maxLength"): (400, "key_too_long"), ("key", "minLength"): (400, "empty_key"),
                     ("key", "type"): (400, "invalid_key")}
# metrics.json keys whose values are file paths of the machine that trained or imported the model
# (TrainingConfig's output_dir, train_file, eval_file, init_from; the HF import's hf_dir): never
# sent to unauthenticated clients (they reveal the training host's layout).
PATH_KEYS = frozenset({"output_dir", "train_file", "eval_file", "init_from", "hf_dir", "distill_from",
                       "unlabeled_file", "tokenizer_from", "teacher"})


def json_body(schema: dict[str, Any]) -> Any:
    """The request's JSON body, checked against `schema`; ApiError naming what is wrong otherwise."""
    if request.mimetype != "application/json":
        got = request.headers.get("Content-Type") or "none"
        raise ApiError(415, "unsupported_media_type", f"Content-Type must be application/json, got {got!r}")
    raw = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ApiError(400, "invalid_json", f"request body is not UTF-8 (bad byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {e.msg} at line {e.lineno} "
                                            f"column {e.colno}") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer with > 4300 digits, absurd nesting
        raise ApiError(400, "invalid_json", f"request body cannot be parsed: {e}") from None
    violation = api_schema.validate(body, schema)
    if violation is not None:
        status, code = _FIELD_VIOLATIONS.get((violation.field, violation.keyword)) or _VIOLATIONS.get(
            violation.keyword, (400, "invalid_request"))
        raise ApiError(status, code, violation.message)
    return body


def request_key(body: Mapping[str, Any]) -> str | None:
    """The routing key: the body's "key" (already checked by its schema) or the X-Request-Key header."""
    if "key" in body:
        return body["key"]
    key = request.headers.get("X-Request-Key") or None  # an empty header is no key
    if key is not None:
        violation = api_schema.validate(key, api_schema.KEY_SCHEMA, "X-Request-Key")
        if violation is not None:
            status, code = _FIELD_VIOLATIONS.get(("key", violation.keyword), (400, "invalid_key"))
            raise ApiError(status, code, violation.message.replace("field 'X-Request-Key'",
                                                                   "header X-Request-Key"))
    return key


def public_metrics(value: Any) -> Any:
    """metrics.json without the PATH_KEYS entries, at any depth."""
    if isinstance(value, dict):
        return {k: public_metrics(v) for k, v in value.items() if k not in PATH_KEYS}
    if isinstance(value, list):
        return [public_metrics(v) for v in value]
    return value


def _predict(engine: InferenceEngine, texts: list[str]) -> list[dict[str, Any]]:
    try:
        results = engine.predict_batch(texts).results
    except InferenceError as e:
        status, code, retry = next((s, c, r) for kind, s, c, r in _ENGINE_ERRORS if isinstance(e, kind))
        message = str(e)
        if status >= 500 and not retry:  # a failure to look into: log it, and let the client quote its id
            request_id = g.get("request_id", "?")
            current_app.logger.error("inference failed (request id %s): %s", request_id, message)
            message = f"{message} (request id {request_id})"
        raise ApiError(status, code, message, retry_after=RETRY_AFTER_S if retry else None) from None
    return [r.to_dict() for r in results]


def _classify(service: Service, texts: list[str], body: Mapping[str, Any]) -> tuple[Arm, list[dict[str, Any]]]:
    """Lease the slot once, pick the version by the request key, predict, record."""
    key = request_key(body)
    with service.lease() as slot:
        arm = slot.pick(key)
        started = time.perf_counter()
        results = _predict(arm.engine, texts)
        service.metrics.inference_seconds.labels(arm.target.version).observe(time.perf_counter() - started)
    service.observe(arm, results)
    return arm, results


# --- handlers --------------------------------------------------------------------------------------

def index(service: Service) -> Response:
    slot = service.slot
    endpoints = [e.name for e in ENDPOINTS if not e.admin or service.admin_token is not None]
    return json_response({"service": "jaxclf", "jaxclf_version": jaxclf.__version__, "ready": slot is not None,
                          "model_version": slot.primary.target.version if slot else None,
                          "model_versions": slot.describe() if slot else [], "endpoints": endpoints})


def health(service: Service) -> Response:
    if service.load_error is not None:  # the cause (paths, exception text) is in the server log only
        raise service.not_ready()
    return json_response({"status": "ok"})


def ready(service: Service) -> Response:
    if service.draining:  # requests already received still complete; new traffic should go elsewhere
        raise ApiError(503, "shutting_down", "the server is shutting down; retry on another replica",
                       retry_after=RETRY_AFTER_S)
    engine = service.ready_engine()
    return json_response({"ready": True, "model_version": engine.version, "compilations": engine.compilations,
                          "startup_seconds": round(engine.startup_seconds, 3),
                          "model_versions": service.slot.describe()})


def model_info(service: Service) -> Response:
    engine = service.ready_engine()
    serving = {"batching": engine.batching, "max_batch_size": engine.max_batch_size,
               "max_wait_ms": engine.max_wait_s * 1000, "max_queue_size": engine.max_queue_size,
               "batch_buckets": list(engine.batch_buckets), "length_buckets": list(engine.length_buckets),
               "cache_size": engine.cache.capacity, "cache_max_bytes": engine.cache.max_bytes,
               "request_timeout_s": engine.request_timeout_s,
               "device": str(engine.device), "backend": engine.backend, "dtype": engine.config.dtype,
               "compilations": engine.compilations,
               "startup_seconds": engine.startup_seconds, "max_texts": service.max_texts,
               "max_chars": service.max_chars, "max_body_bytes": service.max_body_bytes}
    return json_response({"model_version": engine.version, "labels": engine.labels,
                          "config": engine.config.to_dict(), "metrics": public_metrics(engine.classifier.metrics),
                          "serving": serving, "model_versions": service.slot.describe()})


def predict(service: Service, body: Mapping[str, Any]) -> Response:
    _, [result] = _classify(service, [body["text"]], body)
    return json_response(result)


def predict_batch(service: Service, body: Mapping[str, Any]) -> Response:
    arm, results = _classify(service, body["texts"], body)
    for r in results:
        del r["model_version"]  # said once for the whole batch
    return json_response({"predictions": results, "model_version": arm.engine.version})


def admin_reload(service: Service) -> Response:
    service.check_admin(request.headers.get("Authorization"))
    return json_response(service.reload())


def prometheus_metrics(service: Service) -> Response:
    return Response(generate_latest(service.metrics.registry), mimetype=CONTENT_TYPE_LATEST)


def openapi(service: Service) -> Response:
    return json_response(api_schema.openapi_document(ENDPOINTS, service.max_texts, service.max_chars,
                                                     jaxclf.__version__))


def ui(service: Service) -> Response:
    response = Response(UI_HTML, mimetype="text/html")
    # The page only talks to this server; nothing external may load.
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'")
    return response


OBJECT = {"type": "object"}
POST_ERRORS = (400, 413, 415, 422, 429, 503)
ENDPOINTS = (
    Endpoint("GET", "/", "Service information", index, response=OBJECT),
    Endpoint("GET", "/health", "Liveness: the process answers", health, response=OBJECT, errors=(503,)),
    Endpoint("GET", "/ready", "Readiness: 200 once every bucket is compiled", ready,
             response_description="ready", errors=(503,)),
    Endpoint("GET", "/model/info", "Model config, labels, version and metrics", model_info, response=OBJECT),
    Endpoint("POST", "/predict", "Classify one text", predict, request="PredictRequest",
             response=ref("PredictResponse"), response_description="the prediction", errors=POST_ERRORS),
    Endpoint("POST", "/predict/batch", "Classify many texts", predict_batch, request="BatchRequest",
             response=ref("BatchResponse"), response_description="predictions in request order",
             errors=POST_ERRORS),
    Endpoint("GET", "/metrics", "Prometheus metrics", prometheus_metrics, response={"type": "string"},
             content_type="text/plain"),
    Endpoint("GET", "/openapi.json", "This document", openapi, response=OBJECT),
    Endpoint("GET", "/ui", "A page to try the model in a browser", ui, response={"type": "string"},
             content_type="text/html"),
    Endpoint("POST", "/admin/reload", "Serve what the model source names now (e.g. after an alias moved); needs "
             "'Authorization: Bearer <admin token>' and is off without --admin-token", admin_reload,
             response=OBJECT, response_description="reloaded, or already serving it", errors=(401, 403, 404, 409),
             admin=True),
)


class NativePanic(RuntimeError):
    """A BaseException from native code (pyo3's PanicException: a Rust panic, e.g. in `tokenizers`), made an
    ordinary error so Flask answers it (JSON 500 with the request id) instead of leaving the client hanging."""


def _view(endpoint: Endpoint) -> Callable[[], Response]:
    """The Flask view of `endpoint`: finds the app's Service and, if declared, reads and checks the body."""
    def view() -> Response:
        service: Service = current_app.extensions["jaxclf"]
        try:
            if endpoint.request is None:
                return endpoint.handler(service)
            schema = api_schema.components(service.max_texts, service.max_chars)[endpoint.request]
            return endpoint.handler(service, json_body(schema))
        except Exception:
            raise
        except BaseException as e:
            if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise
            raise NativePanic(f"{type(e).__name__}: {e}") from e

    view.__name__ = endpoint.handler.__name__
    return view


blueprint = Blueprint("jaxclf", __name__)
for _endpoint in ENDPOINTS:
    blueprint.add_url_rule(_endpoint.path, view_func=_view(_endpoint), methods=[_endpoint.method])
