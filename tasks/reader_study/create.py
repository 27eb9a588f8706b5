"""Draw a reader study: half released synthetic images, half de-identified real held-out images.

The study folder (tasks/reader_study/layout.py) is the study's own image store; the server reads
pixels from it only, by case number, never from the pipeline's folders or by path.

Why the real images are resized to the synthetic set's size and matched by finding class: a
reader must not be able to tell real from synthetic by resolution or by how often a finding
appears; only the look of the image should give it away.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.artifacts.audit_output import AUDIT_JSON, released_dir
from tasks.artifacts.dataset import DatasetError, has_dataset, open_dataset, read_synthesis
from tasks.artifacts.json_file import read_json_object
from tasks.common.atomic import atomic_dir
from tasks.config import Config, ReaderStudyConfig
from tasks.reader_study.errors import ReaderStudyError
from tasks.reader_study.layout import STUDY_DB, STUDY_IMAGES, STUDY_JSON
from tasks.reader_study.store import Base, Case, StudyRow, open_engine, redact, transaction

LABELS = ("perugini_grade", "metastasis")


@dataclass(frozen=True)
class StudySummary:
    """What ``create_study`` made."""

    folder: Path
    database: str
    study_id: str
    cases: int
    class_matched: int
    size: tuple[int, int]

    def describe(self) -> str:
        """One paragraph for the CLI."""
        half = self.cases // 2
        return (f"reader study {self.study_id}: {self.cases} cases ({half} real, {half} "
                f"synthetic; {self.class_matched} of {half} real cases matched to a synthetic "
                f"case's finding class) at {self.size[0]}x{self.size[1]} in {self.folder}, "
                f"answers in {self.database}; add readers with "
                f"`synthdx reader-study add-reader NAME`")


def sources(cfg: Config) -> tuple[Path, Path]:
    """The released synthetic set and the processed real dataset the study draws from."""
    rs = cfg.reader_study
    return (Path(rs.released or released_dir(cfg.audit.output)),
            Path(rs.processed or cfg.ingest.output))


def _labelled(manifest: pd.DataFrame, path: Path, what: str) -> pd.DataFrame:
    """Rows whose finding labels are known (a case without truth cannot be scored)."""
    known = manifest[list(LABELS)].notna().all(axis=1)
    rows = manifest[known].copy()
    rows["perugini_grade"] = rows["perugini_grade"].astype(int)
    rows["metastasis"] = rows["metastasis"].astype(bool)
    bad = ~rows["perugini_grade"].between(0, 3)
    if bad.any():
        raise ReaderStudyError(f"{path}: {what} has Perugini grades outside 0-3 "
                               f"({sorted(rows.loc[bad, 'perugini_grade'].unique())[:5]})")
    return rows


def _finding_class(rows: pd.DataFrame) -> pd.Series:
    return (rows["perugini_grade"] > 0).astype(int) * 2 + rows["metastasis"].astype(int)


def draw_rows(synthetic: pd.DataFrame, real: pd.DataFrame, half: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """Pick ``half`` synthetic rows at random and ``half`` real rows of the same finding classes.

    Real rows of a class the real pool lacks are filled from the rest of the pool at random.

    Returns:
        Positions into ``synthetic`` and into ``real``, and how many real rows matched a class.
    """
    syn = rng.choice(len(synthetic), size=half, replace=False)
    want = _finding_class(synthetic.iloc[syn]).value_counts()
    real_class = _finding_class(real).to_numpy()
    chosen: list[int] = []
    for cls, count in want.sort_index().items():
        pool = np.flatnonzero(real_class == cls)
        chosen += rng.choice(pool, size=min(count, len(pool)), replace=False).tolist()
    matched = len(chosen)
    rest = np.setdiff1d(np.arange(len(real)), chosen)
    chosen += rng.choice(rest, size=half - matched, replace=False).tolist()
    return syn, np.asarray(chosen), matched


def _resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-resize (N, 2, r, c) images to ``size`` (keeps mean counts, no aliased noise)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images.astype(np.float32)
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.asarray(images, dtype=np.float32))
    return F.interpolate(tensor, size=tuple(size), mode="area").numpy()


def _audit_reference(released: Path) -> dict[str, Any]:
    """The audit that released the set and the model that made it, for the report's tags."""
    ref: dict[str, Any] = {"released": str(released)}
    audit_json = released.parent / AUDIT_JSON
    if audit_json.is_file():
        audit = read_json_object(audit_json, ReaderStudyError)
        digests = (audit.get("inputs") or {}).get("digests") or {}
        ref.update(audit_json=str(audit_json), synthetic_digest=digests.get("synthetic"))
    synthesis = read_synthesis(released) or {}
    model = synthesis.get("model") or {}
    ref.update(model_version=model.get("version"), model_sha256=model.get("sha256"))
    return ref


