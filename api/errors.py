"""Errors → one JSON shape: ``{"status_code": 4xx, "detail": "<field>: <expectation>", "field": "<field>"}``.

User errors (bad bodies, unknown ids, a run that is not there) map to 4xx once, here. Anything else
is a bug or an outage: the client gets a generic 500 and the traceback goes to the server log only.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from typing import Any

import msgspec
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.utils.scope.state import ScopeState  # the request's cached body; pinned in constraints.txt

from api.schemas import API_REFUSED, API_TYPE_HINTS, ErrorBody
from catalog.errors import CatalogReadOnly
from sae_discover.errors import USER_ERRORS, CatalogLocked

log = logging.getLogger("sae_discover.api")
UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")  # msgspec's wording for a body key it refuses
# msgspec's wording for a JSON integer beyond 64 bits, and for a number beyond a float's range (1e400)
OUT_OF_RANGE = ("Integer value out of range", "Number out of range")


class ApiError(Exception):
    """An error a handler raises on purpose (e.g. 404 for a run that is not in the catalog)."""

    def __init__(self, status_code: int, field: str | None, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.status_code = status_code
        self.field = field


def refuse_repeated_query(request: Request, single: Iterable[str]) -> None:
    """A query parameter that takes one value given twice (``?limit=5&limit=1``) is a 400 naming it,
    rather than one of the two silently winning."""
    repeated = sorted(name for name in single if len(request.query_params.getall(name, [])) > 1)
    if repeated:
        raise ApiError(400, repeated[0], "given more than once; it takes one value")


def error_response(status_code: int, detail: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    return Response(ErrorBody(status_code=status_code, detail=detail, field=field), status_code=status_code,
                    media_type=MediaType.JSON, headers=headers)


def _top_level(key: str) -> str:
    return re.split(r"[\[.]", key, maxsplit=1)[0] or key


def _literal_values(kind: msgspec.inspect.Type) -> tuple | None:
    """The values of the first ``Literal`` in a type (through Optional, lists and constraints)."""
    if isinstance(kind, msgspec.inspect.LiteralType):
        return kind.values
    inner = getattr(kind, "type", None) or getattr(kind, "item_type", None)  # Metadata, list/set items
    members = [inner] if inner is not None else list(getattr(kind, "types", ()) or ())  # Union, tuple
    return next((v for v in map(_literal_values, members) if v), None)


def _choices(request: Request, name: str) -> tuple | None:
    """The values body field or query parameter ``name`` of this route takes, where it has a fixed set:
    what a refused value's error lists (msgspec's own message names only the value)."""
    params = request.route_handler.parsed_fn_signature.parameters
    body = params.get("data")
    info = msgspec.inspect.type_info(body.annotation) if body is not None else None
    field = next((f for f in getattr(info, "fields", ()) if f.name == name), None)
    if field is not None:
        return _literal_values(field.type)
    if name in params:
        return _literal_values(msgspec.inspect.type_info(params[name].annotation))
    return None


def on_validation(request: Request, exc: ValidationException) -> Response:
    """Litestar's body/query/path validation (first error, as Litestar reports it) in our shape."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    first = extra[0] if extra and isinstance(extra[0], dict) else {}
    key, message = str(first.get("key") or ""), str(first.get("message") or exc.detail)
    unknown = UNKNOWN_FIELD.search(message)
    if unknown:  # in a nested object, msgspec's key is the object's path (prompts[0]): name the field in it
        name = unknown.group(1)
        key = f"{key}.{name}" if key and key != "data" else name
        message = API_REFUSED.get(key, "unknown field; the request schema is at /schema/openapi.json")
    elif key in API_TYPE_HINTS and message.endswith(f"got `{API_TYPE_HINTS[key][0]}`"):
        message = API_TYPE_HINTS[key][1]
    elif message.startswith("Invalid enum value ") and (choices := _choices(request, _top_level(key))):
        message = f"expected one of {', '.join(map(str, choices))}, got {message.removeprefix('Invalid enum value ')}"
    if not key or key == "data":
        key = "body"
    return error_response(400, f"{key}: {message}", _top_level(key))


