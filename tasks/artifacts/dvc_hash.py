"""The DVC hash of a directory, computed the way DVC 3 does.

Why: the processed dataset is logged to MLflow with this digest, so an MLflow run points at
exactly the data version ``dvc.lock`` records for the ingest stage (same string), without
running DVC. DVC 3 hashes a directory as the MD5 of its listing, a JSON array of
``{"md5": <file md5>, "relpath": <posix path>}`` sorted by relpath, serialised with
``json.dumps(..., sort_keys=True)``, plus the suffix ".dir" (dvc_data.hashfile.tree.Tree).
tests/test_ingest_outputs.py checks this against dvc-data's own computation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path


def file_md5(path: Path, block: int = 1 << 20) -> str:
    """MD5 of a file's bytes (DVC 3's "md5": no line-ending conversion)."""
    digest = hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dvc_dir_hash(root: Path, known: Mapping[str, str] | None = None) -> str:
    """Return "<md5>.dir" for the directory ``root`` (all files below it, recursively).

    Args:
        root: the directory.
        known: MD5s the caller already computed, by relative POSIX path (a writer that
            hashed a large file while writing the others need not read it again).
    """
    known = known or {}
    listing = []
    # os.walk with strings: a sharded dataset has thousands of files, and pathlib's per-path
    # objects and stat calls cost more than the hashing the known MD5s spare.
    base = os.fspath(root)
    for folder, _dirs, files in os.walk(base):
        prefix = os.path.relpath(folder, base).replace(os.sep, "/")
        for name in files:
            relpath = name if prefix == "." else f"{prefix}/{name}"
            md5 = known.get(relpath) or file_md5(Path(folder) / name)
            listing.append({"md5": md5, "relpath": relpath})
    listing.sort(key=lambda entry: entry["relpath"])
    payload = json.dumps(listing, sort_keys=True).encode("utf-8")
    return hashlib.md5(payload, usedforsecurity=False).hexdigest() + ".dir"
