"""The dose of synthetic data (``classifier.synthetic_per_real``): counts, class mix, ratio 0,
shortfall, and what the stage records in model.json.

Uses the small processed and synthetic folders of tests/test_classifier.py (160 training rows,
80 released synthetic images).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.classifier.labels import task_labels
from tasks.classifier.regimes import (
    class_mix_counts,
    compose,
    limited_positions,
    synthetic_positions,
)
from tasks.config import ConfigError, load_config
from tests.conftest import PARAMS
from tests.test_classifier import SPLITS, tiny_config, write_processed, write_synthetic

FRACTION = 0.25
N_SYNTHETIC = 80

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("dose-data")
    return write_processed(base / "processed"), write_synthetic(base / "released",
                                                                n=N_SYNTHETIC)


@pytest.fixture(scope="module")
def frames(datasets: tuple[Path, Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    processed, synthetic = datasets
    return (pd.read_parquet(processed / "manifest.parquet"),
            pd.read_parquet(synthetic / "manifest.parquet"))


def _build(datasets, frames, regime: str, ratio: float | None, seed: int = 0,
           task: str = "metastasis"):
    (processed, synthetic), (real, syn) = datasets, frames
    return compose(task, regime, seed, processed, real, synthetic, syn, FRACTION, ratio)


def _n_limited(frames, seed: int = 0) -> int:
    real = frames[0]
    return len(limited_positions(real[real["split"] == "train"], FRACTION, seed))


def _synthetic_part(training):
    parts = [p for p in training.parts if p.source == "synthetic"]
    return parts[0] if parts else None


# --- the draw -------------------------------------------------------------------------------

def test_class_mix_counts_sum_keep_the_mix_and_grow_with_the_dose() -> None:
    sizes = np.array([70, 30])
    assert class_mix_counts(sizes, 10).tolist() == [7, 3]
    assert class_mix_counts(sizes, 0).tolist() == [0, 0]
    assert class_mix_counts(sizes, 500).tolist() == [70, 30]  # capped at what exists
    previous = np.zeros(2, dtype=np.int64)
    for count in range(101):
        counts = class_mix_counts(sizes, count)
        assert counts.sum() == count and (counts <= sizes).all()
        assert (counts >= previous).all()  # nested doses: no class ever shrinks
        assert abs(counts[1] - 0.3 * count) <= 0.5
        previous = counts


def test_synthetic_draw_is_seeded_and_nested() -> None:
    strata = np.array([0] * 50 + [1] * 30)
    small = synthetic_positions(strata, 8, seed=3)
    large = synthetic_positions(strata, 40, seed=3)
    assert np.array_equal(small, synthetic_positions(strata, 8, seed=3))
    assert set(small) <= set(large)
    assert not np.array_equal(large, synthetic_positions(strata, 40, seed=4))
    assert np.bincount(strata[large]).tolist() == [25, 15]


# --- composition ---------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["metastasis", "amyloidosis"])
@pytest.mark.parametrize("ratio", [0.5, 1.0, 1.5])
def test_dose_gives_the_count_and_the_synthetic_class_mix(datasets, frames, task: str,
                                                          ratio: float) -> None:
    n_limited = _n_limited(frames)
    mixed = _build(datasets, frames, "real_limited+synthetic", ratio, task=task)
    limited = _build(datasets, frames, "real_limited", ratio, task=task)
    part = _synthetic_part(mixed)
    wanted = round(ratio * n_limited)
    assert len(part.indices) == wanted == mixed.synthetic_dose["used"]
    assert mixed.summary()["images"] == n_limited + wanted
    # the real part is the seed's limited draw, untouched by the dose
    assert np.array_equal(mixed.parts[0].indices, limited.parts[0].indices)
    # the synthetic set's class mix, to within one image
    syn = frames[1]
    share = task_labels(syn, task).mean()
    assert abs(part.labels.sum() - share * wanted) <= 0.5
    # the labels are those of the drawn rows
    drawn = syn.set_index("index").loc[part.indices].reset_index()
    assert np.array_equal(part.labels, task_labels(drawn, task))
    dose = mixed.summary()["synthetic_dose"]
    assert dose == {**dose, "per_real": ratio, "n_real": n_limited, "requested": wanted,
                    "available": N_SYNTHETIC, "shortfall": 0,
                    "relative_to": "real_limited draw"}
    assert "notes" not in mixed.summary()


def test_dose_is_reproducible_per_seed_and_nested_across_doses(datasets, frames) -> None:
    one = _synthetic_part(_build(datasets, frames, "real_limited+synthetic", 1.0)).indices
    again = _synthetic_part(_build(datasets, frames, "real_limited+synthetic", 1.0)).indices
    half = _synthetic_part(_build(datasets, frames, "real_limited+synthetic", 0.5)).indices
    other_seed = _synthetic_part(_build(datasets, frames, "real_limited+synthetic", 1.0,
                                        seed=1)).indices
    assert np.array_equal(one, again)
    assert set(half) < set(one)
    assert not np.array_equal(one, other_seed[:len(one)])


def test_real_plus_synthetic_dose_is_relative_to_the_whole_split(datasets, frames) -> None:
    training = _build(datasets, frames, "real+synthetic", 0.25)
    assert len(training.parts[0].indices) == SPLITS["train"]
    assert len(_synthetic_part(training).indices) == round(0.25 * SPLITS["train"]) == 40
    assert training.synthetic_dose["relative_to"] == "training split"


def test_pure_synthetic_dose_is_relative_to_the_limited_draw(datasets, frames) -> None:
    pure = _build(datasets, frames, "synthetic", 1.0)
    mixed = _build(datasets, frames, "real_limited+synthetic", 1.0)
    assert [p.source for p in pure.parts] == ["synthetic"]
    assert len(pure.parts[0].indices) == _n_limited(frames)
    # at one dose and seed, 'synthetic' trains on exactly the mixed regime's synthetic images
    assert np.array_equal(pure.parts[0].indices, _synthetic_part(mixed).indices)


def test_no_ratio_uses_the_whole_released_set(datasets, frames) -> None:
    for regime in ("synthetic", "real_limited+synthetic", "real+synthetic"):
        training = _build(datasets, frames, regime, None)
        part = _synthetic_part(training)
        assert len(part.indices) == N_SYNTHETIC
        dose = training.summary()["synthetic_dose"]
        assert dose["per_real"] is None and dose["used"] == N_SYNTHETIC
    assert "synthetic_dose" not in _build(datasets, frames, "real_limited", None).summary()


def test_ratio_zero_gives_no_synthetic_image_and_says_so(datasets, frames) -> None:
    mixed = _build(datasets, frames, "real_limited+synthetic", 0.0)
    limited = _build(datasets, frames, "real_limited", 0.0)
    assert [p.source for p in mixed.parts] == ["real"]
    assert np.array_equal(mixed.parts[0].indices, limited.parts[0].indices)
    assert np.array_equal(mixed.labels, limited.labels)
    summary = mixed.summary()
    assert summary["synthetic_dose"]["used"] == 0
    assert summary["synthetic_dose"]["same_as_regime"] == "real_limited"
    assert any("equals regime 'real_limited'" in n for n in summary["notes"])
    full = _build(datasets, frames, "real+synthetic", 0.0).summary()
    assert full["images"] == SPLITS["train"]
    assert full["synthetic_dose"]["same_as_regime"] == "real"
    with pytest.raises(ValueError, match="regime 'synthetic' with classifier.synthetic_per_real"
                                         " = 0 has no training image"):
        _build(datasets, frames, "synthetic", 0.0)


def test_shortfall_uses_everything_and_is_recorded(datasets, frames,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    n_limited = _n_limited(frames)
    with caplog.at_level("WARNING", logger="synthdx.classifier"):
        training = _build(datasets, frames, "real_limited+synthetic", 10.0)
    dose = training.summary()["synthetic_dose"]
    assert dose["requested"] == 10 * n_limited > N_SYNTHETIC
    assert dose["used"] == N_SYNTHETIC == len(_synthetic_part(training).indices)
    assert dose["shortfall"] == 10 * n_limited - N_SYNTHETIC
    assert any(f"only {N_SYNTHETIC}" in n for n in training.summary()["notes"])
    assert "short" in caplog.text


def test_ratio_is_validated() -> None:
    assert load_config(PARAMS).classifier.synthetic_per_real is None
    assert load_config(PARAMS, ["classifier.synthetic_per_real=3"]).classifier \
        .synthetic_per_real == 3.0
    with pytest.raises(ConfigError, match="classifier.synthetic_per_real"):
        load_config(PARAMS, ["classifier.synthetic_per_real=-1"])


# --- the stage records it -------------------------------------------------------------------

def test_stage_records_dose_shortfall_and_ratio_zero_in_model_json(
        datasets, tmp_path: Path, mlflow_uri: str) -> None:
    from tasks.classifier.pipeline import run_train_classifier

    processed, synthetic = datasets
    outputs = {}
    for ratio in ("0", "10"):
        out = tmp_path / f"ratio{ratio}"
        cfg = tiny_config(processed, synthetic, out, "classifier.seeds=[0]",
                          "classifier.max_steps=4", "classifier.val_every_n_steps=2",
                          f"classifier.synthetic_per_real={ratio}")
        summary = run_train_classifier(cfg, ["metastasis"], ["real_limited+synthetic"])
        info = json.loads((out / "metastasis/real_limited+synthetic/seed0/model.json")
                          .read_text())
        outputs[ratio] = (info["training_set"], summary.describe())
    zero, zero_text = outputs["0"]
    assert [s["source"] for s in zero["sources"]] == ["real"]
    assert zero["synthetic_dose"]["same_as_regime"] == "real_limited"
    assert "equals regime 'real_limited'" in zero_text
    many, many_text = outputs["10"]
    assert many["synthetic_dose"]["shortfall"] > 0
    assert {s["source"]: s["images"] for s in many["sources"]}["synthetic"] == N_SYNTHETIC
    assert "short" in many_text
    predictions = pd.read_parquet(
        tmp_path / "ratio0/metastasis/real_limited+synthetic/seed0/predictions.parquet")
    # the findings travel with every scored case (subgroups by finding: Perugini 3, superscan)
    assert {"perugini_grade", "metastasis", "superscan"} <= set(predictions.columns)
    assert predictions["superscan"].isna().all()  # the fixture archive does not record it
    assert str(predictions["perugini_grade"].dtype) == "Int64"
