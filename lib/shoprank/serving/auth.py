"""API keys for the HTTP endpoints, and hashing user ids before they reach a log.

Keys come from the environment variable SHOPRANK_API_KEYS (comma-separated) and/or a secret file
(one key a line) named by the app's `api_keys_file` or by SHOPRANK_API_KEYS_FILE. Only their
SHA-256 digests are kept in memory, compared in constant time; a key is never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

KEYS_ENV = "SHOPRANK_API_KEYS"
KEYS_FILE_ENV = "SHOPRANK_API_KEYS_FILE"
HEADER = "x-api-key"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    def __init__(self, keys: list[str]):
        keys = [k.strip() for k in keys if k.strip()]
        if not keys:
            raise ValueError(
                f"no API keys: set {KEYS_ENV} (comma-separated) or {KEYS_FILE_ENV} (a file with "
                "one key a line) in the environment the app runs in"
            )
        self._digests = [_digest(k) for k in keys]

    @classmethod
    def load(cls, path: str | None = None) -> ApiKeys:
        keys = os.environ.get(KEYS_ENV, "").split(",")
        path = path or os.environ.get(KEYS_FILE_ENV)
        if path:
            keys += Path(path).read_text().splitlines()
        return cls(keys)

    def __len__(self) -> int:
        return len(self._digests)

    def valid(self, key: str | None) -> bool:
        if not key:
            return False
        given = _digest(key)
        return any(hmac.compare_digest(given, d) for d in self._digests)


def hash_user(user_id: str) -> str:
    """What logs say instead of a user id: stable, short, not reversible."""
    return "u_" + hashlib.sha256(user_id.encode()).hexdigest()[:12]
