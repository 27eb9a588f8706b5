"""Reading a JSON object that one stage handed to another, with one kind of error message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path, error: type[ValueError] = ValueError) -> dict[str, Any]:
    """The JSON object in ``path``.

    Why one function: every handed-on JSON file (model.json, synthesis.json) must fail the same
    way, naming the file and the reason, whichever stage reads it.

    Raises:
        error: the file cannot be read, is not JSON, or holds something other than an object.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
