"""The `lambdalake` command: up, serve, speed, produce, batch, compact, rebuild, erase, query,
status.

Errors are one line on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from lambdalake.auth import KEY_HEADER
from lambdalake.logs import setup_logging
from lambdalake.settings import Settings

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
batch_app = typer.Typer(no_args_is_help=True, help="Run, inspect and roll back batch views.")
app.add_typer(batch_app, name="batch")
functions_app = typer.Typer(no_args_is_help=True,
                            help="Package, deploy, roll back and meter the functions.")
app.add_typer(functions_app, name="functions")
console = Console()
progress_console = Console(stderr=True)  # bars on stderr, with the logs printed above them
LOG_LEVELS = ("debug", "info", "warning", "error")


def _version(show: bool) -> None:
    if show:
        console.print(f"lambdalake {version('lambdalake')}")
        raise typer.Exit()


@app.callback()
def options(
    log_level: Annotated[str, typer.Option(
        help=f"Logs (JSON lines on stderr) at this level and above: {', '.join(LOG_LEVELS)}",
    )] = "info",
    _: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit",
    )] = False,
) -> None:
    """lambdalake: an immutable master dataset, batch and real-time views, exact answers."""
    if log_level.lower() not in LOG_LEVELS:
        raise CliError(f"--log-level {log_level!r}: use one of {', '.join(LOG_LEVELS)}")
    setup_logging(log_level.upper())


class CliError(Exception):
    """A problem the user can fix; printed as one line."""


def settings_with(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


@app.command()
def up(
    bus: Annotated[str | None, typer.Option(help="embedded, kafka or kinesis")] = None,
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap HOST:PORT")] = None,
    produce: Annotated[float, typer.Option(help="Also produce N synthetic events/s")] = 0,
    batch_every: Annotated[int | None, typer.Option(help="Seconds between batch runs")] = None,
    engine: Annotated[str | None, typer.Option(
        help="Batch engine: duckdb or spark (default: the batch_engine setting)")] = None,
    role: Annotated[list[str] | None, typer.Option(
        help="Run only this part (repeatable): functions, serving, speed, scheduler. "
        "Default: all; on Kafka each may run in its own process")] = None,
) -> None:
    """Run the whole flow: gateway, archiver, speed layer, serving API, batch schedule."""
    from lambdalake.stack.up import ROLES, Stack

    settings = settings_with(bus=bus, kafka_bootstrap=bootstrap,
                             batch_interval_seconds=batch_every, batch_engine=engine)
    roles = tuple(role or ROLES)
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise CliError(f"--role {unknown[0]!r}: use one of {', '.join(ROLES)}")
    if settings.bus == "embedded" and set(roles) != set(ROLES):
        raise CliError("--role: on the embedded bus every role runs in one process "
                       "(the log is local to it); split roles with --bus kafka")
    with Stack(settings, produce_rate=produce, roles=roles) as stack:
        console.print(stack.banner(), soft_wrap=True)
        stack.wait()


@app.command()
def serve(
    bus: Annotated[str | None, typer.Option(
        help="kafka or kinesis (default: LAMBDALAKE_BUS when one of them, else kafka)")] = None,
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap HOST:PORT")] = None,
    port: Annotated[int | None, typer.Option(help="The API's port (0: any free one)")] = None,
    pg_port: Annotated[int | None, typer.Option(help="The PostgreSQL endpoint's port; 0: none",
                                                )] = None,
) -> None:
    """Run one more serving replica (API and PostgreSQL endpoint) beside `up --bus kafka` or
    `up --bus kinesis`: stateless, over the published batch views and the speed layer's
    real-time feed."""
    from lambdalake.stack.replica import serve_replica

    settings = settings_with(bus=bus, kafka_bootstrap=bootstrap, api_port=port,
                             pg_port=pg_port)
    if settings.bus == "embedded":
        if bus is not None:
            raise CliError("--bus embedded: a replica needs a shared bus, kafka or kinesis "
                           "(the embedded log is local to `up`)")
        settings = settings.model_copy(update={"bus": "kafka"})
    serve_replica(settings)


@app.command()
def speed(
    worker_id: Annotated[str | None, typer.Option(
        help="Stable per worker (default: the host name): a restarted worker takes its "
        "partitions or shards back at once")] = None,
) -> None:
    """Run one speed worker in the foreground on the configured bus (LAMBDALAKE_BUS kafka or
    kinesis); start several to split the partitions or shards between them."""
    import importlib

    from lambdalake.stack.up import KINESIS_SPEED_WORKER, SPEED_WORKERS

    settings = Settings()
    if settings.bus == "embedded":
        raise CliError("the embedded bus's speed layer runs inside `lambdalake up`; set "
                       "LAMBDALAKE_BUS=kafka or kinesis to run workers apart")
    kinesis = settings.bus == "kinesis"
    module = KINESIS_SPEED_WORKER if kinesis else SPEED_WORKERS[settings.speed_engine]
    if worker_id is not None and module.endswith("faust_app"):
        raise CliError("--worker-id: the Faust worker is named by its consumer group")
    importlib.import_module(module).main([] if worker_id is None else
                                         ["--worker-id", worker_id])


@app.command("produce")
def produce_command(
    rate: Annotated[float, typer.Option(help="Events per second")] = 200,
    count: Annotated[int | None, typer.Option(help="Stop after N events")] = None,
    batch: Annotated[int, typer.Option(help="Events per request (max 500)")] = 100,
    url: Annotated[str | None, typer.Option(help="Gateway URL")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed")] = None,
) -> None:
    """Send a synthetic web-analytics stream (late, out-of-order, retried events)."""
    from lambdalake.eventlog import now_ms
    from lambdalake.producer import produce
    from lambdalake.synthetic import WebAnalyticsStream

    if not 1 <= batch <= 500:
        raise CliError("--batch must be between 1 and 500")
    settings = Settings()
    target = url or f"http://{settings.gateway_host}:{settings.gateway_port}/events"
    _reachable(target)
    stream = WebAnalyticsStream(seed).batches(batch, now_ms)
    started = time.monotonic()

    def show(stats: Any) -> None:
        elapsed = time.monotonic() - started
        console.print(f"sent {stats.sent} accepted {stats.accepted} "
                      f"({stats.sent / max(elapsed, 1e-9):.0f}/s, {stats.retries} retries)",
                      end="\r")

    try:
        stats = produce(target, stream, rate, count, on_progress=show,
                        api_key=settings.keyring.key_for("ingest"))
    except KeyboardInterrupt:
        return
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    console.print(f"\nsent {stats.sent}, accepted {stats.accepted}, rejected {stats.rejected}")


@batch_app.command("run")
def batch_run(
    engine: Annotated[str, typer.Option(help="duckdb or spark")] = "duckdb",
    master: Annotated[str | None, typer.Option(help="Spark master URL")] = None,
    incremental: Annotated[bool, typer.Option(help="Merge the last version with new data")] = False,
) -> None:
    """Recompute every batch view up to the newest cut and publish it atomically."""
    from lambdalake.stack.up import batch_once

    manifest = batch_once(Settings(), engine, master=master, incremental=incremental,
                          console=progress_console)
    console.print(f"published {manifest.version} (cut {_iso(manifest.cut)}, "
                  f"{manifest.rows_read} events read)")


@batch_app.command("history")
def batch_history(
    limit: Annotated[int, typer.Option(help="Most recent N runs")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list of the runs")] = False,
) -> None:
    """Past batch runs: version, cut, rows, duration, engine, outcome."""
    from lambdalake import catalog
    from lambdalake.stack.up import open_settings_store

    runs = catalog.runs(open_settings_store(Settings()))[-limit:]
    if as_json:
        console.print_json(data=runs)
        return
    table = _table("version", "cut", "engine", "rows read", "rows written", "seconds", "outcome")
    for run in runs:
        table.add_row(run["version"], _iso(run.get("cut")), run.get("engine", ""),
                      str(run.get("rows_read", "")), str(run.get("rows_written", "")),
                      f"{run.get('seconds', 0):.2f}", run.get("outcome", ""))
    console.print(table)


@batch_app.command("rollback")
def batch_rollback(version: str) -> None:
    """Serve an older kept batch version again."""
    from lambdalake.batch.run import BatchError, rollback
    from lambdalake.stack.up import open_settings_store

    settings = Settings()
    try:
        manifest = rollback(settings, open_settings_store(settings), version)
    except (BatchError, LookupError) as exc:
        raise CliError(str(exc)) from None
    console.print(f"serving {manifest.version} (cut {_iso(manifest.cut)}); the real-time layer "
                  "covers only events past the newest cut until the next batch run")


@app.command()
def compact() -> None:
    """Compact the master dataset's small objects below the serving cut; prune the run
    history and old dead letters."""
    from lambdalake.batch.maintenance import compact as compact_master
    from lambdalake.batch.maintenance import prune_history
    from lambdalake.batch.run import BatchError
    from lambdalake.stack.up import open_settings_store

    settings = Settings()
    store = open_settings_store(settings)
    try:
        result = compact_master(settings, store)
    except BatchError as exc:
        raise CliError(str(exc)) from None
    pruned = prune_history(settings, store)
    console.print(f"master objects: {result.objects_before} -> {result.objects_after}; "
                  f"pruned {pruned['runs']} run records, {pruned['dead_letters']} dead letters")


@app.command()
def rebuild(
    engine: Annotated[str | None, typer.Option(
        help="duckdb or spark (default: the batch_engine setting)")] = None,
    master: Annotated[str | None, typer.Option(
        help="Spark master URL (default: the spark_master setting)")] = None,
) -> None:
    """Disaster recovery: recompute every batch view from the whole master dataset (the
    source of truth), publish it, and delete every other kept version."""
    from lambdalake.batch.engine import engine_named
    from lambdalake.batch.rebuild import rebuild as rebuild_views
    from lambdalake.batch.run import BatchError
    from lambdalake.project import load_project
    from lambdalake.stack.up import open_settings_store

    settings = settings_with(batch_engine=engine, spark_master=master)
    try:
        manifest = rebuild_views(settings, load_project(settings.project),
                                 open_settings_store(settings),
                                 engine_named(settings.batch_engine, settings.spark_master))
    except BatchError as exc:
        raise CliError(str(exc)) from None
    console.print(f"rebuilt {manifest.version} from the master dataset (cut {_iso(manifest.cut)}, "
                  f"{manifest.rows_read} events read); older versions deleted")


@app.command()
def erase(
    field: Annotated[str, typer.Option(help="The field naming the subject, e.g. user_id")],
    value: Annotated[str, typer.Option(help="The subject's value of the field")],
    by: Annotated[str | None, typer.Option(help="Who asks, for the audit record")] = None,
    engine: Annotated[str, typer.Option(help="Batch engine: duckdb or spark")] = "duckdb",
) -> None:
    """Forget every event with FIELD = VALUE: rewrite the master dataset without them,
    publish a recomputed batch version, keep an audit record (never the value)."""
    from lambdalake.batch.engine import engine_named
    from lambdalake.batch.erase import erase as erase_subject
    from lambdalake.batch.run import BatchError
    from lambdalake.project import load_project
    from lambdalake.stack.up import open_settings_store

    settings = Settings()
    project = load_project(settings.project)
    try:
        record = erase_subject(settings, project, open_settings_store(settings),
                               engine_named(engine, None), field, value, by)
    except BatchError as exc:
        raise CliError(str(exc)) from None
    console.print(f"erased {record.events} events from {record.objects} master objects; "
                  f"serving {record.version} (audit record {record.id})")


@app.command()
def query(
    view: str,
    start: Annotated[str | None, typer.Option("--from", help="ISO 8601, inclusive")] = None,
    end: Annotated[str | None, typer.Option("--to", help="ISO 8601, exclusive")] = None,
    bucket: Annotated[str | None, typer.Option(help="minute, hour, day or total")] = None,
    group_by: Annotated[str | None, typer.Option(help="dim,dim")] = None,
    where: Annotated[list[str] | None, typer.Option(help="dim=value, repeatable")] = None,
    order_by: Annotated[str | None, typer.Option(help="metric[:asc]")] = None,
    limit: Annotated[int | None, typer.Option()] = None,
    quantiles: Annotated[str | None, typer.Option(help="ranks, e.g. 0.5,0.9,0.99")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON answer")] = False,
) -> None:
    """Ask the serving API for a view, merged batch + real time."""
    params: dict[str, Any] = {"from": start, "to": end, "bucket": bucket, "group_by": group_by,
                              "order_by": order_by, "limit": limit, "quantiles": quantiles}
    for condition in where or []:
        name, sep, value = condition.partition("=")
        if not sep:
            raise CliError(f"--where {condition!r}: expected dim=value")
        params[name] = value
    answer = _api(f"/views/{view}", {k: v for k, v in params.items() if v is not None})
    if as_json:
        console.print_json(data=answer)
        return
    rows = answer["rows"]
    table = Table(*(rows[0].keys() if rows else ["bucket"]), title=view)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
    console.print(_freshness(answer["freshness"]))


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON answer")] = False,
) -> None:
    """Views and freshness from the serving API."""
    views = _api("/views", {})["views"]
    if as_json:
        console.print_json(data=views)
        return
    table = _table("view", "bucket", "dimensions", "metrics", "batch version", "cut", "lag ms")
    for view in views:
        fresh = view["freshness"]
        table.add_row(view["name"], view["bucket"], ",".join(view["dimensions"]),
                      ",".join(view["metrics"]), str(fresh["batch_version"]), str(fresh["cut"]),
                      str(fresh["realtime_lag_ms"]))
    console.print(table)


@functions_app.command("package")
def functions_package(
    out: Annotated[Path, typer.Option(help="Where the artifacts go (the template's CodeUri "
                                           "and DockerContext paths are build/functions)")]
    = Path("build/functions"),
    only: Annotated[list[str] | None, typer.Option(help="Only this function, repeatable")] = None,
    template: Annotated[Path | None, typer.Option(help="A SAM template (default: the "
                                                       "shipped one)")] = None,
) -> None:
    """Build one artifact per function of the template for the AWS Lambda runtime: a zip
    (ingestion) or a Docker context (PackageType: Image), holding what its handler imports."""
    from lambdalake.functions.runtime.template import load_template
    from lambdalake.stack.package import PackageError, package

    try:
        artifacts = package(load_template(template), out, Settings().project, only)
    except PackageError as exc:
        raise CliError(str(exc)) from None
    table = _table("function", "type", "artifact", "MB unzipped", "MB zipped")
    for artifact in artifacts:
        zipped = artifact.zipped_bytes
        table.add_row(artifact.function, artifact.package_type, str(artifact.path),
                      f"{artifact.unzipped_bytes / 2**20:.1f}",
                      "-" if zipped is None else f"{zipped / 2**20:.1f}")
    console.print(table)


@functions_app.command("alarms")
def functions_alarms(
    template: Annotated[Path | None, typer.Option(help="A SAM template (default: the "
                                                       "shipped one)")] = None,
) -> None:
    """Write every function's rollback alarms (Errors, Throttles on its live alias) into the
    template, between its marker comments."""
    from lambdalake.functions.runtime.template import shipped_template
    from lambdalake.stack.alarms import TemplateError, with_alarms

    path = template or shipped_template()
    text = path.read_text()
    try:
        written = with_alarms(text)
    except TemplateError as exc:
        raise CliError(f"{path}: {exc}") from None
    path.write_text(written)
    console.print(f"{path}: {'up to date' if written == text else 'alarms written'}")


def _versions(function: str, template: Path | None = None) -> Any:
    from lambdalake.functions.runtime.local import LocalRuntime
    from lambdalake.functions.runtime.template import load_template
    from lambdalake.functions.runtime.versions import FunctionVersions

    functions = load_template(template).functions
    if function not in functions:
        raise CliError(f"no function {function} in the template (it has {', '.join(functions)})")
    folder = LocalRuntime.versions_folder(Settings())
    return FunctionVersions(folder, function, functions[function].handler)


@functions_app.command("deploy")
def functions_deploy(
    function: str,
    code: Annotated[Path | None, typer.Option(help="A zip or folder holding the handler's "
                                                   "module (default: the installed one)")] = None,
    canary: Annotated[float | None, typer.Option(help="Send this share (0-1) of invocations "
                                                      "to the new version, the rest stay")] = None,
) -> None:
    """Publish FUNCTION's code as a new numbered version and point its live alias at it, at
    once or as a canary; the local runtime routes invocations by the alias's weights."""
    from lambdalake.functions.runtime.versions import VersionError, read_code

    versions = _versions(function)
    try:
        alias = versions.deploy(read_code(versions.handler_path, code), canary)
    except VersionError as exc:
        raise CliError(str(exc)) from None
    console.print(f"{function}: {alias.describe()}")