def _holds(value: Any, marker: object) -> bool:
    if value is marker:
        return True
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return any(_holds(v, marker) for v in items)


def huge_number_field(body: bytes) -> str | None:
    """The top-level field of a JSON body that holds an integer beyond 64 bits or a number beyond a float's
    range, which the decoder refuses naming only ``$[...]``: the body read again by Python's parser, which
    hands over numbers as text."""
    marker = object()

    def parse_int(text: str) -> object:
        return marker if len(text) > 20 or not -2**63 <= int(text) < 2**64 else 0

    def parse_float(text: str) -> object:
        return marker if math.isinf(float(text)) else 0.0

    try:
        data = json.loads(body, parse_int=parse_int, parse_float=parse_float)
    except (ValueError, RecursionError):
        return None
    fields = [k for k, v in data.items() if _holds(v, marker)] if isinstance(data, dict) else []
    return fields[0] if fields else None


def on_http(request: Request, exc: HTTPException) -> Response:
    """Routing and protocol errors (404 no route, 405, 413 body too large, ...) keep their status."""
    if exc.status_code >= 500:
        log.error("HTTP %s: %s", exc.status_code, exc.detail)
        return error_response(exc.status_code, "internal error; see the server log")
    if exc.status_code == 413:
        return error_response(413, f"body: larger than this server accepts ({exc.detail})", "body")
    if exc.status_code == 400 and any(words in str(exc.detail) for words in OUT_OF_RANGE):
        body = ScopeState.from_scope(request.scope).body
        field = huge_number_field(body) if isinstance(body, bytes) else None
        if field is not None:
            return error_response(400, f"{field}: expected a number within range (an integer that fits in 64 "
                                       "bits, a float below 1.8e308)", field)
    if exc.status_code == 400:  # malformed JSON
        return error_response(400, f"body: expected valid JSON ({exc.detail})", "body")
    allow = (exc.headers or {}).get("allow")  # a 405 says which methods the path takes (RFC 9110)
    return error_response(exc.status_code, str(exc.detail), headers={"Allow": allow} if allow else None)


def _said(request: Request, exc: Exception) -> str:
    """An error's message as a client reads it: without the server's paths (the catalog file, the
    registry's folders and corpora: ``ApiService.redact``)."""
    service = getattr(request.app.state, "service", None)
    return service.redact(str(exc)) if service is not None else str(exc)


def on_api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc.status_code, _said(request, exc), exc.field)


def on_user_error(request: Request, exc: Exception) -> Response:
    """Any user error: it carries its field (``exc.field``) and says what was expected."""
    field = getattr(exc, "field", None)
    return error_response(400, _said(request, exc), _top_level(field) if field else None)


def on_read_only(request: Request, exc: CatalogReadOnly) -> Response:
    """A request that would write to a read-only catalog (``serve --read_only``): 409, the server's state
    conflicts with it; the same request is answered by a server that can write."""
    return error_response(409, _said(request, exc), exc.field)


def on_locked(_: Request, exc: CatalogLocked) -> Response:
    log.error("catalog locked: %s", exc)
    return error_response(503, "catalog: held by another process; try again later")


def on_undecodable(request: Request, exc: Exception) -> Response:
    """A body the JSON decoder cannot read: bytes that are not UTF-8, or nesting deeper than it recurses
    (msgspec raises these itself, before validation). Any other such error is a bug: a 500."""
    if isinstance(exc, UnicodeDecodeError):
        return error_response(400, f"body: not UTF-8 text (byte {exc.start})", "body")
    if "deserializing" in str(exc):
        return error_response(400, "body: JSON nested too deeply", "body")
    return on_unexpected(request, exc)


def on_unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error; see the server log")


EXCEPTION_HANDLERS = {
    ValidationException: on_validation,
    HTTPException: on_http,
    ApiError: on_api_error,
    **{error: on_user_error for error in USER_ERRORS},
    CatalogReadOnly: on_read_only,
    CatalogLocked: on_locked,
    UnicodeDecodeError: on_undecodable,
    RecursionError: on_undecodable,
    Exception: on_unexpected,
}
