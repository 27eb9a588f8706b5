"""Incremental ingest against a full ingest, on an archive that grew by 1 %.

A nightly archive grows by a few percent. This measures, on a phantom archive of a few
thousand files (by default a real whole-body scan's 1024 x 256 matrix per view, as the demo
phantom and a hospital's cameras write them; ``--matrix 512x128`` is the study profile's
quarter-pixel shortcut; five sites with their transfer syntaxes), the stage's whole work
without MLflow or Prefect (``run_ingest``: list, hash, read, validate, decode, de-identify,
normalise, split, write the dataset and the cache):

  1. night 1: ingest of the archive without 1 % of its files (fills the cache; not timed);
  2. incremental: the held-back files return; ingest with the project's cache (timed);
  3. full: the same grown archive into a fresh folder, empty cache (timed).
The two outputs must have the same DVC hash (every byte equal). Target: incremental >= 20x
faster than full. Rounds alternate (the machine drifts) and the best of --repeat is kept.

    python benchmarks/bench_incremental_ingest.py                  # 2000 patients, ~2200 files
    python benchmarks/bench_incremental_ingest.py --matrix 512x128 # the study profile's matrix
    python benchmarks/bench_incremental_ingest.py --patients 7800  # the study profile's size
    python benchmarks/bench_incremental_ingest.py --split-counts demo study

``--split-counts`` prints, without rendering an image, the internal site's patients and images
per split and per label (amyloid x metastasis) that ingest's hash split gives a profile's
phantom (its population draw and fake identities are pure functions of the parameters; the
demo key pseudonymises them, as ingest does for the phantom).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import tempfile
import time
from pathlib import Path

from machine import machine_line

REPO = Path(__file__).resolve().parents[1]
BENCH_KEY = "benchmark-key-not-secret-0123456789"


def _build(workdir: Path, patients: int, rows: int, cols: int) -> Path:
    """Generate (or reuse) a phantom archive at the given matrix."""
    from tasks.config import load_config
    from tasks.phantom.generate import generate_phantom

    raw = workdir / f"phantom-{patients}-{rows}x{cols}"
    if not (raw / "PHANTOM.json").exists():
        cfg = load_config(REPO / "params.yaml", [f"phantom.output={raw}",
                                                 f"phantom.patients={patients}",
                                                 f"phantom.rows={rows}", f"phantom.cols={cols}"])
        print(f"building a {patients}-patient phantom in {raw} ...", flush=True)
        generate_phantom(cfg.phantom)
    return raw


def split_counts(profile: str) -> str:
    """The internal site's split of a profile's phantom, per label, as a markdown table."""
    from collections import Counter

    from tasks.config import load_config
    from tasks.ingest.pseudonym import DEMO_KEY, Pseudonymizer, PseudonymKey
    from tasks.ingest.split import patient_split
    from tasks.phantom.identity import make_identity
    from tasks.phantom.population import sample_studies

    cfg = load_config(REPO / "params.yaml", [f"profile={profile}"])
    names = Pseudonymizer(PseudonymKey(DEMO_KEY, "demo"))
    internal = next(s for s in cfg.phantom.sites if s.role == "internal")
    images: Counter[tuple[str, str]] = Counter()
    patients: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    for spec in sample_studies(cfg.phantom):
        if spec.site != internal.name:
            continue
        ident = make_identity(spec.patient_seed, spec.seed, spec.sex, spec.birth_date,
                              internal.role, spec.study_date)
        pseudo = names.patient(spec.site, ident.patient_id)
        split = patient_split(pseudo, cfg.ingest.split)
        label = (f"{'amyloid' if spec.perugini_grade >= 2 else 'no-amyloid'}/"
                 f"{'metastasis' if spec.metastasis else 'no-metastasis'}")
        images[split, label] += 1
        images[split, "all"] += 1
        patients[split].add(pseudo)
    labels = ["all", "amyloid/metastasis", "amyloid/no-metastasis", "no-amyloid/metastasis",
              "no-amyloid/no-metastasis"]
    lines = [f"{profile} ({internal.name}, val {cfg.ingest.split.val_fraction:g} / test "
             f"{cfg.ingest.split.test_fraction:g} of patients):", "",
             "| split | patients | " + " | ".join(labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    for split in ("train", "val", "test"):
        lines.append(f"| {split} | {len(patients[split])} | "
                     + " | ".join(str(images[split, lb]) for lb in labels) + " |")
    return "\n".join(lines)


def _move(relpaths: list[str], src: Path, dst: Path) -> None:
    for relpath in relpaths:
        (dst / relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src / relpath, dst / relpath)


def main() -> None:
    """Build or reuse the archive, run the rounds, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--new-fraction", type=float, default=0.01)
    parser.add_argument("--matrix", default="1024x256",
                        help="rows x cols of each view in the archive's DICOM files")
    parser.add_argument("--workers", type=int, default=0, help="0: one per core")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "synthdx-bench-incremental")
    parser.add_argument("--split-counts", nargs="+", metavar="PROFILE",
                        help="Only print the split counts of these profiles' phantoms.")
    args = parser.parse_args()
    if args.split_counts:
        print("\n\n".join(split_counts(p) for p in args.split_counts))
        return

    from tasks.artifacts.dvc_hash import dvc_dir_hash
    from tasks.config import IngestConfig
    from tasks.ingest.pipeline import list_files, run_ingest

    args.workdir.mkdir(parents=True, exist_ok=True)
    rows, cols = (int(v) for v in args.matrix.lower().split("x"))
    raw = _build(args.workdir, args.patients, rows, cols)
    source, labels = raw / "dicom", raw / "labels.csv"
    key = args.workdir / "bench.key"
    key.write_text(BENCH_KEY)
    files = list_files(source, labels)
    step = max(1, round(1 / args.new_fraction))
    held = files[::step]  # spread over sites and transfer syntaxes
    aside = args.workdir / "held-back"

    def config(out: Path) -> IngestConfig:  # params.yaml's ingest section, these paths
        return IngestConfig(source=source, labels=labels, output=out / "processed",
                            quarantine=out / "quarantine", key_file=key, workers=args.workers)

    project = config(args.workdir / "project")
    best = {"incremental": float("inf"), "full": float("inf")}
    rounds: dict[str, list[float]] = {"incremental": [], "full": []}
    digests: dict[str, str] = {}
    for round_ in range(args.repeat):
        _move(held, source, aside)
        try:
            night1 = run_ingest(project)  # the archive before it grew (not timed)
        finally:
            _move(held, aside, source)
        started = time.perf_counter()
        grown = run_ingest(project)
        rounds["incremental"].append(time.perf_counter() - started)
        best["incremental"] = min(rounds["incremental"])
        full_out = args.workdir / "full"
        shutil.rmtree(full_out, ignore_errors=True)
        started = time.perf_counter()
        full = run_ingest(config(full_out))
        rounds["full"].append(time.perf_counter() - started)
        best["full"] = min(rounds["full"])
        digests = {"incremental": grown.digest, "full": dvc_dir_hash(full.output)}
        print(f"round {round_ + 1}: night 1 {night1.files_total} files; incremental "
              f"{grown.files_total - grown.reused} processed, {grown.reused} reused; full "
              f"{full.files_total} processed", flush=True)
        if digests["incremental"] != digests["full"]:
            raise SystemExit(f"outputs differ: {digests}")
    ratio = best["full"] / best["incremental"]
    print(f"\n{dt.date.today()}  {machine_line()}")
    print(f"archive: {len(files)} files ({args.patients} patients, {rows} x {cols}), "
          f"+{len(held)} new files ({len(held) / len(files):.1%})")
    print(f"| run | seconds (best of {args.repeat}) |")
    print("|---|---|")
    print(f"| full ingest of the grown archive (empty cache) | {best['full']:.2f} |")
    print(f"| incremental ingest (+{len(held)} files) | {best['incremental']:.2f} |")
    print(f"speed-up: {ratio:.1f}x (target >= 20x); outputs equal: DVC hash "
          f"{digests['full']}")
    each = [f / i for f, i in zip(rounds["full"], rounds["incremental"], strict=True)]
    print("every round (full / incremental s, ratio): " + "; ".join(
        f"{f:.2f} / {i:.2f} ({r:.1f}x)"
        for f, i, r in zip(rounds["full"], rounds["incremental"], each, strict=True)))


if __name__ == "__main__":
    main()
