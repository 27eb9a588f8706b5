"""The one error type of the reader study: the message names the thing and the reason."""

from __future__ import annotations


class ReaderStudyError(ValueError):
    """A study, reader, database or port that cannot be used; nothing was written."""