@functions_app.command("shift")
def functions_shift(
    function: str,
    weight: Annotated[float, typer.Argument(help="Share of the new version (1: all)")],
) -> None:
    """Move a canary deployment's traffic to the new version by WEIGHT."""
    from lambdalake.functions.runtime.versions import VersionError

    try:
        alias = _versions(function).shift(weight)
    except VersionError as exc:
        raise CliError(str(exc)) from None
    console.print(f"{function}: {alias.describe()}")


@functions_app.command("rollback")
def functions_rollback(function: str) -> None:
    """Stop a deployment under way (all traffic back on the version it started from), or
    point the live alias at the version before the one it points at."""
    from lambdalake.functions.runtime.versions import VersionError

    try:
        alias = _versions(function).rollback()
    except VersionError as exc:
        raise CliError(str(exc)) from None
    console.print(f"{function}: {alias.describe()}")


@functions_app.command("stats")
def functions_stats(
    url: Annotated[str | None, typer.Option(help="Prometheus metrics of the process running "
                                                  "the functions (default: the API's)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list of the functions")]
    = False,
) -> None:
    """Per function, as the cloud bills it: invocations, errors, throttles, durations,
    billed GB-seconds, concurrency, cold starts and init, and the cost at the settings'
    prices (function_price_per_gb_second, function_price_per_million_requests)."""
    from lambdalake.functions.runtime.metering import Prices, Usage

    settings = Settings()
    target = url or f"http://{settings.api_host}:{settings.api_port}/metrics"
    try:
        reply = httpx.get(target, timeout=10)
    except httpx.TransportError:
        raise CliError(f"no metrics at {target}; is `lambdalake up` running?") from None
    if reply.status_code != 200:
        raise CliError(f"{target} answered {reply.status_code}")
    prices = Prices(settings.function_price_per_gb_second,
                    settings.function_price_per_million_requests)
    usages = Usage.from_prometheus(reply.text).values()
    rows = [{**dataclasses.asdict(u), "cost_usd": u.cost(prices)} for u in usages]
    if as_json:
        console.print_json(data=rows)
        return
    table = _table("function", "MB", "invocations", "errors", "throttles", "duration s",
                   "billed s", "GB-s", "max concurrent", "cold starts", "init s", "cost USD")
    for row in rows:
        table.add_row(row["function"], str(row["memory_mb"]), str(row["invocations"]),
                      str(row["errors"]), str(row["throttles"]), f"{row['duration_s']:.3f}",
                      f"{row['billed_duration_s']:.3f}", f"{row['gb_seconds']:.4f}",
                      str(row["concurrent_max"]), str(row["cold_starts"]),
                      f"{row['init_duration_s']:.3f}", f"{row['cost_usd']:.8f}")
    console.print(table)


