"""`tracetriage`: run the triage flow, or write sample traces.

    tracetriage run                                  # sample traces, every window, summary on stdout
    tracetriage run --source runs.jsonl --json       # your exported runs, one JSON document on stdout
    tracetriage sample --traces 5000 --out runs.jsonl
    tracetriage sample --windows 30 --traces 300 --window-rate 25:tool_error=0.25 --out history.jsonl
    tracetriage report --since 7d                      # trend table of .tracetriage, chart in .tracetriage/trend.png
    tracetriage server status                          # the local Prefect API and UI the runs use; `stop` stops it
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import json
import os
import signal
import sys
import tempfile
import threading
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from flows import local_api, warm

if TYPE_CHECKING:  # imported where used: a warm run's caller imports none of them (flows/warm.py)
    from pydantic import ValidationError

    from tasks.config import ConfigError, LoopConfig

# Disk errors that are the machine's, not a bug: printed as one line naming the path, like a full disk.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date or time, e.g. 2026-11-02T09:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _parser() -> argparse.ArgumentParser:
    from tasks.config import DEFAULT_OUT

    parser = argparse.ArgumentParser(prog="tracetriage", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="triage windows of traces (the sample traces by default)")
    run.add_argument("--config", type=Path, help="loop config YAML (see README)")
    run.add_argument("--source", help="JSONL or Parquet file of LangSmith run records, or langsmith:PROJECT "
                                     "(overrides the config)")
    run.add_argument("--start", type=_moment, help="first window to triage (ISO time, UTC if no zone)")
    run.add_argument("--end", type=_moment, help="triage windows starting before this time")
    run.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: ./.tracetriage)")
    run.add_argument("--json", action="store_true", help="print one JSON document instead of the summary")

    sample = commands.add_parser("sample", help="write sample traces of a RAG/agent app with planted failures")
    sample.add_argument("--traces", type=int, default=2000, help="traces (per window with --windows)")
    sample.add_argument("--seed", type=int, default=7)
    sample.add_argument("--hours", type=float, help="spread root start times over this many hours (default: 3)")
    sample.add_argument("--windows", type=int, help="consecutive hourly windows of --traces traces each, instead "
                                                    "of --hours")
    sample.add_argument("--out", type=Path, required=True, help="output .jsonl or .parquet file")
    sample.add_argument("--rate", action="append", default=[], metavar="MODE=SHARE",
                        help="share of traces with a planted failure mode, e.g. tool_error=0.2 (repeatable); "
                             "modes: irrelevant_retrieval, tool_error, slow_reranker, hallucinated_answer")
    sample.add_argument("--window-rate", action="append", default=[], metavar="N:MODE=SHARE",
                        help="with --windows, the share in window N only (1 is the first), e.g. 25:tool_error=0.25 "
                             "plants a spike in window 25 (repeatable)")
    report = commands.add_parser("report", help="trend table and chart of the snapshots, spikes marked")
    report.add_argument("--config", type=Path, help="loop config YAML: where snapshots are, spike settings")
    report.add_argument("--out", type=Path, default=Path(DEFAULT_OUT),
                        help="the state directory `run --out` wrote (default: ./.tracetriage); snapshots are read "
                             "from its snapshots/ unless the config or --snapshots names them")
    report.add_argument("--snapshots", help="snapshot URL (overrides the config and --out)")
    report.add_argument("--since", default="7d", help="a duration back from the latest window (7d, 48h) or an "
                                                       "ISO time (default: 7d)")
    report.add_argument("--chart", type=Path, help="where to write the chart PNG (default: OUT/trend.png)")
    server = commands.add_parser("server", help="the local Prefect API and UI that `run` starts on first use")
    server.add_argument("action", choices=["status", "start", "stop"])
    return parser


def _progress_bar():
    """A rich progress bar on stderr, fed by the stages' progress reports."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tasks import progress as stage_progress

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True), transient=True)
    ids: dict[str, int] = {}

    def listener(stage: str, done: int, total: int, detail: str) -> None:
        if stage not in ids:
            ids[stage] = bar.add_task(stage, total=total)
        bar.update(ids[stage], completed=done, total=total, description=stage + detail)

    @contextlib.contextmanager
    def running():
        stage_progress.add_listener(listener)
        try:
            with bar:
                yield
        finally:
            stage_progress.remove_listener(listener)

    return running()


