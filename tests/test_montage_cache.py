"""The montage cache: the same picture is copied, not drawn again; a changed one is redrawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.common import montage


def _data(seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    images = rng.random((4, 2, 16, 4)).astype(np.float16)
    manifest = pd.DataFrame({"index": range(4), "site": ["a", "a", "b", "b"],
                             "split": "train", "perugini_grade": [0, 3, 0, 2],
                             "amyloid": [False, True, False, True],
                             "metastasis": [True, False, False, False]})
    return images, manifest


def test_same_picture_is_copied_and_a_changed_one_redrawn(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, manifest = _data()
    cache = tmp_path / "cache"
    montage.write_montage(images, manifest, tmp_path / "first.png", cache=cache)
    kept = list(cache.glob("montage-*.png"))
    assert len(kept) == 1 and kept[0].read_bytes() == (tmp_path / "first.png").read_bytes()

    def no_drawing(*args: object) -> None:
        raise AssertionError("drawn although the same picture was cached")

    monkeypatch.setattr(montage, "_draw", no_drawing)
    montage.write_montage(images, manifest, tmp_path / "again.png", cache=cache)
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "first.png").read_bytes()

    monkeypatch.undo()
    images[1, 0, 3, 2] = 0.5  # one pixel of a shown image changes: a new picture
    montage.write_montage(images, manifest, tmp_path / "changed.png", cache=cache)
    assert (tmp_path / "changed.png").read_bytes() != (tmp_path / "first.png").read_bytes()
    assert [p.name for p in cache.glob("montage-*.png")] != [kept[0].name]
    assert len(list(cache.glob("montage-*.png"))) == 1  # only the latest is kept


def test_without_cache_nothing_is_kept(tmp_path: Path) -> None:
    images, manifest = _data()
    montage.write_montage(images, manifest, tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 0
    assert list(tmp_path.iterdir()) == [tmp_path / "m.png"]


def test_rows_named_by_keys_find_the_cached_picture_without_reading_an_image(
        tmp_path: Path) -> None:
    images, manifest = _data()
    cache, keys = tmp_path / "cache", ["k0", "k1", "k2", "k3"]
    montage.write_montage(images, manifest, tmp_path / "first.png", cache=cache, row_keys=keys)

    class Unread:
        shape = images.shape

        def __getitem__(self, index: object) -> np.ndarray:
            raise AssertionError("an image was read although its key names a cached picture")

    montage.write_montage(Unread(), manifest, tmp_path / "again.png", cache=cache,
                          row_keys=keys)
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "first.png").read_bytes()
    images[1, 0, 3, 2] = 0.5  # with a new key for that row: a new picture, drawn
    montage.write_montage(images, manifest, tmp_path / "changed.png", cache=cache,
            row_keys=["k0", "k1*", "k2", "k3"])
    assert (tmp_path / "changed.png").read_bytes() != (tmp_path / "first.png").read_bytes()
    # A row without a key: named by pixels, as without keys (same picture as without keys).
    montage.write_montage(images, manifest, tmp_path / "pixels.png", cache=cache,
                          row_keys=["k0", None, "k2", "k3"])
    assert (tmp_path / "pixels.png").read_bytes() == (tmp_path / "changed.png").read_bytes()
