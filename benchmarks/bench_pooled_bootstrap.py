r"""Speed of the validate stage's pooled external comparison (patient-clustered bootstrap).

Why a benchmark and not a timed test: a wall-clock limit in a test fails on a loaded machine
(it did: 6.4 s against 5 s while other work shared the two cores), and speed targets are
checked by scripts here and recorded in benchmarks/RESULTS.md.

The size is the study profile's: five sites of 1,500 cases from about 1,100 patients each,
two models' correlated scores, 1,000 resamples (``validation.bootstrap``). Target: a few
seconds on 2 CPU cores, since the validate stage runs one pooled comparison per regime pair
and task (six on the study profile).

    python benchmarks/bench_pooled_bootstrap.py [--sites 5] [--cases 1500] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import numpy as np
from scipy import stats

from tasks.validate.pooled import SiteScores, pooled_comparison


def simulated_sites(n_sites: int, cases: int, patients: int, seed: int = 0) -> list[SiteScores]:
    """Binormal scores of two models on the same cases (true AUC 0.80 vs 0.77), noise rho 0.6."""
    rng = np.random.default_rng(seed)
    sites = []
    for k in range(n_sites):
        y = (rng.random(cases) < 0.3).astype(np.int64)
        shared = rng.normal(size=cases)
        noise = [0.6 * shared + math.sqrt(1 - 0.36) * rng.normal(size=cases) for _ in range(2)]
        d_with, d_without = (math.sqrt(2) * stats.norm.ppf(a) for a in (0.80, 0.77))
        _, clusters = np.unique(rng.integers(0, patients, cases), return_inverse=True)
        sites.append(SiteScores(f"site{k}", y, y * d_with + noise[0], y * d_without + noise[1],
                                clusters))
    return sites


def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo``), recorded with every timing: CPU kinds differ."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    """Time ``pooled_comparison`` a few times and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--cases", type=int, default=1500)
    parser.add_argument("--patients", type=int, default=1100)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sites = simulated_sites(args.sites, args.cases, args.patients)
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        pooled = pooled_comparison(sites, resamples=args.resamples, confidence=0.95, seed=0)
        seconds.append(time.perf_counter() - started)
    assert pooled is not None and pooled["bootstrap"] == args.resamples
    print(json.dumps({"cpu": cpu_model(),
                      "sites": args.sites, "cases_per_site": args.cases,
                      "resamples": args.resamples,
                      "seconds_median": round(statistics.median(seconds), 3),
                      "seconds": [round(s, 3) for s in seconds],
                      "delta_auc": round(pooled["delta_auc"], 4)}))


if __name__ == "__main__":
    main()
