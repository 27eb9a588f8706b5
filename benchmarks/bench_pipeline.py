"""Wall time and peak memory of every stage of `synthdx run`, as a user runs it.

Copies the project (code, dvc.yaml, params.yaml, profiles) into a fresh git + DVC folder,
runs ``synthdx run [--profile P]`` there from scratch, and samples the process tree every
0.2 s with psutil. Per stage (from the pipeline's "pipeline: <stage> runs" lines) it records
the wall time and two peaks: the largest single process (RSS) and the whole tree (pipeline
process + Prefect server + stage processes, summed RSS). Target (issue 5): the demo profile
in <= 10 min pipeline time on 2 cores, peak <= 4 GiB.

    python benchmarks/bench_pipeline.py                      # demo profile, ~10 min on 2 cores
    python benchmarks/bench_pipeline.py --profile tiny       # smoke run, ~4 min
    python benchmarks/bench_pipeline.py --profile study      # the study (issue 15), <= 90 min
    python benchmarks/bench_pipeline.py --keep DIR           # keep the project folder
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGE_LINE = re.compile(r"^pipeline: (\S+) runs \(")
END_LINE = re.compile(r"^pipeline: (\S+) (?:finished in|failed after) ([0-9.]+) s")


def make_project(root: Path) -> None:
    """A fresh git + DVC project holding this checkout's code and parameters."""
    root.mkdir(parents=True)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", "params.yaml", "prefect.yaml"):
        shutil.copy(REPO / name, root / name)
    for folder in ("tasks", "models", "profiles", "flows"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=b@example.org", "-c", "user.name=bench", "commit",
                 "-qm", "bench"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)


class TreeSampler(threading.Thread):
    """Samples the RSS of a process and its descendants, attributed to the running stages.

    Stages run side by side (the classifier matrix), so a sample counts for every stage
    running when it was taken; with none running it counts for "pipeline" (start-up,
    staleness checks, the parent run's bookkeeping).
    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.running: set[str] = set()
        self.peaks: dict[str, tuple[int, int]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        """Sample until stopped or the root process is gone."""
        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = []
            for proc in procs:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    rss.append(proc.memory_info().rss)
            for stage in set(self.running) or {"pipeline"}:
                one, tree = self.peaks.get(stage, (0, 0))
                self.peaks[stage] = (max(one, max(rss, default=0)), max(tree, sum(rss)))
            time.sleep(0.2)


def cpu_model() -> str:
    """The CPU's model name and its bf16 support: timings differ between CPU kinds."""
    name = platform.processor() or "unknown CPU"
    flags = ""
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        for line in info.splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line
                break
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()]
    return f"{name}, bf16: {'/'.join(bf16) or 'none'}"


def bench(profile: str | None, keep: Path | None) -> int:
    base = keep or Path(tempfile.mkdtemp(prefix="synthdx-bench-"))
    root = base / "proj" if keep is None else keep
    make_project(root)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    cmd = [str(BIN / "synthdx"), "run", *(["--profile", profile] if profile else [])]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    times: dict[str, float] = {}
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = [*tail[-200:], line.rstrip()]
        if match := STAGE_LINE.match(line):
            sampler.running.add(match.group(1))
        elif match := END_LINE.match(line):
            sampler.running.discard(match.group(1))
            times[match.group(1)] = float(match.group(2))
    rc = proc.wait()
    end = time.perf_counter()
    sampler.stop.set()
    sampler.join(timeout=5)
    if rc != 0:
        print("\n".join(tail[-60:]))
        print(f"synthdx run failed (exit {rc}); project kept in {root}")
        return rc
    gib = 1024 ** 3
    print(f"# bench_pipeline {dt.date.today()} on {platform.node()} "
          f"({cpu_model()}, {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / gib:.0f} GiB), "
          f"profile {profile or 'params.yaml'}: {' '.join(cmd[1:])}")
    print("Stage wall time is the stage process's own (start-up included); stages of the "
          "classifier matrix run side by side, so they add up to more than the total.")
    print("| stage | wall (s) | peak RSS, largest process (GiB) | peak RSS, whole tree (GiB) |")
    print("|---|---|---|---|")
    for stage in ["pipeline", *times]:
        one, tree = sampler.peaks.get(stage, (0, 0))
        wall = f"{times[stage]:.1f}" if stage in times else "-"
        print(f"| {stage} | {wall} | {one / gib:.2f} | {tree / gib:.2f} |")
    one = max((p[0] for p in sampler.peaks.values()), default=0)
    tree = max((p[1] for p in sampler.peaks.values()), default=0)
    print(f"| **total** | **{end - started:.1f}** | **{one / gib:.2f}** | **{tree / gib:.2f}** |")
    summary = [ln for ln in tail if ln.startswith(("pipeline (", "  "))]
    print("\n".join(summary[-30:]))
    if keep is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None, help="profile to run (default: params.yaml's)")
    parser.add_argument("--keep", type=Path, default=None, help="run in (and keep) this folder")
    args = parser.parse_args()
    sys.exit(bench(args.profile, args.keep))


if __name__ == "__main__":
    main()
