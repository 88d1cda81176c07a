"""User errors: each names the field that was wrong, as data (``.field``, ``.message``), never parsed from text.

Every layer raises its own class with the same two attributes — ``catalog`` and ``ingest`` cannot import
this package (one direction), so :data:`USER_ERRORS` lists them all for the front doors, which map any
of them to "``error: <field>: <message>``" (CLI, exit 2) or a 4xx naming the field (API).
"""

from __future__ import annotations

from catalog.errors import CatalogError, CatalogLocked
from ingest.errors import ModelError, SAEError  # torch-free: light commands import this module


class UserError(ValueError):
    """A request field with a bad value: ``field`` names it, ``message`` says what was expected."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class RequestError(UserError):
    """A field of a request (discovery, drift, re-rank, a command line) that is refused before any work."""


USER_ERRORS: tuple[type[Exception], ...] = (UserError, CatalogError, SAEError, ModelError)
"""Every error a user can cause; anything else is a bug (a traceback in the CLI, a 500 in the API)."""

__all__ = ["USER_ERRORS", "CatalogLocked", "RequestError", "UserError"]
