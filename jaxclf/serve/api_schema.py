"""The HTTP API's request and response schemas and its endpoint table: one set of dicts validates
requests and generates the OpenAPI document, and one table of Endpoints (jaxclf.serve.routes)
feeds the Flask routes, the index and that document, so none of them can drift apart.

The dicts are plain JSON Schema. `validate` implements the subset used here (type, properties,
required, additionalProperties, items, min/maxItems, min/maxLength); a schema may name the
server limit behind a maximum with "x-limit" so an error can say which knob to turn.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

_JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


@dataclasses.dataclass(frozen=True)
class Violation:
    """Why a value does not match its schema."""

    field: str  # "text", "texts[3]", or "(body)" for the whole body
    keyword: str  # the schema keyword that failed: "type", "required", "maxLength", ...
    message: str


def text_schema(max_chars: int) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": max_chars, "x-limit": "max_chars",
            "description": "Text to classify. A text longer than the model's token limit is read by the "
                           "model's long-text rule (config long_text): its first tokens (truncate), its first "
                           "and last (head_tail), or all of it as windows whose predictions are pooled (chunks)."}


KEY_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 256,
              "description": "Optional routing key (a user or session id) when several model versions are "
                             "served: the same key always reaches the same version. Also accepted as the "
                             "X-Request-Key header."}


def predict_request(max_chars: int) -> dict[str, Any]:
    return {"type": "object", "required": ["text"], "additionalProperties": False,
            "properties": {"text": text_schema(max_chars), "key": KEY_SCHEMA}}


def batch_request(max_texts: int, max_chars: int) -> dict[str, Any]:
    return {"type": "object", "required": ["texts"], "additionalProperties": False,
            "properties": {"texts": {"type": "array", "minItems": 1, "maxItems": max_texts,
                                     "x-limit": "max_texts", "items": text_schema(max_chars),
                                     "description": "Texts to classify; answers come in the same order."},
                           "key": KEY_SCHEMA}}


PREDICTION = {
    "type": "object", "required": ["label", "confidence", "probabilities", "windows"],
    "properties": {
        "label": {"type": "string", "description": "the most probable label"},
        "confidence": {"type": "number", "description": "probability of that label"},
        "probabilities": {"type": "object", "additionalProperties": {"type": "number"},
                          "description": "probability of every label"},
        "windows": {"type": "integer", "description": "rows the model read for the text: 1, or under "
                                                      "long_text=chunks the windows of a long text"},
    },
}
PREDICT_RESPONSE = {
    "type": "object", "required": [*PREDICTION["required"], "model_version"],
    "properties": {**PREDICTION["properties"], "model_version": {"type": "string"}},
}
BATCH_RESPONSE = {
    "type": "object", "required": ["predictions", "model_version"],
    "properties": {"predictions": {"type": "array", "items": PREDICTION}, "model_version": {"type": "string"}},
}
ERROR_RESPONSE = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string", "description": "machine-readable, e.g. invalid_json, queue_full"},
        "message": {"type": "string", "description": "what was wrong and what is accepted"}}}},
}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)


def _has_type(value: Any, expected: str) -> bool:
    if expected == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, _JSON_TYPES[expected])


def _limit(schema: dict[str, Any], keyword: str) -> str:
    name = schema.get("x-limit")
    return f"{name}={schema[keyword]}" if name else str(schema[keyword])


def validate(value: Any, schema: dict[str, Any], field: str = "(body)") -> Violation | None:
    """The first violation of `schema` by `value` (a parsed JSON document), or None."""
    expected = schema.get("type")
    if expected and not _has_type(value, expected):
        where = "request body" if field == "(body)" else f"field '{field}'"
        return Violation(field, "type", f"{where} must be a JSON {expected}, got {_type_name(value)}")
    if expected == "object":
        for name in schema.get("required", []):
            if name not in value:
                return Violation(name if field == "(body)" else f"{field}.{name}", "required",
                                 f"field '{name}' is required")
        properties = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            unknown = sorted(set(value) - set(properties))
            if unknown:
                return Violation(unknown[0], "additionalProperties",
                                 f"unknown field '{unknown[0]}'; accepted fields: {', '.join(properties)}")
        for name, sub in properties.items():
            if name in value:
                path = name if field == "(body)" else f"{field}.{name}"
                if (v := validate(value[name], sub, path)) is not None:
                    return v
    elif expected == "array":
        if "minItems" in schema and len(value) < schema["minItems"]:
            return Violation(field, "minItems", f"field '{field}' must hold at least {schema['minItems']} "
                                                f"item(s), got {len(value)}")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            return Violation(field, "maxItems", f"field '{field}' holds {len(value)} items, over the limit "
                                                f"{_limit(schema, 'maxItems')}; split the request")
        if "items" in schema:
            for i, item in enumerate(value):
                if (v := validate(item, schema["items"], f"{field}[{i}]")) is not None:
                    return v
    elif expected == "string":
        if "minLength" in schema and len(value) < schema["minLength"]:
            return Violation(field, "minLength", f"field '{field}' must not be empty")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return Violation(field, "maxLength", f"field '{field}' is {len(value)} characters, over the limit "
                                                 f"{_limit(schema, 'maxLength')}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON allows "\ud800"; Python keeps it; a tokenizer cannot
            return Violation(field, "type", f"field '{field}' holds an unpaired UTF-16 surrogate at "
                                            f"character {e.start}; send valid Unicode text")
    return None


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One route of the HTTP API, declared once: Flask registers it, / lists it, /openapi.json describes it."""

    method: str  # "GET" or "POST"
    path: str
    summary: str  # one line, for the OpenAPI document
    handler: Callable[..., Any]  # handler(service) or, with `request`, handler(service, validated JSON body)
    request: str | None = None  # the component schema the JSON body must match (see `components`)
    response: dict[str, Any] | None = None  # schema of the 200 answer
    response_description: str = "OK"
    content_type: str = "application/json"  # of the 200 answer
    errors: tuple[int, ...] = ()  # error statuses it may answer, documented with the reasons below
    admin: bool = False  # listed in the index only when an admin token is configured

    @property
    def name(self) -> str:
        return f"{self.method} {self.path}"


