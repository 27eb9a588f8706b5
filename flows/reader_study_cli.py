"""``synthdx reader-study``: create a visual Turing test, add readers, serve it, score it.

Wiring only: the work is in tasks/reader_study. Every command reads params.yaml's
``reader_study`` section (``--params``, ``--set``); its options are shortcuts for those keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tasks.config import DEFAULT_PARAMS, Config, ConfigError, load_config

if TYPE_CHECKING:
    from tasks.reader_study.study import OpenStudy

app = typer.Typer(name="reader-study", no_args_is_help=True, rich_markup_mode=None,
                  help="Reader study (visual Turing test): create, add-reader, serve, report.")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Parameter file (YAML).")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-s", metavar="KEY=VALUE", help="Override a parameter: dotted.key=value.")]
StudyOpt = Annotated[Path | None, typer.Option(
    "--output", "-o", help="The study folder (default reader_study.output).")]
DatabaseOpt = Annotated[str | None, typer.Option(
    "--database", metavar="URL",
    help="Answers database URL (default: study.db in the study folder; "
         "SYNTHDX_READER_STUDY_DB is read too, and keeps a password off the command line).")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=code)


def _config(params: Path, set_: list[str] | None, **options: object) -> Config:
    """Parameters with the command's options as ``reader_study.*`` overrides."""
    extra = [f"reader_study.{key}={value}" for key, value in options.items()
             if value is not None]
    try:
        return load_config(params, [*(set_ or []), *extra])
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None


def _open(cfg: Config) -> OpenStudy:
    """The configured study, or a clean CLI error."""
    from tasks.reader_study.errors import ReaderStudyError
    from tasks.reader_study.study import open_study

    try:
        return open_study(cfg.reader_study)
    except ReaderStudyError as exc:
        raise _fail(str(exc)) from None


@app.command("create")
def create_cmd(
    params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None, output: StudyOpt = None,
    database: DatabaseOpt = None,
    cases: Annotated[int | None, typer.Option(
        help="Cases in the study, half real and half synthetic (default reader_study.cases).")
    ] = None,
    released: Annotated[Path | None, typer.Option(
        help="Released synthetic set (default <audit.output>/released).")] = None,
    processed: Annotated[Path | None, typer.Option(
        help="Processed (de-identified) real dataset (default ingest.output).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the draw.")] = None,
) -> None:
    """Draw a study from the released synthetic set and the real held-out images."""
    from tasks.reader_study.create import create_study
    from tasks.reader_study.errors import ReaderStudyError

    cfg = _config(params, set_, output=output, database=database, cases=cases,
                  released=released, processed=processed, seed=seed)
    try:
        summary = create_study(cfg)
    except ReaderStudyError as exc:
        raise _fail(str(exc)) from None
    typer.echo(summary.describe())


@app.command("add-reader")
def add_reader_cmd(
    name: Annotated[str, typer.Argument(help="The reader's login name.")],
    params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None, output: StudyOpt = None,
    database: DatabaseOpt = None,
    password: Annotated[str | None, typer.Option(
        help="The reader's password (asked for, hidden, when not given).")] = None,
) -> None:
    """Create a reader account (the study owner does this; readers cannot sign up)."""
    from tasks.reader_study.errors import ReaderStudyError
    from tasks.reader_study.readers import add_reader

    cfg = _config(params, set_, output=output, database=database)
    study = _open(cfg)
    if password is None:
        password = typer.prompt(f"password for {name}", hide_input=True,
                                confirmation_prompt=True)
    try:
        cases = add_reader(study, name, password, cfg.reader_study.seed)
    except ReaderStudyError as exc:
        raise _fail(str(exc)) from None
    finally:
        study.engine.dispose()
    typer.echo(f"reader {name} added to study {study.study.id}: {cases} cases in their own order")


@app.command("serve")
def serve_cmd(
    params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None, output: StudyOpt = None,
    database: DatabaseOpt = None,
    host: Annotated[str | None, typer.Option(help="Interface (default reader_study.host).")
                    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default reader_study.port).")] = None,
) -> None:
    """Serve the study to its readers in the browser (Ctrl-C stops it; answers are kept)."""
    from tasks.reader_study.errors import ReaderStudyError
    from tasks.reader_study.serve import check_port, serve

    cfg = _config(params, set_, output=output, database=database, host=host, port=port)
    rs = cfg.reader_study
    try:
        check_port(rs.host, rs.port)
    except ReaderStudyError as exc:
        raise _fail(str(exc)) from None
    study = _open(cfg)
    typer.echo(f"reader study {study.study.id} at http://{rs.host}:{rs.port}/ "
               f"(logins last {rs.session_minutes:g} min; Ctrl-C stops it)", err=True)
    try:
        serve(study, rs.host, rs.port, rs.session_minutes)
    except ReaderStudyError as exc:
        raise _fail(str(exc)) from None
    finally:
        study.engine.dispose()


@app.command("report")
def report_cmd(
    params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None, output: StudyOpt = None,
    database: DatabaseOpt = None,
    report: Annotated[Path | None, typer.Option(
        help="Report path without suffix (default reader_study.report): .json and .html.")
    ] = None,
    mlflow: Annotated[bool, typer.Option(
        "--mlflow/--no-mlflow", help="Log the report to MLflow beside the audit.")] = True,
) -> None:
    """Score the answers: real-vs-synthetic accuracy, Fleiss' kappa, diagnosis by origin."""
    from tasks.reader_study.report import report_study

    cfg = _config(params, set_, output=output, database=database, report=report)
    study = _open(cfg)
    try:
        result = report_study(cfg, study, log=mlflow)
    except OSError as exc:  # TrackingUnreachable included: the files are written already
        raise _fail(str(exc)) from None
    finally:
        study.engine.dispose()
    typer.echo(result.describe())
