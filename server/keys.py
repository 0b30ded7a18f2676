"""API keys: each client of the prediction API is one named key.

Keys are 256-bit random tokens, so a plain SHA-256 is a sound way to store them (there is
nothing to brute-force, unlike passwords); only the hash and a short prefix for recognition
are kept, and the key itself is shown once, at creation.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.db import ApiKey, utcnow
from server.shaping import Granularity

KEY_PREFIX = "mlk_"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class KeyStoreError(ValueError):
    """A key operation that cannot be done as asked."""


class DuplicateClient(KeyStoreError):
    pass


class UnknownClient(KeyStoreError):
    pass


@dataclass(frozen=True)
class Client:
    name: str
    granularity: Granularity | None


@dataclass(frozen=True)
class KeyInfo:
    name: str
    key_prefix: str
    granularity: str | None
    created_at: datetime
    revoked_at: datetime | None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def create(self, name: str, granularity: str | None = None) -> str:
        """Create a client and return its key; the key is never stored or shown again."""
        if not _NAME_RE.match(name):
            raise KeyStoreError(
                f"client name {name!r} must be 1-128 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        spec = str(Granularity.parse(granularity)) if granularity else None
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        row = ApiKey(name=name, key_hash=hash_key(key), key_prefix=key[:10], granularity=spec)
        try:
            with Session(self._engine) as session, session.begin():
                session.add(row)
        except IntegrityError as exc:
            raise DuplicateClient(f"a client named {name!r} already exists") from exc
        return key

    def revoke(self, name: str) -> None:
        with Session(self._engine) as session, session.begin():
            row = session.scalar(select(ApiKey).where(ApiKey.name == name))
            if row is None:
                raise UnknownClient(f"no client named {name!r}")
            if row.revoked_at is None:
                row.revoked_at = utcnow()

    def list(self) -> list[KeyInfo]:
        with Session(self._engine) as session:
            rows = session.scalars(select(ApiKey).order_by(ApiKey.created_at)).all()
            return [
                KeyInfo(r.name, r.key_prefix, r.granularity, r.created_at, r.revoked_at)
                for r in rows
            ]

    def authenticate(self, key: str) -> Client | None:
        """The client a key belongs to, or None for an unknown or revoked key."""
        digest = hash_key(key)
        with Session(self._engine) as session:
            row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
            # The lookup is by hash; the comparison below keeps the final check constant-time.
            if row is None or not hmac.compare_digest(row.key_hash, digest):
                return None
            if row.revoked_at is not None:
                return None
            granularity = Granularity.parse(row.granularity) if row.granularity else None
            return Client(row.name, granularity)
