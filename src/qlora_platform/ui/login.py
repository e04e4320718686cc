"""Who may use the UI: `--auth USER:PASS`, `$QLORA_UI_AUTH` or `--auth-file`, checked at start-up.

A credential source that is given but empty (an empty file, `QLORA_UI_AUTH=`, a password of
nothing) is an error, never a UI without a login.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError

ENV = "QLORA_UI_AUTH"


def parse_auth(text: str, source: str) -> tuple[str, str]:
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise UserError(f"{source}: give the login as USER:PASSWORD, both non-empty")
    return user, password


def gather_auth(cli_value: str | None, auth_file: str | None) -> tuple[str, str] | None:
    """The one login the UI asks for, or None when no source is given."""
    given = [
        (value, source)
        for value, source in (
            (cli_value, "--auth"),
            (os.environ.get(ENV), f"${ENV}"),
        )
        if value is not None
    ]
    if auth_file is not None:
        path = Path(auth_file)
        if not path.exists():
            raise UserError(f"--auth-file: '{auth_file}' does not exist; give a file holding USER:PASSWORD")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
            raise UserError(
                f"--auth-file: cannot read '{auth_file}' ({reason}); give a file holding USER:PASSWORD"
            ) from None
        given.append((text.strip(), f"--auth-file {auth_file}"))
    if len(given) > 1:
        raise UserError(f"the login is given twice ({' and '.join(s for _, s in given)}); keep one")
    return parse_auth(*given[0]) if given else None
