"""Reader study (visual Turing test): drawing a study, readers, scoring, and bad input.

The study is drawn from small real datasets written through the on-disk formats: bone scans
rendered by the phantom (a processed set with held-out splits, and a released set in the audit's
output folder, smoothed the way a generator's images are). The browser tests
(tests/test_reader_study_browser.py) use the same builders.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from flows.cli import app
from tasks.artifacts.audit_output import AUDIT_JSON, released_dir, write_released
from tasks.artifacts.dataset import write_dataset
from tasks.config import load_config
from tasks.reader_study.passwords import hash_password, verify_password
from tasks.reader_study.scoring import fleiss_kappa, wilson
from tasks.reader_study.store import Assignment, Case, Reader, transaction

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
SIZE = (256, 64)
SPLITS = ["train", "val", "test", "test", "test", "external", "external"]
SYNTHETIC = 6
DIGEST = "0123456789abcdef0123456789abcdef.dir"


@functools.lru_cache(maxsize=2)
def render(count: int, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """``count`` phantom bone scans in [0, 1] at SIZE, with their labels."""
    from tasks.phantom.population import sample_studies
    from tasks.phantom.render import render_study

    cfg = load_config(PARAMS, [f"phantom.patients={count + 8}", f"phantom.rows={SIZE[0]}",
                               f"phantom.cols={SIZE[1]}", f"phantom.seed={seed}"])
    sites = {s.name: s for s in cfg.phantom.sites}
    # Every grade and both metastasis labels, so the scoring is tested on real variety.
    specs = [dataclasses.replace(s, perugini_grade=i % 4, metastasis=i % 3 == 0, superscan=False)
             for i, s in enumerate(sample_studies(cfg.phantom)[:count])]
    images = np.stack([render_study(s, sites[s.site], *SIZE)[0] for s in specs])
    images = images.astype(np.float32)
    images /= np.percentile(images, 99.5, axis=(1, 2, 3), keepdims=True) * 1.4
    labels = pd.DataFrame({"site": [s.site for s in specs],
                           "perugini_grade": np.array([s.perugini_grade for s in specs]),
                           "metastasis": np.array([s.metastasis for s in specs])})
    return np.clip(images, 0, 1), labels


def write_sources(base: Path) -> tuple[Path, Path]:
    """A processed dataset and an audit output folder with its released set; returns both."""
    import torch
    import torch.nn.functional as F

    images, labels = render(len(SPLITS) + SYNTHETIC, seed=11)
    processed = base / "processed"
    processed.mkdir(parents=True)
    n = len(SPLITS)
    write_dataset(processed, images[:n].astype(np.float16), labels.iloc[:n].assign(
        index=np.arange(n), pseudo_id=[f"PSEUDO{i:03d}" for i in range(n)], split=SPLITS,
        amyloid=lambda f: f["perugini_grade"] > 0).reset_index(drop=True))
    smooth = F.avg_pool2d(torch.from_numpy(images[n:]), 3, stride=1, padding=1,
                          count_include_pad=False).numpy()
    audit = base / "audit"
    synthetic = base / "synthetic"
    synthetic.mkdir(parents=True)
    (synthetic / "synthesis.json").write_text(json.dumps(
        {"model": {"version": "synthdx-bone-scan-diffusion/v1@test", "sha256": "ab" * 32}}))
    write_released(released_dir(audit), smooth.astype(np.float16), labels.iloc[n:].assign(
        sample_id=[f"syn-{i:05d}" for i in range(SYNTHETIC)], split="synthetic")
        .reset_index(drop=True), synthetic)
    (audit / AUDIT_JSON).write_text(json.dumps({"inputs": {"digests": {"synthetic": DIGEST}}}))
    return processed, audit


def study_args(processed: Path, audit: Path, study: Path, cases: int = 8) -> list[str]:
    return ["--params", str(PARAMS), "--set", f"ingest.output={processed}",
            "--set", f"audit.output={audit}", "--output", str(study), "--cases", str(cases)]


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_sources(tmp_path_factory.mktemp("reader-sources"))


@pytest.fixture(scope="module")
def study(sources: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("reader-study") / "study"
    result, out = invoke("reader-study", "create", *study_args(*sources, folder))
    assert result.exit_code == 0, out
    return folder


def open_cfg(folder: Path):
    return load_config(PARAMS, [f"reader_study.output={folder}"])


def test_create_draws_a_balanced_study_with_the_truth_kept_from_the_images(study, sources):
    from tasks.reader_study.study import open_study

    opened = open_study(open_cfg(study).reader_study)
    with transaction(opened.engine) as session:
        cases = session.scalars(select(Case).order_by(Case.case_id)).all()
    assert [c.case_id for c in cases] == list(range(1, 9))
    assert sorted(c.origin for c in cases) == ["real"] * 4 + ["synthetic"] * 4
    # Real cases come from the held-out splits only, by pseudonym; synthetic from the released set.
    real = [c.source for c in cases if c.origin == "real"]
    assert all(s.split("/")[-1] in ("test", "external") and "PSEUDO" in s for s in real)
    assert all(c.source.startswith("released:syn-") for c in cases if c.origin == "synthetic")
    assert opened.images.shape == (8, 2, *SIZE)
    # The served bytes are a fixed-size array: every case's response has the same length.
    assert {len(opened.pixels(c.image_row)) for c in cases} == {2 * SIZE[0] * SIZE[1] * 2}
    # Row k of the study's store is case k + 1, and it holds that case's source image.
    processed, _ = sources
    manifest = pd.read_parquet(processed / "manifest.parquet")
    source_images = np.load(processed / "images.npy")
    first_real = next(c for c in cases if c.origin == "real")
    row = manifest.index[manifest["pseudo_id"] == first_real.source.split(":")[1].split("/")[0]]
    assert np.allclose(opened.images[first_real.image_row], source_images[row[0]], atol=1e-3)
    details = json.loads((study / "study.json").read_text())
    assert details["synthetic_digest"] == DIGEST
    assert details["model_version"] == "synthdx-bone-scan-diffusion/v1@test"
    assert "origin" not in json.dumps(details)
    opened.engine.dispose()


def test_real_cases_are_matched_to_the_synthetic_finding_classes():
    from tasks.reader_study.create import _resize, draw_rows

    synthetic = pd.DataFrame({"perugini_grade": [0, 0, 2, 3, 0, 1],
                              "metastasis": [False, True, False, False, True, False]})
    real = pd.DataFrame({"perugini_grade": [0] * 10 + [2, 3, 1],
                         "metastasis": [False] * 7 + [True] * 3 + [False] * 3})
    rng = np.random.default_rng(0)
    syn, chosen, matched = draw_rows(synthetic, real, 4, rng)
    assert len(set(chosen)) == 4 and matched == 4
    key = lambda f: list(zip(f["perugini_grade"] > 0, f["metastasis"], strict=True))  # noqa: E731
    assert sorted(key(synthetic.iloc[syn])) == sorted(key(real.iloc[chosen]))
    # Area resizing keeps the mean counts of a view.
    image = rng.random((1, 2, 8, 4)).astype(np.float32)
    assert np.isclose(_resize(image, (4, 2)).mean(), image.mean(), atol=1e-6)


def test_readers_get_their_own_order_and_a_name_twice_is_refused(study):
    result, out = invoke("reader-study", "add-reader", "carol", "--params", str(PARAMS),
                         "--output", str(study), "--password", "carol-secret")
    assert result.exit_code == 0, out
    # Without --password the owner is asked for it twice, hidden.
    result = CliRunner().invoke(app, ["reader-study", "add-reader", "dave", "--params",
                                      str(PARAMS), "--output", str(study)],
                                input="dave-secret\ndave-secret\n")
    assert result.exit_code == 0, result.output
    assert "dave-secret" not in result.output
    result, out = invoke("reader-study", "add-reader", "carol", "--params", str(PARAMS),
                         "--output", str(study), "--password", "another-secret")
    assert result.exit_code == 1
    assert "reader 'carol' already exists" in out
    from tasks.reader_study.study import open_study

    opened = open_study(open_cfg(study).reader_study)
    with transaction(opened.engine) as session:
        readers = session.scalars(select(Reader).order_by(Reader.id)).all()
        orders = [session.scalars(select(Assignment.case_id).where(
            Assignment.reader_id == r.id).order_by(Assignment.position)).all() for r in readers]
    opened.engine.dispose()
    assert [r.name for r in readers] == ["carol", "dave"]
    assert all(sorted(o) == list(range(1, 9)) for o in orders) and orders[0] != orders[1]
    # The first password stays; only a hash is stored.
    assert verify_password("carol-secret", readers[0].password_hash)
    assert verify_password("dave-secret", readers[1].password_hash)
    assert "carol-secret" not in readers[0].password_hash


def test_passwords_are_salted_scrypt_hashes():
    one, two = hash_password("correct horse"), hash_password("correct horse")
    assert one.startswith("scrypt$") and one != two
    assert verify_password("correct horse", one) and not verify_password("correct hors", one)
    with pytest.raises(ValueError, match="at least 8"):
        hash_password("short")


def test_fleiss_kappa_and_wilson_match_published_values():
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories, kappa 0.210.
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0],
             [2, 2, 8, 1, 1], [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2],
             [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(np.array(table)) == pytest.approx(0.20993, abs=5e-5)
    assert fleiss_kappa(np.array([[2, 0], [0, 2]])) == pytest.approx(1.0)
    assert fleiss_kappa(np.array([[2, 0], [2, 0]])) is None  # one category only: undefined
    # Wilson 95 % interval of 5/10: 0.2366 to 0.7634 (Newcombe 1998, table I).
    low, high = wilson(5, 10, 0.95)
    assert (low, high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))


def test_create_refuses_bad_input_and_writes_nothing(sources, tmp_path):
    processed, audit = sources
    target = tmp_path / "study"
    # No released synthetic set.
    result, out = invoke("reader-study", "create",
                         *study_args(processed, tmp_path / "no-audit", target))
    assert result.exit_code == 1
    assert f"{tmp_path / 'no-audit' / 'released'}: no released synthetic set" in out
    assert not target.exists()
    # More cases than the released set (6 images) can give.
    result, out = invoke("reader-study", "create", *study_args(processed, audit, target, 14))
    assert result.exit_code == 1
    assert f"{released_dir(audit)}: the released synthetic set has 6 labelled images" in out
    assert "--cases 12 at most" in out and not target.exists()
    # More than the real held-out splits (5 of 7 images) can give.
    result, out = invoke("reader-study", "create", *study_args(processed, audit, target, 12))
    assert result.exit_code == 1
    assert f"{processed}: the processed dataset has 5 labelled real images" in out
    assert not target.exists()
    # An odd number of cases cannot be balanced.
    result, out = invoke("reader-study", "create", *study_args(processed, audit, target, 7))
    assert result.exit_code == 2 and "cases must be even" in out
    assert list(tmp_path.iterdir()) == []
    # An existing study is never overwritten.
    target.mkdir()
    (target / "keep").write_text("answers")
    result, out = invoke("reader-study", "create", *study_args(processed, audit, target))
    assert result.exit_code == 1 and "a study folder is already there" in out
    assert (target / "keep").read_text() == "answers"


def test_serve_on_a_port_in_use_names_the_port(study):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result, out = invoke("reader-study", "serve", "--params", str(PARAMS),
                             "--output", str(study), "--port", str(port))
    assert result.exit_code == 1
    assert f"port {port} on 127.0.0.1 is in use" in out


def test_commands_on_a_missing_study_say_so(tmp_path):
    result, out = invoke("reader-study", "report", "--params", str(PARAMS),
                         "--output", str(tmp_path / "none"), "--no-mlflow")
    assert result.exit_code == 1
    assert f"{tmp_path / 'none'}: no reader study here" in out


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:Using .httpx. with .starlette.testclient.")
def test_the_same_code_runs_the_study_on_postgresql(sources, tmp_path, monkeypatch):
    """A team's PostgreSQL by URL: create, a reader, an answer once and only once, a report."""
    import re

    from starlette.testclient import TestClient

    from tasks.reader_study.readers import add_reader
    from tasks.reader_study.scoring import score_study
    from tasks.reader_study.study import open_study
    from tasks.reader_study.web import build_app
    from tests.servers import postgres

    with postgres(("reader_study",)) as pg:
        url = pg.url("reader_study")
        monkeypatch.setenv("SYNTHDX_READER_STUDY_DB", url)  # keeps the password off argv
        result, out = invoke("reader-study", "create",
                             *study_args(*sources, tmp_path / "study", cases=6))
        assert result.exit_code == 0, out
        assert pg.password not in out and "***" in out
        assert not (tmp_path / "study" / "study.db").exists()
        # A second study in the same database is refused; the first is left as it was.
        result, out = invoke("reader-study", "create",
                             *study_args(*sources, tmp_path / "other", cases=6))
        assert result.exit_code == 1 and "already holds a study" in out
        assert not (tmp_path / "other").exists()
        opened = open_study(open_cfg(tmp_path / "study").reader_study)
        add_reader(opened, "pat", "pat-password", seed=1)
        client = TestClient(build_app(opened, session_minutes=5), base_url="http://testserver")
        token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text)[1]
        page = client.post("/login", data={"name": "pat", "password": "pat-password",
                                           "csrf": token})
        assert page.url.path == "/case/1"
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)[1]
        form = {"csrf": csrf, "origin": "synthetic", "perugini_grade": "2",
                "metastasis": "yes", "confidence": "4"}
        assert client.post("/case/1/answer", data=form).url.path == "/case/2"
        assert client.post("/case/1/answer", data=form).status_code == 409
        assert len(client.get("/cases/1/pixels").content) == 2 * 2 * SIZE[0] * SIZE[1]
        doc = score_study(opened, 0.95)
        assert doc["turing"]["per_reader"]["pat"]["answered"] == 1
        opened.engine.dispose()


def test_the_server_starts_without_the_training_stack():
    """serve, add-reader and report load no torch/MONAI (seconds of start-up on 2 cores)."""
    import subprocess
    import sys

    code = ("import sys, flows.cli, tasks.reader_study.web, tasks.reader_study.report; "
            "print(sorted(m for m in ('torch', 'monai', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
