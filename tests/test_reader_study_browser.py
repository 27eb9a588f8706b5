"""The reader study web app in a real headless browser (Debian's Chromium driven by Playwright).

The server is the real command (``synthdx reader-study serve``) in its own process, on a study
drawn from the phantom-rendered datasets of tests/test_reader_study.py. Two readers log in and
answer; the server is killed (SIGKILL) under one of them and restarted, and he goes on where he
was; he stops for now and resumes after logging in again; the report's numbers must be the ones
their answers give. Each security refusal is a test of its own. The browser is the system's
(/usr/bin/chromium): nothing is downloaded.

SYNTHDX_SCREENSHOT=path writes the reader view's screenshot there too (docs/reader_study.png).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, update
from test_reader_study import PARAMS, invoke, study_args, write_sources

from tasks.config import load_config
from tasks.reader_study.store import Answer, Assignment, Case, LoginSession, Reader, transaction

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORDS = {"alice": "alice-password", "bob": "bob-password"}

if not CHROMIUM.is_file() and os.environ.get("SYNTHDX_REQUIRE_CHROMIUM"):
    raise RuntimeError(f"{CHROMIUM} is missing (apt-get install chromium)")
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(),
                                reason=f"{CHROMIUM} missing: apt-get install chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``synthdx reader-study serve`` in a process of its own, restartable."""

    def __init__(self, study: Path) -> None:
        self.study, self.port = study, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "reader-study", "serve", "--params", str(PARAMS),
             "--output", str(self.study), "--port", str(self.port)],
            cwd=PARAMS.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180  # a loaded 2-core CI machine
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read().decode()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise AssertionError("the reader study server did not start within 180 s")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush; what was committed must survive."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("browser-study")
    processed, audit = write_sources(base)
    folder = base / "study"
    result, out = invoke("reader-study", "create", *study_args(processed, audit, folder))
    assert result.exit_code == 0, out
    for name, password in PASSWORDS.items():
        result, out = invoke("reader-study", "add-reader", name, "--params", str(PARAMS),
                             "--output", str(folder), "--password", password)
        assert result.exit_code == 0, out
    return folder


@pytest.fixture(scope="module")
def server(study: Path) -> Iterator[Server]:
    srv = Server(study)
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def engine(study: Path):
    from tasks.reader_study.store import open_engine

    cfg = load_config(PARAMS, [f"reader_study.output={study}"])
    eng = open_engine(cfg.reader_study.database_url())
    yield eng
    eng.dispose()


def truth(engine, name: str) -> list[Case]:
    """A reader's cases in their order, with the truth (from the database, not the page)."""
    with transaction(engine) as session:
        return list(session.scalars(
            select(Case).join(Assignment, Assignment.case_id == Case.case_id)
            .join(Reader, Reader.id == Assignment.reader_id)
            .where(Reader.name == name).order_by(Assignment.position)))


def log_in(browser, server: Server, name: str):
    context = browser.new_context(base_url=server.url, viewport={"width": 1100, "height": 820})
    page = context.new_page()
    page.goto("/login")
    page.fill("#name", name)
    page.fill("#password", PASSWORDS[name])
    page.click("#login")
    page.wait_for_url(re.compile(r".*/(case/\d+|study)$"))
    return context, page


def answer(page, origin: str, grade: int, metastasis: bool, confidence: int) -> None:
    page.check(f"input[name=origin][value={origin}]")
    page.check(f"input[name=perugini_grade][value='{grade}']")
    page.check(f"input[name=metastasis][value={'yes' if metastasis else 'no'}]")
    page.check(f"input[name=confidence][value='{confidence}']")
    page.click("#submit")


def alice_says(case: Case) -> tuple[str, int, bool, int]:
    """Alice calls everything real, grade 0, no metastasis."""
    return "real", 0, False, 2


