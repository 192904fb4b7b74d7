"""Responses that always render, and the app's error handlers.

`SafeJSONResponse` is the app's response class: ASCII-only JSON, so a lone surrogate that reached the database
before the edge refused them (or through a data set) is sent as the escape `\\ud800`, which JSON allows and any
parser reads back, instead of failing the UTF-8 encoding with a 500 for everyone who lists jobs; a NaN that slipped
past the schemas becomes null. The handlers answer validation errors without echoing the input (pydantic's
`input` can be anything a client sent), HTTP errors in OpenAI's shape under `/v1` (an unknown `/v1` path too), and
anything unexpected with a one-line 500 whose traceback goes to the log.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.utils import is_body_allowed_for_status_code
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend.api.middleware import error_body, is_openai_path
from backend.api.schemas import jsonable

logger = logging.getLogger("edgerlhf.backend")


def render_json(content: Any) -> bytes:
    """`content` as ASCII JSON; non-finite floats as null, anything JSON has no type for as its `str`."""
    try:
        text = json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":"), default=str)
    except ValueError:  # NaN or infinity
        text = json.dumps(jsonable(content), ensure_ascii=True, allow_nan=False, separators=(",", ":"), default=str)
    return text.encode("ascii")


class SafeJSONResponse(JSONResponse):
    """A JSON response whose rendering cannot fail on its content (see the module docstring)."""

    def render(self, content: Any) -> bytes:
        return render_json(content)


def validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """FastAPI's errors with `loc`, `msg` and `type` only: no `input` (it is the client's own, and may be large or
    unencodable) and no `ctx`."""
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()]


def install_error_handlers(app: FastAPI) -> None:
    """The app's handlers for validation errors, HTTP errors and unexpected exceptions."""

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> SafeJSONResponse:
        errors = validation_errors(exc)
        if is_openai_path(request.url.path):  # a /v1 route answers its own; this is a path no route declares
            first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
            return SafeJSONResponse(error_body(request.url.path, f"Invalid value for "
                                               f"'{'.'.join(map(str, first['loc']))}': {first['msg']}."), 400)
        return SafeJSONResponse({"detail": errors}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = getattr(exc, "headers", None)
        if not is_body_allowed_for_status_code(exc.status_code):
            return Response(status_code=exc.status_code, headers=headers)
        if is_openai_path(request.url.path):
            message = exc.detail if isinstance(exc.detail, str) else render_json(exc.detail).decode()
            return SafeJSONResponse(error_body(request.url.path, message, status=exc.status_code), exc.status_code,
                                    headers=headers)
        return SafeJSONResponse({"detail": exc.detail}, exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> SafeJSONResponse:
        logger.error(f"{request.method} {request.url.path} failed", exc_info=exc)
        return SafeJSONResponse(error_body(request.url.path, "internal server error", status=500), 500)
