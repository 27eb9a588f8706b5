"""``synthdx init``: a project for a hospital's own archive, ready for ``synthdx run``.

A project is a git + DVC folder holding the platform's code (tasks/, models/, flows/,
profiles/: dvc.yaml's code dependencies, so git records the code of every result), its
params.yaml, dvc.yaml and prefect.yaml. A project made here differs from the demo in three
places: its pipeline starts at ``ingest`` (no phantom stage), ingest reads the archive and the
labels file where they are, and the pseudonymisation key lives in a file outside the project.

Why the archive is an external dependency of the ingest stage (an absolute path in dvc.yaml)
and not a copy or an import: DVC hashes it in place and records the hash in dvc.lock, so
``dvc status`` / ``synthdx run`` see a new, changed or removed study, while the archive, which
holds identity, never enters the project, its DVC cache or a DVC remote. The labels file is
one for the same reason (it holds hospital patient IDs).

Every input is checked before anything is written; a failure names the path and the reason,
and removes whatever this command created (the folder, a new key file).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from tasks.config import DEFAULTS_FILE, PROFILES_DIR
from tasks.ingest.errors import IngestError
from tasks.ingest.labels import LabelTable, load_labels, study_in_archive
from tasks.ingest.pipeline import list_files
from tasks.ingest.pseudonym import MIN_KEY_LENGTH

REPO = DEFAULTS_FILE.parent
CODE_FOLDERS = ("tasks", "models", "flows", "profiles")
PROJECT_MARKERS = (".git", ".dvc", "dvc.yaml", "params.yaml")
KEY_DIR = Path("~/.config/synthdx")
ARCHIVE_STAGE_COMMENT = (
    "ingest reads the archive and the labels file in place: DVC hashes them as external\n"
    "dependencies (dvc.lock), so new, changed or removed studies rerun the pipeline")


class InitError(ValueError):
    """A project that cannot be created; the message names the path and the reason."""


@dataclass(frozen=True)
class InitRequest:
    """What ``synthdx init`` was asked for (paths as given)."""

    folder: Path
    archive: Path
    labels: Path
    key_file: Path | None = None
    profile: str = "demo"
    internal_site: str | None = None


@dataclass(frozen=True)
class Checked:
    """The request, checked: absolute paths, the labels read, the key file's state."""

    folder: Path
    archive: Path
    labels: Path
    key_file: Path
    key_exists: bool
    profile: str
    internal_site: str | None
    files: int
    table: LabelTable


def default_key_file(folder: Path) -> Path:
    """``~/.config/synthdx/<project folder name>.key``."""
    return KEY_DIR.expanduser() / f"{folder.name}.key"


