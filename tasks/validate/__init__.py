"""The validation stage: every classifier on the internal test split and on each external site.

The work is plain typed functions (no orchestration, no tracking calls): ``pipeline.run_validation``
reads the training stage's prediction folders and writes ``reports/validation.json``, the DVC
metrics and plot files, per-site figures and a self-contained HTML report.
"""

from __future__ import annotations
