"""Sample traces of a RAG/agent app, as LangSmith run records, with planted failure modes.

Each trace is a root chain `rag_agent` with children: `plan` (llm), `search_docs`
(retriever), `rerank` (chain), sometimes `lookup_order` (tool) and `answer_llm` (llm).
At most one failure mode is planted per trace, so the ground truth names one culprit:

| mode                 | culprit span  | how it shows                                        |
|----------------------|---------------|-----------------------------------------------------|
| irrelevant_retrieval | search_docs   | documents share no words with the question          |
| tool_error           | lookup_order  | the tool raises; the root errors with it            |
| slow_reranker        | rerank        | rerank takes 7–11 s; the whole trace blows its SLO  |
| hallucinated_answer  | answer_llm    | the answer is not supported by the documents        |

Some passing traces hold a tool error that a retry recovered from, so error spans
are not a perfect signal. The hallucination rate is doubled for `gpt-4o-mini`, so
metadata patterns have something to find.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from tasks.config import ConfigError

SAMPLE_START = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
SAMPLE_NAMESPACE = uuid.UUID("6f1f3b8e-1c1d-4c55-9c3e-4b1d5a7f2e10")
SAMPLE_PROJECT_ID = str(uuid.uuid5(SAMPLE_NAMESPACE, "project/sample-rag-agent"))

FAILURE_MODES = {
    "irrelevant_retrieval": ("search_docs", "below_threshold"),
    "tool_error": ("lookup_order", "error"),
    "slow_reranker": ("rerank", "below_threshold"),
    "hallucinated_answer": ("answer_llm", "below_threshold"),
}

DEFAULT_RATES = {
    "irrelevant_retrieval": 0.08,
    "tool_error": 0.05,
    "slow_reranker": 0.06,
    "hallucinated_answer": 0.07,
}

_TOPICS = {
    "router": "router wifi password reset admin firmware signal channel modem bandwidth",
    "billing": "invoice billing refund charge payment subscription receipt card statement",
    "shipping": "shipping delivery package courier tracking address parcel warehouse dispatch",
    "account": "account login email username verification profile security twofactor recovery",
    "returns": "return exchange label warranty damaged replacement policy condition restock",
    "printer": "printer toner cartridge paper jam driver spooler scanner duplex tray",
}
_FILLER = "the a to of and for your with is can you it on this that please from".split()
_HALLUCINATION = "lunar volcano saxophone glacier origami telescope marathon cathedral pelican".split()
_MODELS = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4"]
_PROMPTS = ["v3", "v4"]


@dataclass
class SampleTraces:
    records: list[dict[str, Any]]
    truth: list[dict[str, Any]] = field(default_factory=list)


def _dotted(start: datetime, run_id: str) -> str:
    return start.strftime("%Y%m%dT%H%M%S%fZ") + run_id


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _sentence(rng: random.Random, words: list[str], n: int, must: list[str] = ()) -> str:
    picked = [rng.choice(words) if rng.random() < 0.7 else rng.choice(_FILLER) for _ in range(n - len(must))]
    picked += must
    rng.shuffle(picked)
    return " ".join(picked).capitalize() + "."


class _TraceBuilder:
    def __init__(self, rng: random.Random, seed: int, index: int, start: datetime, metadata: dict[str, str]):
        self.rng = rng
        self.seed = seed
        self.index = index
        self.metadata = metadata
        self.records: list[dict[str, Any]] = []
        self.root_id = self._id("root")
        self.root_start = start
        self.root_dotted = _dotted(start, self.root_id)
        self.cursor = start + timedelta(milliseconds=rng.randint(1, 20))
        self.children = 0

    def _id(self, label: str) -> str:
        return str(uuid.uuid5(SAMPLE_NAMESPACE, f"{self.seed}/{self.index}/{label}"))

    def span(
        self,
        name: str,
        run_type: str,
        seconds: float,
        inputs: dict[str, Any],
        outputs: dict[str, Any] | None,
        error: str | None = None,
        tokens: tuple[int, int] = (0, 0),
    ) -> str:
        self.children += 1
        run_id = self._id(f"{name}/{self.children}")
        start = self.cursor
        end = start + timedelta(seconds=seconds)
        self.cursor = end + timedelta(milliseconds=self.rng.randint(1, 15))
        self.records.append(self._record(run_id, name, run_type, self.root_id,
                                         f"{self.root_dotted}.{_dotted(start, run_id)}", start, end,
                                         inputs, outputs, error, tokens))
        return run_id

    def root(self, inputs: dict[str, Any], outputs: dict[str, Any] | None, error: str | None) -> None:
        end = self.cursor + timedelta(milliseconds=self.rng.randint(2, 30))
        tokens = (sum(r["prompt_tokens"] for r in self.records), sum(r["completion_tokens"] for r in self.records))
        self.records.insert(0, self._record(self.root_id, "rag_agent", "chain", None, self.root_dotted,
                                            self.root_start, end, inputs, outputs, error, tokens))

    def _record(
        self, run_id: str, name: str, run_type: str, parent: str | None, dotted: str, start: datetime,
        end: datetime, inputs: dict[str, Any], outputs: dict[str, Any] | None, error: str | None,
        tokens: tuple[int, int],
    ) -> dict[str, Any]:
        """A v1 LangSmith run record (the `RunSchema` of the API spec)."""
        return {
            "id": run_id,
            "name": name,
            "run_type": run_type,
            "trace_id": self.root_id,
            "parent_run_id": parent,
            "dotted_order": dotted,
            "session_id": SAMPLE_PROJECT_ID,
            "start_time": _iso(start),
            "end_time": _iso(end),
            "status": "error" if error else "success",
            "error": error,
            "inputs": inputs,
            "outputs": outputs,
            "extra": {"metadata": dict(self.metadata)},
            "prompt_tokens": tokens[0],
            "completion_tokens": tokens[1],
            "total_tokens": tokens[0] + tokens[1],
            "app_path": f"/o/sample/projects/p/{SAMPLE_PROJECT_ID}/r/{run_id}",
        }


def _pick_mode(rng: random.Random, rates: dict[str, float], model: str) -> str | None:
    draw = rng.random()
    for mode, rate in rates.items():
        if mode == "hallucinated_answer" and model == "gpt-4o-mini":
            rate *= 2
        if draw < rate:
            return mode
        draw -= rate
    return None


def _one_trace(
    rng: random.Random, seed: int, index: int, start: datetime, rates: dict[str, float]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    metadata = {"model": rng.choice(_MODELS), "prompt_version": rng.choice(_PROMPTS)}
    mode = _pick_mode(rng, rates, metadata["model"])
    topic = rng.choice(list(_TOPICS))
    words = _TOPICS[topic].split()
    other = _TOPICS[rng.choice([t for t in _TOPICS if t != topic])].split()
    keywords = rng.sample(words, 4)
    question = "How do I fix my " + " ".join(keywords) + "?"
    trace = _TraceBuilder(rng, seed, index, start, metadata)

    trace.span(
        "plan", "llm", rng.uniform(0.3, 1.0),
        {"messages": [{"role": "user", "content": question}]},
        {"plan": f"search docs about {topic}, then answer"},
        tokens=(rng.randint(80, 200), rng.randint(10, 40)),
    )
    relevant = mode != "irrelevant_retrieval"
    documents = [
        {"page_content": _sentence(rng, words if relevant else other, 14, rng.sample(keywords, 2) if relevant else []),
         "metadata": {"source": f"kb/{topic}"}}
        for _ in range(3)
    ]
    trace.span("search_docs", "retriever", rng.uniform(0.1, 0.4), {"query": question}, {"documents": documents})
    rerank_seconds = rng.uniform(7.0, 11.0) if mode == "slow_reranker" else rng.uniform(0.1, 0.5)
    trace.span("rerank", "chain", rerank_seconds, {"query": question, "k": 3}, {"documents": documents[:2]})

    culprit = {"lookup_order": None}
    tool_ids: list[str] = []
    uses_tool = mode == "tool_error" or rng.random() < 0.5
    if uses_tool and mode is None and rng.random() < 0.08:  # recovered by a retry: not a cause
        tool_ids.append(trace.span("lookup_order", "tool", rng.uniform(0.1, 0.6), {"order_id": index},
                                   None, error="TimeoutError: order service did not answer in 0.5s"))
    if mode == "tool_error":
        tool_ids.append(trace.span("lookup_order", "tool", rng.uniform(0.1, 0.6), {"order_id": index},
                                   None, error="ToolException: order service returned 500"))
        culprit["lookup_order"] = tool_ids[-1]
        trace.root({"question": question}, None, "ToolException: order service returned 500")
    else:
        if uses_tool:
            tool_ids.append(trace.span("lookup_order", "tool", rng.uniform(0.1, 0.6), {"order_id": index},
                                       {"status": "shipped"}))
        context = " ".join(d["page_content"] for d in documents)
        if mode == "hallucinated_answer":
            answer = _sentence(rng, _HALLUCINATION, 12)
        else:
            answer = " ".join(rng.sample(context.lower().rstrip(".").replace(".", "").split(), 10)) + "."
        trace.span(
            "answer_llm", "llm", rng.uniform(0.8, 2.5),
            {"question": question, "context": [d["page_content"] for d in documents]},
            {"answer": answer},
            tokens=(rng.randint(300, 900), rng.randint(40, 160)),
        )
        trace.root({"question": question}, {"answer": answer, "source_documents": documents}, None)

    ids_by_name = {r["name"]: r["id"] for r in trace.records}
    culprit_name = FAILURE_MODES[mode][0] if mode else None
    culprit_id = culprit["lookup_order"] if culprit_name == "lookup_order" else ids_by_name.get(culprit_name)
    truth = {
        "trace_id": trace.root_id,
        "failure_mode": mode,
        "culprit_span_name": culprit_name,
        "culprit_run_id": culprit_id,
        "culprit_reason": FAILURE_MODES[mode][1] if mode else None,
        "model": metadata["model"],
        "prompt_version": metadata["prompt_version"],
        "recovered_tool_error": mode is None and any(
            r["status"] == "error" for r in trace.records if r["name"] == "lookup_order"
        ),
    }
    return trace.records, truth


def generate_traces(
    traces: int,
    seed: int = 7,
    start: datetime = SAMPLE_START,
    hours: float = 3,
    rates: dict[str, float] | None = None,
) -> SampleTraces:
    """`traces` sample traces with root starts spread over `hours` from `start`, plus their ground truth."""
    rates = {**DEFAULT_RATES, **(rates or {})}
    unknown = set(rates) - set(DEFAULT_RATES)
    if unknown:
        raise ConfigError(f"unknown failure modes {sorted(unknown)}; known: {sorted(DEFAULT_RATES)}")
    if sum(rates.values()) > 1:
        raise ConfigError(f"failure rates add up to {sum(rates.values()):.2f}; they must add up to at most 1")
    rng = random.Random(seed)
    span_seconds = hours * 3600
    offsets = sorted(rng.uniform(0, span_seconds) for _ in range(traces))
    out = SampleTraces(records=[])
    for index, offset in enumerate(offsets):
        records, truth = _one_trace(rng, seed, index, start + timedelta(seconds=offset), rates)
        out.records.extend(records)
        out.truth.append(truth)
    return out


def generate_windows(
    traces_per_window: int,
    rates: Sequence[dict[str, float] | None],
    seed: int = 7,
    start: datetime = SAMPLE_START,
    window: timedelta = timedelta(hours=1),
) -> SampleTraces:
    """Consecutive windows of sample traces, window i with failure rates `rates[i]` (None: the defaults).

    History for trend tests and benchmarks: a spike is a window whose rates are higher.
    """
    out = SampleTraces(records=[])
    for i, window_rates in enumerate(rates):
        part = generate_traces(traces_per_window, seed=seed * 100_003 + i, start=start + i * window,
                               hours=window.total_seconds() / 3600, rates=window_rates)
        out.records.extend(part.records)
        out.truth.extend(part.truth)
    return out


def truth_path_for(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name.split(".")[0] + ".truth.jsonl")


def write_sample(path: str | Path, sample: SampleTraces) -> Path:
    """Write records as JSONL or Parquet (by suffix), and the ground truth beside them; returns the truth path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [
            {k: (orjson.dumps(v).decode() if isinstance(v, dict | list) else v) for k, v in r.items()}
            for r in sample.records
        ]
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        with open(tmp, "wb") as handle:
            for record in sample.records:
                handle.write(orjson.dumps(record))
                handle.write(b"\n")
    tmp.replace(path)
    truth = truth_path_for(path)
    with open(truth, "wb") as handle:
        for row in sample.truth:
            handle.write(orjson.dumps(row) + b"\n")
    return truth


def to_v2_record(record: dict[str, Any]) -> dict[str, Any]:
    """A v1 run record in the v2 wire form of `POST /v2/runs/query` (UPPERCASE enums, ancestor ids)."""
    lineage = [segment[22:] for segment in record["dotted_order"].split(".")]
    metadata = (record.get("extra") or {}).get("metadata")
    v2 = {k: v for k, v in record.items() if k not in ("parent_run_id", "session_id", "extra")}
    v2.update(
        run_type=record["run_type"].upper(),
        status=record["status"].upper(),
        parent_run_ids=lineage[:-1],
        project_id=record["session_id"],
        is_root=len(lineage) == 1,
        metadata=metadata,
    )
    return v2
