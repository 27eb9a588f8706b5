"""The pipeline's scheduler: DAG order, bounded concurrency, skips and failures."""

from __future__ import annotations

import threading
import time

import pytest

from flows.orchestration.dag import StageInfo
from flows.orchestration.runner import StageFailed
from flows.orchestration.schedule import run_scheduled, thread_budget


def _stage(name: str, *upstream: str) -> StageInfo:
    return StageInfo(name=name, group=name.split("@")[0], cmd=f"run {name}", upstream=upstream)


# audit -> four classifier stages -> validate, as in dvc.yaml
DAG = [
    _stage("audit"),
    *[_stage(f"clf@{i}", "audit") for i in range(4)],
    _stage("validate", *[f"clf@{i}" for i in range(4)]),
]


class Recorder:
    def __init__(self, fail: set[str] | None = None, seconds: float = 0.05,
                 fail_seconds: float | None = None) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.started: list[str] = []
        self.ended: list[str] = []
        self.threads: dict[str, int] = {}
        self.fail = fail or set()
        self.seconds = seconds
        self.fail_seconds = seconds if fail_seconds is None else fail_seconds

    def __call__(self, info: StageInfo, threads: int) -> float:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.started.append(info.name)
            self.threads[info.name] = threads
        time.sleep(self.fail_seconds if info.name in self.fail else self.seconds)
        with self.lock:
            self.active -= 1
            self.ended.append(info.name)
        if info.name in self.fail:
            raise StageFailed(info.name, 1, f"error: {info.name} broke")
        return self.seconds


def test_independent_stages_run_side_by_side_and_wait_for_upstream():
    rec = Recorder()
    result = run_scheduled(DAG, lambda name: "changed", rec, max_parallel=2, log=lambda _: None,
                           cores=2)
    assert result.failure is None
    assert [o.outcome for o in result.outcomes] == ["ran"] * 6
    assert [o.stage for o in result.outcomes] == [s.name for s in DAG]  # pipeline order
    assert rec.peak == 2
    assert rec.started[0] == "audit" and rec.ended[0] == "audit"
    assert rec.started[-1] == "validate"
    assert set(rec.ended[1:5]) == {f"clf@{i}" for i in range(4)}
    # alone on the machine: both cores; side by side: one each
    assert rec.threads["audit"] == 2 and rec.threads["validate"] == 2
    assert all(rec.threads[f"clf@{i}"] == 1 for i in range(4))


def test_one_at_a_time_keeps_pipeline_order():
    rec = Recorder(seconds=0.01)
    run_scheduled(DAG, lambda name: "changed", rec, max_parallel=1, log=lambda _: None)
    assert rec.peak == 1
    assert rec.started == [s.name for s in DAG]


def test_up_to_date_stages_are_skipped_and_unblock_their_downstream():
    rec = Recorder(seconds=0.01)
    lines: list[str] = []
    fresh = {"audit", "clf@0", "clf@1"}
    result = run_scheduled(DAG, lambda n: None if n in fresh else "changed", rec,
                           max_parallel=2, log=lines.append)
    outcome = {o.stage: o.outcome for o in result.outcomes}
    assert outcome == {"audit": "skipped", "clf@0": "skipped", "clf@1": "skipped",
                       "clf@2": "ran", "clf@3": "ran", "validate": "ran"}
    assert "pipeline: audit up to date, skipped" in lines
    assert rec.started[-1] == "validate"


def test_staleness_is_asked_only_when_the_upstream_stages_are_done():
    rec = Recorder(seconds=0.01)
    asked: list[tuple[str, list[str]]] = []

    def stale(name: str) -> str:
        asked.append((name, list(rec.ended)))
        return "changed"

    run_scheduled(DAG, stale, rec, max_parallel=2, log=lambda _: None)
    when = dict(asked)
    assert set(when["validate"]) >= {f"clf@{i}" for i in range(4)}
    assert "audit" in when["clf@3"]


