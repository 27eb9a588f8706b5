"""Ingest end to end on a small archive: outcomes per file, outputs, splits, errors, keys."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import Dataset
from test_ingest_helpers import (
    OTHER_KEY,
    TEST_KEY,
    Archive,
    add_duplicate,
    build_archive,
    crash_on_marked_file,
)

from tasks.artifacts.dataset import ShardedImages, open_images, read_headers
from tasks.artifacts.dvc_hash import dvc_dir_hash
from tasks.ingest.errors import IngestError
from tasks.ingest.parallel import CRASH_REASON, run_pool
from tasks.ingest.pipeline import prepare, run_ingest, worker_context
from tasks.ingest.provenance import PHANTOM_FILE
from tasks.ingest.result import IngestResult


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Archive:
    arch = build_archive(tmp_path_factory.mktemp("archive"))
    add_duplicate(arch)
    return arch


@pytest.fixture(scope="module")
def ingested(archive: Archive, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[IngestResult, Path]:
    cfg = archive.config(tmp_path_factory.mktemp("run"))
    return run_ingest(cfg), Path(cfg.output)


def _report(output: Path) -> dict:
    return json.loads((output / "ingest_report.json").read_text())


def test_every_file_ingested_or_quarantined_with_its_reason(archive: Archive, ingested) -> None:
    result, output = ingested
    report = _report(output)
    all_files = sorted(p.relative_to(archive.source).as_posix()
                       for p in archive.source.rglob("*") if p.is_file())
    # The report names each file by its copy in the quarantine, never by its path; the
    # quarantine's own reasons.json maps the copies to the original paths.
    quarantine = Path(result.quarantine)
    local = json.loads((quarantine / "reasons.json").read_text())
    assert report["quarantined"] == [{"file": e["file"], "reason": e["reason"]} for e in local]
    by_source = {e["source"]: e for e in local}
    assert report["files_total"] == len(all_files) == result.files_total
    assert report["ingested"] + len(local) == len(all_files)
    assert set(by_source) == set(archive.bad)
    for path, expected in archive.bad.items():
        assert by_source[path]["reason"].startswith(expected), (path, by_source[path])
        assert path not in json.dumps(report)
    assert report["ingested"] == len(archive.good) == result.ingested
    # Quarantine: untouched copies, flat, named <keyed id><known extension>.
    for path, entry in by_source.items():
        assert (quarantine / entry["file"]).read_bytes() == (archive.source / path).read_bytes()
        assert entry["file"].startswith("Q") and "/" not in entry["file"]
    assert by_source["misc/notes.txt"]["file"].endswith(".txt")
    assert {p.name for p in quarantine.iterdir()} == {e["file"] for e in local} | {
        "reasons.json"}
    duplicate = by_source["zz_copies/copy_of_first.dcm"]
    assert duplicate["duplicate_of"] == archive.good[0].relpath
    assert archive.good[0].relpath not in duplicate["reason"]
    assert not any(p.suffix == ".dcm" for p in output.rglob("*"))


def test_report_counts(archive: Archive, ingested) -> None:
    _, output = ingested
    report = _report(output)
    assert report["labels"]["rows_without_image"] == 1
    assert report["labels"]["unknown_columns"] == ["notes"]
    assert report["counts"]["site"] == {"alpha": 8, "beta": 4, "gamma": 2}
    assert sum(report["counts"]["split"].values()) == report["ingested"]
    assert report["counts"]["split"]["external"] == 6
    assert set(report["transfer_syntaxes"]) == {
        "ExplicitVRLittleEndian", "ImplicitVRLittleEndian", "JPEGLSLossless", "RLELossless",
        "JPEG2000Lossless"}
    assert report["internal_site"] == "alpha"
    assert "elapsed_seconds" not in report  # timings would change the DVC hash on every rerun
    assert report["deidentification"]["table"] == "dicomfields_2026c"


def test_rerun_on_the_same_input_gives_byte_identical_output(archive: Archive,
                                                               tmp_path: Path) -> None:
    """No timing or other per-run value in the DVC-tracked output: a rerun keeps its hash.

    A timing in ingest_report.json gave the dataset a new DVC hash on every run, so every
    stage downstream reran.
    """
    cfg = archive.config(tmp_path)
    first = run_ingest(cfg)
    output = Path(cfg.output)
    files = {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    assert first.elapsed_seconds > 0  # timed, for MLflow and the console, just not written

    second = run_ingest(cfg)

    again = {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    assert set(again) == set(files)
    for name, data in files.items():
        assert again[name] == data, f"{name} differs between two runs on the same input"
    assert second.digest == first.digest == dvc_dir_hash(output)


def test_outputs_format(archive: Archive, ingested) -> None:
    _, output = ingested
    images = open_images(output)
    assert isinstance(images, ShardedImages) and not (output / "images.npy").exists()
    assert images.dtype == np.float16 and images.shape == (len(archive.good), 2, 48, 16)
    whole = np.asarray(images)
    assert float(whole.min()) >= 0.0 and float(whole.max()) <= 1.0
    # Shards: each named by the MD5 of its bytes, a plain .npy, together the whole array.
    index = json.loads((output / "images" / "shards.json").read_text())
    parts = []
    for shard in index["shards"]:
        path = output / "images" / shard["file"]
        assert hashlib.md5(path.read_bytes()).hexdigest() + ".npy" == shard["file"]
        parts.append(np.load(path))
        assert len(parts[-1]) == shard["rows"]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    np.testing.assert_array_equal(images[[3, 0, 3]], whole[[3, 0, 3]])
    manifest = pd.read_parquet(output / "manifest.parquet")
    assert list(manifest["index"]) == list(range(len(manifest)))
    for column in ("pseudo_id", "study_uid", "site", "split", "perugini_grade", "amyloid",
                   "metastasis", "sex", "age", "weight_kg", "pixel_mm", "counts_anterior",
                   "counts_posterior", "intensity_reference", "tracer", "manufacturer",
                   "model", "transfer_syntax", "view_source", "bmi", "lesion_count"):
        assert column in manifest.columns, column
    assert "notes" not in manifest.columns and "patient_id" not in manifest.columns
    assert (manifest["amyloid"] == (manifest["perugini_grade"] >= 2)).all()
    assert manifest["study_uid"].str.startswith("2.25.").all()
    headers = read_headers(output)
    assert len(headers) == len(manifest)
    for line, (_, row) in zip(headers, manifest.iterrows(), strict=True):
        header = json.loads(line)
        assert header["0020000D"]["Value"][0] == row["study_uid"]
        assert header["00100020"]["Value"][0] == row["pseudo_id"]
        assert "7FE00010" not in header
        assert not any(int(tag[:4], 16) % 2 for tag in header)  # no private groups
    assert (output / "montage.png").read_bytes()[:4] == b"\x89PNG"


def test_anterior_and_posterior_channels(archive: Archive, tmp_path: Path) -> None:
    """Posterior-first files and files without view codes land in the right channels."""
    from test_ingest_helpers import header_for, views_for, write_dicom

    source = tmp_path / "src"
    study = archive.good[0]
    views = views_for(1, 96, 32, bar=2)  # anterior bar at the left, posterior at the right

    def posterior_first(ds: Dataset) -> None:
        ds.PixelData = views[::-1].copy().tobytes()
        ds.DetectorVector = [2, 1]

    def no_views(ds: Dataset) -> None:
        del ds.DetectorInformationSequence

    for name, mutate in (("reversed", posterior_first), ("noview", no_views)):
        write_dicom(source / f"{name}.dcm", views, study.ident,
                    header_for("alpha", 77 + len(name), 32), "explicit_le", mutate)
    labels = tmp_path / "labels.csv"
    rows = []
    for name in ("reversed", "noview"):
        from pydicom import dcmread

        uid = str(dcmread(source / f"{name}.dcm", stop_before_pixels=True).StudyInstanceUID)
        rows.append({"study_uid": uid, "patient_id": study.patient, "site": "alpha",
                     "perugini_grade": 0, "metastasis": 0})
    pd.DataFrame(rows).to_csv(labels, index=False)
    cfg = archive.config(tmp_path / "out", source=source, labels=labels, workers=1)
    run_ingest(cfg)
    manifest = pd.read_parquet(Path(cfg.output) / "manifest.parquet")
    images = np.asarray(open_images(cfg.output), dtype=np.float32)
    assert list(manifest["view_source"]) == ["assumed", "dicom"]  # noview, reversed
    for image in images:
        assert image[0, :, :4].mean() > 3 * image[0, :, -4:].mean()  # anterior: bar left
        assert image[1, :, -4:].mean() > 3 * image[1, :, :4].mean()  # posterior: bar right


def test_no_patient_in_two_splits(ingested) -> None:
    _, output = ingested
    manifest = pd.read_parquet(output / "manifest.parquet")
    assert (manifest.groupby("pseudo_id")["split"].nunique() == 1).all()
    assert set(manifest.loc[manifest["site"] != "alpha", "split"]) == {"external"}
    assert set(manifest.loc[manifest["site"] == "alpha", "split"]) == {"train", "val", "test"}
    follow_ups = manifest.groupby("pseudo_id").size()
    assert (follow_ups == 2).sum() == 3  # the patients with two studies stayed whole


def test_dates_shifted_consistently_per_patient(archive: Archive, ingested) -> None:
    _, output = ingested
    manifest = pd.read_parquet(output / "manifest.parquet")
    headers = [json.loads(line) for line in read_headers(output)]
    by_uid = {s.study_uid: s for s in archive.good}
    shifts: dict[str, set[int]] = {}
    for study, header in zip(sorted(archive.good, key=lambda s: s.relpath), headers,
                             strict=True):
        shifted = dt.datetime.strptime(header["00080020"]["Value"][0], "%Y%m%d").date()
        assert by_uid[study.study_uid] is study
        shifts.setdefault(header["00100020"]["Value"][0], set()).add(
            (shifted - study.study_date).days)
    assert all(len(s) == 1 for s in shifts.values())
    assert all(-730 <= next(iter(s)) <= -30 for s in shifts.values())
    assert len({next(iter(s)) for s in shifts.values()}) > 1
    assert len(shifts) == manifest["pseudo_id"].nunique()


def test_pseudonyms_stable_per_key_and_uids_consistent(archive: Archive, ingested,
                                                       tmp_path: Path) -> None:
    _, output = ingested
    first = pd.read_parquet(output / "manifest.parquet")
    again = archive.config(tmp_path / "again", workers=1)
    run_ingest(again)
    second = pd.read_parquet(Path(again.output) / "manifest.parquet")
    pd.testing.assert_frame_equal(first, second)
    # Same bytes with one worker as with two: the output does not depend on scheduling.
    for name in ("images/shards.json", "manifest.parquet", "headers/shards.json"):
        assert (output / name).read_bytes() == (Path(again.output) / name).read_bytes()
    assert read_headers(output) == read_headers(again.output)
    np.testing.assert_array_equal(np.asarray(open_images(output)),
                                  np.asarray(open_images(again.output)))
    other_key = tmp_path / "other.key"
    other_key.write_text(OTHER_KEY)
    other = archive.config(tmp_path / "other", key_file=other_key)
    run_ingest(other)
    third = pd.read_parquet(Path(other.output) / "manifest.parquet")
    assert not set(first["pseudo_id"]) & set(third["pseudo_id"])
    assert not set(first["study_uid"]) & set(third["study_uid"])
    # Follow-up studies keep their own study UID; one study's UID is the same in every row.
    assert first["study_uid"].nunique() == len(first)


def test_strict_mode_fails_and_keeps_previous_output(archive: Archive, ingested,
                                                     tmp_path: Path) -> None:
    _, output = ingested
    previous = tmp_path / "processed"
    shutil.copytree(output, previous)
    before = dvc_dir_hash(previous)
    cfg = archive.config(tmp_path, output=previous, strict=True)
    total = len(archive.good) + len(archive.bad)
    with pytest.raises(IngestError, match=rf"strict mode: {len(archive.bad)} of {total} files"):
        run_ingest(cfg)
    assert dvc_dir_hash(previous) == before
    assert (Path(cfg.quarantine) / "reasons.json").exists()


def test_missing_key_is_a_clear_error_except_for_phantom_data(archive: Archive,
                                                              tmp_path: Path) -> None:
    cfg = archive.config(tmp_path, key_file=None)
    with pytest.raises(IngestError, match="set the environment variable SYNTHDX_PSEUDONYM_KEY"):
        prepare(cfg)
    labels = tmp_path / "demo" / "labels.csv"
    labels.parent.mkdir()
    shutil.copy(archive.labels, labels)
    meta = {"generator": "synthdx phantom", "internal_site": "alpha",
            "labels_sha256": hashlib.sha256(labels.read_bytes()).hexdigest()}
    (labels.parent / PHANTOM_FILE).write_text(json.dumps(meta))
    assert prepare(archive.config(tmp_path, key_file=None, labels=labels)).key.origin == "demo"
    labels.write_text(labels.read_text() + "\n")  # edited labels are real data again
    with pytest.raises(IngestError, match="no pseudonymisation key"):
        prepare(archive.config(tmp_path, key_file=None, labels=labels))


def test_key_from_environment_and_short_keys(archive: Archive, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNTHDX_PSEUDONYM_KEY", TEST_KEY)
    assert prepare(archive.config(tmp_path, key_file=None)).key.origin == "env"
    monkeypatch.setenv("SYNTHDX_PSEUDONYM_KEY", "short")
    with pytest.raises(IngestError, match="too short"):
        prepare(archive.config(tmp_path, key_file=None))


def test_nothing_usable_is_an_error(archive: Archive, tmp_path: Path) -> None:
    source = tmp_path / "junk"
    source.mkdir()
    (source / "a.txt").write_text("hello")
    shutil.copy(archive.source / "bad/ct.dcm", source / "ct.dcm")
    cfg = archive.config(tmp_path, source=source)
    with pytest.raises(IngestError, match="no usable images .* all 2 files were quarantined"):
        run_ingest(cfg)
    assert not Path(cfg.output).exists()
    local = json.loads((Path(cfg.quarantine) / "reasons.json").read_text())
    assert sorted(e["source"] for e in local) == ["a.txt", "ct.dcm"]
    assert all((Path(cfg.quarantine) / e["file"]).is_file() for e in local)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(IngestError, match="holds no files"):
        prepare(archive.config(tmp_path, source=empty))
    with pytest.raises(IngestError, match="must not contain each other"):
        prepare(archive.config(tmp_path, output=archive.source / "out"))


def test_a_crashing_worker_costs_one_file(archive: Archive, tmp_path: Path) -> None:
    source = tmp_path / "src"
    for study in archive.good[:5]:
        target = source / study.relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(archive.source / study.relpath, target)
    shutil.copy(archive.source / archive.good[5].relpath, source / "crash_me.dcm")
    cfg = archive.config(tmp_path, source=source)
    plan = prepare(cfg)
    results = run_pool(plan.files, worker_context(plan), workers=2, task=crash_on_marked_file)
    assert set(results) == set(plan.files)
    assert results["crash_me.dcm"].reason == CRASH_REASON
    assert all(r.ok for p, r in results.items() if p != "crash_me.dcm")
