"""How the service answers: JSON bodies, and errors as {"error": {"code", "message"}} with a status."""

from __future__ import annotations

import json
import math
from typing import Any

from flask import Response

RETRY_AFTER_S = 1  # what 503 and 429 tell clients to wait, in seconds (when no better estimate exists)


class ApiError(Exception):
    """An error answered as JSON {"error": {"code", "message"}} with `status` (and Retry-After if given)."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


def json_response(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json")


def error_response(status: int, code: str, message: str, retry_after: float | None = None) -> Response:
    response = json_response({"error": {"code": code, "message": message}}, status)
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return response
