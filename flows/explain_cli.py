"""``synthdx explain``: counterfactual heat maps from the diffusion model (wiring only).

The work is tasks/explain/ (run.py; its MLflow run in tracking.py). Not a pipeline stage:
it explains whichever model and processed dataset the parameters name, on request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from tasks.config import DEFAULT_PARAMS, ConfigError, load_config


def _fail(message: str, code: int) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=code)


def explain_cmd(
    study: Annotated[str | None, typer.Option(
        "--study", help="Explain this study: its study_uid in the processed manifest "
                        "(pseudonymous; see --list).")] = None,
    evaluate: Annotated[int | None, typer.Option(
        "--evaluate", min=1, metavar="N",
        help="Measure the heat maps of up to N studies per finding against the phantom's "
             "true finding masks (explain.evaluate_splits): reports/explain/explain.json, "
             "explain.html and an MLflow run.")] = None,
    list_: Annotated[bool, typer.Option(
        "--list", help="List the study IDs (with split, site and labels) and exit.")] = False,
    split: Annotated[str | None, typer.Option(
        help="With --list: only this split (train, val, test, external).")] = None,
    task: Annotated[Literal["amyloid", "metastasis"] | None, typer.Option(
        help="With --study: only this finding (default: both).")] = None,
    params: Annotated[Path, typer.Option("--params", "-p", help="Parameter file (YAML).")
                      ] = DEFAULT_PARAMS,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", metavar="KEY=VALUE",
        help="Override a parameter: dotted.key=value (repeatable).")] = None,
) -> None:
    """Counterfactual heat maps: what the diffusion model changes to remove (or add) a finding.

    A processed scan is encoded by DDIM inversion (or noising) to explain.strength of the
    noise schedule and regenerated under its own condition and the opposite one (amyloid ->
    Perugini 0, metastasis -> none, and the reverse); the difference, over both views, is
    written as a PNG under explain.output.
    """
    if sum([study is not None, evaluate is not None, list_]) != 1:
        raise _fail("give exactly one of --study ID, --evaluate N or --list", 2)
    try:
        cfg = load_config(params, set_ or [])
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    from tasks.explain.conditions import TASKS
    from tasks.explain.run import ExplainError, explain_study, list_studies, open_inputs
    from tasks.explain.run import evaluate as run_evaluation

    try:
        inputs = open_inputs(cfg)
        if list_:
            table = list_studies(inputs, split)
            if table.empty:
                raise ExplainError(f"no study in split {split!r} of {inputs.processed}")
            typer.echo(table.to_string(index=False))
            return
        if study is not None:
            result = explain_study(cfg, study, (task,) if task else TASKS, inputs=inputs)
            for caption in result.captions:
                typer.echo(f"explain: {caption}")
            typer.echo(f"explain: heat maps of study {study} -> {result.figure} "
                       f"({result.seconds:.1f} s)")
            return
        from tasks.explain.tracking import log_evaluation

        assert evaluate is not None
        evaluation = run_evaluation(cfg, evaluate, inputs=inputs)
        run_id = log_evaluation(cfg, evaluation)
    except ExplainError as exc:
        raise _fail(str(exc), 2) from None
    except OSError as exc:
        raise _fail(str(exc), 1) from None
    for name, t in evaluation.report["tasks"].items():
        if not t.get("n"):
            typer.echo(f"explain: {name}: not measured ({t.get('skipped')})")
            continue
        low, high = t["pointing_game_ci95"]
        typer.echo(f"explain: {name}: {t['n']} studies, pointing game {t['pointing_game']:.2f} "
                   f"[{low:.2f}, {high:.2f}], energy in mask {t['energy_fraction_mean']:.2f} "
                   f"(mask share of body {t['mask_share_mean']:.2f}: chance)")
    typer.echo(f"explain: report {evaluation.html_path} and {evaluation.json_path} "
               f"({evaluation.seconds:.1f} s); MLflow run {run_id}")
