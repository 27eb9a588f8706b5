"""The words a comparison ends in, and the relative change, shared by per-site and pooled.

Why a module of its own: the per-site comparison (``compare``) and the pooled one (``pooled``)
must call a result "better" by the same rule, and neither should import the other.
"""

from __future__ import annotations

BETTER = "better"
WORSE = "worse"
NO_DIFFERENCE = "no significant difference"
NOT_ASSESSABLE = "not assessable"
VERDICTS = (BETTER, WORSE, NO_DIFFERENCE, NOT_ASSESSABLE)


def verdict(delta: float | None, p_value: float | None, alpha: float) -> str:
    """One word for a reader: better / worse when ``p < alpha``, else no significant difference."""
    if delta is None or p_value is None:
        return NOT_ASSESSABLE
    if p_value < alpha:
        return BETTER if delta > 0 else WORSE
    return NO_DIFFERENCE


def relative_pct(delta: float | None, reference: float | None) -> float | None:
    """``delta / reference * 100`` (``None`` when either is missing or the reference is 0)."""
    if delta is None or reference is None or reference == 0:
        return None
    return delta / reference * 100.0
