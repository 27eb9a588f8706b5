"""One way to turn a nested document into MLflow's flat keys.

MLflow params and metrics are flat: a config tree or a metrics document is logged as dotted
(params) or slashed (metrics) keys. Every stage uses :func:`flatten`, so a key means the same
path into the document wherever it was logged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def flatten(tree: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Leaves of a nested mapping under joined keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``.

    A list of mappings is expanded by position (``groups.0.name``): a config's list of groups
    would otherwise be one unreadable string. Other lists and scalars are leaves, kept as they
    are (the caller decides how to render them).

    Args:
        tree: the document.
        prefix: prepended to every key (e.g. ``"ingest."``).
        sep: joins the levels (``.`` for params, ``/`` for metrics, as MLflow's UI groups them).
    """
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}{sep}", sep))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}{sep}{i}{sep}", sep))
        else:
            out[name] = value
    return out


def param_values(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """:func:`flatten` with every leaf as the string MLflow stores (None as ``""``; 6000 chars).

    Why the cut: MLflow refuses a param value longer than 6000 characters.
    """
    return {k: ("" if v is None else str(v))[:6000] for k, v in flatten(tree, prefix).items()}


def metric_values(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """:func:`flatten` (``/``-joined) keeping the finite numeric leaves (bools as 0/1).

    Why skip the rest: a metric is a number; a missing value (None, NaN) is no measurement.
    """
    return {k: float(v) for k, v in flatten(tree, prefix, sep="/").items()
            if isinstance(v, int | float) and math.isfinite(float(v))}
