"""The one flattening of nested documents into MLflow keys (tasks/common/flatten.py)."""

from __future__ import annotations

import math

from tasks.common.flatten import flatten, metric_values, param_values


def test_nested_mappings_and_lists_of_mappings_become_joined_keys():
    tree = {"a": {"b": 1, "c": {"d": None}}, "groups": [{"name": "x"}, {"name": "y"}],
            "sizes": [1, 2]}
    assert flatten(tree) == {"a.b": 1, "a.c.d": None, "groups.0.name": "x",
                             "groups.1.name": "y", "sizes": [1, 2]}
    assert flatten(tree, "cfg.", sep="/")["cfg.a/c/d"] is None


def test_params_are_strings_metrics_finite_numbers():
    tree = {"lr": 1e-3, "name": None, "long": "v" * 7000, "nested": {"ok": True}}
    params = param_values(tree)
    assert params == {"lr": "0.001", "name": "", "long": "v" * 6000, "nested.ok": "True"}
    metrics = metric_values({"fid": 3.5, "n": 4, "skip": None, "bad": math.nan,
                             "label": "x", "privacy": {"withheld": False}})
    assert metrics == {"fid": 3.5, "n": 4.0, "privacy/withheld": 0.0}
