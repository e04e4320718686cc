"""API keys of the server: where they come from, and a constant-time check.

    keys = ApiKeys.gather(cli_keys=["k1"], key_file="keys.txt")   # + $QLORA_API_KEYS / $QLORA_API_KEY
    keys.allows(request_headers)                                   # Bearer or X-Api-Key

Only SHA-256 digests are kept in memory. A presented key is hashed and compared with
`hmac.compare_digest` against every stored digest, without stopping at the first
match, so neither the comparison nor the number of keys leaks through timing.
A key file holds one key per line; blank lines and `#` comments are skipped.

A key source that is given but holds no key (`--api-key "$KEY"` with KEY unset, an
empty or comment-only key file, QLORA_API_KEYS set to nothing) is a startup error:
serving without keys must be a choice (no key source at all), never an accident.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import UserError

ENV_KEYS = ("QLORA_API_KEYS", "QLORA_API_KEY")  # comma-separated / a single key


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    def __init__(self, keys: list[str]):
        cleaned = [k.strip() for k in keys if k and k.strip()]
        for k in cleaned:
            if len(k) < 8:
                raise UserError("an API key must be at least 8 characters (use 'openssl rand -hex 24' for one)")
        self._digests = [_digest(k) for k in dict.fromkeys(cleaned)]

    @classmethod
    def gather(
        cls, cli_keys: list[str] | None = None, key_file: str | None = None, environ: Mapping[str, str] | None = None
    ) -> ApiKeys:
        """Keys from --api-key (each), $QLORA_API_KEYS (comma-separated), $QLORA_API_KEY and a key
        file; UserError when any of these is given yet yields no key."""
        env: Mapping[str, str] = os.environ if environ is None else environ
        sources: list[tuple[str, list[str], str]] = []
        for given in cli_keys or []:
            sources.append(
                (
                    "--api-key",
                    [given],
                    "the value is empty (an unset shell variable?); pass the key itself, or use "
                    "$QLORA_API_KEYS or --api-key-file",
                )
            )
        if ENV_KEYS[0] in env:
            sources.append(
                (
                    f"${ENV_KEYS[0]}",
                    env[ENV_KEYS[0]].split(","),
                    "it is set but holds no key; set it to comma-separated keys or unset it",
                )
            )
        if ENV_KEYS[1] in env:
            sources.append((f"${ENV_KEYS[1]}", [env[ENV_KEYS[1]]], "it is set but empty; set it to a key or unset it"))
        if key_file:
            path = Path(key_file)
            if not path.is_file():
                raise UserError(f"API key file '{path}' does not exist")
            sources.append(
                (
                    f"API key file '{path}'",
                    [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")],
                    "it holds no key (only blank lines or # comments); put one key per line",
                )
            )
        keys = []
        for name, found, fix in sources:
            found = [k.strip() for k in found if k.strip()]
            if not found:
                raise UserError(f"{name} gives no API key: {fix}")
            keys += found
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    @staticmethod
    def presented(headers) -> str | None:
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip()
        return headers.get("x-api-key")

    def allows(self, headers) -> bool:
        if not self.enabled:
            return True
        key = self.presented(headers)
        if not key:
            return False
        given = _digest(key)
        ok = False
        for stored in self._digests:
            ok |= hmac.compare_digest(given, stored)
        return ok
