"""Which process of a distributed stage is the stage's Prefect flow run: the global rank 0."""

from __future__ import annotations

import pytest

from flows.cli import _worker_rank

RANK_VARS = ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK")


@pytest.mark.parametrize(("env", "worker"), [
    ({}, False),                                         # a plain single-process run
    ({"LOCAL_RANK": "1"}, True),                         # Lightning's launcher, one node
    ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, True),       # Lightning, second node
    ({"SLURM_PROCID": "0", "LOCAL_RANK": "0"}, False),   # srun, first task
    ({"SLURM_PROCID": "4", "LOCAL_RANK": "0"}, True),    # srun, second node's local rank 0
    ({"RANK": "0", "LOCAL_RANK": "0"}, False),           # torchrun
    ({"RANK": "3", "LOCAL_RANK": "1"}, True),
])
def test_only_the_global_rank_zero_runs_the_flow(monkeypatch, env, worker):
    for var in RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert _worker_rank() is worker
