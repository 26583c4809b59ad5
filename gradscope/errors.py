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
