"""The catalog's errors. Each carries the field it is about as data (``.field``, ``.message``), so
callers map it to a CLI line or an API body without parsing text."""

from __future__ import annotations


class CatalogError(ValueError):
    """Bad input to a catalog operation: ``field`` names what was wrong, ``message`` what was expected.

    ``str(exc)`` is ``"<field>: <message>"``, the one-line form the CLI prints.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # pickles with both arguments (errors cross process boundaries in batch mode)
        return type(self), (self.field, self.message)


class UnknownRun(CatalogError):
    """No stored run has this id (or id prefix): the API answers 404, the CLI prints it like any bad input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)


class UnknownFeature(CatalogError):
    """The catalog holds no SAE with this id, hook or feature id (``field`` says which): the API answers
    404, the CLI prints it like any bad input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)


class LabelFileError(CatalogError):
    """A label file's content is wrong: ``field`` is the column or field of the file (``file`` for the
    file as a whole), the message says where (file and line). The CLI prints it as it is; the API, which
    took the file as a body field, names that field and keeps the column in the message."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)


class CatalogReadOnly(CatalogError):
    """The catalog is open read-only and the request needs to write (a new run, a calibration, labels):
    refused before any work is done. The CLI prints it like any bad input; the API answers 409."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)


class CatalogLocked(RuntimeError):
    """Another process holds the catalog file (DuckDB allows one writer per file). Not a bad request:
    the CLI exits with its own status and the API answers 503."""

    field = "db"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):
        return type(self), (self.message,)


class CatalogWarning(UserWarning):
    """Something about the catalog file the user must hear but that does not stop the command (e.g. a
    write-ahead log whose last transaction was cut short by a crash). The CLI prints it as one line."""


def hooks_text(hooks) -> str:
    """(layer, stream) pairs as a message says them: ``layer 1 resid_pre, layer 2 mlp_out`` (sorted), or
    ``none`` — never Python's text of a list of tuples."""
    return ", ".join(f"layer {layer} {stream}" for layer, stream in sorted(set(hooks))) or "none"


def listed(values, limit: int) -> str:
    """Values as a message lists them: the first ``limit``, comma-separated, then ``…`` if there are more."""
    values = list(values)
    return ", ".join(map(str, values[:limit])) + (", …" if len(values) > limit else "")
