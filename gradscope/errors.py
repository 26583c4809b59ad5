"""Errors that gradscope raises on bad input.

Every message repeats the bad value and says how to fix it; the CLI turns a ``GradscopeError`` into one line
on stderr and exit status 2.
"""
from __future__ import annotations


class GradscopeError(Exception):
    """Base class for every error gradscope raises on purpose (bad input, unusable setup)."""


class SelectorError(GradscopeError, ValueError):
    """A block selector that is malformed or matches no module."""


class ModelError(GradscopeError, ValueError):
    """A model that cannot be built, imported, or run on the given input."""


class DataError(GradscopeError, ValueError):
    """A data set that is missing or malformed."""


class OutputError(GradscopeError, OSError):
    """An output folder that cannot be written."""

    @classmethod
    def for_report(cls, out: object, exc: OSError) -> "OutputError":
        """The one-line error of a report that could not be written: the folder, why, and the file when known (a
        full disk's error names the file only through :func:`gradscope.store.atomic_write`)."""
        where = f" (writing {exc.filename})" if exc.filename else ""
        return cls(f"cannot write the report to {str(out)!r}: {exc.strerror or exc}{where}")
