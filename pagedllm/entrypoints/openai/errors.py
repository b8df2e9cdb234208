"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` and their HTTP status.

Handlers raise `OpenAIError` (or a subclass); `install_error_handlers` turns it, FastAPI's
validation errors (folded into 400 like OpenAI), unknown routes and unexpected exceptions
into JSON bodies of that shape. A 500 is only returned for real server faults.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

# Status -> the `type` string of the error body (vLLM's spelling).
_ERROR_TYPES: dict[int, str] = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


class OpenAIError(Exception):
    """An error the client should see, with its HTTP status and the offending parameter."""

    status_code: int = HTTPStatus.BAD_REQUEST

    def __init__(self, message: str, *, param: str | None = None,
                 status_code: int | None = None, err_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if status_code is not None:
            self.status_code = int(status_code)
        self.err_type = err_type or error_type(self.status_code)

    def to_response(self) -> ErrorResponse:
        return make_error(self.message, self.status_code, param=self.param,
                          err_type=self.err_type)


class BadRequestError(OpenAIError):
    status_code = HTTPStatus.BAD_REQUEST


class NotFoundError(OpenAIError):
    status_code = HTTPStatus.NOT_FOUND


class AuthenticationError(OpenAIError):
    status_code = HTTPStatus.UNAUTHORIZED


class RequestTooLargeError(OpenAIError):
    """A body or prompt over the server's size limits (413)."""

    status_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


def error_type(status_code: int) -> str:
    """The `type` string used for an HTTP status."""
    if status_code in _ERROR_TYPES:
        return _ERROR_TYPES[status_code]
    return "BadRequestError" if 400 <= status_code < 500 else "InternalServerError"


def make_error(message: str, status_code: int, *, param: str | None = None,
               err_type: str | None = None) -> ErrorResponse:
    """Build an OpenAI-shaped error body."""
    return ErrorResponse(error=ErrorInfo(
        message=message,
        type=err_type or error_type(status_code),
        param=param,
        code=int(status_code),
    ))


def error_json(message: str, status_code: int, *, param: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-shaped error as a JSON response."""
    body = make_error(message, status_code, param=param)
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


def internal_error_message(exc: BaseException) -> str:
    """What a client is told about an unexpected fault (details stay in the server log)."""
    return f"Internal server error ({type(exc).__name__}); see the server log for details."


def _format_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Turn pydantic/FastAPI error dicts into one readable message and the first param."""
    parts: list[str] = []
    param: str | None = None
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        # Drop pydantic's union-member tags such as 'str' or 'list[int]' from the location.
        loc = [p for p in loc if not _is_type_tag(p)]
        where = ".".join(loc)
        if not loc and err.get("type") in ("model_attributes_type", "dict_type", "missing"):
            parts.append("The request body must be a JSON object; send it with "
                         "'Content-Type: application/json'.")
            continue
        if err.get("type") == "json_invalid":
            msg = f"Request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}"
            parts.append(msg)
            continue
        if param is None and where:
            param = where
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    if len(errors) > 5:
        parts.append(f"... and {len(errors) - 5} more errors")
    # A union produces one error per member; keep each message once.
    unique = list(dict.fromkeys(parts))
    return "Invalid request: " + "; ".join(unique), param


def _is_type_tag(part: str) -> bool:
    return part in {"str", "int", "float", "bool"} or "[" in part or part.startswith(
        ("function-", "json-", "union["))


async def _openai_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return JSONResponse(exc.to_response().model_dump(), status_code=exc.status_code,
                        headers=headers)


async def _validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = _format_validation_errors(list(exc.errors()))
    return error_json(message, HTTPStatus.BAD_REQUEST, param=param)


async def _http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"Not found: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_json(message, exc.status_code, headers=getattr(exc, "headers", None))


async def _unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    if type(exc).__name__ == "EngineDeadError":  # logged once, where the core was lost
        return error_json(str(exc), HTTPStatus.INTERNAL_SERVER_ERROR)
    logger.exception("Unhandled error in %s %s", request.method, request.url.path,
                     exc_info=exc)
    return error_json(internal_error_message(exc), HTTPStatus.INTERNAL_SERVER_ERROR)


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers so every error the app returns has the OpenAI shape."""
    app.add_exception_handler(OpenAIError, _openai_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(Exception, _unexpected_error_handler)
