"""Recognise the built-in demo data (the phantom) by its PHANTOM.json provenance file.

Why: the phantom's identities are fake, so it may be ingested with a fixed, public demo key
(``synthdx run`` works out of the box), and it knows which of its sites is the internal one.
Both privileges must never extend to real data, so they require proof, not a name: a
PHANTOM.json beside the labels file whose ``labels_sha256`` matches the labels file's bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PHANTOM_FILE = "PHANTOM.json"
PHANTOM_GENERATOR = "synthdx phantom"


@dataclass(frozen=True)
class PhantomInfo:
    """What a verified PHANTOM.json tells ingest."""

    path: Path
    internal_site: str | None


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (read in blocks, so large files are fine)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _internal_site(meta: dict[str, Any]) -> str | None:
    """Read the internal site from either ``internal_site`` or a ``sites`` list with roles."""
    name = meta.get("internal_site")
    if isinstance(name, str) and name:
        return name
    sites = meta.get("sites")
    if isinstance(sites, list):
        internal = [s.get("name") for s in sites
                    if isinstance(s, dict) and s.get("role") == "internal"]
        if len(internal) == 1 and isinstance(internal[0], str):
            return internal[0]
    if isinstance(sites, dict):  # {"name": {"role": ...}} form
        internal = [k for k, v in sites.items()
                    if isinstance(v, dict) and v.get("role") == "internal"]
        if len(internal) == 1:
            return str(internal[0])
    return None


def verified_phantom(labels: Path) -> PhantomInfo | None:
    """Return the phantom provenance if ``labels`` is the phantom's unmodified labels file.

    Returns None when there is no PHANTOM.json beside the labels, when it is unreadable, when
    it was not written by the phantom, or when the labels file's hash differs (edited or
    replaced labels are treated as real data).
    """
    path = Path(labels).parent / PHANTOM_FILE
    if not path.is_file() or not Path(labels).is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("generator") != PHANTOM_GENERATOR:
        return None
    if meta.get("labels_sha256") != file_sha256(labels):
        return None
    return PhantomInfo(path=path, internal_site=_internal_site(meta))
