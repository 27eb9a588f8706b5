"""Ingest against DICOM files nobody here wrote: pydicom's own test corpus.

Other modalities (CT, MR, US, RT, SR, SEG...), every transfer syntax pydicom ships examples
of (deflated, big endian, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE), damaged
and non-DICOM files. Each must end ingested or quarantined with a reason, and the run must
finish with the phantom studies beside them ingested.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom.data

from tasks.config import load_config
from tasks.ingest.pipeline import run_ingest
from tests.conftest import PARAMS


def test_foreign_corpus_every_file_accounted_for(tiny_phantom: Path, tmp_path: Path,
                                                 monkeypatch) -> None:
    monkeypatch.setenv("SYNTHDX_PSEUDONYM_KEY", "real-world-corpus-key-0123456789")
    source = tmp_path / "source"
    corpus = Path(pydicom.data.__file__).parent / "test_files"
    foreign = [f for f in corpus.rglob("*") if f.is_file()]
    assert len(foreign) > 50
    for f in foreign:
        target = source / "foreign" / f.relative_to(corpus)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    shutil.copytree(tiny_phantom / "dicom", source / "phantom")
    ours = sum(1 for _ in (source / "phantom").rglob("*.dcm"))
    cfg = load_config(PARAMS, [f"ingest.source={source}",
                               f"ingest.labels={tiny_phantom / 'labels.csv'}",
                               f"ingest.output={tmp_path / 'out'}",
                               f"ingest.quarantine={tmp_path / 'q'}", "ingest.workers=2"])
    result = run_ingest(cfg.ingest)
    report = json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    files = {str(p.relative_to(source)) for p in source.rglob("*") if p.is_file()}
    # The report names files by their quarantine copies; the paths are in reasons.json only.
    local = json.loads((tmp_path / "q" / "reasons.json").read_text())
    assert [e["file"] for e in local] == [q["file"] for q in report["quarantined"]]
    quarantined = {e["source"]: e["file"] for e in local}
    assert report["files_total"] == len(files)
    assert report["ingested"] + len(quarantined) == len(files)
    assert result.ingested == ours  # every phantom study, and nothing foreign
    assert all(p.startswith("foreign/") for p in quarantined)
    assert all(q["reason"] and "Traceback" not in q["reason"] for q in report["quarantined"])
    reasons = " | ".join(q["reason"] for q in report["quarantined"])
    for expected in ("modality is CT, expected NM", "modality is MR, expected NM",
                     "not a DICOM file", "truncated or corrupt"):
        assert expected in reasons
    # quarantined copies are byte-identical to the originals
    for rel, name in list(quarantined.items())[:20]:
        assert (tmp_path / "q" / name).read_bytes() == (source / rel).read_bytes()
