"""The errors a user can cause. Raised before any compute, with an actionable message."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class LmlabError(Exception):
    """Base class for errors caused by user input (config or data), not by lmlab bugs."""


class ConfigError(LmlabError, ValueError):
    """A config field holds a value that cannot work.

    The message always names the field, the bad value and what would be valid, so the user can
    fix the override without reading a stack trace.
    """

    def __init__(self, field: str, value: Any, valid: str | Iterable[Any] | None = None, reason: str = ""):
        self.field = field
        self.value = value
        if valid is not None and not isinstance(valid, str):
            valid = ", ".join(repr(v) for v in valid)
        self.valid = valid
        self.reason = reason
        msg = f"{field}={value!r}"
        if reason:
            msg += f": {reason}"
        if valid:
            msg += f" (valid: {valid})"
        super().__init__(msg)


class DataError(LmlabError, ValueError):
    """Input data is missing, empty, undecodable or inconsistent. Names the file (and line)."""

    def __init__(self, path: Any, reason: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {reason}")


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(field, value, choices, "unknown option")
