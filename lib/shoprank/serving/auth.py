"""API keys for the HTTP endpoints, and hashing user ids before they reach a log.

Keys come from the environment variable SHOPRANK_API_KEYS (comma-separated) and/or a secret file
(one key a line) named by the app's `api_keys_file` or by SHOPRANK_API_KEYS_FILE. Only their
SHA-256 digests are kept in memory, compared in constant time; a key is never logged or echoed.

User ids are logged as a keyed hash (HMAC-SHA256): a plain hash of a public id (a reviewer id)
can be matched by anyone who hashes the candidates. The secret comes from
SHOPRANK_USER_HASH_KEY or from the file SHOPRANK_USER_HASH_KEY_FILE names; without either, each
process draws a random one, so its log lines still never show an id, but the same user cannot be
followed across replicas or restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEYS_ENV = "SHOPRANK_API_KEYS"
KEYS_FILE_ENV = "SHOPRANK_API_KEYS_FILE"
USER_KEY_ENV = "SHOPRANK_USER_HASH_KEY"
USER_KEY_FILE_ENV = "SHOPRANK_USER_HASH_KEY_FILE"
HEADER = "x-api-key"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


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


def _user_key() -> bytes:
    key = os.environ.get(USER_KEY_ENV, "")
    path = os.environ.get(USER_KEY_FILE_ENV)
    if not key and path:
        key = Path(path).read_text().strip()
    return key.encode() if key else secrets.token_bytes(32)


_USER_KEY: bytes | None = None


def hash_user(user_id: str) -> str:
    """What logs say instead of a user id: stable under one secret, not reversible, and not
    matchable without the secret."""
    global _USER_KEY
    if _USER_KEY is None:
        _USER_KEY = _user_key()
    data = user_id.encode("utf-8", "surrogatepass")
    return "u_" + hmac.new(_USER_KEY, data, hashlib.sha256).hexdigest()[:16]


def reset_user_key() -> None:
    """Read the secret again on the next hash (tests; a rotated secret after a reload)."""
    global _USER_KEY
    _USER_KEY = None
