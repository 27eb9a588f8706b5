"""What a pipeline run was made of: git commit, dvc.lock entry per stage, data digests.

These become tags of the pipeline's MLflow parent run, so a result in the MLflow UI points
back at the exact code, parameters and data versions (and ``dvc.lock`` at that commit
reproduces it).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

LOCK_FILE = "dvc.lock"
_TAG_UNSAFE = re.compile(r"[^\w.\- /:]")


def tag_key(text: str) -> str:
    """An MLflow-safe tag key (MLflow allows word characters, ``. - / :`` and spaces)."""
    return _TAG_UNSAFE.sub("_", text.replace("@", "/").replace("+", "_plus_"))


def git_commit(root: Path) -> str | None:
    """HEAD's commit, with ``-dirty`` when tracked files differ from it; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}-dirty" if dirty.strip() else head


def read_lock(root: Path) -> dict[str, Any]:
    """The ``stages`` mapping of dvc.lock ({} before the first stage has run)."""
    path = root / LOCK_FILE
    if not path.is_file():
        return {}
    document = yaml.safe_load(path.read_text()) or {}
    return dict(document.get("stages") or {})


def lock_hashes(lock: dict[str, Any]) -> dict[str, str]:
    """A short digest of each stage's dvc.lock entry (its cmd, dep, param and out hashes)."""
    return {name: hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:16]
            for name, entry in lock.items()}


def data_digests(lock: dict[str, Any]) -> dict[str, str]:
    """The content hash DVC recorded for every stage output (``data/raw`` -> md5).

    And for every dependency outside the project (an absolute path: a ``synthdx init``
    project's archive and labels file), so the run names the archive version it read.
    """
    out: dict[str, str] = {}
    for entry in lock.values():
        for item in entry.get("deps") or []:
            digest = item.get("md5") or item.get("hash") or item.get("etag")
            if str(item.get("path", "")).startswith("/") and digest:
                out[str(item["path"])] = str(digest)
        for item in entry.get("outs") or []:
            digest = item.get("md5") or item.get("hash") or item.get("etag")
            if item.get("path") and digest:
                out[str(item["path"])] = str(digest)
    return out


def lineage_tags(root: Path, profile: str) -> dict[str, str]:
    """Every lineage tag of the pipeline's parent run, from the current dvc.lock."""
    lock = read_lock(root)
    tags = {"synthdx.profile": profile}
    commit = git_commit(root)
    if commit:
        tags["synthdx.git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    tags.update({tag_key(f"dvc.lock.{k}"): v for k, v in lock_hashes(lock).items()})
    tags.update({tag_key(f"data.{k}")[:250]: v for k, v in data_digests(lock).items()})
    return tags
