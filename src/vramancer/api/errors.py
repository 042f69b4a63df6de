"""Every error leaves the API as ``{"error": {"code", "message", ...}}``: a 4xx, or 503 (a backend
or the daemon unavailable), 504 (timeout), 507 (disk full)."""

from __future__ import annotations

import sqlite3
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vramancer.errors import VramancerError, disk_full_error, is_disk_full


def error_body(code: str, message: str, **details: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **details}}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **details: Any
) -> JSONResponse:
    return JSONResponse(error_body(code, message, **details), status_code=status, headers=headers)


#: Messages for whole-body problems, which pydantic words for Python objects.
_BODY_MESSAGES = {
    "json_invalid": "not valid JSON",
    "model_attributes_type": "expected a JSON object (and Content-Type: application/json)",
    "dict_type": "expected a JSON object (and Content-Type: application/json)",
    "missing": "a JSON body is required",
}


#: A 422 describes at most this many problems, each in at most this many characters: it never
#: echoes a large body back (the rest is counted in ``errors_total``).
MAX_REPORTED_ERRORS = 20
MAX_PART_CHARS = 300


def _short(text: str, limit: int = MAX_PART_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(errors: list[Any]) -> str:
    parts = []
    for err in errors[:MAX_REPORTED_ERRORS]:
        raw = err.get("loc", ())
        loc = [_short(str(p), 80) for p in raw if p not in ("body", "query", "path", "header")]
        kind = err.get("type")
        if raw and raw[0] == "body" and (kind == "json_invalid" or len(raw) == 1):
            reason = (err.get("ctx") or {}).get("error")
            msg = _BODY_MESSAGES.get(str(kind), str(err.get("msg", "invalid")))
            parts.append(_short(f"body: {msg}" + (f" ({reason})" if reason else "")))
            continue
        where = ".".join(loc) or "body"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(_short(f"{where}: {msg}"))
    if len(errors) > MAX_REPORTED_ERRORS:
        parts.append(f"and {len(errors) - MAX_REPORTED_ERRORS} more")
    return "; ".join(parts) or "invalid request"


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    shown = errors[:MAX_REPORTED_ERRORS]
    fields = [_short(".".join(str(p) for p in e.get("loc", ()))) for e in shown]
    total = {"errors_total": len(errors)} if len(errors) > len(shown) else {}
    return error_response(422, "invalid_request", _describe(errors), None, fields=fields, **total)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
}


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers) if exc.headers else None
    return error_response(
        exc.status_code,
        _HTTP_CODES.get(exc.status_code, "http_error"),
        str(exc.detail),
        headers=headers,
    )


async def _library(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, VramancerError)
    details = {k: v for k, v in exc.details.items() if _jsonable(v)}
    return error_response(exc.http_status, exc.code, exc.message, **details)


def _jsonable(value: Any) -> bool:
    return isinstance(value, str | int | float | bool | list | dict) or value is None


async def _disk_full(request: Request, exc: Exception) -> JSONResponse:
    """A full disk met outside the block store (the task queue's database, a task log) is a
    JSON 507 like the store's own; any other I/O error stays a 500."""
    if not is_disk_full(exc):
        raise exc
    return await _library(request, disk_full_error(exc, "the daemon's state"))


def install(app: FastAPI) -> None:
    app.add_exception_handler(OSError, _disk_full)
    app.add_exception_handler(sqlite3.Error, _disk_full)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(VramancerError, _library)
