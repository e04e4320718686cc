"""API keys of the server: where they come from, and a constant-time check.

    keys = ApiKeys.gather(cli_keys=["k1"], key_file="keys.txt")   # + $QLORA_API_KEYS / $QLORA_API_KEY
    keys.allows(request_headers)                                   # Bearer or X-Api-Key

Only SHA-256 digests are kept in memory. A presented key is hashed and compared with
`hmac.compare_digest` against every stored digest, without stopping at the first
match, so neither the comparison nor the number of keys leaks through timing.
A key file holds one key per line; blank lines and `#` comments are skipped.
"""
from __future__ import annotations

import hashlib
import hmac
import os
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
    def gather(cls, cli_keys: list[str] | None = None, key_file: str | None = None) -> "ApiKeys":
        keys = list(cli_keys or [])
        keys += [k for k in os.environ.get(ENV_KEYS[0], "").split(",")]
        keys.append(os.environ.get(ENV_KEYS[1], ""))
        if key_file:
            path = Path(key_file)
            if not path.is_file():
                raise UserError(f"API key file '{path}' does not exist")
            keys += [line.strip() for line in path.read_text().splitlines()
                     if line.strip() and not line.lstrip().startswith("#")]
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