def _table(*columns: str) -> Table:
    """A table whose cells are never cut: a version id must stay whole to be typed back."""
    table = Table()
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _reachable(url: str) -> None:
    """Fail fast, in one line, when nothing listens at the gateway's address."""
    try:
        httpx.get(url.rsplit("/", 1)[0] + "/healthz", timeout=3)
    except httpx.TransportError as exc:
        raise CliError(f"gateway not reachable at {url} ({exc}); is `lambdalake up` running?")\
            from None


def _api(path: str, params: dict[str, Any]) -> Any:
    settings = Settings()
    url = f"http://{settings.api_host}:{settings.api_port}{path}"
    key = settings.keyring.key_for("query")
    headers = {KEY_HEADER: key} if key else {}
    try:
        reply = httpx.get(url, params=params, headers=headers, timeout=30)
    except httpx.TransportError:
        raise CliError(f"serving API not reachable at {url}; is `lambdalake up` running?") from None
    if reply.status_code != 200:
        errors = reply.json().get("errors", [{"field": "?", "error": reply.text}])
        raise CliError("; ".join(f"{e['field']}: {e['error']}" for e in errors))
    return reply.json()


def _iso(ms: int | None) -> str:
    from lambdalake.events import iso

    return "-" if ms is None else iso(ms)


def _freshness(fresh: dict[str, Any]) -> str:
    return (f"batch {fresh['batch_version']} (cut {fresh['cut']}), "
            f"real-time lag {fresh['realtime_lag_ms']} ms")


def main() -> None:
    from pydantic import ValidationError

    setup_logging()
    try:
        app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        _fail("aborted")
    except typer.TyperException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help is already printed
            sys.exit(2)
        _fail(exc.format_message().replace("\n", " "))
    except CliError as exc:
        _fail(str(exc))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))  # empty for a rule across settings
        message = first["msg"].removeprefix("Value error, ")
        _fail(f"setting {where}: {message}" if where else f"setting {message}")
    except (OSError, RuntimeError, ValueError, LookupError, ImportError) as exc:
        # our own errors say what is wrong in their message; a builtin one needs its name
        builtin = type(exc).__module__ == "builtins"
        _fail(f"{type(exc).__name__}: {exc}" if builtin else str(exc))


def _fail(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
