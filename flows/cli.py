"""`tracetriage`: run the triage flow, or write sample traces.

    tracetriage run                                  # sample traces, every window, summary on stdout
    tracetriage run --source runs.jsonl --json       # your exported runs, one JSON document on stdout
    tracetriage sample --traces 5000 --out runs.jsonl
    tracetriage report --since 7d --out report/        # trend table on stdout, chart in report/trend.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from tasks.config import ConfigError, FileSource, LangSmithSource, SnapshotConfig, load_config
from tasks.langsmith import LangSmithFetchError, LangSmithSourceError


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date or time, e.g. 2026-11-02T09:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracetriage", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="triage windows of traces (the sample traces by default)")
    run.add_argument("--config", type=Path, help="loop config YAML (see README)")
    run.add_argument("--source", help="JSONL or Parquet file of LangSmith run records, or langsmith:PROJECT "
                                     "(overrides the config)")
    run.add_argument("--start", type=_moment, help="first window to triage (ISO time, UTC if no zone)")
    run.add_argument("--end", type=_moment, help="triage windows starting before this time")
    run.add_argument("--out", default=".tracetriage", help="output directory (default: ./.tracetriage)")
    run.add_argument("--json", action="store_true", help="print one JSON document instead of the summary")

    sample = commands.add_parser("sample", help="write sample traces of a RAG/agent app with planted failures")
    sample.add_argument("--traces", type=int, default=2000)
    sample.add_argument("--seed", type=int, default=7)
    sample.add_argument("--hours", type=float, default=3, help="spread root start times over this many hours")
    sample.add_argument("--out", type=Path, required=True, help="output .jsonl or .parquet file")
    sample.add_argument("--rate", action="append", default=[], metavar="MODE=SHARE",
                        help="share of traces with a planted failure mode, e.g. tool_error=0.2 (repeatable); "
                             "modes: irrelevant_retrieval, tool_error, slow_reranker, hallucinated_answer")
    report = commands.add_parser("report", help="trend table and chart of the snapshots, spikes marked")
    report.add_argument("--config", type=Path, help="loop config YAML: where snapshots are, spike settings")
    report.add_argument("--snapshots", help="snapshot URL (overrides the config; default .tracetriage/snapshots)")
    report.add_argument("--since", default="7d", help="a duration back from the latest window (7d, 48h) or an "
                                                       "ISO time (default: 7d)")
    report.add_argument("--out", type=Path, default=Path("."), help="directory for trend.png (default: .)")
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


def run_command(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config) if args.config else load_config(data={})
        if args.source and args.source.startswith("langsmith:"):
            project = args.source.removeprefix("langsmith:")
            current = config.source if isinstance(config.source, LangSmithSource) else None
            source = (current.model_copy(update={"project": project}) if current
                      else LangSmithSource(project=project))
            config = config.model_copy(update={"source": source})
        elif args.source:
            config = config.model_copy(update={"source": FileSource(path=args.source)})
        from flows.triage import triage, validate

        validate(config)
    except (ConfigError, ValueError, FileNotFoundError, LangSmithSourceError) as exc:
        print(f"tracetriage: {exc}", file=sys.stderr)
        return 2
    if args.start and args.end and args.start >= args.end:
        print("tracetriage: --start must be before --end", file=sys.stderr)
        return 2
    if (problem := _unwritable(Path(args.out))) is not None:
        print(f"tracetriage: --out {args.out} {problem}", file=sys.stderr)
        return 2
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext(), _progress_bar():
        try:
            result = triage(config=config, start=args.start, end=args.end, out=args.out)
        except (ValueError, LangSmithSourceError, LangSmithFetchError) as exc:
            print(f"tracetriage: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:  # a full or read-only disk: which path, in one line; the rerun sends nothing twice
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"tracetriage: {where}{exc.strerror or exc}", file=sys.stderr)
            return 1
    from tasks.summary import skipped_text

    skipped = skipped_text(result["skipped"])
    if not result["windows"] and skipped:
        print(f"tracetriage: nothing to triage in {result['source']}: {skipped}", file=sys.stderr)
        return 1
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


def sample_command(args: argparse.Namespace) -> int:
    from tasks.sample import generate_traces, write_sample

    if args.out.suffix not in (".jsonl", ".parquet"):
        print("tracetriage: --out must end in .jsonl or .parquet", file=sys.stderr)
        return 2
    rates = {}
    for item in args.rate:
        mode, _, share = item.partition("=")
        try:
            rates[mode] = float(share)
        except ValueError:
            print(f"tracetriage: --rate {item!r} must look like tool_error=0.2", file=sys.stderr)
            return 2
    try:
        sample = generate_traces(args.traces, seed=args.seed, hours=args.hours, rates=rates)
    except ValueError as exc:
        print(f"tracetriage: {exc}", file=sys.stderr)
        return 2
    truth = write_sample(args.out, sample)
    print(f"wrote {len(sample.records)} runs of {args.traces} traces to {args.out} (ground truth: {truth})")
    return 0


def report_command(args: argparse.Namespace) -> int:
    from tasks.report import format_table, report_period, trend_report
    from tasks.snapshot import open_store

    try:
        config = load_config(args.config) if args.config else load_config(data={})
        if args.snapshots:
            config = config.model_copy(update={"snapshots": SnapshotConfig(url=args.snapshots)})
        report = trend_report(open_store(config.snapshots, Path(".tracetriage") / "snapshots"), args.since,
                              config.spikes)
    except (ConfigError, ValueError) as exc:
        print(f"tracetriage: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    chart = args.out / "trend.png"
    chart.write_bytes(report.chart_png)
    print(f"trends of {report_period(report)}\n")
    print(format_table(report.table))
    print(f"\n{report.spiking_windows} of {report.windows} windows spiked; chart: {chart}")
    return 0


COMMANDS = {"run": run_command, "sample": sample_command, "report": report_command}


def main(argv: list[str] | None = None) -> int:
    # Offline by default: no telemetry from the temporary Prefect server.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = _parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
