"""One mapping from every failure to OpenAI-style error JSON and an HTTP status.

``{"error": {"message", "type", "param", "code"}}``; ``param`` names the field
(``attributes.verbosity``, ``messages.0.content``) so a caller can fix it.
A malformed request never becomes a 500.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from steerserve.attributes import InvalidAttribute
from steerserve.server.engines.base import (
    ContextLengthExceeded,
    EngineNotReady,
    EngineOverloaded,
    InvalidRequest,
)
from steerserve.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error with its HTTP status, raised anywhere in the serving layer."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None, type_: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _TYPES.get(status, "invalid_request_error")
        self.headers: dict[str, str] = {}

    def info(self) -> ErrorInfo:
        return ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=self.info()).model_dump()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


def model_not_found(model: str, known: list[str]) -> APIError:
    return APIError(
        404,
        f"the model {model!r} does not exist; served models: {', '.join(known) or 'none'}",
        param="model",
        code="model_not_found",
    )


def from_exception(exc: Exception) -> APIError:
    """Translate engine, codec and validation errors into :class:`APIError`."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthExceeded):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, InvalidAttribute):
        return APIError(400, str(exc), param=exc.field, code="invalid_attribute")
    if isinstance(exc, InvalidRequest):
        return APIError(400, str(exc), code="invalid_request")
    if isinstance(exc, EngineNotReady):
        return APIError(503, f"model not ready: {exc}", code="model_not_ready")
    if isinstance(exc, EngineOverloaded):
        error = APIError(429, f"server busy: {exc}", code="overloaded")
        error.headers["Retry-After"] = "1"
        return error
    if isinstance(exc, (ValidationError, RequestValidationError)):
        return _from_validation(exc.errors())
    logger.exception("internal error", exc_info=exc)
    return APIError(500, "internal server error", code="internal_error")


def _field_path(loc: tuple[Any, ...]) -> str:
    # FastAPI prefixes body fields with "body"; pydantic unions add type names we drop.
    parts = [str(p) for p in loc if p not in ("body",) and not str(p).startswith(("function-", "list["))]
    return ".".join(p for p in parts if p not in ("str", "int", "float", "bool", "dict", "list"))


def _from_validation(errors: list[dict[str, Any]]) -> APIError:
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, InvalidAttribute):
        return APIError(400, str(cause), param=cause.field, code="invalid_attribute")
    param = _field_path(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {message}", code="invalid_json")
    if first.get("type") == "missing":
        message = f"field required: {param}"
    return APIError(400, f"{param}: {message}" if param else message, param=param or None, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception through :func:`from_exception`."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        error = from_exception(exc)
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.count_request(getattr(request.state, "model_name", ""), error.status)
        return error.response()

    async def handle_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    app.add_exception_handler(APIError, handle)
    app.add_exception_handler(RequestValidationError, handle)
    app.add_exception_handler(ValidationError, handle)
    app.add_exception_handler(StarletteHTTPException, handle_http)
    app.add_exception_handler(Exception, handle)


def sse_error_frame(exc: Exception) -> str:
    """The one SSE frame a stream ends with when it fails midway (then ``[DONE]``)."""
    return f"data: {json.dumps(ErrorResponse(error=from_exception(exc).info()).model_dump())}\n\n"