def _unwritable(out: Path) -> str | None:
    """Why the output directory cannot be written (made if missing, then a file tried in it), or None."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except FileExistsError:
        return "is a file, not a directory"
    except OSError as exc:
        return f"is not writable: {exc.strerror or exc}"
    return None


def refused(exc: ConfigError) -> int:
    """A config or input the user fixes: its message (which names the fix) and exit 2, no traceback."""
    print(f"tracetriage: {exc}", file=sys.stderr)
    return 2


def unexpected(exc: BaseException, flow_runs_url: str | None = None) -> int:
    """A bug, in tracetriage or in code the config names: the traceback, then what it was and where more is;
    exit 1. tracetriage keeps no log file; a flow run's logs (Prefect's) are in the Prefect UI."""
    traceback.print_exception(exc, file=sys.stderr)
    more = (f"this run's flow-run logs are in the Prefect UI at {flow_runs_url}" if flow_runs_url
            else "no flow run had started")
    print(f"tracetriage: unexpected {type(exc).__name__}: a bug in tracetriage or in code the config names, not a "
          f"config error; the traceback above is the full error (tracetriage writes no log file), and {more}",
          file=sys.stderr)
    return 1


def _flow_runs_url(server: local_api.LocalServer | None) -> str | None:
    """The Prefect UI's flow-run list this run reports to (the local server's, else the configured API's)."""
    from prefect.settings import get_current_settings

    ui = server.url if server else get_current_settings().ui_url
    return f"{ui}/runs" if ui else None


def _with_source(config: LoopConfig, source: str) -> LoopConfig:
    """The config with `--source` in place of its source: a file, or `langsmith:PROJECT`."""
    from pydantic import ValidationError

    from tasks.config import FileSource, LangSmithSource

    try:
        if source.startswith("langsmith:"):
            project = source.removeprefix("langsmith:")
            current = config.source if isinstance(config.source, LangSmithSource) else None
            return config.model_copy(update={"source": current.model_copy(update={"project": project}) if current
                                             else LangSmithSource(project=project)})
        return config.model_copy(update={"source": FileSource(path=source)})
    except ValidationError as exc:
        raise _flag_error("--source", source, exc) from None


def _flag_error(flag: str, value: str, error: ValidationError) -> ConfigError:
    """A flag's value that its config field refuses, in one line."""
    from tasks.config import ConfigError

    reasons = "; ".join(item["msg"].removeprefix("Value error, ") for item in error.errors())
    return ConfigError(f"{flag} {value!r}: {reasons}")


def run_command(args: argparse.Namespace) -> int:
    from tasks.config import ConfigError, load_config
    from tasks.sources.langsmith import LangSmithFetchError

    try:
        config = load_config(args.config) if args.config else load_config(data={})
        if args.source:
            config = _with_source(config, args.source)
        server = _local_server()  # starts while the flow modules import and the config is checked
        if server:
            warm.used_local_server()
            os.environ["PREFECT_API_URL"] = server.api_url  # for any process this run starts: the workers, next
        from tasks.evaluation.evaluate import prepare_evaluation

        prepare_evaluation(config)  # the workers import on the other core while the flow modules import here
        from flows.triage import triage
        from tasks.sinks.connections import validate

        validate(config)
    except ConfigError as exc:
        return refused(exc)
    if args.start and args.end and args.start >= args.end:
        print("tracetriage: --start must be before --end", file=sys.stderr)
        return 2
    if (problem := _unwritable(Path(args.out))) is not None:
        print(f"tracetriage: --out {args.out} {problem}", file=sys.stderr)
        return 2
    stdout = sys.stdout
    try:
        api = _prefect_api(server)
    except local_api.LocalServerError as exc:
        print(f"tracetriage: {exc}", file=sys.stderr)
        return 1
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext(), api, _progress_bar():
        try:
            result = triage(config=config, start=args.start, end=args.end, out=args.out)
        except ConfigError as exc:  # e.g. a LangSmith project deleted since the check
            return refused(exc)
        except LangSmithFetchError as exc:  # every retry spent: one line; the rerun fetches again
            print(f"tracetriage: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            if exc.filename is None and exc.errno not in DISK_ERRNOS:
                return unexpected(exc, _flow_runs_url(server))
            # A full or read-only disk: which path, in one line; the rerun sends nothing twice.
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"tracetriage: {where}{exc.strerror or exc}", file=sys.stderr)
            return 1
        except Exception as exc:  # noqa: BLE001 - a bug: shown whole, with where the flow run's logs are
            return unexpected(exc, _flow_runs_url(server))
    from tasks.summary import skipped_text

    skipped = skipped_text(result["skipped"])
    if not result["windows"] and skipped:
        print(f"tracetriage: nothing to triage in {result['source']}: {skipped}", file=sys.stderr)
        return 1
    if server:
        print(f"flow runs and artifacts: {server.url}/runs (the local Prefect server; `tracetriage server stop` "
              "stops it)", file=sys.stderr)
    if args.json:
        stdout.write(json.dumps({"windows": result["windows"], "skipped": result["skipped"]}, indent=2) + "\n")
    else:
        from tasks.summary import summary_text

        print(f"\ntriaged {len(result['windows'])} windows of {result['source']}\n")
        if skipped:
            print(skipped + "\n")
        for window in result["windows"]:
            print(summary_text(window) + "\n")
        where = result["windows"][-1]["snapshot_uri"] if result["windows"] else f"{args.out}/snapshots"
        print(f"snapshots and the ledger (_ledger/) are in {where}; the action log is {args.out}/actions.jsonl")
    return 0


