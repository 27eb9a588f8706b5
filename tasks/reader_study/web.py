"""The reader study's web app: login, one case at a time in a bone-scan viewer, answers.

Server-side pages (Jinja2, autoescaped) and one plain JavaScript file for the viewer. What a
reader can reach, and nothing else:

- ``/login`` (GET, POST) and ``/logout`` (POST): the only pages without a session.
- ``/study``: the next case the reader has not answered (or the end page).
- ``/case/<position>``: the reader's own position-th case (their random order); its answer
  form posts to ``/case/<position>/answer``.
- ``/cases/<case id>/pixels``: the case's two views, read from the study's own image array by
  case number (an integer route: no path ever reaches the file system).
- ``/answers`` and ``/answers/<id>``: the reader's own answers (another reader's: 404).

The truth (real or synthetic, the labels, the image's source) never leaves the server.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException

from tasks.reader_study.security import (
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    Login,
    current_login,
    log_in,
    log_out,
    same_token,
)
from tasks.reader_study.store import (
    CONFIDENCE,
    GRADES,
    ORIGINS,
    Answer,
    Assignment,
    Case,
    transaction,
)
from tasks.reader_study.study import OpenStudy

HERE = Path(__file__).resolve().parent
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class NotLoggedIn(Exception):
    """A request without a valid session; ``expired`` when its session has run out."""

    def __init__(self, expired: bool) -> None:
        super().__init__("login required")
        self.expired = expired


def build_app(study: OpenStudy, session_minutes: float) -> FastAPI:
    """The web app of one open study.

    Args:
        study: the study (its database engine and image array are used for every request).
        session_minutes: how long a login lasts.
    """
    app = FastAPI(title="synthdx reader study", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    pages = Environment(loader=FileSystemLoader(HERE / "templates"),
                        autoescape=select_autoescape(default=True))
    engine = study.engine
    rows, cols = study.size

    def page(name: str, status: int = 200, **values: Any) -> HTMLResponse:
        return HTMLResponse(pages.get_template(name).render(**values), status_code=status)

    def require(request: Request) -> Login:
        login, expired = current_login(engine, request.cookies.get(SESSION_COOKIE))
        if login is None:
            raise NotLoggedIn(expired)
        return login

    async def form_with_csrf(request: Request, login: Login) -> dict[str, str]:
        form = {k: str(v) for k, v in (await request.form()).items()}
        if not same_token(form.get("csrf"), login.csrf):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page")
        return form

    def progress(login: Login) -> tuple[int, int]:
        with transaction(engine) as session:
            done = session.scalar(select(func.count()).select_from(Answer)
                                  .where(Answer.reader_id == login.reader_id)) or 0
            total = session.scalar(select(func.count()).select_from(Assignment)
                                   .where(Assignment.reader_id == login.reader_id)) or 0
        return int(done), int(total)

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    @app.exception_handler(NotLoggedIn)
    async def to_login(request: Request, exc: NotLoggedIn) -> Response:
        if request.url.path.startswith("/cases/"):
            return Response("login required", status_code=401, media_type="text/plain")
        return RedirectResponse("/login?expired=1" if exc.expired else "/login", status_code=303)

    @app.exception_handler(HTTPException)
    async def error_page(request: Request, exc: HTTPException) -> Response:
        return page("message.html", status=exc.status_code, title=f"Error {exc.status_code}",
                    text=exc.detail if exc.status_code != 404 else "Not found.")

    @app.get("/")
    def root() -> Response:
        return RedirectResponse("/study", status_code=303)

    @app.get("/login")
    def login_form(request: Request, expired: int = 0, stopped: int = 0,
                   failed: int = 0) -> Response:
        token = secrets.token_urlsafe(32)
        note = ("Your session has expired: please log in again." if expired else
                "Your answers are saved. Log in again to resume." if stopped else
                "Wrong name or password." if failed else "")
        response = page("login.html", csrf=token, note=note)
        response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/login")
        return response

    @app.post("/login")
    async def login_submit(request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        if not same_token(form.get("csrf"), request.cookies.get(LOGIN_CSRF_COOKIE)):
            raise HTTPException(403, "missing or wrong CSRF token: reload the login page")
        opened = log_in(engine, form.get("name", ""), form.get("password", ""), session_minutes)
        if opened is None:
            return RedirectResponse("/login?failed=1", status_code=303)
        token, login = opened
        response = RedirectResponse("/study", status_code=303)
        response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/",
                            max_age=int(session_minutes * 60) + 1)
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        login = require(request)
        await form_with_csrf(request, login)
        log_out(engine, request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login?stopped=1", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @app.get("/study")
    def next_case(request: Request) -> Response:
        login = require(request)
        with transaction(engine) as session:
            answered = select(Answer.case_id).where(Answer.reader_id == login.reader_id)
            position = session.scalar(
                select(Assignment.position).where(Assignment.reader_id == login.reader_id,
                                                  Assignment.case_id.not_in(answered))
                .order_by(Assignment.position).limit(1))
        if position is not None:
            return RedirectResponse(f"/case/{position}", status_code=303)
        done, total = progress(login)
        return page("done.html", login=login, done=done, total=total)

    @app.get("/case/{position:int}")
    def show_case(request: Request, position: int) -> Response:
        login = require(request)
        with transaction(engine) as session:
            case_id = session.scalar(select(Assignment.case_id).where(
                Assignment.reader_id == login.reader_id, Assignment.position == position))
            if case_id is None:
                raise HTTPException(404)
            answer = session.scalars(select(Answer).where(
                Answer.reader_id == login.reader_id, Answer.case_id == case_id)).first()
        done, total = progress(login)
        return page("case.html", login=login, position=position, case_id=case_id,
                    answer=answer, done=done, total=total, rows=rows, cols=cols,
                    grades=GRADES, confidence=CONFIDENCE)

    @app.post("/case/{position:int}/answer")
    async def answer_case(request: Request, position: int) -> Response:
        login = require(request)
        form = await form_with_csrf(request, login)
        try:
            origin = form["origin"]
            grade, confidence = int(form["perugini_grade"]), int(form["confidence"])
            metastasis = {"yes": True, "no": False}[form["metastasis"]]
            if origin not in ORIGINS or grade not in GRADES or confidence not in CONFIDENCE:
                raise ValueError(origin)
        except (KeyError, ValueError):
            raise HTTPException(422, "answer every question: real or synthetic, the Perugini "
                                     "grade, metastasis and your confidence") from None
        try:
            with transaction(engine) as session:  # one answer, one committed transaction
                case_id = session.scalar(select(Assignment.case_id).where(
                    Assignment.reader_id == login.reader_id, Assignment.position == position))
                if case_id is None:
                    raise HTTPException(404)
                session.add(Answer(reader_id=login.reader_id, case_id=case_id, origin=origin,
                                   perugini_grade=grade, metastasis=metastasis,
                                   confidence=confidence, answered_at=time.time()))
        except IntegrityError:
            raise HTTPException(409, f"case {position} is already answered; an answer cannot "
                                     "be changed") from None
        return RedirectResponse("/study", status_code=303)

    @app.get("/cases/{case_id:int}/pixels")
    def pixels(request: Request, case_id: int) -> Response:
        login = require(request)
        with transaction(engine) as session:
            image_row = session.scalar(
                select(Case.image_row).join(Assignment, Assignment.case_id == Case.case_id)
                .where(Assignment.reader_id == login.reader_id, Case.case_id == case_id))
        if image_row is None:
            raise HTTPException(404)
        return Response(study.pixels(image_row), media_type="application/octet-stream",
                        headers={"X-Image-Rows": str(rows), "X-Image-Cols": str(cols)})

    @app.get("/answers")
    def my_answers(request: Request) -> Response:
        login = require(request)
        with transaction(engine) as session:
            mine = session.execute(
                select(Answer, Assignment.position)
                .join(Assignment, (Assignment.case_id == Answer.case_id)
                      & (Assignment.reader_id == Answer.reader_id))
                .where(Answer.reader_id == login.reader_id)
                .order_by(Answer.answered_at)).all()
        done, total = progress(login)
        return page("answers.html", login=login, answers=mine, done=done, total=total)

    @app.get("/answers/{answer_id:int}")
    def my_answer(request: Request, answer_id: int) -> Response:
        login = require(request)
        with transaction(engine) as session:
            row = session.execute(
                select(Answer, Assignment.position)
                .join(Assignment, (Assignment.case_id == Answer.case_id)
                      & (Assignment.reader_id == Answer.reader_id))
                .where(Answer.id == answer_id, Answer.reader_id == login.reader_id)).first()
        if row is None:
            raise HTTPException(404)
        done, total = progress(login)
        return page("answers.html", login=login, answers=[row], done=done, total=total)

    return app
