"""The reader study's database: study, cases (with the truth), readers, assignments, answers.

Why SQLAlchemy: one schema and one set of queries for SQLite (the default, a file in the study
folder) and PostgreSQL (a team's server, by URL). Every write is its own short transaction,
committed before the browser is answered, so a killed server loses no submitted answer; the
unique constraint on (reader, case) is what makes an answer impossible to give twice, even
from two tabs at once. Times are UNIX seconds (floats): the same on every database, no time
zones to lose.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    Boolean,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
)
from sqlalchemy.exc import ArgumentError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from tasks.reader_study.errors import ReaderStudyError

ORIGINS = ("real", "synthetic")
GRADES = (0, 1, 2, 3)
CONFIDENCE = (1, 2, 3, 4, 5)


class Base(DeclarativeBase):
    """The study's tables."""


class StudyRow(Base):
    """The one study this database holds (its id is also in the folder's study.json)."""

    __tablename__ = "study"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)
    cases: Mapped[int] = mapped_column(Integer)
    details: Mapped[str] = mapped_column(Text)

    def detail(self) -> dict[str, Any]:
        """The study's provenance (sources, audit and model references) as a mapping."""
        return json.loads(self.details)


class Case(Base):
    """One image pair shown to readers. ``origin`` and the labels are the hidden truth."""

    __tablename__ = "cases"
    case_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    origin: Mapped[str] = mapped_column(String(9))
    perugini_grade: Mapped[int] = mapped_column(Integer)
    metastasis: Mapped[bool] = mapped_column(Boolean)
    image_row: Mapped[int] = mapped_column(Integer, unique=True)
    source: Mapped[str] = mapped_column(String(200))


class Reader(Base):
    """A reader account made by the study owner; the password is stored as a KDF hash."""

    __tablename__ = "readers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[float] = mapped_column(Float)


class Assignment(Base):
    """The order in which one reader sees the cases (random per reader)."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("reader_id", "case_id", name="one_position_per_case"),)
    reader_id: Mapped[int] = mapped_column(ForeignKey("readers.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.case_id"))


class Answer(Base):
    """One reader's answer on one case: committed once, never changed."""

    __tablename__ = "answers"
    __table_args__ = (UniqueConstraint("reader_id", "case_id", name="one_answer_per_case"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    reader_id: Mapped[int] = mapped_column(ForeignKey("readers.id"))
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.case_id"))
    origin: Mapped[str] = mapped_column(String(9))
    perugini_grade: Mapped[int] = mapped_column(Integer)
    metastasis: Mapped[bool] = mapped_column(Boolean)
    confidence: Mapped[int] = mapped_column(Integer)
    answered_at: Mapped[float] = mapped_column(Float)


class LoginSession(Base):
    """A reader's login: the cookie's token is stored hashed, with its CSRF token and expiry."""

    __tablename__ = "sessions"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    reader_id: Mapped[int] = mapped_column(ForeignKey("readers.id"))
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)


def open_engine(url: str) -> Engine:
    """An engine on ``url``; SQLite gets foreign keys and a wait on a busy file.

    Raises:
        ReaderStudyError: the URL is not a database URL SQLAlchemy knows.
    """
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(connection: Any, record: Any) -> None:
                cursor = connection.cursor()
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.execute("PRAGMA synchronous=FULL")
                cursor.close()

            return engine
        return create_engine(url, pool_pre_ping=True)
    except (ArgumentError, ImportError) as exc:
        raise ReaderStudyError(f"database URL {redact(url)}: {exc}") from exc


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


def create_schema(engine: Engine) -> None:
    """Create the tables (a new study's database).

    Raises:
        ReaderStudyError: the database already holds a study (it is never overwritten).
    """
    if inspect(engine).has_table(StudyRow.__tablename__):
        raise ReaderStudyError(f"database {redact(str(engine.url))} already holds a study; "
                               "use another database (or --output) for a new study")
    Base.metadata.create_all(engine)


@contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back on any error."""
    with Session(engine, expire_on_commit=False) as session, session.begin():
        yield session


def read_study(engine: Engine) -> StudyRow:
    """The study this database holds.

    Raises:
        ReaderStudyError: no study in it (wrong URL, or `reader-study create` was not run).
    """
    try:
        with Session(engine) as session:
            study = session.scalars(select(StudyRow)).first()
    except (OperationalError, ProgrammingError) as exc:
        raise ReaderStudyError(f"database {redact(str(engine.url))} holds no reader study "
                               f"(run `synthdx reader-study create` first): "
                               f"{str(exc.orig).splitlines()[0]}") from None
    if study is None:
        raise ReaderStudyError(f"database {redact(str(engine.url))} holds no reader study "
                               "(run `synthdx reader-study create` first)")
    return study
