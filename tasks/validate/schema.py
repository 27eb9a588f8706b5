"""The validation report's JSON Schema (``validation.schema.json``, draft 2020-12).

Why a schema: ``reports/validation.json`` is read by people's scripts, dashboards and the
MLflow step; checking it before it is written means a code change cannot silently drop or
rename a number they depend on.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

SCHEMA_PATH = Path(__file__).with_name("validation.schema.json")


class ReportSchemaError(ValueError):
    """A validation report that does not match ``validation.schema.json``."""


@cache
def _validator() -> Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def report_schema() -> dict[str, Any]:
    """The schema as a dict."""
    return dict(_validator().schema)


def validate_report(report: dict[str, Any]) -> None:
    """Raise :class:`ReportSchemaError` listing (up to five) places where ``report`` is wrong."""
    errors = sorted(_validator().iter_errors(report), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  at /{'/'.join(str(p) for p in e.absolute_path)}: {e.message}"
                 for e in errors[:5]]
        more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise ReportSchemaError("validation report does not match its schema:\n"
                                + "\n".join(lines) + more)