def _inside(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def _check_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise InitError(f"{folder} exists and is not a folder")
    if folder.is_dir():
        found = [name for name in PROJECT_MARKERS if (folder / name).exists()]
        if found:
            raise InitError(f"{folder} already holds a project (found {', '.join(found)}); "
                            "choose a new or empty folder")
        if any(folder.iterdir()):
            raise InitError(f"{folder} is not empty; choose a new or empty folder")


def _check_archive(archive: Path, labels: Path) -> int:
    if not archive.exists():
        raise InitError(f"archive {archive} does not exist")
    if not archive.is_dir():
        raise InitError(f"archive {archive} is not a folder (give the folder of DICOM files)")
    if not os.access(archive, os.R_OK | os.X_OK):
        raise InitError(f"archive {archive} cannot be read (permission denied)")
    try:
        files = list_files(archive, labels)
    except OSError as exc:
        raise InitError(f"archive {archive} cannot be read: {exc.strerror or exc}") from None
    if not files:
        raise InitError(f"archive {archive} holds no files")
    return len(files)


def _check_key(key_file: Path, folder: Path, archive: Path) -> bool:
    """Whether the key file exists already (and is usable); it must be outside the project."""
    if _inside(folder, key_file) or _inside(archive, key_file):
        raise InitError(f"key file {key_file} must be outside the project folder and the "
                        "archive: the key never enters git, DVC or the archive")
    if not key_file.exists():
        return False
    try:
        secret = key_file.read_bytes().strip()
    except OSError as exc:
        raise InitError(f"key file {key_file} cannot be read: {exc.strerror or exc}") from None
    if len(secret) < MIN_KEY_LENGTH:
        raise InitError(f"key file {key_file} holds a key of {len(secret)} characters, need at "
                        f"least {MIN_KEY_LENGTH}; remove it to have a new one generated")
    return True


def check_request(request: InitRequest) -> Checked:
    """Check every input; nothing is written.

    Raises:
        InitError: naming the path and the reason.
    """
    folder = request.folder.expanduser().absolute()
    archive = request.archive.expanduser().absolute()
    labels = request.labels.expanduser().absolute()
    _check_folder(folder)
    if _inside(archive, folder) or _inside(folder, archive):
        raise InitError(f"project folder {folder} and archive {archive} must not contain each "
                        "other: the archive stays where it is, outside the project")
    files = _check_archive(archive, labels)
    try:
        table = load_labels(labels)
    except IngestError as exc:
        raise InitError(str(exc)) from None
    if not table.rows and not table.problems:
        raise InitError(f"labels file {labels} has no rows with a study_uid")
    if not study_in_archive(archive, table, labels):
        raise InitError(f"labels file {labels} names no study of the archive {archive}: none "
                        f"of its {len(table.rows) + len(table.problems)} study UIDs is the "
                        f"StudyInstanceUID of any of the archive's {files} files")
    profile = request.profile
    if profile != "demo" and not (REPO / PROFILES_DIR / f"{profile}.yaml").is_file():
        known = sorted(p.stem for p in (REPO / PROFILES_DIR).glob("*.yaml"))
        raise InitError(f"no profile {profile!r} (known: demo, {', '.join(known)})")
    if request.internal_site is not None and request.internal_site not in {
            row.site for row in table.rows.values()}:
        raise InitError(f"internal site {request.internal_site!r} is not a site of the labels "
                        f"file {labels}")
    key_file = (request.key_file.expanduser().absolute() if request.key_file is not None
                else default_key_file(folder))
    key_exists = _check_key(key_file, folder, archive)
    return Checked(folder=folder, archive=archive, labels=labels, key_file=key_file,
                   key_exists=key_exists, profile=profile,
                   internal_site=request.internal_site, files=files, table=table)


def _yaml() -> YAML:
    yaml = YAML()  # round trip: the comments of the repository's files stay
    yaml.preserve_quotes = True
    yaml.width = 100
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def _edit_yaml(source: Path, target: Path, edit: Any) -> None:
    yaml = _yaml()
    document = yaml.load(source.read_text(encoding="utf-8"))
    edit(document)
    with target.open("w", encoding="utf-8") as fh:
        yaml.dump(document, fh)


def _params(checked: Checked) -> Any:
    def edit(params: Any) -> None:
        params["profile"] = checked.profile
        ingest = params["ingest"]
        ingest["source"] = str(checked.archive)
        ingest["labels"] = str(checked.labels)
        ingest["key_file"] = str(checked.key_file)
        ingest["internal_site"] = checked.internal_site
        if "truth" in ingest:  # the phantom's finding masks: none for a real archive
            ingest["truth"] = None
    return edit


def _dvc_yaml(checked: Checked) -> Any:
    def edit(document: Any) -> None:
        stages = document["stages"]
        del stages["phantom"]
        deps = stages["ingest"]["deps"]
        at = list(deps).index("data/raw")
        deps[at] = str(checked.archive)
        deps.insert(at + 1, str(checked.labels))
        for dep in [d for d in deps if str(d).startswith("data/")]:
            deps.remove(dep)  # the phantom's outputs (its finding masks): not in this project
        stages.yaml_set_comment_before_after_key("ingest", before=ARCHIVE_STAGE_COMMENT,
                                                 indent=2)
    return edit


def _prefect_yaml(checked: Checked) -> Any:
    def edit(document: Any) -> None:
        deployments = document["deployments"]
        for at in reversed(range(len(deployments))):
            if deployments[at]["name"] == "phantom":
                del deployments[at]
            elif deployments[at]["name"] == "nightly":
                deployments[at]["parameters"]["profile"] = checked.profile
                deployments[at]["description"] = (
                    f"The whole pipeline every night on the {checked.profile} profile: ingest "
                    "reads what the archive gained (incremental), up-to-date stages skipped.")
    return edit


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise InitError(f"`{' '.join(cmd)}` failed in {cwd}: "
                        f"{(proc.stderr or proc.stdout).strip()[-500:]}")


def _git_identity(cwd: Path) -> list[str]:
    """``-c user.name/email`` for the first commit when git has no identity configured."""
    proc = subprocess.run(["git", "config", "user.email"], cwd=cwd, capture_output=True)
    if proc.returncode == 0 and proc.stdout.strip():
        return []
    return ["-c", "user.name=synthdx init", "-c", "user.email=synthdx@localhost"]


def _write_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")


def create_project(checked: Checked) -> None:
    """Write the project and its first commit, and the key file when there is none yet.

    On any failure what was created is removed again.
    """
    folder = checked.folder
    made_folder = not folder.exists()
    made_key = False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name in CODE_FOLDERS:
            shutil.copytree(REPO / name, folder / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in (".gitignore", ".dvcignore"):
            shutil.copy(REPO / name, folder / name)
        _edit_yaml(REPO / "params.yaml", folder / "params.yaml", _params(checked))
        _edit_yaml(REPO / "dvc.yaml", folder / "dvc.yaml", _dvc_yaml(checked))
        _edit_yaml(REPO / "prefect.yaml", folder / "prefect.yaml", _prefect_yaml(checked))
        dvc = str(Path(sys.executable).parent / "dvc")
        _run(["git", "init", "-q"], folder)
        _run([dvc if Path(dvc).exists() else "dvc", "init", "-q"], folder)
        shutil.copy(REPO / ".dvc" / "config", folder / ".dvc" / "config")
        if not checked.key_exists:
            _write_key(checked.key_file)
            made_key = True
        _run(["git", "add", "-A"], folder)
        _run(["git", *_git_identity(folder), "commit", "-q", "-m",
              f"synthdx init: pipeline from ingest of {checked.archive.name}"], folder)
    except BaseException:
        if made_key:
            checked.key_file.unlink(missing_ok=True)
        if made_folder:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            for child in folder.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise


def describe(checked: Checked) -> str:
    """What the command prints: the project, the archive, the key and the next command."""
    key = ("pseudonymisation key: using the existing key file" if checked.key_exists else
           "pseudonymisation key: generated into")
    return "\n".join([
        f"project created in {checked.folder} (git + DVC; pipeline: ingest -> ... -> "
        f"validate, profile {checked.profile})",
        f"archive: {checked.archive} ({checked.files} files, read in place and never copied; "
        f"DVC records its hash at every run)",
        f"labels: {checked.labels} ({len(checked.table.rows)} studies)",
        f"{key} {checked.key_file} (outside the project, readable by you only). Keep it "
        "secret and keep it: the same key gives the same pseudonyms every night; without it "
        "every patient gets new ones. It never enters git, DVC, the logs or MLflow.",
        f"next: cd {checked.folder} && synthdx run",
    ])


def init_project(request: InitRequest) -> str:
    """Check the request, create the project; return what to print.

    Raises:
        InitError: naming the path and the reason; nothing is left behind.
    """
    checked = check_request(request)
    create_project(checked)
    return describe(checked)
