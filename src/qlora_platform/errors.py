"""The one exception type that reaches the user as a clean message.

Anything raised as `UserError` is printed by `cli.main` as a single line
(`error: ...`) with a non-zero exit code, never a traceback. Raise it at the
edges (files, configs, requests) with what went wrong, where, and how to fix it.
"""

from __future__ import annotations

import difflib


class UserError(Exception):
    """A problem the user can fix: bad input, a missing file, an impossible config."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
