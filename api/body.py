"""Checks of a request body before Litestar reads it into the route's type.

Litestar converts a decoded body to the route's type leniently (``msgspec.convert(..., strict=False)``,
which its query and path parameters need): ``"return_top_x": "3"``, ``"merge_across_layers": 1`` or
``"layers": ["2"]`` would pass, although the OpenAPI schema says integer and boolean. A client that sends
those has a bug the server should name, so each body is also decoded strictly here; a value that only
the lenient conversion accepts is a 400 naming its field. Everything else (malformed JSON, unknown
fields, bounds) is left to Litestar and :mod:`api.errors`, which name the field as for every body.

The body must be sent as JSON (``Content-Type: application/json``): a browser sends a cross-site
``text/plain`` POST without asking the server first (no CORS preflight), so a web page could otherwise
make a visitor's browser start runs or replace labels on a server on their machine.
"""

from __future__ import annotations

import re

import msgspec
from litestar import Request
from litestar.exceptions import ValidationException

from api.errors import ApiError

JSON_MEDIA_TYPE = re.compile(r"^application/([\w.-]+\+)?json\s*(;|$)", re.IGNORECASE)
AT_PATH = re.compile(r"^(?P<what>.*) - at `\$(?P<path>.*)`$")


async def check_body(request: Request) -> None:
    """Before a route that reads a body: JSON sent as JSON (415 otherwise), not empty (400 naming
    ``body``), and of the schema's JSON types (400 naming the field whose value only converts)."""
    body_field = request.route_handler.parsed_fn_signature.parameters.get("data")
    if body_field is None:
        return
    media_type = request.headers.get("content-type", "")
    if not JSON_MEDIA_TYPE.match(media_type.strip()):
        got = repr(media_type) if media_type else "none"
        raise ApiError(415, "content-type", f"expected application/json, got {got}: the body is a JSON object")
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "body", "expected a JSON object, got an empty body")
    try:
        msgspec.json.decode(raw, type=body_field.annotation, strict=True)
    except msgspec.ValidationError as strict_error:
        try:
            msgspec.json.decode(raw, type=body_field.annotation, strict=False)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return  # refused either way: Litestar says so, naming the field
        raise _type_error(str(strict_error)) from None
    except msgspec.DecodeError:
        return  # malformed JSON: Litestar's answer (api.errors.on_http)


def _type_error(message: str) -> ValidationException:
    """msgspec's ``Expected `int`, got `str` - at `$.layers[0]``` as the validation error
    :func:`api.errors.on_validation` turns into the API's 400 (``layers[0]: expected int, got str ...``)."""
    match = AT_PATH.match(message)
    key = match["path"].lstrip(".") if match else ""
    what = (match["what"] if match else message).replace("`", "")
    text = f"{what[:1].lower()}{what[1:]} (a JSON value of the schema's type: no numbers or booleans in strings)"
    return ValidationException(detail=text, extra=[{"key": key, "message": text}])
