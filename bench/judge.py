"""Benchmark: LLM-as-judge evaluators, whole `tracetriage run` processes (Prefect start included).

    .venv/bin/python bench/judge.py                        # all three cases
    .venv/bin/python bench/judge.py --only latency --traces 1000
    .venv/bin/python bench/judge.py --only rate --model-traces 10000

1. latency: an async evaluator that waits 0.3 s per run (it stands for a judge call) on 1,000 traces with
   the default config. Target: under 30 s whole process (issue 14; it took 375 s when it ran serially).
2. rate: an openevals LLM-as-judge (`create_async_llm_as_judge` with an `openai.AsyncOpenAI` client) on
   10,000 traces against a local fake chat-completions API on 127.0.0.1 that enforces 600 requests/min
   (429 with Retry-After beyond it), with `rate_limit: {requests: 600, per: 60s}`. Prints the requests per
   minute achieved against the limit, and the 429s drawn.
3. rerun: the same run again (model calls made; target 0), and again with another evaluator added, so the
   window's cached evaluation is stale but the judge's results are not (target 0).

Each line carries the wall time, the peak RSS of the whole process tree sampled from /proc (evaluation workers,
the forkserver's children, included; the temporary Prefect API server shown apart) and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.measure import PeakRSS  # noqa: E402

JUDGE_PROMPT = ("Does the answer address the question?\n<question>{inputs}</question>\n<answer>{outputs}</answer>\n"
                "Answer with a score of true or false.")


async def slow_judge(*, inputs: dict, outputs: dict | None) -> dict:
    """Stands for an LLM-as-judge call: 0.3 s of waiting on the network, no CPU."""
    await asyncio.sleep(0.3)
    return {"score": 1.0 if outputs else 0.0}


def model_judge(base_url: str, model: str = "gpt-4o-mini") -> Any:
    """An openevals LLM-as-judge against an OpenAI-compatible API at `base_url` (the client's own retries off:
    tracetriage retries, under the shared rate limit)."""
    from openai import AsyncOpenAI
    from openevals.llm import create_async_llm_as_judge

    client = AsyncOpenAI(base_url=base_url, api_key="bench-not-a-secret", max_retries=0)
    return create_async_llm_as_judge(prompt=JUDGE_PROMPT, judge=client, model=model, feedback_key="helpful")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _sample(path: Path, traces: int, *options: str) -> Path:
    if not path.exists():
        subprocess.run([sys.executable, "-m", "flows.cli", "sample", "--traces", str(traces), "--hours", "1",
                        "--out", str(path), *options], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return path


def _run(config: dict, source: Path, out: Path) -> tuple[float, dict, PeakRSS]:
    """One `tracetriage run --json` process: (seconds, its JSON document, peak RSS of its tree)."""
    config_path = out.parent / f"{out.name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    with PeakRSS() as memory:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(config_path), "--source",
                               str(source), "--out", str(out), "--json"], capture_output=True, text=True, env=env,
                              cwd=ROOT)
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"tracetriage run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout), memory


def _counts(document: dict, key: str) -> str:
    totals = {s: sum(w["evaluators"][key][s] for w in document["windows"]) for s in ("pass", "fail", "error")}
    return f"{key} {totals['pass']}/{totals['fail']}/{totals['error']} (pass/fail/error)"


def _line(label: str, seconds: float, memory: PeakRSS, extra: str = "") -> None:
    print(f"  {label:44s} {seconds:7.1f} s   peak RSS {memory.peak / 2**20:6,.0f} MB "
          f"(with the Prefect API {memory.peak_all / 2**20:,.0f} MB)   load {_load()}   {extra}", flush=True)


def latency_case(data: Path, work: Path, traces: int) -> None:
    source = _sample(data / f"judge-{traces}.jsonl", traces)
    config = {"evaluators": [{"key": "judge", "ref": "bench.judge:slow_judge"}]}
    print(f"latency: async 0.3 s judge, {traces:,} traces, default config (target < 30 s; floor "
          f"{traces * 0.3 / 32:.1f} s at the default concurrency 32)")
    seconds, document, memory = _run(config, source, work / "latency")
    _line(f"{traces:,} traces, whole process", seconds, memory, _counts(document, "judge"))


def rate_and_rerun_cases(data: Path, work: Path, traces: int, rpm: int, rerun: bool) -> None:
    from tests.fake_model_server import FakeModelServer

    # No planted tool errors: a trace without outputs fails in the judge before its request, and would spend a
    # slot of the rate limit without reaching the API, which would blur the requests/min achieved.
    source = _sample(data / f"judge-answered-{traces}.jsonl", traces, "--rate", "tool_error=0")
    with FakeModelServer(requests_per_minute=rpm) as server:
        judge = {"key": "helpful", "ref": "bench.judge:model_judge", "params": {"base_url": server.base_url},
                 "rate_limit": {"requests": rpm, "per": "60s"}}
        config = {"evaluators": [judge]}
        print(f"\nrate: openevals judge, {traces:,} traces, fake model API enforcing {rpm} requests/min "
              f"(floor {traces / rpm:.1f} min)")
        seconds, document, memory = _run(config, source, work / "rate")
        print(f"  model requests answered {server.requests:,}, 429s drawn {server.rejected:,}; achieved "
              f"{server.achieved_rpm():,.1f} requests/min = {server.achieved_rpm() / rpm:.1%} of the limit; "
              f"most in any 60 s: {server.max_in_any_window():,}")
        _line(f"{traces:,} traces, whole process", seconds, memory, _counts(document, "helpful"))
        if not rerun:
            return
        print("\nrerun cost (target: 0 model calls)")
        before = server.requests + server.rejected
        seconds, document, memory = _run(config, source, work / "rate")
        _line("same run again", seconds, memory, f"model calls made: {server.requests + server.rejected - before}")
        before = server.requests + server.rejected
        config = {"evaluators": [judge, {"key": "no_error", "ref": "builtin:error_free", "threshold": 1.0}]}
        seconds, document, memory = _run(config, source, work / "rate")
        _line("again, another evaluator added", seconds, memory,
              f"model calls made: {server.requests + server.rejected - before}; {_counts(document, 'helpful')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=1000, help="traces of the latency case")
    parser.add_argument("--model-traces", type=int, default=10_000, help="traces of the rate-limited case")
    parser.add_argument("--rpm", type=int, default=600, help="the fake model API's requests per minute")
    parser.add_argument("--only", choices=["latency", "rate"], help="run one case (rate includes the rerun)")
    parser.add_argument("--no-rerun", action="store_true", help="skip the rerun case")
    parser.add_argument("--data", type=Path, default=ROOT / ".bench-data", help="where generated traces are kept")
    args = parser.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} cores, load {_load()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "latency"):
            latency_case(args.data, Path(tmp), args.traces)
        if args.only in (None, "rate"):
            rate_and_rerun_cases(args.data, Path(tmp), args.model_traces, args.rpm, not args.no_rerun)


if __name__ == "__main__":
    main()
