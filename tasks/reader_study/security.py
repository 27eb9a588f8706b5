"""Logins and CSRF tokens for the reader study's web app.

A login is a random token in an HttpOnly, SameSite=Strict cookie; the database keeps only its
SHA-256 (a copied database holds no usable session), the reader, an expiry and the session's
CSRF token. Every form carries that CSRF token and every POST is refused without it; the login
form, before there is a session, uses a double-submit token (a cookie and the same value in
the form).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import Engine, delete, select

from tasks.reader_study.passwords import verify_password
from tasks.reader_study.store import LoginSession, Reader, transaction

SESSION_COOKIE = "reader_session"
LOGIN_CSRF_COOKIE = "reader_login_csrf"
_DUMMY_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 43 + "="
"""Checked against when a name is unknown, so a login takes as long either way."""


@dataclass(frozen=True)
class Login:
    """The reader behind a valid session."""

    reader_id: int
    name: str
    csrf: str
    expires_at: float


def token_hash(token: str) -> str:
    """The stored form of a session token."""
    return hashlib.sha256(token.encode()).hexdigest()


def same_token(given: str | None, expected: str | None) -> bool:
    """Constant-time equality of two non-empty tokens."""
    return bool(given) and bool(expected) and hmac.compare_digest(str(given), str(expected))


def log_in(engine: Engine, name: str, password: str, minutes: float) -> tuple[str, Login] | None:
    """Check a reader's password and open a session; None when name or password is wrong.

    Returns:
        The cookie's token (shown once, never stored) and the login.
    """
    with transaction(engine) as session:
        reader = session.scalars(select(Reader).where(Reader.name == name)).first()
    if not verify_password(password, reader.password_hash if reader else _DUMMY_HASH) \
            or reader is None:
        return None
    token, csrf, now = secrets.token_urlsafe(32), secrets.token_urlsafe(32), time.time()
    expires = now + minutes * 60.0
    with transaction(engine) as session:
        session.execute(delete(LoginSession).where(LoginSession.expires_at <= now))
        session.add(LoginSession(token_hash=token_hash(token), reader_id=reader.id, csrf=csrf,
                                 created_at=now, expires_at=expires))
    return token, Login(reader_id=reader.id, name=reader.name, csrf=csrf, expires_at=expires)


def current_login(engine: Engine, token: str | None) -> tuple[Login | None, bool]:
    """The login of a session cookie, and whether a session was there but has expired."""
    if not token:
        return None, False
    with transaction(engine) as session:
        row = session.execute(
            select(LoginSession, Reader.name).join(Reader, Reader.id == LoginSession.reader_id)
            .where(LoginSession.token_hash == token_hash(token))).first()
        if row is None:
            return None, False
        stored, name = row
        if stored.expires_at <= time.time():  # kept (so it still reads "expired") until a login
            return None, True
        return Login(reader_id=stored.reader_id, name=name, csrf=stored.csrf,
                     expires_at=stored.expires_at), False


def log_out(engine: Engine, token: str | None) -> None:
    """End a session (stopping for now: the answers stay)."""
    if token:
        with transaction(engine) as session:
            session.execute(delete(LoginSession).where(
                LoginSession.token_hash == token_hash(token)))