def _local_server() -> local_api.LocalServer | None:
    """The local Prefect server this run will use (possibly still starting), or None when a Prefect API is
    configured."""
    if local_api.configured_api_url():
        return None
    server, started = local_api.ensure_started()
    if started:
        first = f" (first run: {server.first_run})" if server.first_run else ""
        print(f"starting the local Prefect API at {server.url}{first}; allowing up to "
              f"{local_api.startup_allowance():.0f} s", file=sys.stderr)
    return server


def _prefect_api(server: local_api.LocalServer | None) -> contextlib.AbstractContextManager:
    """Prefect settings for this run: the local server's API once it answers; no flow-run heartbeat, which
    only serves crash detection by a server's automations and makes every flow run wait up to 1 s at its end
    (set PREFECT_FLOWS_HEARTBEAT_FREQUENCY to keep it)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    updates: dict = {}
    if "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" not in os.environ:
        updates["flows.heartbeat_frequency"] = None
    if server:
        server.wait_until_healthy(local_api.startup_allowance())
        os.environ["PREFECT_API_URL"] = server.api_url  # for any process this run starts
        updates[PREFECT_API_URL] = server.api_url
    return temporary_settings(updates=updates)


def server_command(args: argparse.Namespace) -> int:
    if args.action == "stop":
        stopped = local_api.stop()
        print(f"stopped the local Prefect server (pid {stopped.pid}, {stopped.url})" if stopped
              else "no local Prefect server is running")
        return 0
    if args.action == "start":
        server, _ = local_api.ensure_started()
        try:
            server.wait_until_healthy(local_api.startup_allowance())
        except local_api.LocalServerError as exc:
            print(f"tracetriage: {exc}", file=sys.stderr)
            return 1
    server = local_api.recorded()
    if server is None:
        print(f"no local Prefect server is running (its home: {local_api.server_home()})")
        return 1
    state = "running" if server.healthy() else "starting"
    print(f"{state}: pid {server.pid}, API {server.api_url}, UI {server.url}, home {server.home}")
    for pid in warm.runners(server.home):
        print(f"warm runner: pid {pid} (later runs fork from it instead of importing; it stops with the server)")
    return 0


def _rates(items: list[str], flag: str) -> dict[str, float]:
    """`MODE=SHARE` items as a dict; ConfigError naming the flag when one is malformed."""
    from tasks.config import ConfigError

    rates = {}
    for item in items:
        mode, _, share = item.partition("=")
        try:
            rates[mode] = float(share)
        except ValueError:
            raise ConfigError(f"{flag} {item!r} must look like tool_error=0.2") from None
    return rates


def _window_rates(items: list[str], windows: int, base: dict[str, float]) -> list[dict[str, float] | None]:
    """Each window's rates: `--rate` everywhere, `--window-rate N:MODE=SHARE` on top in window N."""
    from tasks.config import ConfigError

    per_window: list[dict[str, float]] = [dict(base) for _ in range(windows)]
    for item in items:
        number, _, rate = item.partition(":")
        if not number.isdigit() or not 1 <= int(number) <= windows:
            raise ConfigError(f"--window-rate {item!r}: N must be a window number from 1 to {windows}, "
                              "e.g. 25:tool_error=0.25")
        per_window[int(number) - 1].update(_rates([rate], "--window-rate"))
    return [rates or None for rates in per_window]


