"""Reader passwords, stored as scrypt hashes (hashlib's memory-hard KDF, no extra package).

Format: ``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>``, so the cost can be raised later and old
hashes still verify.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

N, R, P = 2**14, 8, 1
"""scrypt cost (16 MiB, ~50 ms a hash): OWASP's minimum for scrypt is N=2^17 with r=8 at
p=1, or an equivalent memory-time trade; 2^14 keeps logins quick on a 2-core study laptop."""
MIN_LENGTH = 8


def hash_password(password: str) -> str:
    """A salted scrypt hash of ``password``.

    Raises:
        ValueError: shorter than ``MIN_LENGTH`` characters.
    """
    if len(password) < MIN_LENGTH:
        raise ValueError(f"a reader's password needs at least {MIN_LENGTH} characters")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=32)
    return "$".join(["scrypt", str(N), str(R), str(P),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()])


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (constant-time comparison)."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r),
                             p=int(p), dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)
