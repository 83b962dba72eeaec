"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

``param`` names the request field at fault (``messages[0].content`` for a nested one), so
a client can tell its user what to fix; the official ``openai`` client raises
``BadRequestError`` for a 400 and exposes this body.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.param, self.code, self.kind)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "tuple", "set"}


def error_body(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


def field_path(loc: tuple) -> str | None:
    """pydantic's error location -> OpenAI's field name: ('body', 'messages', 0, 'role') -> messages[0].role."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not isinstance(p, str) or "[" in p or p in TYPE_TAGS:
            continue  # pydantic's names for the branches of a union, not fields
        else:
            out += f".{p}" if out else p
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return bad_request(f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})",
                           None, "invalid_json")
    param = field_path(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if param is None:  # the body itself: not JSON (or not sent as JSON), or not an object
        return bad_request(f"the request body must be a JSON object of the request's fields ({message})", None,
                           "invalid_json")
    if first.get("type") == "missing":
        message = f"missing required field {param!r}"
    elif first.get("type") == "extra_forbidden":
        message = f"unrecognized request field {param!r}"
    elif param:
        message = f"{param}: {message}"
    return bad_request(message, param, "missing_required_parameter" if first.get("type") == "missing" else
                       "unknown_parameter" if first.get("type") == "extra_forbidden" else "invalid_value")


def install_handlers(app, on_invalid=None) -> None:
    """Every error the app returns, including FastAPI's own, in OpenAI's shape;
    ``on_invalid(request)`` hears of each body that failed validation (for metrics)."""

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        if on_invalid is not None:
            on_invalid(request)
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), None, None, kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))
