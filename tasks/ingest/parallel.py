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
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

from tasks.common.progress import progress
from tasks.ingest.errors import IngestError
from tasks.ingest.reader import FileResult, WorkerContext, init_worker, process_chunk

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


def _run_round(chunks: list[list[str]], workers: int, context: WorkerContext,
               task: ChunkTask, done: dict[str, FileResult],
               advance: Callable[[int], None] | None = None) -> list[list[str]]:
    """Run chunks in one pool; return the chunks that did not finish (pool broke)."""
    unfinished: list[list[str]] = []
    with _pool(workers, context) as pool:
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
             task: ChunkTask = process_chunk) -> dict[str, FileResult]:
    """Process every file in worker processes; return one result per file, by relpath.

    Args:
        relpaths: files, relative to ``context.source``.
        context: shared inputs, sent once to each worker.
        workers: worker processes (0 = one per core).
        task: the chunk function (replaceable so tests can make a worker crash).
    """
    files = list(relpaths)
    workers = resolve_workers(workers)
    done: dict[str, FileResult] = {}
    with progress("ingest", len(files), "files") as advance:
        broken = _run_round(chunked(files, workers), workers, context, task, done, advance)
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
