"""Validation of build options: one place that turns a bad value into a ModelError naming it and the fix."""
from __future__ import annotations

from typing import Any, TypeVar

from gradscope.errors import ModelError

T = TypeVar("T")


def check_choice(option: str, value: T, choices: tuple[Any, ...]) -> T:
    """Return ``value`` if it is one of ``choices``, else raise a ModelError naming the option and the choices."""
    if value not in choices:
        raise ModelError(f"{option}={value!r} is not supported; use one of {', '.join(map(repr, choices))}")
    return value


def check_positive(option: str, value: Any) -> int:
    """Return ``value`` if it is a positive int (not a bool), else raise a ModelError."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelError(f"{option}={value!r} must be a positive integer")
    return value


def check_bool(option: str, value: Any) -> bool:
    """Return ``value`` if it is a bool, else raise a ModelError (a string such as "False" is truthy)."""
    if not isinstance(value, bool):
        raise ModelError(f"{option}={value!r} must be True or False")
    return value