def bob_says(case: Case) -> tuple[str, int, bool, int]:
    """Bob is wrong on the origin of every third case only, and reads the findings right."""
    wrong = {"real": "synthetic", "synthetic": "real"}
    origin = wrong[case.origin] if case.case_id % 3 == 0 else case.origin
    return origin, case.perugini_grade, case.metastasis, 4


def test_two_readers_answer_stop_resume_and_the_report_matches(server, browser, engine, study,
                                                               tmp_path, mlflow_uri):
    # Alice reads every case; the first one is photographed in the viewer.
    context, page = log_in(browser, server, "alice")
    cases = truth(engine, "alice")
    page.wait_for_selector("#viewer[data-loaded='1']")
    assert page.inner_text("#case-title") == f"Case 1 of {len(cases)}"
    assert page.inner_text("#progress") == f"0 of {len(cases)} answered"
    drawn = page.evaluate("""() => {
        const c = document.getElementById('view-0');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let dark = 0; for (let i = 0; i < d.length; i += 4) { if (d[i] < 128) dark++; }
        return [c.width, c.height, dark]; }""")
    assert drawn[0] > 64 and drawn[1] > 256 and drawn[2] > 100  # a scan, not a blank canvas
    shot = tmp_path / "reader_study.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if os.environ.get("SYNTHDX_SCREENSHOT"):
        shutil.copy(shot, os.environ["SYNTHDX_SCREENSHOT"])
    for k, case in enumerate(cases, start=1):
        page.wait_for_url(f"**/case/{k}")
        answer(page, *alice_says(case))
    page.wait_for_selector("#done")
    context.close()

    # Bob answers three cases; the server is killed (SIGKILL: no shutdown) and restarted; his
    # answers and his login survive and he goes on at case 4.
    bob_cases = truth(engine, "bob")
    context, page = log_in(browser, server, "bob")
    for k, case in enumerate(bob_cases[:3], start=1):
        answer(page, *bob_says(case))
        page.wait_for_url(f"**/case/{k + 1}")
    server.kill()
    server.start()
    page.goto("/study")
    page.wait_for_url("**/case/4")
    assert page.inner_text("#progress") == f"3 of {len(bob_cases)} answered"
    answer(page, *bob_says(bob_cases[3]))
    page.wait_for_url("**/case/5")
    # He stops for now, logs in again later and resumes at case 5.
    page.click("#stop")
    page.wait_for_url("**/login?stopped=1")
    assert "Your answers are saved" in page.inner_text("#note")
    page.fill("#name", "bob")
    page.fill("#password", PASSWORDS["bob"])
    page.click("#login")
    page.wait_for_url("**/case/5")
    assert page.inner_text("#progress") == f"4 of {len(bob_cases)} answered"
    for k, case in enumerate(bob_cases[4:], start=5):
        answer(page, *bob_says(case))
        if k < len(bob_cases):
            page.wait_for_url(f"**/case/{k + 1}")
    page.wait_for_selector("#done")
    context.close()

    # The report, from the command line, logged beside the audit of the released set.
    import mlflow

    cfg = load_config(PARAMS)
    mlflow.set_tracking_uri(mlflow_uri)
    from tasks.common.tracking import stage_run

    with stage_run(cfg.mlflow, "audit", {"synthdx.synthetic_digest": _digest(study)}) as audit:
        pass
    base = tmp_path / "report" / "reader_study"
    result, out = invoke("reader-study", "report", "--params", str(PARAMS), "--output",
                         str(study), "--report", str(base))
    assert result.exit_code == 0, out
    import json

    doc = json.loads(base.with_suffix(".json").read_text())
    said = {"alice": {c.case_id: alice_says(c) for c in cases},
            "bob": {c.case_id: bob_says(c) for c in bob_cases}}
    origin = {c.case_id: c for c in cases}
    right = {name: [said[name][i][0] == origin[i].origin for i in said[name]] for name in said}
    assert doc["turing"]["per_reader"]["alice"]["accuracy"] == pytest.approx(0.5)  # balanced
    assert doc["turing"]["per_reader"]["bob"]["accuracy"] == pytest.approx(np.mean(right["bob"]))
    pooled = right["alice"] + right["bob"]
    assert doc["turing"]["pooled"]["n"] == 16
    assert doc["turing"]["pooled"]["accuracy"] == pytest.approx(np.mean(pooled))
    lo, hi = doc["turing"]["pooled"]["ci"]
    assert lo < np.mean(pooled) < hi
    # Fleiss' kappa for two raters and two categories, from the answers by hand.
    agree = np.mean([said["alice"][i][0] == said["bob"][i][0] for i in origin])
    share = np.mean([said[n][i][0] == "real" for n in said for i in origin])
    chance = share ** 2 + (1 - share) ** 2
    assert doc["turing"]["fleiss_kappa"]["kappa"] == pytest.approx((agree - chance) / (1 - chance))
    # Bob read every finding right; Alice (grade 0, no metastasis) is right where that is true.
    for kind in ("real", "synthetic"):
        bob = doc["diagnosis"]["per_reader"]["bob"][kind]
        assert bob["perugini_grade"]["accuracy"] == bob["metastasis"]["accuracy"] == 1.0
        alice = doc["diagnosis"]["per_reader"]["alice"][kind]
        mine = [c for c in origin.values() if c.origin == kind]
        assert alice["perugini_grade"]["accuracy"] == pytest.approx(
            np.mean([c.perugini_grade == 0 for c in mine]))
        assert alice["metastasis"]["accuracy"] == pytest.approx(
            np.mean([not c.metastasis for c in mine]))
        pooled_grade = doc["diagnosis"]["pooled"][kind]["perugini_grade"]
        assert pooled_grade["n"] == 8
        assert pooled_grade["correct"] == 4 + sum(c.perugini_grade == 0 for c in mine)
    assert 0 < np.mean(right["bob"]) < 1  # the two readers' numbers differ
    assert "Fleiss" in base.with_suffix(".html").read_text()
    run = mlflow.search_runs(experiment_names=[cfg.mlflow.experiment], output_format="list",
                             filter_string="tags.`synthdx.stage` = 'reader_study'")[0]
    assert run.data.tags["synthdx.audit_run_id"] == audit.info.run_id
    assert run.data.metrics["reader_study/real_vs_synthetic_accuracy"] == pytest.approx(
        np.mean(pooled))
    assert run.data.metrics["reader_study/reader/bob/real_vs_synthetic_accuracy"] \
        == pytest.approx(np.mean(right["bob"]))


