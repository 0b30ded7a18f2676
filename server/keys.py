"""API keys: each client of the prediction API is one named key.

Keys are 256-bit random tokens, so a plain SHA-256 is a sound way to store them (there is
nothing to brute-force, unlike passwords); only the hash and a short prefix for recognition
are kept, and the key itself is shown once, at creation.

Every key belongs to an account: by default the key's own name, i.e. the key alone. Keys
created with a shared account name are one customer to the detectors, which then also decide
on the account's queries taken together (a Sybil attacker spreading queries over many keys).
Key names and shared account names are one namespace: an account named after a key is that
key alone, so no key may join a key's own account and no key may take a shared account's name.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from defense.monitor import shared_account
from server.db import ApiKey, utcnow
from server.ratelimit import LimitSpec
from server.shaping import Granularity

KEY_PREFIX = "mlk_"
CLIENT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_NAME_RE = re.compile(CLIENT_NAME_PATTERN)


class KeyStoreError(ValueError):
    """A key operation that cannot be done as asked."""


class DuplicateClient(KeyStoreError):
    pass


class NameConflict(KeyStoreError):
    """A name that would blur which keys an account holds (see the module's doc)."""


class UnknownClient(KeyStoreError):
    pass


@dataclass(frozen=True)
class Client:
    name: str
    granularity: Granularity | None
    limits: LimitSpec = field(default_factory=LimitSpec)
    """The key's own rate limit and quota; unset fields fall back to the deployment's."""
    account: str | None = None
    """The key's account; None or the key's own name: the key alone."""

    @property
    def shared_account(self) -> str | None:
        """The account when it is more than this key (detectors also decide on it), else None."""
        return shared_account(self.name, self.account)

    def limits_over(self, default: LimitSpec) -> LimitSpec:
        own = self.limits
        return LimitSpec(
            rate=own.rate if own.rate is not None else default.rate,
            burst=own.burst if own.burst is not None else default.burst,
            daily_quota=own.daily_quota if own.daily_quota is not None else default.daily_quota,
        )


@dataclass(frozen=True)
class KeyInfo:
    name: str
    key_prefix: str
    granularity: str | None
    created_at: datetime
    revoked_at: datetime | None
    limits: LimitSpec = field(default_factory=LimitSpec)
    account: str | None = None

    def to_row(self) -> dict[str, Any]:
        """The key as the admin API and ``mlaas keys list`` show it."""
        return {
            "name": self.name,
            "account": self.account,
            "key_prefix": self.key_prefix,
            "granularity": self.granularity,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "rate_limit": self.limits.rate,
            "rate_burst": self.limits.burst,
            "daily_quota": self.limits.daily_quota,
        }


def _limits_of(row: ApiKey) -> LimitSpec:
    return LimitSpec(rate=row.rate_limit, burst=row.rate_burst, daily_quota=row.daily_quota)


def _check_name(name: str, what: str) -> None:
    if not _NAME_RE.fullmatch(name):  # match() would let "$" pass a trailing newline
        raise KeyStoreError(
            f"{what} name {name!r} must be 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _check_namespace(session: Session, name: str, account: str) -> None:
    """Refuse a key that would blur which keys an account holds (see the module's doc).

    Checked in the creating transaction, not enforced by a constraint: two keys created at
    the same instant could still cross (keys are made by an operator, one at a time)."""
    # Joining account X when a key is named X: X is that key's own account.
    if account != name and session.scalar(select(ApiKey.name).where(ApiKey.name == account)):
        raise NameConflict(
            f"{account!r} is a client's name, hence that client's own account: "
            "name the shared account differently"
        )
    # A key named after a shared account: its queries would miss the account's record.
    taken = session.scalar(
        select(ApiKey.name).where(ApiKey.account == name, ApiKey.name != name).limit(1)
    )
    if taken is not None:
        raise NameConflict(f"{name!r} is the name of a shared account (of {taken!r})")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    def __init__(self, engine: Engine, *, serve_through_outages: bool = False) -> None:
        """With ``serve_through_outages``, keys seen valid before a database outage keep
        working during it (buffered logging); otherwise every request asks the database, so
        a revocation takes effect at once and an outage refuses everyone."""
        self._engine = engine
        self._serve_through_outages = serve_through_outages
        self._last_known: dict[str, Client] = {}

    def create(
        self,
        name: str,
        granularity: str | None = None,
        limits: LimitSpec | None = None,
        account: str | None = None,
    ) -> str:
        """Create a client and return its key; the key is never stored or shown again.

        ``account``: the account the key joins (default: the key's own name, the key alone).
        """
        _check_name(name, "client")
        account = account or name
        if account != name:
            _check_name(account, "account")
        spec = str(Granularity.parse(granularity)) if granularity else None
        limits = limits or LimitSpec()
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        row = ApiKey(
            name=name,
            account=account,
            key_hash=hash_key(key),
            key_prefix=key[:10],
            granularity=spec,
            rate_limit=limits.rate,
            rate_burst=limits.burst,
            daily_quota=limits.daily_quota,
        )
        try:
            with Session(self._engine) as session, session.begin():
                _check_namespace(session, name, account)
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
                KeyInfo(
                    r.name,
                    r.key_prefix,
                    r.granularity,
                    r.created_at,
                    r.revoked_at,
                    _limits_of(r),
                    r.account,
                )
                for r in rows
            ]

    def authenticate(self, key: str) -> Client | None:
        """The client a key belongs to, or None for an unknown or revoked key."""
        digest = hash_key(key)
        try:
            client = self._lookup(digest)
        except SQLAlchemyError:
            known = self._last_known.get(digest) if self._serve_through_outages else None
            if known is None:
                raise
            return known
        if self._serve_through_outages:
            if client is None:
                self._last_known.pop(digest, None)
            else:
                self._last_known[digest] = client
        return client

    def _lookup(self, digest: str) -> Client | None:
        with Session(self._engine) as session:
            row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
            # The lookup is by hash; the comparison below keeps the final check constant-time.
            if row is None or not hmac.compare_digest(row.key_hash, digest):
                return None
            if row.revoked_at is not None:
                return None
            granularity = Granularity.parse(row.granularity) if row.granularity else None
            return Client(row.name, granularity, _limits_of(row), row.account)
