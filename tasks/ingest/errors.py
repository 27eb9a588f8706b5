"""The one error type of the ingest stage."""

from __future__ import annotations


class IngestError(RuntimeError):
    """Ingest cannot produce a dataset; the message names the file or setting and the fix.

    Why a dedicated type: the CLI turns exactly this error into a one-line message and exit
    code 1, while any other exception is a bug and keeps its traceback.
    """