def test_a_failure_lets_running_stages_finish_and_starts_nothing_new():
    # clf@0 fails at once while clf@1 still runs: nothing new may start after the failure.
    rec = Recorder(fail={"clf@0"}, seconds=0.5, fail_seconds=0.0)
    result = run_scheduled(DAG, lambda name: "changed", rec, max_parallel=2,
                           log=lambda _: None)
    assert result.failure is not None and result.failure.stage == "clf@0"
    outcome = {o.stage: o.outcome for o in result.outcomes}
    assert outcome["clf@0"] == "failed"
    assert outcome["clf@1"] == "ran"          # was running beside it: finished, not killed
    assert outcome["validate"] == "not run"
    assert outcome["clf@2"] == outcome["clf@3"] == "not run"
    assert "validate" not in rec.started
    failed = next(o for o in result.outcomes if o.stage == "clf@0")
    assert failed.reason == "error: clf@0 broke"


def test_selected_subset_ignores_upstream_outside_the_run():
    rec = Recorder(seconds=0.01)
    only = [s for s in DAG if s.name.startswith("clf@")]
    result = run_scheduled(only, lambda name: "changed", rec, max_parallel=2,
                           log=lambda _: None)
    assert [o.outcome for o in result.outcomes] == ["ran"] * 4


def test_an_exclusive_stage_runs_alone_with_every_core_and_keeps_its_place():
    """As in dvc.yaml: after ingest, train_diffusion and the `real` classifiers are ready
    together; the diffusion training runs alone on both cores (not one core for its whole
    run beside a short neighbour), then synthesize alone, then the rest side by side."""
    dag = [
        _stage("ingest"),
        _stage("train_diffusion", "ingest"),
        _stage("synthesize", "train_diffusion"),
        _stage("audit", "synthesize"),
        _stage("train_classifier@real", "ingest"),
        _stage("train_classifier@mixed", "audit"),
        _stage("validate", "train_classifier@real", "train_classifier@mixed"),
    ]
    rec = Recorder(seconds=0.02)
    result = run_scheduled(dag, lambda name: "changed", rec, max_parallel=2, log=lambda _: None,
                           cores=2, exclusive={"train_diffusion", "synthesize"})
    assert result.failure is None
    assert rec.started[:3] == ["ingest", "train_diffusion", "synthesize"]
    assert rec.ended[:3] == ["ingest", "train_diffusion", "synthesize"]  # nothing beside them
    assert rec.threads["train_diffusion"] == 2 and rec.threads["synthesize"] == 2
    assert rec.threads["audit"] == 1 and rec.threads["train_classifier@real"] == 1  # side by side
    assert rec.started[-1] == "validate"
    without = Recorder(seconds=0.02)
    run_scheduled(dag, lambda name: "changed", without, max_parallel=2, log=lambda _: None,
                  cores=2)
    assert without.threads["train_diffusion"] == 1  # what the study run got before


@pytest.mark.parametrize(("concurrent", "cores", "expected"),
                         [(1, 2, 2), (2, 2, 1), (3, 2, 1), (2, 16, 8), (0, 4, 4)])
def test_thread_budget(concurrent, cores, expected):
    assert thread_budget(concurrent, cores) == expected


def test_interruption_stops_the_running_stages_before_waiting_for_them():
    """Ctrl-C or SIGTERM lands in the scheduling thread while clf@0 runs: on_abort is told
    to stop it, and the interruption is raised once it has stopped, not after it finished."""
    released = threading.Event()
    lines: list[str] = []

    def launch(info: StageInfo, threads: int) -> float:
        if not released.wait(timeout=30):  # a stage that runs until it is stopped
            raise AssertionError("the running stage was never stopped")
        raise StageFailed(info.name, -15, "terminated")

    def stale(name: str) -> str | None:
        if name == "clf@1":
            raise KeyboardInterrupt  # arrives while clf@0 runs
        return "changed"

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_scheduled(DAG[1:3], stale, launch, max_parallel=2, log=lines.append, cores=2,
                      on_abort=released.set)
    assert time.monotonic() - started < 10
    assert released.is_set()
    assert any(line.startswith("pipeline: stopping; terminating clf@0 (") for line in lines)
