"""The `synthdx` command line: one command per stage, each a thin shell over its Prefect flow.

Every command loads params.yaml (or ``--params``), applies ``--set dotted.key=value`` overrides
and validates the tree before doing anything, so any run is reproducible from its command line.
The stage commands are built from the stage registry (flows/stages.py), one body for all.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, get_args

import typer

from flows.explain_cli import explain_cmd
from flows.reader_study_cli import app as reader_study_app
from flows.stages import STAGES, Stage, load
from tasks.config import DEFAULT_PARAMS, Config, ConfigError, dump_config, load_config

app = typer.Typer(
    name="synthdx",
    help="Synthetic medical imaging data platform: phantom -> ingest -> ... (see README).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain (click) help: typer's Rich help panel gives every flag a value type, so it read
    # "--strict <bool>" and "--help <bool>" as if they took a value; click's help shows
    # flags as flags ("--strict", "--resume / --no-resume").
    rich_markup_mode=None,
)

ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="Parameter file (YAML).", show_default=True)
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY=VALUE",
                 help="Override a parameter: dotted.key=value (repeatable)."),
]


def _project_prefect_home() -> None:
    """Keep Prefect's local state in the project (.prefect/) unless the user chose otherwise.

    Why: the temporary server's SQLite database otherwise lives in ~/.prefect and is shared
    by every project and test run on the machine, which locks under concurrent use.
    """
    if "PREFECT_HOME" not in os.environ and "PREFECT_API_URL" not in os.environ:
        os.environ["PREFECT_HOME"] = str(Path.cwd() / ".prefect")
    # No machine here reaches the internet: telemetry only fails and locks the local database.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server needs 10-20 s on an idle 2-core machine; under load (training in
    # the next process, a test run) Prefect's 20 s default is not enough.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _load(params: Path, overrides: list[str] | None, extra: list[str] | None = None) -> Config:
    """Load and validate parameters, turning a bad value into a clean CLI error."""
    try:
        return load_config(params, [*(overrides or []), *(extra or [])])
    except ConfigError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=2) from None


def _worker_rank() -> bool:
    """True in every distributed process but the global rank 0.

    Why the global rank: on several nodes (SLURM, torchrun) each node has a local rank 0, and
    only one process may be the stage's Prefect flow run. torchrun sets RANK, srun sets
    SLURM_PROCID, Lightning's own launcher sets NODE_RANK and LOCAL_RANK.
    """
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var]) > 0
    return any(int(os.environ.get(var, "0") or 0) > 0 for var in ("NODE_RANK", "LOCAL_RANK"))


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=code)


@app.command("config")
def config_cmd(params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None) -> None:
    """Print the validated parameter tree (after overrides) as YAML."""
    cfg = _load(params, set_)
    typer.echo(dump_config(cfg))


def _stage_command(spec: Stage) -> Callable[..., None]:
    """The ``synthdx <stage>`` command of a registered stage: one body for every stage.

    Its signature (``--params``, ``--set`` and the stage's own options) is built from the
    registry, so typer shows each option with its help and parses it as it always has.
    """

    def command(params: Path, set_: list[str] | None, **values: Any) -> None:
        _run_stage_command(spec, params, set_, values)

    parameters = [
        inspect.Parameter("params", inspect.Parameter.KEYWORD_ONLY, default=DEFAULT_PARAMS,
                          annotation=ParamsOpt),
        inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=SetOpt),
        *(inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY, default=opt.default,
                            annotation=Annotated[opt.type, typer.Option(
                                *opt.flags, help=opt.help, metavar=opt.metavar)])
          for opt in spec.options),
    ]
    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__name__ = f"{spec.name}_cmd"
    command.__doc__ = spec.help
    return command


def _run_stage_command(spec: Stage, params: Path, set_: list[str] | None,
                       values: dict[str, Any]) -> None:
    """Validate the parameters and the options, run the stage, print its result.

    Everything the command line can get wrong fails before a Prefect server is started for
    nothing: a bad parameter (exit 2), an unknown choice such as a task typo (exit 2).
    """
    overrides = [o for opt in spec.options if (o := opt.override(values[opt.name]))]
    cfg = _load(params, set_, overrides)
    args: dict[str, Any] = {}
    for opt in spec.options:
        if opt.arg is None:
            continue
        given = values[opt.name] or None
        if given is not None and opt.choices is not None:
            known = get_args(load(opt.choices))
            for name in given:
                if name not in known:
                    raise _fail(f"unknown {opt.name} {name!r} "
                                f"(expected one of: {', '.join(known)})", 2)
        args[opt.arg] = given
    _project_prefect_home()
    from flows.stage_flow import run_stage, run_stage_flow

    try:
        # A distributed launcher (Lightning DDP, torchrun, srun) re-runs this command for the
        # other ranks; only the global rank 0 is the stage's Prefect flow run, the others just
        # join the process group.
        if spec.distributed and _worker_rank():
            result = run_stage(spec, cfg, **args)
        else:
            result = run_stage_flow(spec, cfg, **args)
    except spec.error_types() as exc:
        raise _fail(str(exc)) from None
    text = spec.describe(result)
    if text is not None:
        typer.echo(text)


for _spec in STAGES:
    app.command(_spec.command)(_stage_command(_spec))
app.command("explain")(explain_cmd)
app.add_typer(reader_study_app, name="reader-study")


@app.command("init")
def init_cmd(
    folder: Annotated[Path, typer.Argument(help="The new project's folder (new or empty).")],
    archive: Annotated[Path, typer.Option(
        help="Folder of DICOM files (sub-folders allowed); read in place, never copied.")],
    labels: Annotated[Path, typer.Option(help="Labels CSV, one row per study (see README).")],
    key_file: Annotated[Path | None, typer.Option(
        help="Pseudonymisation key file, outside the project; generated when missing "
             "[default: ~/.config/synthdx/<folder name>.key].")] = None,
    profile: Annotated[str, typer.Option(help="Profile of the project's runs.")] = "demo",
    internal_site: Annotated[str | None, typer.Option(
        help="The site split into train/val/test [default: the site with most images].")
    ] = None,
) -> None:
    """Create a project whose pipeline starts at ingest from your own archive."""
    from flows.init_project import InitError, InitRequest, init_project

    request = InitRequest(folder=folder, archive=archive, labels=labels, key_file=key_file,
                          profile=profile, internal_site=internal_site)
    try:
        typer.echo(init_project(request))
    except InitError as exc:
        raise _fail(str(exc)) from None


@app.command("run")
def run_cmd(
    params: ParamsOpt = DEFAULT_PARAMS,
    profile: Annotated[str | None, typer.Option(
        help="Profile to run (demo, gpu, ...): written to params.yaml so DVC tracks it.")
    ] = None,
    from_stage: Annotated[str | None, typer.Option(
        "--from", help="Start at this stage (or matrix group) and run everything after it.")
    ] = None,
    only: Annotated[list[str] | None, typer.Option(
        "--only", metavar="STAGE", help="Run just this stage or matrix group (repeatable).")
    ] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Rerun the chosen stages even when they are up to date.")] = False,
    wait: Annotated[float, typer.Option(
        "--wait", min=0, metavar="SECONDS",
        help="When another synthdx run holds this project, wait up to this long for it "
             "(default 0: refuse at once).")] = 0.0,
) -> None:
    """Run the whole pipeline (dvc.yaml order): each out-of-date stage in its own process."""
    from flows.orchestration.dag import PipelineError
    from flows.orchestration.lock import LOCKED_EXIT_CODE, ProjectLocked, project_lock
    from flows.orchestration.profile import set_profile
    from flows.orchestration.run import PipelineFailed, PipelineRequest, plan
    from tasks.common.tracking import TrackingUnreachable, check_tracking_server

    # Everything is checked before the project lock is taken and before anything is written:
    # the parameters as they will be (with the new profile), the stage names, the tracking
    # server. A typo in --from/--only fails here, before any server starts.
    cfg = _load(params, None, [f"profile={profile}"] if profile is not None else None)
    try:
        plan(PipelineRequest(from_stage=from_stage, only=only or None, force=force))
    except PipelineError as exc:
        raise _fail(str(exc), 2) from None
    try:
        check_tracking_server(cfg.mlflow.resolved_uri())
    except TrackingUnreachable as exc:
        raise _fail(str(exc)) from None
    try:
        with project_lock(Path("."), wait=wait,
                          on_wait=lambda message: typer.echo(message, err=True)):
            if profile is not None:
                try:
                    if set_profile(params, profile):
                        typer.echo(f"params: profile set to {profile} in {params}")
                except ConfigError as exc:
                    raise _fail(str(exc), 2) from None
            _project_prefect_home()
            from flows.pipeline import pipeline_flow
            from flows.prefect_api import shared_prefect_api

            stopped = ("the running stages were stopped before DVC recorded them; `synthdx "
                       "run` again continues from the first stage that is not up to date")
            try:
                with _sigterm_exits(), shared_prefect_api():
                    summary = pipeline_flow(params=str(params), from_stage=from_stage,
                                            only=only or None, force=force)
            except PipelineFailed as exc:
                typer.echo(exc.summary.describe())
                raise _fail(str(exc.failure)) from None
            except PipelineError as exc:
                raise _fail(str(exc), 2) from None
            except KeyboardInterrupt:
                raise _fail(f"synthdx run interrupted: {stopped}", 130) from None
            except _Terminated:
                raise _fail(f"synthdx run terminated (SIGTERM): {stopped}", 143) from None
    except ProjectLocked as exc:
        raise _fail(str(exc), LOCKED_EXIT_CODE) from None
    typer.echo(summary.describe())


class _Terminated(SystemExit):
    """SIGTERM reached ``synthdx run``: unwind (stop the Prefect server, release the lock)."""


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """Make SIGTERM unwind the pipeline run instead of killing the process on the spot.

    Why: Prefect's flow engine turns a SIGTERM into a crashed flow run (the scheduler stops
    the stages meanwhile) and then re-delivers it to the handler it found installed; with
    Python's default handler the process would die there, leaving the temporary Prefect
    server it started running. This handler raises instead, so every ``with`` unwinds.
    """
    def terminated(signum: int, frame: object) -> None:
        raise _Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command("status")
def status_cmd(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Show which stages are up to date and the latest headline results."""
    from flows.orchestration.dag import PipelineError
    from flows.orchestration.state import describe_states, stage_states
    from flows.orchestration.summary import headline

    cfg = _load(params, None)
    try:
        states = stage_states(Path("."))
    except PipelineError as exc:
        raise _fail(str(exc), 2) from None
    typer.echo(f"profile: {cfg.profile}")
    typer.echo(describe_states(states))
    table, report = headline(cfg.validation.output)
    if table:
        typer.echo("\nlatest results (reports/validation.json):\n" + table)
        if report:
            typer.echo(f"  report: {report}")
    else:
        typer.echo("\nno validation results yet (synthdx run)")


