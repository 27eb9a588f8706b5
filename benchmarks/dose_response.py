r"""Dose-response of synthetic data: pooled external Delta AUC against synthetic per real.

Issue 15, point 5: does adding synthetic scans help more the smaller the real training set,
and how much synthetic data per real scan is worth adding? The grid is one DVC experiment per
(``classifier.synthetic_per_real``, ``classifier.limited_fraction``) pair; each retrains
``real_limited`` and ``real_limited+synthetic`` (every seed of ``classifier.seeds``, both
tasks) and revalidates; the answer is the validate stage's pooled comparison over the
external sites (``comparisons[].pooled``: Delta AUC of the seed ensembles, bootstrap CI,
DeLong p-value).

Commands, in a project whose pipeline has run (``synthdx run`` or ``dvc repro``) with
``dvc.lock`` and the reports git keeps (``reports/*_metrics.json``, ``reports/validation/``)
committed, so that the experiments reuse phantom ... audit from the DVC cache and only train
the classifiers and validate. An experiment's workspace is a checkout of that commit: without
``reports/ingest_metrics.json`` in it, DVC sees ingest's output missing and runs ingest again
in every experiment (2 min each on the study project; measured 2026-12-08, with the file
committed ingest was skipped)::

    git add dvc.lock params.yaml reports && git commit -m "pipeline run"
    source .venv/bin/activate
    export MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db   # else each experiment's runs go to
                                                          # a mlflow.db in its temp folder
    python benchmarks/dose_response.py queue              # queue the 12 experiments, run them
    python benchmarks/dose_response.py collect reports/dose_response/

``queue`` runs exactly these two commands (``--dry-run`` prints them; ``--no-run`` only
queues; ``--ratios`` / ``--fractions`` change the grid)::

    dvc exp run --queue \
        -S classifier.synthetic_per_real=0,1,3,10 \
        -S classifier.limited_fraction=0.05,0.15,0.3 \
        -S 'classifier.regimes=[real_limited,real_limited+synthetic]' \
        -S 'validation.comparisons=[[real_limited+synthetic,real_limited]]' \
        -S classifier.registered_model_prefix=null
    dvc exp run --run-all -j 1

Comma-separated values of one ``-S`` are DVC's (Hydra's) sweep syntax: DVC queues the cross
product, 4 x 3 = 12 experiments. The last three ``-S`` keep each experiment to what the grid
needs: two regimes instead of five (the classifier stage is most of an experiment's time),
one comparison, and no model registration (a grid point must not become the registry's
champion). ``-j 1``: the experiments' classifier stages already use every core.

``collect`` reads ``dvc exp show --json`` (params and ``reports/validation_metrics.json`` of
every experiment of the current commit; ``--all-commits`` for every commit). The metrics file
holds the pooled Delta AUC (``delta_auc.<task>.<with>_vs_<without>.pooled_external``) but, by
the validate stage's design, no bootstrap bounds; those come from each experiment's
``reports/validation.json``, a DVC-cached output (not in git, so ``git show <exp>:...`` does not
have it), read with ``dvc.api.read(path, rev=<experiment commit>)`` from the local cache. It
writes into the folder given:

    dose_response.md    one table per task: limited fraction x ratio, synthetic images used
                        (mean per model; shortfall when the released set was too small),
                        pooled Delta AUC with its CI, p-value, verdict, experiment name
    dose_response.png   pooled Delta AUC with CI against synthetic-per-real, one line per
                        limited fraction, one panel per task
    dose_response.csv   the same rows, for other tools

Sizing: ratio r at limited fraction f asks for ``round(r * f * n_train)`` synthetic images per
model; the released set must hold ``max(r) * max(f) * n_train`` (e.g. 10 x 0.3 x 2,100 = 6,300
at the study scale) or the largest doses are capped at the whole set, which the table shows as
a shortfall. Ratio 0 trains ``real_limited+synthetic`` on exactly the ``real_limited`` images,
so its Delta AUC is ~0: the grid's built-in null.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RATIOS = (0.0, 1.0, 3.0, 10.0)
FRACTIONS = (0.05, 0.15, 0.3)
WITH, WITHOUT = "real_limited+synthetic", "real_limited"
GRID_KEYS = ("classifier.synthetic_per_real", "classifier.limited_fraction",
             "classifier.regimes", "validation.comparisons",
             "classifier.registered_model_prefix")
"""Parameters the grid sets; a profile that sets any of them would silently override it."""

ReportReader = Callable[[str, str], dict[str, Any] | None]
"""(experiment commit, path of validation.json in the repository) -> the report, or None."""


# --- queue -----------------------------------------------------------------------------------

def _number(value: float) -> str:
    """A grid value as DVC will store it in params.yaml (``3`` not ``3.0``)."""
    return f"{value:g}"


def queue_commands(ratios: Sequence[float] = RATIOS, fractions: Sequence[float] = FRACTIONS,
                   all_regimes: bool = False, jobs: int = 1, dvc: str = "dvc"
                   ) -> list[list[str]]:
    """The ``dvc exp run`` command lines of the grid: queue it, then run the queue.

    Args:
        ratios: values of ``classifier.synthetic_per_real``.
        fractions: values of ``classifier.limited_fraction``.
        all_regimes: keep the project's regimes and comparisons (and registration) instead of
            restricting each experiment to the two regimes the grid compares.
        jobs: experiments run at once.
        dvc: the dvc executable.
    """
    if not ratios or not fractions:
        raise ValueError("the grid needs at least one ratio and one limited fraction")
    if any(r < 0 for r in ratios) or any(not 0 < f <= 1 for f in fractions):
        raise ValueError("ratios must be >= 0 and limited fractions in (0, 1]")
    queue = [dvc, "exp", "run", "--queue",
             "-S", "classifier.synthetic_per_real=" + ",".join(_number(r) for r in ratios),
             "-S", "classifier.limited_fraction=" + ",".join(_number(f) for f in fractions)]
    if not all_regimes:
        queue += ["-S", f"classifier.regimes=[{WITHOUT},{WITH}]",
                  "-S", f"validation.comparisons=[[{WITH},{WITHOUT}]]",
                  "-S", "classifier.registered_model_prefix=null"]
    return [queue, [dvc, "exp", "run", "--run-all", "-j", str(jobs)]]


def profile_conflicts(root: Path) -> list[str]:
    """Grid parameters that the project's profile file sets (it would win over ``-S``).

    Why: synthdx applies ``profiles/<profile>.yaml`` over params.yaml, and ``dvc exp run -S``
    edits params.yaml; a profile that sets ``classifier.limited_fraction`` would make every
    grid point train the same fraction without any error.
    """
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}
    profile = params.get("profile", "demo")
    path = root / "profiles" / f"{profile}.yaml"
    if profile in (None, "demo") or not path.is_file():
        return []
    tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    found = []
    for key in GRID_KEYS:
        node: Any = tree
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            found.append(f"{key} (set in {path.relative_to(root)})")
    return found


def queue(root: Path, ratios: Sequence[float], fractions: Sequence[float], all_regimes: bool,
          jobs: int, run: bool, dry_run: bool, dvc: str = "dvc") -> int:
    """Queue the grid and (unless ``run`` is False) run every queued experiment.

    Returns:
        The exit code of the first command that failed, else 0.
    """
    conflicts = profile_conflicts(root)
    if conflicts:
        print("error: the active profile overrides grid parameters, so the grid would not "
              "vary them: " + "; ".join(conflicts), file=sys.stderr)
        return 2
    commands = queue_commands(ratios, fractions, all_regimes, jobs, dvc)
    for command in commands if run else commands[:1]:
        print("$ " + shlex.join(command), flush=True)
        if dry_run:
            continue
        code = subprocess.run(command, cwd=root, check=False).returncode
        if code:
            return code
    return 0


# --- collect ---------------------------------------------------------------------------------

@dataclass
class Point:
    """One experiment's result for one task: the grid coordinates and the pooled comparison."""

    task: str
    limited_fraction: float
    synthetic_per_real: float
    experiment: str
    rev: str
    timestamp: str | None = None
    delta_auc: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    verdict: str | None = None
    synthetic_images: float | None = None
    shortfall: int = 0
    models: int = 0
    notes: list[str] = field(default_factory=list)


