"""Keyed pseudonyms: patient IDs, per-patient date shifts and UIDs from one secret key.

Why keyed (HMAC-SHA256) rather than plain hashes: hospital IDs and UIDs are short and
structured, so an unkeyed hash can be reversed by trying every ID. With the key kept outside
the repository, the same key gives the same pseudonyms on every run (new scans of a patient
join the right group, DVC outputs are reproducible) and another key gives unrelated ones.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tasks.config import IngestConfig
from tasks.ingest.errors import IngestError
from tasks.ingest.provenance import verified_phantom

log = logging.getLogger("synthdx.ingest")

# Public and documented: only ever used for the phantom's fake identities (see resolve_key).
DEMO_KEY = b"synthdx-demo-key: phantom data only, not a secret"

MIN_KEY_LENGTH = 16
DATE_SHIFT_MIN_DAYS = 30
DATE_SHIFT_MAX_DAYS = 730

KeyOrigin = Literal["env", "file", "demo"]


@dataclass(frozen=True)
class PseudonymKey:
    """The secret key and where it came from; its repr never shows the key."""

    secret: bytes = field(repr=False)
    origin: KeyOrigin

    def __repr__(self) -> str:
        return f"PseudonymKey(origin={self.origin!r}, secret=<hidden>)"


def _key_help(cfg: IngestConfig) -> str:
    return (
        f"set the environment variable {cfg.key_env} to a secret of at least {MIN_KEY_LENGTH} "
        f"characters (for example: export {cfg.key_env}=$(python -c "
        "'import secrets; print(secrets.token_hex(32))')), or set ingest.key_file to a file "
        "outside the repository that holds it. Keep the key secret and keep it: the same key "
        "gives the same pseudonyms on every run"
    )


def resolve_key(cfg: IngestConfig) -> PseudonymKey:
    """Find the pseudonymisation key: environment variable, then key file, then demo key.

    The demo key is used only for the phantom's own, unmodified labels (PHANTOM.json beside
    the labels file with a matching labels hash), and a warning says so.

    Raises:
        IngestError: when no key is configured for real data, or the key is unusable; the
            message says how to set one.
    """
    value = os.environ.get(cfg.key_env, "")
    origin: KeyOrigin | None = None
    secret = b""
    if value.strip():
        secret, origin = value.strip().encode("utf-8"), "env"
    elif cfg.key_file is not None:
        path = Path(cfg.key_file).expanduser()
        try:
            secret = path.read_bytes().strip()
        except OSError as exc:
            raise IngestError(
                f"cannot read the pseudonymisation key file {path} (ingest.key_file): "
                f"{exc.strerror or exc}"
            ) from None
        origin = "file"
    if origin is not None:
        if len(secret) < MIN_KEY_LENGTH:
            where = f"environment variable {cfg.key_env}" if origin == "env" else str(cfg.key_file)
            raise IngestError(
                f"the pseudonymisation key in {where} is too short "
                f"({len(secret)} characters, need {MIN_KEY_LENGTH}): {_key_help(cfg)}"
            )
        return PseudonymKey(secret, origin)
    if verified_phantom(cfg.labels) is not None:
        log.warning(
            "no pseudonymisation key set; %s is the phantom's demo data, so the public demo "
            "key is used. Never ingest real data this way: %s", cfg.labels, _key_help(cfg)
        )
        return PseudonymKey(DEMO_KEY, "demo")
    raise IngestError(f"no pseudonymisation key for {cfg.labels}: {_key_help(cfg)}")


@functools.lru_cache(maxsize=1 << 16)
def _keyed_mac(secret: bytes, message: str) -> bytes:
    """HMAC-SHA256 of ``message``, remembered for the life of the process (memory only).

    Why: a run names each file in several steps (the cache, the splits, the shards), with
    several Pseudonymizers of one key; they share this memo.
    """
    return hmac.new(secret, message.encode("utf-8"), hashlib.sha256).digest()


class Pseudonymizer:
    """Derive every pseudonymous value from one key, with a separate domain per use."""

    def __init__(self, key: PseudonymKey) -> None:
        self._secret = key.secret
        self._uid_cache: dict[str, str] = {}

    def _mac(self, domain: str, *parts: str) -> bytes:
        return _keyed_mac(self._secret, "\x1f".join((domain, *parts)))

    def digest(self, domain: str, *parts: str) -> str:
        """A keyed hex digest of ``parts`` in a ``domain`` of its own.

        Why: incremental ingest names files, studies and label rows in its cache by such
        digests, which reveal nothing of the paths, UIDs or IDs (nor the key) without the key.
        """
        if domain in {"patient", "dateshift", "file", "uid"}:
            raise ValueError(f"domain {domain!r} belongs to a pseudonym")
        return self._mac(domain, *parts).hex()

    def patient(self, site: str, patient_id: str) -> str:
        """Pseudonym of a patient; hospital IDs are unique only within their site."""
        return "P" + self._mac("patient", site, patient_id).hex()[:16]

    def date_shift_days(self, site: str, patient_id: str) -> int:
        """Days to add to every date of a patient: the same for all their studies, < 0."""
        span = DATE_SHIFT_MAX_DAYS - DATE_SHIFT_MIN_DAYS + 1
        value = int.from_bytes(self._mac("dateshift", site, patient_id)[:8], "big")
        return -(DATE_SHIFT_MIN_DAYS + value % span)

    def file_id(self, relpath: str) -> str:
        """Pseudonym of an input file (its path relative to the source folder).

        Why keyed: archives are often exported one folder per patient ("DOE^JOHN_1962/..."),
        so a path is identity, and a guessable one; the same key gives the same name on
        every run, so a file quarantined twice is recognised.
        """
        return "Q" + self._mac("file", relpath).hex()[:16]

    def uid(self, uid: str) -> str:
        """Replacement UID under the 2.25 (UUID-derived integer) root; same input, same UID."""
        uid = str(uid).strip()
        cached = self._uid_cache.get(uid)
        if cached is None:
            # 122 bits, like a random UUID, so the result has at most 37 digits (< 64 chars).
            number = int.from_bytes(self._mac("uid", uid)[:16], "big") >> 6
            cached = self._uid_cache[uid] = f"2.25.{number}"
        return cached