@app.command("ui")
def ui_cmd(
    params: ParamsOpt = DEFAULT_PARAMS,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
) -> None:
    """Start the MLflow UI on the project's tracking store (Ctrl-C stops it).

    One light server (no job runner, one worker); Ctrl-C or SIGTERM stops every process it
    started.
    """
    from tasks.common.mlflow_ui import serve_ui

    cfg = _load(params, None)
    uri = cfg.mlflow.resolved_uri()
    if not uri.startswith(("sqlite:", "file:", "postgresql", "mysql")) and "://" in uri:
        raise _fail(f"the tracking store is a server ({uri}): open it in a browser instead", 2)
    typer.echo(f"MLflow UI for {uri} at http://{host}:{port} (Ctrl-C stops it)")
    raise typer.Exit(serve_ui(uri, host, port))


@app.command("serve")
def serve_cmd(
    cron: Annotated[str, typer.Option(help="Cron schedule, e.g. '0 2 * * *' (02:00 nightly).")],
    params: ParamsOpt = DEFAULT_PARAMS,
    name: Annotated[str, typer.Option(help="Deployment name.")] = "scheduled",
    timezone: Annotated[str, typer.Option(help="Time zone of the schedule.")] = "UTC",
) -> None:
    """Serve the pipeline on a cron schedule from this process (no prefect.yaml needed).

    Needs a Prefect server (PREFECT_API_URL; see the README): the schedule lives there.
    """
    from prefect.schedules import Cron

    from flows.orchestration.dag import PipelineError
    from flows.orchestration.deployments import check_cron

    _load(params, None)
    try:
        check_cron(cron, timezone, "--cron")
    except PipelineError as exc:
        raise _fail(str(exc), 2) from None
    schedule = Cron(cron, timezone=timezone)
    if "PREFECT_API_URL" not in os.environ:
        raise _fail("synthdx serve needs a Prefect server: start one with `prefect server "
                    "start` and set PREFECT_API_URL (see README, Schedules)", 2)
    _project_prefect_home()
    from flows.pipeline import pipeline_flow

    pipeline_flow.serve(name=name, schedule=schedule,
                        parameters={"params": str(params)}, pause_on_shutdown=False)