def _digest(study: Path) -> str:
    import json

    return json.loads((study / "study.json").read_text())["synthetic_digest"]


def test_nothing_is_reachable_without_a_login(server, browser):
    context = browser.new_context(base_url=server.url)
    page = context.new_page()
    for path in ("/", "/study", "/case/1", "/answers", "/answers/1"):
        page.goto(path)
        assert page.url == f"{server.url}/login", path
    response = context.request.get("/cases/1/pixels")
    assert response.status == 401 and len(response.body()) < 100
    context.close()


def test_a_reader_sees_only_their_own_answers(server, browser, engine):
    alice, alice_page = log_in(browser, server, "alice")
    if "/case/" in alice_page.url:  # run alone: Alice answers one case first
        answer(alice_page, "real", 0, False, 1)
        alice_page.wait_for_load_state()
    alice.close()
    context, page = log_in(browser, server, "bob")
    with transaction(engine) as session:
        others = session.scalars(select(Answer.id).join(Reader, Reader.id == Answer.reader_id)
                                 .where(Reader.name == "alice")).all()
        mine = session.scalars(select(Answer.id).join(Reader, Reader.id == Answer.reader_id)
                               .where(Reader.name == "bob")).all()
    assert others
    for answer_id in others:
        assert context.request.get(f"/answers/{answer_id}").status == 404
    page.goto("/answers")
    assert page.locator("#my-answers tbody tr").count() == max(len(mine), 1)
    if mine:
        assert context.request.get(f"/answers/{mine[0]}").status == 200
    context.close()


