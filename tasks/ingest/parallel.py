"""Run the per-file work over a process pool, surviving workers that die.

Why processes: decoding and resampling are CPU-bound Python and C code that holds the GIL.
Why chunks: one task per file would pay inter-process overhead per file; a chunk of files per
task keeps it negligible while still balancing the load. Why ``forkserver``: workers start
from a clean, preloaded server process instead of forking a process that runs Prefect's and
MLflow's threads (a fork can inherit a lock another thread holds and hang).

A worker killed by a crashing decoder (a segfault in C code, the OOM killer) breaks the whole
pool; the files it had not finished are then retried in fresh pools, a few at a time and
finally one at a time, so that exactly the crashing file is quarantined and every other file
still gets processed.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed, wait
from concurrent.futures.process import BrokenProcessPool

from tasks.common.progress import progress
from tasks.ingest.errors import IngestError
from tasks.ingest.reader import (
    FileResult,
    WorkerContext,
    init_worker,
    process_chunk,
    working_here,
)

log = logging.getLogger("synthdx.ingest")

ChunkTask = Callable[[list[str]], list[FileResult]]
CRASH_REASON = ("the reader crashed on this file (its worker process died, e.g. a decoder "
                "fault or running out of memory)")


def resolve_workers(workers: int) -> int:
    """0 means one worker per CPU core."""
    return workers if workers > 0 else (os.cpu_count() or 1)


def chunked(items: list[str], workers: int, max_chunk: int = 16) -> list[list[str]]:
    """Split into consecutive chunks: ~16 per worker, at most ``max_chunk`` files each.

    Consecutive files (one site, one transfer syntax, one camera) keep a worker's decoder
    and caches warm, which measurably beats dealing files round-robin; many small chunks
    keep the idle time at the end short.
    """
    if not items:
        return []
    size = max(1, min(max_chunk, -(-len(items) // (workers * 16))))
    return [items[i:i + size] for i in range(0, len(items), size)]


def _pool(workers: int, context: WorkerContext) -> ProcessPoolExecutor:
    mp_context = mp.get_context("forkserver")
    mp_context.set_forkserver_preload(["tasks.ingest.reader"])
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=mp_context,
        initializer=init_worker, initargs=(context, workers >= (os.cpu_count() or 1) > 1),
    )


def run_here(relpaths: Iterable[str], context: WorkerContext,
             task: ChunkTask = process_chunk) -> dict[str, FileResult]:
    """Process a few files in this process, as a worker would; no pool is started.

    Why: a pool's start (the forkserver preloading the DICOM stack, then its workers) costs
    most of a second, more than a nightly handful of new files take to process. The price is
    isolation: a decoder that crashes takes this process with it, so the caller keeps a
    journal of what runs here and uses a pool next time (tasks/ingest/cache.py).
    """
    files = list(relpaths)
    with working_here(context), progress("ingest", len(files), "files") as advance:
        results = task(files)
        advance(len(results))
    return {r.relpath: r for r in results}


def _ready() -> None:
    """A task that does nothing: submitting one per worker makes the pool start them all."""


class PoolStart:
    """A process pool whose workers start in a background thread, beside other work.

    Why: starting the forkserver (which preloads the DICOM stack) and its workers takes
    most of a second, as long as an incremental ingest's whole remaining work on a few new
    files. Started while the cache is being read, it is ready when the new files are known.
    If the start fails, :meth:`take` gives None and :func:`run_pool` starts its own pool,
    whose error (if any) is then raised where it always was.
    """

    def __init__(self, workers: int, context: WorkerContext) -> None:
        self.workers = resolve_workers(workers)
        self._context = context
        self._pool: ProcessPoolExecutor | None = None
        self._thread = threading.Thread(target=self._start, name="ingest-pool-start",
                                        daemon=True)
        self._thread.start()

    def _start(self) -> None:
        pool = None
        try:
            pool = _pool(self.workers, self._context)
            done, _ = wait([pool.submit(_ready) for _ in range(self.workers)])
            if all(f.exception() is None for f in done):
                self._pool = pool
                return
        except Exception as exc:  # reported by the pool run_pool starts instead
            log.debug("background pool start failed: %s", exc)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def take(self) -> ProcessPoolExecutor | None:
        """The started pool (the caller shuts it down), or None when it did not start."""
        self._thread.join()
        pool, self._pool = self._pool, None
        return pool

    def close(self) -> None:
        """Shut the pool down if it was never taken."""
        pool = self.take()
        if pool is not None:
            pool.shutdown(wait=True)


def _run_round(chunks: list[list[str]], workers: int, context: WorkerContext,
               task: ChunkTask, done: dict[str, FileResult],
               advance: Callable[[int], None] | None = None,
               started: ProcessPoolExecutor | None = None) -> list[list[str]]:
    """Run chunks in one pool; return the chunks that did not finish (the pool broke).

    The pool is ``started`` when given (:class:`PoolStart`), else a new one.
    """
    unfinished: list[list[str]] = []
    with started if started is not None else _pool(workers, context) as pool:
        futures: dict[Future[list[FileResult]], list[str]] = {
            pool.submit(task, chunk): chunk for chunk in chunks
        }
        for future in as_completed(futures):
            try:
                results = future.result()
                for result in results:
                    done[result.relpath] = result
                if advance is not None:
                    advance(len(results))
            except BrokenProcessPool:
                unfinished.append(futures[future])
            except Exception as exc:  # e.g. a result that cannot be sent back
                log.warning("a chunk of %d files failed (%s); retrying one by one",
                            len(futures[future]), type(exc).__name__)
                unfinished.append(futures[future])
    return unfinished


def run_pool(relpaths: Iterable[str], context: WorkerContext, workers: int,
             task: ChunkTask = process_chunk,
             started: PoolStart | None = None) -> dict[str, FileResult]:
    """Process every file in worker processes; return one result per file, by relpath.

    Args:
        relpaths: files, relative to ``context.source``.
        context: shared inputs, sent once to each worker.
        workers: worker processes (0 = one per core).
        task: the chunk function (replaceable so tests can make a worker crash).
        started: a pool started beforehand (:class:`PoolStart`, same workers and context)
            for the first round; retries after a crash always start fresh pools.
    """
    files = list(relpaths)
    workers = resolve_workers(workers)
    done: dict[str, FileResult] = {}
    first = started.take() if started is not None else None
    with progress("ingest", len(files), "files") as advance:
        broken = _run_round(chunked(files, workers), workers, context, task, done, advance,
                            started=first)
    order = {p: i for i, p in enumerate(files)}
    queue = sorted((p for chunk in broken for p in chunk if p not in done), key=order.__getitem__)
    while queue:
        # After a crash: one file per task. A pool works through its queue in order, so the
        # file that killed the pool is among the first few unfinished ones; each of those is
        # retried alone, the rest go round again. Every pass settles at least one file.
        log.warning("a worker process died; retrying %d unfinished files", len(queue))
        broken = _run_round([[p] for p in queue], workers, context, task, done)
        unfinished = sorted((c[0] for c in broken if c[0] not in done), key=order.__getitem__)
        suspects, queue = unfinished[: workers + 1], unfinished[workers + 1:]
        for relpath in suspects:
            if _run_round([[relpath]], 1, context, task, done):
                done[relpath] = FileResult(relpath=relpath, reason=CRASH_REASON)
    if files and all(done[p].reason == CRASH_REASON for p in files):
        raise IngestError(
            f"every worker process died ({len(files)} files, none processed): the workers "
            "cannot start or crash on every file. A script that calls ingest must guard its "
            "entry point with `if __name__ == '__main__':` (worker processes re-import it)"
        )
    return done