@app.command("deploy")
def deploy_cmd(
    file: Annotated[Path, typer.Option(help="Deployment file.")] = Path("prefect.yaml"),
    name: Annotated[list[str] | None, typer.Option(
        "--name", help="Apply just this deployment (repeatable; default: all).")] = None,
) -> None:
    """Create or update the Prefect deployments of prefect.yaml on the server in force."""
    from flows.orchestration.dag import PipelineError
    from flows.orchestration.deployments import load_deployments

    try:
        load_deployments(file, Path("."))
    except PipelineError as exc:
        raise _fail(str(exc), 2) from None
    if "PREFECT_API_URL" not in os.environ:
        raise _fail("synthdx deploy needs a Prefect server: start one with `prefect server "
                    "start` and set PREFECT_API_URL (see README, Schedules)", 2)
    _project_prefect_home()
    from flows.deploy import apply_deployments

    try:
        applied = apply_deployments(file, Path("."), name or None)
    except PipelineError as exc:
        raise _fail(str(exc), 2) from None
    for spec, deployment_id in applied:
        when = ", ".join(f"{c.cron} {c.timezone}{'' if c.active else ' (paused)'}"
                         for c in spec.schedules) or "on demand"
        typer.echo(f"deployment pipeline/{spec.name} -> pool {spec.work_pool} [{when}] "
                   f"({deployment_id})")


def main() -> None:
    """Entry point for ``python -m flows.cli``."""
    app()


if __name__ == "__main__":
    main()