def test_image_urls_cannot_reach_files_outside_the_study(server, browser, study):
    context, page = log_in(browser, server, "alice")
    secret = (study / "study.json").read_text()[:40]
    for path in ("/cases/..%2Fstudy.json/pixels", "/cases/..%2F..%2Fstudy.db/pixels",
                 "/cases/%2E%2E/study.json", "/cases/0/pixels", "/cases/-1/pixels",
                 "/cases/9999/pixels", "/cases/1.0/pixels", "/static/..%2Fweb.py",
                 "/static/%2E%2E/%2E%2E/study.json", "/static/..%2F..%2F..%2Fparams.yaml",
                 "/study.db", "/images.npy"):
        response = context.request.get(path)
        assert response.status == 404, path
        body = response.body()
        assert secret.encode() not in body and b"SQLite format" not in body, path
        assert b"import " not in body, path
    assert context.request.get("/cases/1/pixels").status == 200
    context.close()


def test_every_form_needs_its_csrf_token(server, browser, engine):
    context, page = log_in(browser, server, "alice")
    with transaction(engine) as session:
        before = session.query(Answer).count()
    form = {"origin": "real", "perugini_grade": "0", "metastasis": "no", "confidence": "3"}
    for token in (None, "forged-token"):
        data = form if token is None else {**form, "csrf": token}
        assert context.request.post("/case/1/answer", form=data).status == 403
        assert context.request.post("/logout", form={} if token is None else {"csrf": token}
                                    ).status == 403
    fresh = browser.new_context(base_url=server.url)
    fresh.new_page().goto("/login")
    assert fresh.request.post("/login", form={"name": "alice", "password": PASSWORDS["alice"]}
                              ).status == 403
    fresh.close()
    with transaction(engine) as session:
        assert session.query(Answer).count() == before
    page.goto("/study")  # the session is still valid after the refusals
    assert page.url.endswith("/study") or "/case/" in page.url
    context.close()


def test_an_expired_session_is_refused(server, browser, engine):
    context, page = log_in(browser, server, "alice")
    with transaction(engine) as session:
        session.execute(update(LoginSession).where(LoginSession.reader_id == select(
            Reader.id).where(Reader.name == "alice").scalar_subquery())
            .values(expires_at=time.time() - 1))
    assert context.request.get("/cases/1/pixels").status == 401
    page.goto("/study")
    assert page.url == f"{server.url}/login?expired=1"
    assert "session has expired" in page.inner_text("#note")
    context.close()


def test_a_case_cannot_be_answered_twice(server, browser, engine, study):
    result, out = invoke("reader-study", "add-reader", "erin", "--params", str(PARAMS),
                         "--output", str(study), "--password", "erin-password")
    assert result.exit_code == 0, out
    PASSWORDS["erin"] = "erin-password"
    context, page = log_in(browser, server, "erin")
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    answer(page, "synthetic", 1, True, 5)
    page.wait_for_url("**/case/2")
    again = context.request.post("/case/1/answer", form={
        "csrf": csrf, "origin": "real", "perugini_grade": "0", "metastasis": "no",
        "confidence": "1"})
    assert again.status == 409 and "already answered" in again.text()
    page.goto("/case/1")
    assert "You said synthetic" in page.inner_text("#answered")
    assert page.locator("#answer-form").count() == 0
    with transaction(engine) as session:
        stored = session.scalars(select(Answer).join(Reader, Reader.id == Answer.reader_id)
                                 .where(Reader.name == "erin")).all()
    assert [(a.origin, a.perugini_grade, a.metastasis, a.confidence) for a in stored] == [
        ("synthetic", 1, True, 5)]
    context.close()
