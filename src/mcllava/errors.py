"""Errors that mcllava raises for bad user input and bad concept banks.

Every message names the offending file and says what is wrong in plain words, so that a user can fix the
problem without reading a traceback. The concrete errors are also ``ValueError``s, so generic callers that
catch ``ValueError`` keep working.
"""

from __future__ import annotations


class McLlavaError(Exception):
    """Base class of every error mcllava raises on purpose."""


class ConceptError(McLlavaError, ValueError):
    """A concept folder (ids, ``concept.yaml``, images or masks) is invalid.

    ``problems`` lists each problem on its own (``"<path>: <what is wrong>"``) when one error reports several.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems) if problems else [message]


class BankError(McLlavaError, ValueError):
    """A concept bank cannot be saved, loaded, merged or used with this base model."""
