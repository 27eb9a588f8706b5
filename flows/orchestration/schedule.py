"""Run the pipeline's stages in DAG order, independent ones side by side.

Why in parallel: the ten ``train_classifier@<task>-<regime>`` stages depend only on the audit,
not on each other, and each spends ~10 s importing torch, Lightning and MONAI on one core
before it trains. Two at a time on a 2-core machine overlaps that start-up and runs the small
trainings one thread each, which is what brings the CPU demo inside its time budget. DVC
allows it: ``dvc repro`` releases the repository lock while a stage's command runs and guards
each stage's deps and outs with its own read/write locks.

The scheduler is a plain function over callables, so its order and concurrency rules are
tested without DVC, Prefect or MLflow.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from flows.orchestration.dag import StageInfo
from flows.orchestration.runner import StageFailed
from flows.orchestration.summary import StageOutcome

Launch = Callable[[StageInfo, int], float]
"""Runs one stage with a thread budget (CPU threads for its process); raises StageFailed."""


@dataclass
class ScheduleResult:
    """The outcome of every selected stage (pipeline order) and the first failure, if any."""

    outcomes: list[StageOutcome]
    failure: StageFailed | None


def thread_budget(concurrent: int, cores: int | None = None) -> int:
    """CPU threads for one stage process when ``concurrent`` stages share the machine.

    Why: each torch process starts one intra-op thread per core; two of them on two cores
    oversubscribe the CPU and both slow down.
    """
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, concurrent))


@contextlib.contextmanager
def _stop_on_interrupt(running: dict[Future[float], tuple[StageInfo, float, str]],
                       on_abort: Callable[[], None] | None,
                       log: Callable[[str], None]) -> Iterator[None]:
    """On an interruption of the scheduling thread, stop the stages still running."""
    try:
        yield
    except BaseException:
        if running and on_abort is not None:
            names = ", ".join(sorted(info.name for info, _, _ in running.values()))
            log(f"pipeline: stopping; terminating {names} (DVC records nothing for them: "
                "the next synthdx run reruns them)")
            on_abort()
        raise


def run_scheduled(stages: Sequence[StageInfo], stale: Callable[[str], str | None],
                  launch: Launch, max_parallel: int = 1,
                  log: Callable[[str], None] = print,
                  cores: int | None = None,
                  on_abort: Callable[[], None] | None = None,
                  exclusive: Collection[str] = ()) -> ScheduleResult:
    """Run the stale stages of ``stages`` as their upstream stages finish.

    A stage starts once every upstream stage that is part of this run has finished; it is
    asked whether it is stale only then (an upstream stage that just ran may have made it
    so). At most ``max_parallel`` stages run at once. After a failure nothing new starts;
    the stages already running finish, and the rest are reported "not run".

    A stage of an ``exclusive`` group runs alone, with every core: it starts once nothing
    else runs, and nothing starts beside it. Why: a process's thread budget is fixed when it
    starts, so a long stage launched beside a short one (train_diffusion beside the ``real``
    classifiers, which need only ingest) kept half the cores for its whole run after its
    neighbours had finished: the study profile's diffusion training ran on one thread for
    37 minutes. When the next stage in pipeline order is exclusive, nothing later in the
    order jumps ahead of it.

    Args:
        stages: the selected stages in pipeline order (their ``upstream`` from dvc.yaml).
        stale: why a stage must run now, or None when it is up to date.
        launch: runs one stage with a CPU-thread budget; returns its seconds.
        max_parallel: most stages running at once.
        log: where "runs" / "skipped" lines go.
        cores: CPU cores to share out (default: this machine's).
        on_abort: stops the running stages when this thread is interrupted (SIGTERM,
            Ctrl-C); without it the interruption waits for them to finish.
        exclusive: stage groups (dvc.yaml keys) that run alone.
    """
    selected = {s.name for s in stages}
    pending = list(stages)
    finished: set[str] = set()
    outcomes: dict[str, StageOutcome] = {}
    failure: StageFailed | None = None
    running: dict[Future[float], tuple[StageInfo, float, str]] = {}

    def ready() -> list[StageInfo]:
        return [s for s in pending
                if all(u in finished for u in s.upstream if u in selected)]

    # Exits before the pool does: the running stages are stopped before it waits for them.
    with ThreadPoolExecutor(max_workers=max(1, max_parallel),
                            thread_name_prefix="stage") as pool, \
            _stop_on_interrupt(running, on_abort, log):
        while pending or running:
            progressed = True
            while failure is None and progressed and len(running) < max_parallel:
                progressed = False
                for info in ready():
                    alone = info.group in exclusive
                    if len(running) >= max_parallel or (running and alone) or any(
                            r.group in exclusive for r, _, _ in running.values()):
                        break
                    pending.remove(info)
                    progressed = True
                    reason = stale(info.name)
                    if reason is None:
                        log(f"pipeline: {info.name} up to date, skipped")
                        outcomes[info.name] = StageOutcome(info.name, "skipped",
                                                           reason="up to date")
                        finished.add(info.name)
                        break  # a skipped stage may make others ready: look again
                    share = 1 if alone else min(max_parallel, len(running) + len(ready()) + 1)
                    log(f"pipeline: {info.name} runs ({reason})")
                    context = contextvars.copy_context()  # Prefect's flow-run context
                    future = pool.submit(context.run, launch, info,
                                         thread_budget(share, cores))
                    running[future] = (info, time.perf_counter(), reason)
            if not running:
                if failure is not None or not ready():
                    break
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                info, started, reason = running.pop(future)
                seconds = time.perf_counter() - started
                try:
                    future.result()
                except StageFailed as exc:
                    log(f"pipeline: {info.name} failed after {seconds:.1f} s")
                    failure = failure or exc
                    outcomes[info.name] = StageOutcome(
                        info.name, "failed", seconds, reason=exc.error.splitlines()[-1][:200])
                    continue
                log(f"pipeline: {info.name} finished in {seconds:.1f} s")
                outcomes[info.name] = StageOutcome(info.name, "ran", seconds, reason=reason)
                finished.add(info.name)
    for info in stages:
        outcomes.setdefault(info.name, StageOutcome(info.name, "not run"))
    return ScheduleResult([outcomes[s.name] for s in stages], failure)