def _open_sources(cfg: Config, half: int) -> tuple[Any, pd.DataFrame, Any, pd.DataFrame]:
    """Both input datasets, checked; a clear error when either cannot give ``half`` cases."""
    rs = cfg.reader_study
    released, processed = sources(cfg)
    if not has_dataset(released):
        raise ReaderStudyError(
            f"{released}: no released synthetic set (images.npy and manifest.parquet); run the "
            f"audit first (`synthdx run` or `synthdx audit`), or set reader_study.released")
    try:
        syn_images, syn_manifest = open_dataset(released, "released synthetic set", LABELS)
        real_images, real_manifest = open_dataset(processed, "processed dataset",
                                                  ("split", "pseudo_id", *LABELS))
    except DatasetError as exc:
        raise ReaderStudyError(str(exc)) from None
    synthetic = _labelled(syn_manifest, released, "the released synthetic set")
    held = real_manifest[real_manifest["split"].astype(str).isin(rs.real_splits)]
    real = _labelled(held, processed, "the processed dataset")
    if len(synthetic) < half:
        raise ReaderStudyError(
            f"{released}: the released synthetic set has {len(synthetic)} labelled images, "
            f"fewer than the {half} synthetic cases a {rs.cases}-case study needs; ask for "
            f"fewer cases (--cases {2 * len(synthetic)} at most)")
    if len(real) < half:
        raise ReaderStudyError(
            f"{processed}: the processed dataset has {len(real)} labelled real images in "
            f"splits {', '.join(rs.real_splits)}, fewer than the {half} real cases a "
            f"{rs.cases}-case study needs; ask for fewer cases (--cases {2 * len(real)} at most)")
    return (syn_images, synthetic.reset_index(drop=True), real_images,
            real.reset_index(drop=True))


def create_study(cfg: Config) -> StudySummary:
    """Draw the study, write its folder and database; all or nothing.

    Args:
        cfg: the validated parameters (``reader_study``, and ``audit.output`` and
            ``ingest.output`` for the default sources).

    Returns:
        What was made.

    Raises:
        ReaderStudyError: the folder exists already, a source is missing or too small, or the
            database already holds a study. Nothing is written then.
    """
    rs: ReaderStudyConfig = cfg.reader_study
    folder = Path(rs.output)
    if folder.exists():
        raise ReaderStudyError(f"{folder}: a study folder is already there (its answers would be "
                               "lost); choose another --output or remove it")
    half = rs.cases // 2
    syn_images, synthetic, real_images, real = _open_sources(cfg, half)
    released, processed = sources(cfg)
    rng = np.random.default_rng(rs.seed)
    syn_pick, real_pick, matched = draw_rows(synthetic, real, half, rng)
    size = (int(syn_images.shape[2]), int(syn_images.shape[3]))
    syn_rows = synthetic["index"].to_numpy()[syn_pick]
    real_rows = real["index"].to_numpy()[real_pick]
    images = np.concatenate([_resize(np.asarray(syn_images[syn_rows]), size),
                             _resize(np.asarray(real_images[real_rows]), size)])
    picked = pd.concat([
        synthetic.iloc[syn_pick].assign(origin="synthetic", source=lambda f: "released:" + (
            f["sample_id"].astype(str) if "sample_id" in f else f["index"].astype(str))),
        real.iloc[real_pick].assign(origin="real", source=lambda f: "processed:" + f[
            "pseudo_id"].astype(str) + "/" + f["split"].astype(str)),
    ], ignore_index=True)
    order = rng.permutation(len(picked))  # case k + 1 is picked row order[k]: origin hidden
    study_id = str(uuid.UUID(bytes=secrets.token_bytes(16), version=4))
    details = {"study_id": study_id, "cases": rs.cases, "seed": rs.seed, "size": list(size),
               "class_matched": matched, "real_splits": list(rs.real_splits),
               "processed": str(processed), **_audit_reference(released)}
    in_folder = f"sqlite:///{folder.resolve() / STUDY_DB}"
    explicit = rs.database_url() != in_folder
    with atomic_dir(folder) as tmp:
        np.save(tmp / STUDY_IMAGES, np.clip(images[order], 0.0, 1.0).astype(np.float16),
                allow_pickle=False)
        (tmp / STUDY_JSON).write_text(json.dumps(details, indent=1) + "\n", encoding="utf-8")
        url = rs.database_url() if explicit else f"sqlite:///{(tmp / STUDY_DB).resolve()}"
        engine = open_engine(url)
        try:
            _write_database(engine, study_id, details, picked.iloc[order])
        finally:
            engine.dispose()
    return StudySummary(folder=folder, database=redact(rs.database_url()), study_id=study_id,
                        cases=rs.cases, class_matched=matched, size=size)


def _write_database(engine: Any, study_id: str, details: dict[str, Any],
                    picked: pd.DataFrame) -> None:
    """Create the tables and insert the study and its cases in one transaction."""
    from sqlalchemy import inspect

    if inspect(engine).has_table(StudyRow.__tablename__):
        raise ReaderStudyError(f"database {redact(str(engine.url))} already holds a study; "
                               "use another database for a new study")
    Base.metadata.create_all(engine)
    try:
        with transaction(engine) as session:
            session.add(StudyRow(id=study_id, created_at=time.time(), cases=len(picked),
                                 details=json.dumps(details)))
            session.add_all(Case(case_id=k + 1, origin=str(row.origin),
                                 perugini_grade=int(row.perugini_grade),
                                 metastasis=bool(row.metastasis), image_row=k,
                                 source=str(row.source)[:200])
                            for k, row in enumerate(picked.itertuples(index=False)))
    except BaseException:
        Base.metadata.drop_all(engine)  # an external database is left as it was found
        raise
