"""Server errors stage: exceptions and pydantic failures in, OpenAI/vLLM-shaped JSON error responses out."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

# status -> OpenAI/vLLM error `type`
_TYPES = {
    400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
    413: "RequestTooLargeError", 415: "BadRequestError", 429: "RateLimitError", 500: "InternalServerError",
    501: "NotImplementedError", 503: "ServiceUnavailableError",
}


class ClientGone(Exception):
    """The HTTP client disconnected while its request was in the engine (the request was aborted)."""


class OpenAIError(Exception):
    """An error that becomes `{"error": {message, type, param, code}}` with HTTP `status`."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None, err_type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.err_type = err_type or _TYPES.get(status, "BadRequestError")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, param=self.param, err_type=self.err_type)


def error_body(message: str, status: int, *, param: str | None = None, err_type: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type or _TYPES.get(status, "BadRequestError"),
                      "param": param, "code": status}}


def error_response(err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def validation_error(errors: list[dict[str, Any]]) -> OpenAIError:
    """pydantic errors -> vLLM's 400 "N validation error(s)" with `param` = dotted path of the first field."""
    lines = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        path = ".".join(loc) or "body"
        msg = str(e.get("msg", "invalid value"))
        lines.append(f"  {{'type': {e.get('type')!r}, 'loc': {path!r}, 'msg': {msg!r}, "
                     f"'input': {_short(e.get('input'))}}}")
    first = [str(x) for x in errors[0].get("loc", ()) if x != "body"] if errors else []
    n = len(errors)
    message = f"{n} validation error{'s' if n != 1 else ''}:\n" + "\n".join(lines)
    return OpenAIError(message, 400, param=".".join(first) or None, err_type="Bad Request")


def from_pydantic(exc: ValidationError) -> OpenAIError:
    return validation_error([dict(e) for e in exc.errors(include_url=False)])


def parse_json_body(raw: bytes, content_type: str | None) -> Any:
    """Bytes of a request body -> JSON value; wrong content type, bad UTF-8 and bad JSON are 400s."""
    if content_type is not None and content_type.split(";")[0].strip().lower() not in ("application/json", ""):
        raise OpenAIError(f"Unsupported Media Type: {content_type!r}; send the body as JSON with "
                          "'Content-Type: application/json'", 400, err_type="Bad Request")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OpenAIError(f"The request body is not valid UTF-8 (byte {e.start}): send JSON encoded as UTF-8",
                          400, err_type="Bad Request") from None
    if not text.strip():
        raise OpenAIError("The request body is empty: send a JSON object", 400, err_type="Bad Request")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise OpenAIError(f"The request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                          400, err_type="Bad Request") from None
    except RecursionError:
        raise OpenAIError("The request body nests JSON too deeply", 400, err_type="Bad Request") from None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error([dict(e) for e in exc.errors()]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = {404: "Not Found: no such route", 405: "Method Not Allowed"}.get(exc.status_code, str(exc.detail))
        return error_response(OpenAIError(msg, exc.status_code, headers=getattr(exc, "headers", None)))

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody is left to read it

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return error_response(OpenAIError(f"Internal server error: {type(exc).__name__}: {exc}", 500))
