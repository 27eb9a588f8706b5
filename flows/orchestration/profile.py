"""Switch the project's profile in params.yaml, the way ``dvc exp run -S profile=X`` would.

Why edit the file and not pass ``--set``: the stages run through ``dvc repro``, which reads
params.yaml; a profile that lived only on the command line would be invisible to DVC, so
dvc.lock would record the wrong parameters and every later ``dvc repro`` would disagree.
"""

from __future__ import annotations

import re
from pathlib import Path

from tasks.config import ConfigError, load_config

_PROFILE_LINE = re.compile(r"^profile:[ \t]*([^\s#]+)", re.MULTILINE)


def current_profile(params: Path) -> str:
    """The profile params.yaml names now."""
    return load_config(params).profile


def set_profile(params: Path, profile: str) -> bool:
    """Make params.yaml name ``profile``; return True when the file changed.

    The new profile is validated (its overrides file must exist and give a valid tree)
    before the file is touched, so a typo leaves params.yaml as it was.

    Raises:
        ConfigError: the profile does not exist or gives invalid parameters.
    """
    load_config(params, [f"profile={profile}"])
    text = params.read_text()
    match = _PROFILE_LINE.search(text)
    if match is None:
        raise ConfigError(f"{params}: no top-level 'profile:' line to set")
    if match.group(1) == profile:
        return False
    new = text[:match.start(1)] + profile + text[match.end(1):]
    tmp = params.with_suffix(params.suffix + ".tmp")
    tmp.write_text(new)
    tmp.replace(params)
    return True
