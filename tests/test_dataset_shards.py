"""The sharded image layout of a processed dataset: cut, written, read like an array."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tasks.artifacts.dataset import (
    DatasetError,
    ShardedImages,
    open_dataset,
    open_images,
    read_headers,
    shard_bounds,
    stored_size,
    write_header_shards,
    write_image_shards,
)


def _array(n: int = 23) -> np.ndarray:
    return np.random.default_rng(0).random((n, 2, 6, 4)).astype(np.float16)


def _write(folder: Path, images: np.ndarray, rows_per_shard: int = 4) -> list:
    keys = [f"key-{i}" for i in range(len(images))]
    bounds = shard_bounds(keys, row_bytes=1, target_bytes=rows_per_shard)
    return write_image_shards(folder, images.shape, bounds, lambda a, b: images[a:b])


def test_bounds_are_content_defined_a_new_row_changes_one_shard() -> None:
    keys = [f"file-{i:04d}" for i in range(400)]
    bounds = shard_bounds(keys, row_bytes=1, target_bytes=8)
    assert bounds[0][0] == 0 and bounds[-1][1] == 400
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    assert max(e - s for s, e in bounds) <= 32 and 25 <= len(bounds) <= 80
    grown = [*keys[:200], "file-new", *keys[200:]]
    before = {tuple(keys[s:e]) for s, e in bounds}
    after = {tuple(grown[s:e]) for s, e in shard_bounds(grown, row_bytes=1, target_bytes=8)}
    assert len(after - before) <= 2 and len(before - after) <= 2  # the rest are the same rows


def test_written_shards_read_back_like_an_array(tmp_path: Path) -> None:
    images = _array()
    shards = _write(tmp_path, images)
    assert len(shards) > 2 and sum(s.rows for s in shards) == len(images)
    for shard in shards:
        data = (tmp_path / "images" / shard.file).read_bytes()
        assert hashlib.md5(data).hexdigest() == shard.md5 and shard.file == f"{shard.md5}.npy"
    read = open_images(tmp_path)
    assert isinstance(read, ShardedImages)
    assert read.shape == images.shape and read.ndim == 4 and len(read) == len(images)
    np.testing.assert_array_equal(np.asarray(read), images)
    np.testing.assert_array_equal(read[5], images[5])
    np.testing.assert_array_equal(read[-1], images[-1])
    np.testing.assert_array_equal(read[3:17:2], images[3:17:2])
    np.testing.assert_array_equal(read[[9, 0, 9, 22]], images[[9, 0, 9, 22]])
    np.testing.assert_array_equal(read[np.arange(23) % 3 == 0], images[np.arange(23) % 3 == 0])
    np.testing.assert_array_equal(read[[1, 2], 0], images[[1, 2], 0])
    np.testing.assert_array_equal(read[4, 1], images[4, 1])
    assert read[[]].shape == (0, 2, 6, 4)
    assert np.asarray(read, dtype=np.float32).dtype == np.float32
    with pytest.raises(IndexError, match="out of"):
        read[23]
    with pytest.raises(IndexError, match="out of range"):
        read[[0, 40]]
    assert stored_size(tmp_path) == (6, 4)


def test_header_shards_read_back_in_row_order(tmp_path: Path) -> None:
    lines = [json.dumps({"row": i}) for i in range(23)]
    bounds = shard_bounds([f"key-{i}" for i in range(23)], row_bytes=1, target_bytes=4)
    shards = write_header_shards(tmp_path, bounds, lambda a, b: lines[a:b])
    assert len(shards) == len(bounds) > 2 and read_headers(tmp_path) == lines
    (tmp_path / "headers" / shards[0].file).write_text("")  # its lines lost
    with pytest.raises(DatasetError, match=f"{shards[0].file}: 0 lines, the index says"):
        read_headers(tmp_path)


def test_a_missing_or_wrong_shard_is_named(tmp_path: Path) -> None:
    images = _array()
    shards = _write(tmp_path, images)
    import pandas as pd

    pd.DataFrame({"index": np.arange(len(images))}).to_parquet(tmp_path / "manifest.parquet")
    open_dataset(tmp_path, "processed dataset")
    np.save(tmp_path / "images" / shards[1].file, images[:1])  # one row where more belong
    with pytest.raises(DatasetError, match=f"{shards[1].file}: shard is"):
        open_dataset(tmp_path, "processed dataset")
    (tmp_path / "images" / shards[1].file).unlink()
    with pytest.raises(DatasetError, match=f"{shards[1].file}: missing image shard"):
        open_dataset(tmp_path, "processed dataset")
    index = tmp_path / "images" / "shards.json"
    doc = json.loads(index.read_text())
    doc["shape"][0] += 1
    index.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="do not add up"):
        open_dataset(tmp_path, "processed dataset")
    index.write_text("{not json")
    with pytest.raises(DatasetError, match="shards.json: not a readable JSON shard index"):
        open_dataset(tmp_path, "processed dataset")
