"""Incremental ingest: an archive that grows, changes and shrinks gives the dataset a full
re-ingest gives (same files, rows, pseudonyms and splits), reading only what changed; an
archive that lost too many files is refused with nothing rewritten.

One archive (a copy of the session's tiny phantom, labels as a hospital's file, a key file)
goes through the nights in order; each night's incremental output is compared with a full
ingest of the same archive into a fresh folder (no cache) by its DVC hash: every byte of
images, manifest, headers, report and montage.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from tasks.artifacts.dvc_hash import dvc_dir_hash
from tasks.config import IngestConfig, SplitConfig
from tasks.ingest.cache import INDEX_NAME, JOURNAL_NAME, cache_folder
from tasks.ingest.errors import IngestError
from tasks.ingest.pipeline import run_ingest
from tasks.ingest.split import assign_splits

KEY = "incremental-test-key-0123456789"
HELD_BACK = 3  # studies that arrive on night 2


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory, tiny_phantom: Path):
    """An archive, its labels and a config factory; the archive starts without 3 studies."""
    root = tmp_path_factory.mktemp("incremental")
    archive = root / "archive"
    shutil.copytree(tiny_phantom / "dicom", archive)
    labels = pd.read_csv(tiny_phantom / "labels.csv", dtype=str, keep_default_na=False)
    files = sorted(p.relative_to(archive).as_posix() for p in archive.rglob("*.dcm"))
    held = root / "held"
    for relpath in files[-HELD_BACK:]:  # a site's last studies arrive later
        (held / relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(archive / relpath, held / relpath)
    key = root / "key.txt"
    key.write_text(KEY)

    def config(out: Path, **changes: object) -> IngestConfig:
        values: dict[str, object] = {
            "source": archive, "labels": root / "labels.csv", "output": out / "processed",
            "quarantine": out / "quarantine", "image_rows": 48, "image_cols": 16,
            "workers": 2, "key_file": key, "internal_site": "aurelia",
            "split": SplitConfig(val_fraction=0.2, test_fraction=0.2, seed=3),
        }
        values.update(changes)
        return IngestConfig(**values)

    labels.to_csv(root / "labels.csv", index=False)
    return {"root": root, "archive": archive, "held": held, "labels": labels,
            "files": files, "config": config}


def _full(night: dict, name: str) -> Path:
    """A full ingest of the archive as it is now, into a fresh folder (empty cache)."""
    cfg = night["config"](night["root"] / name)
    result = run_ingest(cfg)
    assert result.reused == 0
    return Path(cfg.output)


def _manifest(output: Path) -> pd.DataFrame:
    return pd.read_parquet(output / "manifest.parquet")


@pytest.fixture(scope="module")
def nightly(night: dict) -> IngestConfig:
    """The project's ingest: one output and one cache, night after night."""
    return night["config"](night["root"] / "project")


def test_first_night_fills_the_cache(night: dict, nightly: IngestConfig) -> None:
    result = run_ingest(nightly)
    assert result.reused == 0 and result.ingested == len(night["files"]) - HELD_BACK
    entries = list((cache_folder(nightly) / "entries").glob("*/*.pkl"))
    assert len(entries) == result.files_total
    folder = cache_folder(nightly)
    blob = b"".join(p.read_bytes() for p in [*entries, folder / "pack.pkl", folder / INDEX_NAME])
    secrets = [KEY, str(night["archive"]), *night["files"], *night["labels"]["patient_id"],
               *night["labels"]["study_uid"]]
    assert not [s for s in secrets if s.encode() in blob]  # no identity, no key in the cache
    again = run_ingest(nightly)  # nothing changed: everything from the cache, same bytes
    assert again.reused == again.files_total and again.digest == result.digest


