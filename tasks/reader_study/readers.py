"""Reader accounts, made by the study owner: a name, a hashed password, a random case order."""

from __future__ import annotations

import re
import time

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from tasks.reader_study.errors import ReaderStudyError
from tasks.reader_study.passwords import hash_password
from tasks.reader_study.store import Assignment, Case, Reader, transaction
from tasks.reader_study.study import OpenStudy

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def add_reader(study: OpenStudy, name: str, password: str, seed: int) -> int:
    """Create a reader with their own random order of every case; return how many cases.

    The order is drawn from the study's seed and the reader's id, so it differs between
    readers (no reader sees the cases in the order another does) and is reproducible.

    Raises:
        ReaderStudyError: a bad name, a short password, or a name the study already has.
    """
    if not NAME.match(name):
        raise ReaderStudyError(f"reader name {name!r}: use 1-64 letters, digits, '.', '_' or "
                               "'-', starting with a letter or digit")
    try:
        hashed = hash_password(password)
    except ValueError as exc:
        raise ReaderStudyError(f"reader {name!r}: {exc}") from None
    taken = ReaderStudyError(f"reader {name!r} already exists in study {study.study.id}; "
                             "choose another name (a reader's answers are never replaced)")
    with transaction(study.engine) as session:
        if session.scalar(select(Reader.id).where(Reader.name == name)) is not None:
            raise taken
    try:
        with transaction(study.engine) as session:
            reader = Reader(name=name, password_hash=hashed, created_at=time.time())
            session.add(reader)
            session.flush()
            cases = session.scalars(select(Case.case_id).order_by(Case.case_id)).all()
            order = np.random.default_rng([seed, reader.id]).permutation(len(cases))
            session.add_all(Assignment(reader_id=reader.id, position=k + 1,
                                       case_id=int(cases[i])) for k, i in enumerate(order))
    except IntegrityError:  # the same name added at the same moment by another process
        raise taken from None
    return len(cases)


def reader_names(study: OpenStudy) -> list[str]:
    """Every reader's name, in the order they were added."""
    with transaction(study.engine) as session:
        return list(session.scalars(select(Reader.name).order_by(Reader.id)))