def sample_command(args: argparse.Namespace) -> int:
    from tasks.config import ConfigError
    from tasks.sources.sample import generate_traces, generate_windows, write_sample

    if args.out.suffix not in (".jsonl", ".parquet"):
        print("tracetriage: --out must end in .jsonl or .parquet", file=sys.stderr)
        return 2
    try:
        if args.windows is None and args.window_rate:
            raise ConfigError("--window-rate needs --windows N")
        if args.windows is not None and args.hours is not None:
            raise ConfigError("give --windows (hourly windows) or --hours, not both")
        rates = _rates(args.rate, "--rate")
        if args.windows is not None:
            if args.windows < 1:
                raise ConfigError("--windows must be at least 1")
            sample = generate_windows(args.traces, _window_rates(args.window_rate, args.windows, rates),
                                      seed=args.seed)
            traces = args.traces * args.windows
        else:
            sample = generate_traces(args.traces, seed=args.seed, hours=args.hours or 3, rates=rates)
            traces = args.traces
    except ConfigError as exc:
        return refused(exc)
    truth = write_sample(args.out, sample)
    print(f"wrote {len(sample.records)} runs of {traces} traces to {args.out} (ground truth: {truth})")
    return 0


def report_command(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from tasks.config import ConfigError, SnapshotConfig, load_config
    from tasks.report import format_table, report_period, trend_report
    from tasks.sinks.connections import open_store

    try:
        config = load_config(args.config) if args.config else load_config(data={})
        if args.snapshots:
            try:
                config = config.model_copy(update={"snapshots": SnapshotConfig(url=args.snapshots)})
            except ValidationError as exc:
                raise _flag_error("--snapshots", args.snapshots, exc) from None
        report = trend_report(open_store(config.snapshots, args.out / "snapshots"), args.since, config.spikes)
    except ConfigError as exc:
        return refused(exc)
    chart = args.chart or args.out / "trend.png"
    chart.parent.mkdir(parents=True, exist_ok=True)
    chart.write_bytes(report.chart_png)
    print(f"trends of {report_period(report)}\n")
    print(format_table(report.table))
    print(f"\n{report.spiking_windows} of {report.windows} windows spiked; chart: {chart}")
    return 0


COMMANDS = {"run": run_command, "sample": sample_command, "report": report_command, "server": server_command}


def main(argv: list[str] | None = None) -> int:
    # Offline by default: no usage data from the local Prefect server, nor from Prefect's SDK in this process
    # (which, on a terminal, would print a notice and queue usage events). Either can be set.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except Exception as exc:  # noqa: BLE001 - a bug: shown whole; config and input errors were one line above
        return unexpected(exc)
    finally:
        if args.command == "run":
            warm.leave_runner()  # the next run forks from it instead of importing


def entry() -> None:
    """The `tracetriage` command: in a warm runner's fork when one serves this caller (flows/warm.py), else
    `main` here; then exit without the interpreter's teardown."""
    code = warm.run(sys.argv[1:]) if sys.argv[1:2] == ["run"] else None
    finish(main() if code is None else code)


def finish(code: int | None) -> None:
    """Exit with `code` without the interpreter's teardown.

    By the time `main` returns, the run's output is written and flushed and its flow runs are reported; what
    remains is Python's exit: the atexit handlers (Prefect's event and log workers drain there, the worker pool
    stops), then freeing every module and object, which took 0.7 s of a 5 s run here. The threads are still
    joined and the handlers still run, in Python's order; only the freeing is skipped."""
    threading._shutdown()  # what Python's exit does first: join non-daemon threads, stop executors
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if code is not None and code < 0:  # a warm run's Ctrl-C: killed by the signal, as Python's exit is
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code or 0)


if __name__ == "__main__":
    entry()