def test_grown_archive_processes_only_new_files_and_equals_a_full_ingest(
        night: dict, nightly: IngestConfig) -> None:
    before = _manifest(Path(nightly.output))
    for path in night["held"].rglob("*.dcm"):
        target = night["archive"] / path.relative_to(night["held"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)
    result = run_ingest(nightly)
    assert result.reused == result.files_total - HELD_BACK
    assert result.ingested == len(night["files"])
    full = _full(night, "full-grown")
    assert result.digest == dvc_dir_hash(full)  # every byte of every output file
    after = _manifest(Path(nightly.output))
    old = before.set_index("study_uid")[["pseudo_id", "split"]]
    assert after.set_index("study_uid").loc[old.index, ["pseudo_id", "split"]].equals(old)
    report = json.loads((Path(nightly.output) / "ingest_report.json").read_text())
    assert report["archive"]["dvc_hash"] == result.archive_digest == dvc_dir_hash(
        night["archive"])  # the archive version is DVC's hash of the source folder


def test_changed_label_row_updates_that_row_only(night: dict, nightly: IngestConfig) -> None:
    labels = night["labels"].copy()
    at = labels.index[labels["site"] == "coastal"][0]
    labels.loc[at, "perugini_grade"] = "3" if labels.loc[at, "perugini_grade"] != "3" else "0"
    labels.to_csv(night["root"] / "labels.csv", index=False)
    before = _manifest(Path(nightly.output))
    result = run_ingest(nightly)
    assert result.reused == result.files_total - 1
    after = _manifest(Path(nightly.output))
    changed = (before.drop(columns=["amyloid", "perugini_grade"]).equals(
        after.drop(columns=["amyloid", "perugini_grade"])),
        int((before["perugini_grade"] != after["perugini_grade"]).sum()))
    assert changed == (True, 1)
    assert result.digest == dvc_dir_hash(_full(night, "full-relabelled"))


def test_removed_file_disappears(night: dict, nightly: IngestConfig) -> None:
    gone = night["archive"] / night["files"][0]
    gone.unlink()
    result = run_ingest(nightly)
    assert result.ingested == len(night["files"]) - 1 and result.reused == result.files_total
    assert result.digest == dvc_dir_hash(_full(night, "full-shrunk"))


def test_mass_loss_is_refused_and_nothing_changes(night: dict, nightly: IngestConfig) -> None:
    output, index = Path(nightly.output), cache_folder(nightly) / INDEX_NAME
    digest, index_bytes = dvc_dir_hash(output), index.read_bytes()
    site = night["archive"] / "aurelia"
    moved = night["root"] / "unmounted"
    shutil.move(site, moved)  # a share that did not mount: a whole site gone
    try:
        with pytest.raises(IngestError, match=r"archive .*archive lost \d+ of the \d+ files") as e:
            run_ingest(nightly)
        assert "max_removed_fraction" in str(e.value) and "Nothing was changed" in str(e.value)
        assert dvc_dir_hash(output) == digest and index.read_bytes() == index_bytes
    finally:
        shutil.move(moved, site)
    assert run_ingest(nightly).reused > 0  # back: the cache serves again


def test_split_is_a_pure_function_of_patient_and_stable_as_data_grows() -> None:
    rng = np.random.default_rng(4)
    cfg = SplitConfig(val_fraction=0.15, test_fraction=0.2, seed=17)
    patients = [f"P{i:016x}" for i in rng.integers(0, 2**62, 3000)]
    small = pd.DataFrame({"pseudo_id": patients[:1000], "site": "a"})
    grown = pd.DataFrame({"pseudo_id": patients, "site": "a"})
    first, second = assign_splits(small, "a", cfg), assign_splits(grown, "a", cfg)
    assert second[:1000].equals(first)  # nobody moves when 2,000 patients arrive
    share = second.value_counts(normalize=True)
    assert abs(share["test"] - 0.2) < 0.03 and abs(share["val"] - 0.15) < 0.03
    other = assign_splits(grown, "a", SplitConfig(val_fraction=0.15, test_fraction=0.2, seed=18))
    assert (other != second).mean() > 0.3  # the seed (like the key) reshuffles


def test_few_new_files_run_here_with_a_journal_and_a_dead_run_falls_back_to_a_pool(
        night: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.ingest.pipeline as pipeline

    cfg = night["config"](night["root"] / "journal")
    journal = cache_folder(cfg) / JOURNAL_NAME
    newcomer = night["archive"] / sorted(night["archive"].rglob("*.dcm"))[-1].relative_to(
        night["archive"])
    aside = night["root"] / "aside.dcm"
    shutil.move(newcomer, aside)
    first = run_ingest(cfg)  # no cache yet: worker processes, as any full ingest
    shutil.move(aside, newcomer)
    calls: dict[str, list[int]] = {"here": [], "pool": []}
    run_here, run_pool = pipeline.run_here, pipeline.run_pool

    def here(relpaths: list[str], *args: object, **kwargs: object) -> dict:
        assert journal.is_file()  # written before the first file is touched
        calls["here"].append(len(relpaths))
        return run_here(relpaths, *args, **kwargs)

    def pool(relpaths: list[str], *args: object, **kwargs: object) -> dict:
        calls["pool"].append(len(relpaths))
        return run_pool(relpaths, *args, **kwargs)

    monkeypatch.setattr(pipeline, "run_here", here)
    monkeypatch.setattr(pipeline, "run_pool", pool)
    grown = run_ingest(cfg)  # one new file: processed here, no pool started
    assert calls == {"here": [1], "pool": []} and not journal.exists()
    assert grown.ingested == first.ingested + 1
    assert grown.digest == dvc_dir_hash(_full(night, "full-journal"))

    shutil.move(newcomer, aside)
    run_ingest(cfg)  # the file goes again (nothing to process)
    shutil.move(aside, newcomer)
    journal.write_text('{"version": 1, "files": ["x"]}')  # as a run that died here leaves it
    calls = {"here": [], "pool": []}
    again = run_ingest(cfg)
    assert calls == {"here": [], "pool": [1]} and not journal.exists()
    assert again.digest == grown.digest

    with pytest.raises(ValidationError, match="pool_min_files"):  # a bad value is named
        night["config"](night["root"] / "x", pool_min_files=-1)


def test_a_night_links_unchanged_shards_and_rewrites_only_what_it_must(
        tmp_path: Path, tiny_phantom: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Shards a night leaves alone are the last output's files (hard links, not copies);
    a shard copied in place is checked by its MD5 and kept, a shard file edited in the
    output, a lost pack and lost cache entries are all repaired, and each night still
    equals a full ingest byte for byte."""
    from tasks.artifacts import dataset

    monkeypatch.setattr(dataset, "SHARD_BYTES", 3 * 2 * 48 * 16 * 2)  # about 3 rows a shard
    archive = tmp_path / "archive"
    shutil.copytree(tiny_phantom / "dicom", archive)
    (tmp_path / "key.txt").write_text(KEY)

    def config(out: Path) -> IngestConfig:
        return IngestConfig(source=archive, labels=tiny_phantom / "labels.csv",
                            output=out / "processed", quarantine=out / "quarantine",
                            image_rows=48, image_cols=16, workers=1,
                            key_file=tmp_path / "key.txt", internal_site="aurelia")

    def shards(output: Path, kind: str = "images") -> dict[str, int]:
        index = json.loads((output / kind / "shards.json").read_text())
        return {s["file"]: (output / kind / s["file"]).stat().st_ino for s in index["shards"]}

    def equals_full(digest: str, name: str) -> bool:
        full = config(tmp_path / name)
        return digest == run_ingest(full).digest == dvc_dir_hash(Path(full.output))

    project = config(tmp_path / "project")
    output = Path(project.output)
    late = sorted(archive.rglob("*.dcm"))[5]
    late.rename(tmp_path / "late.dcm")
    run_ingest(project)
    before, before_headers = shards(output), shards(output, "headers")
    assert len(before) >= 4 and len(before_headers) == len(before)

    late.parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "late.dcm").rename(late)  # night 2: one new file
    grown = run_ingest(project)
    after = shards(output)
    linked = {f for f in after if before.get(f) == after[f]}
    assert len(after) - len(linked) <= 2 and len(linked) >= len(before) - 2
    headers = shards(output, "headers")
    assert len({f for f in headers if before_headers.get(f) == headers[f]}) == len(linked)
    assert equals_full(grown.digest, "full-1")

    # The same bytes under another stat (as a DVC checkout leaves them) are checked by MD5
    # and linked; a shard whose bytes changed is written again, from the cache.
    copied, edited = list(after)[:2]
    copy = output / "images" / copied
    copy.write_bytes(copy.read_bytes())
    path = output / "images" / edited
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    copied_inode, edited_inode = copy.stat().st_ino, path.stat().st_ino
    again = run_ingest(project)
    assert again.reused == again.files_total and again.digest == grown.digest
    now = shards(output)
    assert now[copied] == copied_inode  # trusted by its MD5, linked
    assert now[edited] != edited_inode  # written anew, under its name (the right bytes)
    assert all(now[f] == after[f] for f in after if f not in (copied, edited))
    assert dvc_dir_hash(output) == grown.digest

    # No pack and no entries: results come from nowhere, so every file is processed again.
    folder = cache_folder(project)
    (folder / "pack.pkl").unlink()
    shutil.rmtree(folder / "entries")
    rebuilt = run_ingest(project)
    assert rebuilt.reused == 0 and rebuilt.digest == grown.digest

    # Entries lost but the pack kept: a shard that must be written processes its files again.
    shutil.rmtree(folder / "entries")
    path = output / "images" / next(iter(shards(output)))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="synthdx.ingest"):
        repaired = run_ingest(project)
    assert repaired.reused == repaired.files_total and repaired.digest == grown.digest
    assert "processing its file again" in caplog.text
