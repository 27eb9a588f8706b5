"""DVC's command line as the pipeline runs it: without the git advice meant for a prompt.

Why: after each stage ``dvc repro`` prints "To track the changes with git, run: git add
dvc.lock ..." and "To enable auto staging, run: dvc config core.autostage true" unless the
project auto-stages. ``synthdx run`` runs ``dvc repro`` once per stage, so the advice came
after every stage, between the stages' own output, addressed to whoever had typed ``dvc``.
DVC silences the same advice for the ``repro`` its experiments executor runs on a user's
behalf (``scm_context.quiet``); this does the same for the pipeline's, and drops the
"Use `dvc push`" line that ``repro`` writes after each stage too. Everything else DVC
prints (the stage being run, its command, DVC's errors) is unchanged, and a project that
sets ``core.autostage`` still has dvc.lock staged, as configured.

Used as ``python -m flows.orchestration.dvc_repro <dvc arguments>``; exits with DVC's code.
"""

from __future__ import annotations

import sys
from typing import Any


def quiet_scm_advice() -> None:
    """Make every DVC repository of this process skip the "track the changes with git" advice."""
    from dvc.repo.scm_context import SCMContext

    if getattr(SCMContext.__init__, "_synthdx_quiet", False):
        return
    init = SCMContext.__init__

    def quiet_init(self: SCMContext, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.quiet = True

    quiet_init._synthdx_quiet = True  # type: ignore[attr-defined]
    SCMContext.__init__ = quiet_init  # type: ignore[method-assign]


PUSH_ADVICE = "Use `dvc push` to send your updates to remote storage."
"""What ``dvc repro`` writes after every run that reproduced something (dvc/commands/repro.py),
remote or not: once per stage under ``synthdx run``. Pushing is the user's step after the
whole pipeline (README: "Reproducing with DVC"), not after each stage."""


def quiet_push_advice() -> None:
    """Make DVC's console drop the one ``dvc push`` line ``repro`` writes after each run."""
    from dvc.ui import ui

    if getattr(ui.write, "_synthdx_quiet", False):
        return
    write = ui.write

    def quiet_write(*objects: Any, **kwargs: Any) -> None:
        if objects == (PUSH_ADVICE,):
            return
        write(*objects, **kwargs)

    quiet_write._synthdx_quiet = True  # type: ignore[attr-defined]
    ui.write = quiet_write  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    """Run DVC's CLI with ``argv`` (default: this process's arguments); return its exit code."""
    from dvc.cli import main as dvc_main

    quiet_scm_advice()
    quiet_push_advice()
    return int(dvc_main(sys.argv[1:] if argv is None else argv) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