def _dig(tree: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _metrics(data: dict[str, Any]) -> dict[str, Any] | None:
    """The validation metrics of one ``dvc exp show`` entry (whatever ``validation.output``)."""
    for path, entry in (data.get("metrics") or {}).items():
        if path.endswith("validation_metrics.json"):
            return entry.get("data") if isinstance(entry, dict) else None
    return None


def _params(data: dict[str, Any]) -> dict[str, Any]:
    return _dig(data, "params", "params.yaml", "data") or {}


def experiment_entries(exp_show: list[dict[str, Any]]) -> Iterable[tuple[str, str, dict[str, Any]]]:
    """``(name, state, data)`` of every experiment under every baseline commit.

    The workspace and the baseline commits themselves are not experiments of the grid.
    """
    for baseline in exp_show:
        for experiment in baseline.get("experiments") or []:
            revs = experiment.get("revs") or []
            if not revs:
                continue
            executor = experiment.get("executor") or {}
            state = executor.get("state") or "success"
            head = revs[0]
            data = dict(head.get("data") or {})
            data.setdefault("rev", head.get("rev"))
            if head.get("error"):
                state = "failed"
            yield str(experiment.get("name") or head.get("name") or head.get("rev")), state, data


def _pooled(report: dict[str, Any] | None, task: str, with_: str, without: str
            ) -> dict[str, Any] | None:
    for comp in _dig(report, "tasks", task, "comparisons") or []:
        if comp.get("with") == with_ and comp.get("without") == without:
            return comp.get("pooled")
    return None


def _dose_used(report: dict[str, Any] | None, task: str, regime: str
               ) -> tuple[float | None, int, int, set[float | None]]:
    """Mean synthetic images per model, total shortfall, model count and the ratios recorded."""
    used, shortfall, ratios = [], 0, set()
    for model in (report or {}).get("provenance") or []:
        if model.get("task") != task or model.get("regime") != regime:
            continue
        dose = _dig(model, "training_set", "synthetic_dose") or {}
        sources = _dig(model, "training_set", "sources") or []
        used.append(sum(s.get("images", 0) for s in sources if s.get("source") == "synthetic"))
        shortfall += int(dose.get("shortfall") or 0)
        ratios.add(dose.get("per_real"))
    mean = sum(used) / len(used) if used else None
    return mean, shortfall, len(used), ratios


def collect_points(exp_show: list[dict[str, Any]], read_report: ReportReader,
                   with_: str = WITH, without: str = WITHOUT
                   ) -> tuple[list[Point], list[str]]:
    """Every finished experiment's pooled comparison per task, and what was left out and why.

    The pooled Delta AUC is taken from the metrics (what ``dvc exp show`` lists), the interval,
    p-value, verdict and dose from the experiment's validation.json (``read_report``); the two
    must agree, which ties the report to the experiment.
    """
    comparison = f"{with_}_vs_{without}"
    points: list[Point] = []
    skipped: list[str] = []
    for name, state, data in experiment_entries(exp_show):
        if state != "success":
            skipped.append(f"{name}: {state}")
            continue
        params = _params(data)
        ratio = _dig(params, "classifier", "synthetic_per_real")
        fraction = _dig(params, "classifier", "limited_fraction")
        metrics = _metrics(data)
        if ratio is None or fraction is None:
            skipped.append(f"{name}: classifier.synthetic_per_real is null (the whole set); "
                           "not a point of the grid")
            continue
        deltas = _dig(metrics, "delta_auc") or {}
        tasks = sorted(t for t, comps in deltas.items() if comparison in (comps or {}))
        if not tasks:
            skipped.append(f"{name}: no {comparison} in its validation metrics")
            continue
        output = _dig(params, "validation", "output") or "reports"
        report = read_report(str(data.get("rev")), f"{str(output).rstrip('/')}/validation.json")
        for task in tasks:
            point = Point(task=task, limited_fraction=float(fraction),
                          synthetic_per_real=float(ratio), experiment=name,
                          rev=str(data.get("rev")), timestamp=data.get("timestamp"),
                          delta_auc=_dig(deltas, task, comparison, "pooled_external"))
            pooled = _pooled(report, task, with_, without)
            if report is None:
                point.notes.append("validation.json not readable: no CI")
            elif pooled is None:
                point.notes.append("no pooled comparison in validation.json")
            else:
                point.ci_low = pooled.get("delta_auc_ci_low")
                point.ci_high = pooled.get("delta_auc_ci_high")
                point.p_value = pooled.get("p_value")
                point.verdict = pooled.get("verdict")
                if pooled.get("note"):
                    point.notes.append(str(pooled["note"]))
                reported = pooled.get("delta_auc")
                if point.delta_auc is None:
                    point.delta_auc = reported
                elif reported is not None and not math.isclose(reported, point.delta_auc,
                                                                abs_tol=1e-9):
                    point.notes.append(f"metrics ({point.delta_auc:.4f}) and validation.json "
                                       f"({reported:.4f}) disagree")
            used, shortfall, models, recorded = _dose_used(report, task, with_)
            point.synthetic_images, point.shortfall, point.models = used, shortfall, models
            if recorded and recorded != {float(ratio)}:
                point.notes.append(f"models record synthetic_per_real {sorted(map(str, recorded))}"
                                   f", the params {ratio}: a profile or --set overrode the grid")
            if shortfall:
                point.notes.append(f"released set too small: {shortfall / models:.0f} "
                                   "synthetic images short per model")
            points.append(point)
    return _latest(points, skipped), skipped


def _latest(points: list[Point], skipped: list[str]) -> list[Point]:
    """One point per (task, fraction, ratio): the newest experiment; older ones are listed."""
    best: dict[tuple[str, float, float], Point] = {}
    for point in sorted(points, key=lambda p: p.timestamp or ""):
        key = (point.task, point.limited_fraction, point.synthetic_per_real)
        if key in best:
            skipped.append(f"{best[key].experiment}: superseded by {point.experiment} "
                           f"({point.task}, fraction {point.limited_fraction:g}, ratio "
                           f"{point.synthetic_per_real:g})")
        best[key] = point
    return sorted(best.values(), key=lambda p: (p.task, p.limited_fraction,
                                                p.synthetic_per_real))


def _fmt(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    value = value + 0.0 if round(value, digits) != 0 else 0.0  # no "-0.000"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown_table(points: list[Point], skipped: list[str], comparison: str) -> str:
    """One table per task, rows by limited fraction then ratio, and the experiments left out."""
    lines = [f"# Dose-response: pooled external Delta AUC, {comparison}", "",
             "Seed-ensemble Delta AUC averaged over the external sites (the validate stage's "
             "pooled comparison); CI: patient-clustered bootstrap; p: DeLong fixed effect.", ""]
    for task in sorted({p.task for p in points}):
        lines += [f"## {task}", "",
                  "| limited fraction | synthetic per real | synthetic images / model | "
                  "pooled Delta AUC | CI | p | verdict | experiment | notes |",
                  "|---:|---:|---:|---:|---|---:|---|---|---|"]
        for p in (q for q in points if q.task == task):
            ci = f"[{_fmt(p.ci_low, signed=True)}, {_fmt(p.ci_high, signed=True)}]"
            lines.append(
                f"| {p.limited_fraction:g} | {p.synthetic_per_real:g} | "
                f"{_fmt(p.synthetic_images, 1)} | {_fmt(p.delta_auc, signed=True)} | {ci} | "
                f"{_fmt(p.p_value, 3)} | {p.verdict or 'n/a'} | {p.experiment} | "
                f"{'; '.join(p.notes)} |")
        lines.append("")
    if skipped:
        lines += ["## Not in the table", "", *[f"- {s}" for s in skipped], ""]
    return "\n".join(lines)


def plot(points: list[Point], path: Path, comparison: str) -> None:
    """Pooled Delta AUC with CI against the ratio: a panel per task, a line per fraction.

    The ratios are equally spaced categories (0, 1, 3, 10 would crowd a linear axis and a log
    axis has no 0); the fractions are dodged sideways so their intervals do not overlap.
    """
    from matplotlib.figure import Figure

    tasks = sorted({p.task for p in points})
    ratios = sorted({p.synthetic_per_real for p in points})
    fractions = sorted({p.limited_fraction for p in points})
    fig = Figure(figsize=(5.2 * max(len(tasks), 1), 4.2), layout="constrained")
    axes = fig.subplots(1, max(len(tasks), 1), squeeze=False)[0]
    width = 0.5 / max(len(fractions), 1)
    for ax, task in zip(axes, tasks, strict=False):
        ax.axhline(0.0, color="0.5", lw=0.8, ls="--")
        for k, fraction in enumerate(fractions):
            rows = [p for p in points if p.task == task and p.limited_fraction == fraction
                    and p.delta_auc is not None]
            if not rows:
                continue
            x = [ratios.index(p.synthetic_per_real) + (k - (len(fractions) - 1) / 2) * width
                 for p in rows]
            y = [p.delta_auc for p in rows]
            low = [p.delta_auc - p.ci_low if p.ci_low is not None else 0.0 for p in rows]
            high = [p.ci_high - p.delta_auc if p.ci_high is not None else 0.0 for p in rows]
            ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=3,
                        label=f"limited fraction {fraction:g}")
        ax.set_xticks(range(len(ratios)), [f"{r:g}" for r in ratios])
        ax.set_xlabel("synthetic images per real image")
        ax.set_ylabel("pooled external Delta AUC (95 % CI)")
        ax.set_title(task)
        ax.legend(fontsize=8)
    fig.suptitle(comparison, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def write_outputs(points: list[Point], skipped: list[str], out: Path,
                  comparison: str) -> dict[str, Path]:
    """dose_response.md, .png and .csv in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table": out / "dose_response.md", "plot": out / "dose_response.png",
             "csv": out / "dose_response.csv"}
    paths["table"].write_text(markdown_table(points, skipped, comparison), encoding="utf-8")
    plot(points, paths["plot"], comparison)
    with paths["csv"].open("w", newline="", encoding="utf-8") as handle:
        names = list(asdict(points[0]).keys()) if points else [f.name for f in
                                                               Point.__dataclass_fields__.values()]
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for p in points:
            writer.writerow({**asdict(p), "notes": "; ".join(p.notes)})
    return paths


def dvc_report_reader(root: Path) -> ReportReader:
    """Read an experiment's validation.json from the local DVC cache (``dvc.api.read``)."""
    import dvc.api

    def read(rev: str, path: str) -> dict[str, Any] | None:
        try:
            return json.loads(dvc.api.read(path, repo=str(root), rev=rev))
        except Exception as exc:  # a missing cache entry, a rev gone: the point loses its CI
            print(f"warning: {path} at {rev[:12]}: {exc}", file=sys.stderr)
            return None

    return read


def exp_show(root: Path, all_commits: bool, dvc: str = "dvc") -> list[dict[str, Any]]:
    """``dvc exp show --json`` of the project (the current commit's experiments by default)."""
    command = [dvc, "exp", "show", "--json", *(["--all-commits"] if all_commits else [])]
    done = subprocess.run(command, cwd=root, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def collect(root: Path, out: Path, exp_show_file: Path | None = None,
            all_commits: bool = False, read_report: ReportReader | None = None,
            with_: str = WITH, without: str = WITHOUT) -> dict[str, Path]:
    """Collect the grid into ``out`` (table, plot, CSV).

    Args:
        root: the DVC project.
        out: output folder.
        exp_show_file: a saved ``dvc exp show --json`` instead of running it.
        all_commits: every commit's experiments, not only the current commit's.
        read_report: how an experiment's validation.json is read (default: dvc.api).
        with_: the comparison's regime with synthetic images.
        without: its regime without.
    """
    shown = (json.loads(exp_show_file.read_text(encoding="utf-8")) if exp_show_file
             else exp_show(root, all_commits))
    points, skipped = collect_points(shown, read_report or dvc_report_reader(root), with_,
                                     without)
    paths = write_outputs(points, skipped, out, f"{with_} vs {without}")
    print(f"dose_response: {len(points)} point(s), {len(skipped)} left out -> "
          + ", ".join(str(p) for p in paths.values()))
    return paths


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    """Command line: ``queue`` or ``collect`` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path.cwd(),
                        help="the DVC project (default: the current folder)")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queue", help="queue the grid as DVC experiments and run them")
    q.add_argument("--ratios", type=_floats, default=list(RATIOS))
    q.add_argument("--fractions", type=_floats, default=list(FRACTIONS))
    q.add_argument("--all-regimes", action="store_true",
                   help="keep every regime, comparison and the registration")
    q.add_argument("-j", "--jobs", type=int, default=1)
    q.add_argument("--no-run", dest="run", action="store_false",
                   help="only queue (run later with: dvc exp run --run-all)")
    q.add_argument("--dry-run", action="store_true", help="print the commands only")
    c = sub.add_parser("collect", help="table and plot of the finished experiments")
    c.add_argument("out", type=Path, help="output folder, e.g. reports/dose_response/")
    c.add_argument("--exp-show", type=Path, default=None,
                   help="a saved `dvc exp show --json` instead of running it")
    c.add_argument("--all-commits", action="store_true")
    c.add_argument("--with", dest="with_", default=WITH)
    c.add_argument("--without", default=WITHOUT)
    args = parser.parse_args(argv)
    root = args.repo.resolve()
    if args.command == "queue":
        return queue(root, args.ratios, args.fractions, args.all_regimes, args.jobs, args.run,
                     args.dry_run)
    collect(root, args.out, args.exp_show, args.all_commits, with_=args.with_,
            without=args.without)
    return 0


if __name__ == "__main__":
    sys.exit(main())
