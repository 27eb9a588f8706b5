"""Ingest building blocks: labels file, views, intensity normalisation, splits, DVC hash."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from tasks.artifacts.dvc_hash import dvc_dir_hash
from tasks.config import SplitConfig
from tasks.ingest.errors import IngestError
from tasks.ingest.labels import load_labels
from tasks.ingest.pixels import area_resize, normalise, percentile
from tasks.ingest.split import assign_splits
from tasks.ingest.views import ViewError, identify_views

REQUIRED = "study_uid,patient_id,site,perugini_grade,metastasis"


def _labels(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


# -- labels -----------------------------------------------------------------------------------

def test_labels_valid_rows_optional_and_unknown_columns(tmp_path: Path) -> None:
    path = _labels(tmp_path, f"{REQUIRED},Sex,age,tracer,fracture,ward\n"
                             "1.2.3,MRN1,alpha,2,1,f,70.5,Tc99m HMDP,yes,B4\n"
                             "1.2.4,MRN2,beta,0,0,,,,0,B5\n")
    table = load_labels(path)
    row = table.rows["1.2.3"]
    assert (row.site, row.perugini_grade, row.metastasis) == ("alpha", 2, True)
    assert row.extras == {"sex": "F", "age": 70.5, "tracer": "HMDP", "fracture": True}
    assert table.rows["1.2.4"].extras["sex"] is None
    assert table.unknown_columns == ["ward"]
    assert "MRN1" not in repr(row)


@pytest.mark.parametrize("cells, reason", [
    ("alpha,5,1", "invalid label perugini_grade=5 (must be 0-3)"),
    ("alpha,x,1", "invalid label perugini_grade=x (must be 0-3)"),
    ("alpha,2,2", "invalid label metastasis=2 (must be 0 or 1)"),
    ("St Mary,2,1", "invalid label site='St Mary' (letters, digits, '_' and '-' only)"),
    ("alpha,,1", "invalid label perugini_grade='' (must be 0-3)"),
])
def test_labels_invalid_values_become_reasons(tmp_path: Path, cells: str, reason: str) -> None:
    table = load_labels(_labels(tmp_path, f"{REQUIRED}\n1.2.3,MRN1,{cells}\n"))
    assert table.problems == {"1.2.3": reason}
    assert not table.rows


def test_labels_conflicting_duplicates_and_identical_repeats(tmp_path: Path) -> None:
    table = load_labels(_labels(tmp_path, f"{REQUIRED}\n1.1,M1,a,1,0\n1.1,M1,a,1,0\n"
                                          "1.2,M2,a,1,0\n1.2,M2,a,3,0\n"))
    assert "1.1" in table.rows
    assert table.problems["1.2"] == "the labels file has 2 different rows for this study"


def test_labels_file_errors_name_file_and_column(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match=r"labels\.csv does not exist"):
        load_labels(tmp_path / "labels.csv")
    with pytest.raises(IngestError, match=r"labels\.csv has no column 'metastasis'"):
        load_labels(_labels(tmp_path, "study_uid,patient_id,site,perugini_grade\n1,2,a,0\n"))
    png = tmp_path / "labels.csv"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00\x10binary\x00")
    with pytest.raises(IngestError, match=r"labels\.csv (is not a readable CSV|has no column)"):
        load_labels(png)
    with pytest.raises(IngestError, match="not a readable CSV"):
        load_labels(_labels(tmp_path, ""))


# -- views ------------------------------------------------------------------------------------

def _nm(codes: list[tuple[str, str] | None], vector: list[int] | None = None) -> Dataset:
    ds = Dataset()
    items = []
    for code in codes:
        item = Dataset()
        if code is not None:
            view = Dataset()
            view.CodeValue, view.CodeMeaning = code
            item.ViewCodeSequence = Sequence([view])
        items.append(item)
    ds.DetectorInformationSequence = Sequence(items)
    if vector is not None:
        ds.DetectorVector = vector
        ds.FrameIncrementPointer = 0x00540020
    return ds


@pytest.mark.parametrize("codes, vector, expected", [
    ([("399348003", "antero-posterior"), ("399300004", "postero-anterior")], [1, 2],
     ((0, 1), "dicom")),
    ([("399348003", ""), ("399300004", "")], [2, 1], ((1, 0), "dicom")),
    ([("", "POST"), ("", "ANT")], None, ((1, 0), "dicom")),
    ([("X1", "AP"), ("X2", "PA")], [1, 2], ((0, 1), "dicom")),
    ([None, None], [1, 2], ((0, 1), "assumed")),
])
def test_views_from_code_value_or_meaning(codes: list, vector: list | None,
                                          expected: tuple) -> None:
    assert identify_views(_nm(codes, vector), 2) == expected
    assert identify_views(Dataset(), 2) == ((0, 1), "assumed")


def test_views_that_cannot_be_told_apart() -> None:
    with pytest.raises(ViewError, match="'AP' and 'AP'"):
        identify_views(_nm([("", "AP"), ("", "AP")]), 2)
    with pytest.raises(ViewError, match="'LATERAL' and no view code"):
        identify_views(_nm([("", "LATERAL"), None]), 2)


# -- pixels -----------------------------------------------------------------------------------

@pytest.mark.parametrize("q", [99.5, 99.9, 95.0, 100.0, 60.0])
def test_percentile_matches_numpy(q: float) -> None:
    rng = np.random.default_rng(3)
    cases = [rng.poisson(4.0, (2, 300, 80)).astype(np.uint16),
             np.zeros((2, 100, 100), np.uint16),
             rng.integers(0, 3, 50_001).astype(np.uint16),
             rng.standard_normal(70_000).astype(np.float32),
             np.sort(rng.poisson(9, 40_000)).astype(np.int16)]
    for values in cases:
        assert percentile(values, q) == pytest.approx(np.percentile(values, q), abs=1e-6)


def test_integer_percentile_matches_numpy() -> None:
    from tasks.ingest.pixels import integer_percentile

    rng = np.random.default_rng(5)
    for values in (rng.poisson(3.0, 40_000), np.zeros(1000, np.int64),
                   np.concatenate([np.zeros(30_000, np.int64), rng.integers(0, 9000, 2000)]),
                   np.array([7])):
        for q in (50.0, 99.0, 99.5, 100.0):
            assert integer_percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_block_mean_fast_path_equals_pillow_box_filter() -> None:
    from PIL import Image

    views = np.random.default_rng(2).poisson(7.0, (2, 96, 32)).astype(np.uint16)
    image, reference, _ = normalise(views, 99.5, 24, 8)
    boxed = np.stack([np.asarray(Image.fromarray(v.astype(np.float32)).resize(
        (8, 24), Image.Resampling.BOX)) for v in views])
    assert reference == pytest.approx(np.percentile(boxed, 99.5), rel=1e-5)
    expected = np.clip(boxed * (0.5 / reference), 0, 1).astype(np.float16)
    assert np.array_equal(image, expected)


@pytest.mark.parametrize("shape", [(96, 32), (120, 40), (100, 30)])
def test_area_resize_preserves_mean_and_antialiases(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    view = rng.poisson(5.0, shape).astype(np.float32)
    out = area_resize(view, 48, 16)
    assert out.shape == (48, 16) and out.dtype == np.float32
    assert out.mean() == pytest.approx(view.mean(), rel=0.02)
    checker = (np.indices(shape).sum(axis=0) % 2 * 2.0).astype(np.float32)  # std 1
    smoothed = area_resize(checker, 48, 16)  # the finest detail must average out, not alias
    assert smoothed.mean() == pytest.approx(1.0, abs=0.01) and smoothed.std() < 0.1


def test_normalise_maps_percentile_to_half_and_keeps_channels() -> None:
    views = np.full((2, 96, 32), 10, dtype=np.uint16)
    views[0, :8, :2] = 1000  # a small hot spot (bladder, lesion) on the anterior view only
    image, reference, counts = normalise(views, 99.5, 48, 16)
    assert image.dtype == np.float16 and image.shape == (2, 48, 16)
    assert list(counts) == [int(v.sum()) for v in views.astype(np.int64)]
    assert reference == 10  # the percentile of the area-averaged counts
    assert float(image[0, 4:, 1:].mean()) == 0.5 and float(image[1].max()) == 0.5
    assert float(image[0, :4, 0].min()) == 1.0  # saturates instead of squashing the rest
    with pytest.raises(ValueError, match="image is empty"):
        normalise(np.zeros((2, 96, 32), np.uint16), 99.5, 48, 16)


# -- splits -----------------------------------------------------------------------------------

def test_split_by_patient_internal_only() -> None:
    rng = np.random.default_rng(1)
    rows = []
    for p in range(120):
        site = "alpha" if p < 80 else "beta"
        for _ in range(1 + p % 2):
            rows.append({"pseudo_id": f"P{p}", "site": site, "amyloid": bool(rng.random() < .2),
                         "metastasis": bool(rng.random() < .3)})
    manifest = pd.DataFrame(rows)
    split = assign_splits(manifest, "alpha", SplitConfig(val_fraction=0.15, test_fraction=0.2))
    assert (split[manifest.site == "beta"] == "external").all()
    assert set(split[manifest.site == "alpha"]) == {"train", "val", "test"}
    assert (manifest.assign(split=split).groupby("pseudo_id")["split"].nunique() == 1).all()
    share = split[manifest.site == "alpha"].value_counts(normalize=True)
    assert 0.12 <= share["test"] <= 0.28 and 0.08 <= share["val"] <= 0.25
    again = assign_splits(manifest, "alpha", SplitConfig(val_fraction=0.15, test_fraction=0.2))
    assert split.equals(again)


# -- DVC hash ---------------------------------------------------------------------------------

def test_dvc_dir_hash_equals_dvc_data(tmp_path: Path) -> None:
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    root = tmp_path / "out"
    (root / "sub").mkdir(parents=True)
    np.save(root / "images.npy", np.arange(100, dtype=np.float16))
    (root / "report.json").write_text(json.dumps({"a": 1}) + "\r\n")  # no dos2unix in DVC 3
    (root / "sub" / "b.txt").write_text("x")
    fs = LocalFileSystem()
    odb = HashFileDB(fs, str(tmp_path / "odb"))
    _, _, tree = build(odb, str(root), fs, "md5", dry_run=True)
    assert dvc_dir_hash(root) == tree.hash_info.value
    assert tree.hash_info.value.endswith(".dir")


@pytest.mark.parametrize("shape", [(5, 2, 12, 4), (0, 2, 12, 4)])
def test_dataset_writer_hashes_images_from_memory_as_the_file_holds_them(
        tmp_path: Path, shape: tuple[int, ...]) -> None:
    import pandas as pd

    from tasks.artifacts.dataset import IMAGES_FILE, write_dataset
    from tasks.artifacts.dvc_hash import file_md5

    images = np.random.default_rng(1).random(shape).astype(np.float16)
    md5 = write_dataset(tmp_path, images, pd.DataFrame({"index": np.arange(shape[0])}))
    assert md5 == file_md5(tmp_path / IMAGES_FILE)  # also for an empty set (nothing released)
    assert dvc_dir_hash(tmp_path, {IMAGES_FILE: md5}) == dvc_dir_hash(tmp_path)