def components(max_texts: int, max_chars: int) -> dict[str, dict[str, Any]]:
    """The named schemas, the request ones with the server's limits in them."""
    return {"PredictRequest": predict_request(max_chars), "BatchRequest": batch_request(max_texts, max_chars),
            "Prediction": PREDICTION, "PredictResponse": PREDICT_RESPONSE, "BatchResponse": BATCH_RESPONSE,
            "Error": ERROR_RESPONSE}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


ERROR_REASONS = {
    400: "malformed JSON, wrong type, unknown field or a bad routing key (key_too_long, empty_key; the message "
         "names the field)",
    401: "no 'Authorization: Bearer <token>' header", 403: "wrong admin token",
    404: "admin endpoints are off (no admin token configured)",
    409: "reload refused: the source cannot be resolved, or a reload is already running",
    413: "body, text count or text length over a limit, or (code text_too_long) a text longer than the model "
         "reads under long_text=chunks with chunk_overflow=refuse (the message names it)",
    415: "Content-Type is not application/json", 422: "empty text or empty list",
    429: "rate limit exceeded; see Retry-After",
    503: "not ready, queue full or shutting down; see Retry-After"}


def _operation(endpoint: Endpoint) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": endpoint.response_description}
    if endpoint.response is not None:
        ok["content"] = {endpoint.content_type: {"schema": endpoint.response}}
    operation: dict[str, Any] = {"summary": endpoint.summary, "responses": {"200": ok, **{
        str(s): {"description": ERROR_REASONS[s], **_json_body(ref("Error"))} for s in endpoint.errors}}}
    if endpoint.request is not None:
        operation["requestBody"] = {"required": True, **_json_body(ref(endpoint.request))}
    return operation


def openapi_document(endpoints: Sequence[Endpoint], max_texts: int, max_chars: int, version: str) -> dict[str, Any]:
    """OpenAPI 3.1 description of `endpoints`, built from the same dicts that validate requests."""
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(endpoint)
    return {
        "openapi": "3.1.0",
        "info": {"title": "jaxclf text classifier", "version": version,
                 "description": "Classify texts with a jaxclf model. Every response carries X-Request-ID."},
        "paths": paths,
        "components": {"schemas": components(max_texts, max_chars)},
    }
