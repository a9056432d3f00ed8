"""`feedback_loop` as langsmith-sdk #2907 asks for it, against a LangSmith project, through the real SDK over HTTP.

The request's own example runs as written (only the import and the span name differ):
runs come from a LangSmith project, `run.child_runs` is the trace's tree, and what
`on_failure` returns is carried out exactly once.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import langsmith
import pytest

from flows.loop import FeedbackLoopError, feedback_loop, loop_config, loop_deployment, served_flow
from tasks.sources.langsmith import window_range
from tasks.sources.sample import SAMPLE_START, generate_traces
from tests.langsmith_server import LangSmithTestServer

KEY = "ls-loop-key-canary-91c4"
START, END = SAMPLE_START, SAMPLE_START + timedelta(hours=1)
FAILS = {"hallucinated_answer", "tool_error"}  # the sample's failure modes a faithfulness check catches


def my_faithfulness_evaluator(run) -> float:
    """LangSmith's documented pattern for an intermediate step: find the retriever among `run.child_runs`."""
    retrieval = next(r for r in run.child_runs if r.name == "search_docs")
    context = " ".join(d["page_content"] for d in retrieval.outputs["documents"]).lower()
    words = ((run.outputs or {}).get("answer") or "").lower().rstrip(".").split()
    return sum(w in context for w in words) / len(words) if words else 0.0


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch):
    with LangSmithTestServer(api_key=KEY) as running:
        monkeypatch.setenv("LANGSMITH_ENDPOINT", running.url)
        monkeypatch.setenv("LANGSMITH_API_KEY", KEY)
        monkeypatch.setenv("LANGSMITH_TRACING", "false")
        yield running


@pytest.fixture(scope="module")
def sample():
    return generate_traces(80, seed=41, start=START, hours=1)


def client(server: LangSmithTestServer) -> langsmith.Client:
    return langsmith.Client(api_url=server.url, api_key=KEY, auto_batch_tracing=False)


def test_the_2907_example_as_written_queues_exactly_the_failing_runs_once_each_with_their_context(
        server, sample, tmp_path):
    server.add_project("my-rag-pipeline", sample.records)
    failing = {t["trace_id"] for t in sample.truth if t["failure_mode"] in FAILS}
    retriever_ids = {r["trace_id"]: r["id"] for r in sample.records if r["name"] == "search_docs"}

    def example() -> dict:
        return feedback_loop(
            project_name="my-rag-pipeline",
            evaluator=my_faithfulness_evaluator,
            threshold=0.7,  # flag runs scoring below this
            on_failure=lambda run, score: {
                "action": "add_to_annotation_queue",
                "queue_name": "low-faithfulness-review",
                "metadata": {
                    "failure_score": score,
                    "trace_id": run.id,
                    "span_ids": [s.id for s in run.child_runs if s.name == "search_docs"]
                }
            },
            start=START, end=END, out=str(tmp_path),
        )

    (window,) = example()["windows"]
    assert window["failing_traces"] == len(failing) > 0
    (queue,) = [q for q in server.queues.values() if q["name"] == "low-faithfulness-review"]
    assert set(server.queue_runs[queue["id"]]) == failing
    assert sorted(run for _, run in server.queue_adds) == sorted(failing)  # once each
    context = {f["run_id"]: f for f in server.feedback if f["key"] == "tracetriage.context"}
    assert set(context) == failing
    for run_id, feedback in context.items():
        metadata = feedback["extra"]["metadata"]
        assert metadata["span_ids"] == [retriever_ids[run_id]] and metadata["trace_id"] == run_id
        assert metadata["failure_score"] == pytest.approx(feedback["score"], abs=1e-4) and feedback["score"] < 0.7
        assert feedback["comment"].startswith(f"my_faithfulness_evaluator {feedback['score']:.2f} < 0.7")
    before = (dict(server.queue_runs), len(server.queue_adds), len(server.feedback))
    again = example()["windows"][0]["actions"]
    assert (dict(server.queue_runs), len(server.queue_adds), len(server.feedback)) == before
    assert again["sent"] == 0 and again["failed"] == 0
    assert server.violations == []


def nested(records: list[dict]) -> list[dict]:
    """The sample traces three levels deep: rerank under search_docs, search_docs under plan."""
    out = [dict(r) for r in records]
    by_trace: dict[str, dict[str, dict]] = {}
    for r in out:
        by_trace.setdefault(r["trace_id"], {})[r["name"]] = r
    for spans in by_trace.values():
        for child, parent in (("search_docs", "plan"), ("rerank", "search_docs")):
            if child in spans and parent in spans:
                spans[child]["parent_run_id"] = spans[parent]["id"]
                spans[child]["dotted_order"] = spans[parent]["dotted_order"] + "." + \
                    spans[child]["dotted_order"].split(".")[-1]
    return out


def tree_of(records: list[dict], parent: str) -> list[tuple[str, list]]:
    children = sorted((r for r in records if r.get("parent_run_id") == parent), key=lambda r: r["dotted_order"])
    return [(r["id"], tree_of(records, r["id"])) for r in children]


def test_child_runs_are_the_traces_tree_three_levels_deep_in_dotted_order(server, sample, tmp_path):
    records = nested(sample.records)
    server.add_project("deep", records)
    seen: dict[str, Any] = {}

    def shape(run) -> list[tuple[str, list]]:
        return [(str(c.id), shape(c)) for c in run.child_runs]

    def retrieval_relevance(run) -> float:
        """A docs-style evaluator of an intermediate step, two levels down."""
        seen[str(run.id)] = shape(run)
        plan = next(r for r in run.child_runs if r.name == "plan")
        retrieve = next(r for r in plan.child_runs if r.name == "search_docs")
        assert isinstance(retrieve.inputs, dict) and retrieve.child_runs[0].name == "rerank"
        question = set(run.inputs["question"].lower().rstrip("?").split())
        text = " ".join(d["page_content"] for d in retrieve.outputs["documents"]).lower()
        return sum(w in text for w in question) / len(question)

    (window,) = feedback_loop(project_name="deep", evaluator=retrieval_relevance, threshold=0.3,
                              start=START, end=END, out=str(tmp_path))["windows"]
    roots = [r for r in records if r.get("parent_run_id") is None]
    assert seen == {r["id"]: tree_of(records, r["id"]) for r in roots}
    assert max(len(t[1][0][1]) for tree in seen.values() for t in tree if t[1]) >= 1  # root > plan > docs > rerank
    irrelevant = {t["trace_id"] for t in sample.truth if t["failure_mode"] == "irrelevant_retrieval"}
    assert window["failing_traces"] == len(irrelevant) > 0


@pytest.mark.parametrize("evaluator", ["inputs, outputs", "run, unread tree"])
def test_evaluators_that_do_not_read_child_runs_do_not_pay_for_them(server, sample, tmp_path, evaluator):
    """An (inputs, outputs) evaluator gets no Run at all; one taking `run` that never reads `child_runs` gets
    only the root runs (trees are grown when first read)."""
    from tasks.evaluation.run_tree import _Forest
    from tasks.evaluation.scoring import RunRows

    built: list[int] = []
    grown: list[int] = []
    original, link = RunRows.prepare_runs, _Forest._link

    def counting(self, indices):
        built.extend(indices)
        return original(self, indices)

    def linking(self):
        grown.extend(self.roots)
        return link(self)

    def outputs_only(run) -> float:
        return float(bool(run.outputs))

    server.add_project("plain", sample.records)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunRows, "prepare_runs", counting)
        patch.setattr(_Forest, "_link", linking)
        feedback_loop(project_name="plain", evaluator=outputs_only if evaluator.startswith("run") else
                      (lambda inputs, outputs: float(bool(outputs))), threshold=0.5,
                      start=START, end=END, out=str(tmp_path))
    roots = sorted(i for i, r in enumerate(sample.records) if r.get("parent_run_id") is None)
    assert len(built) == (len(roots) if evaluator.startswith("run") else 0)
    assert grown == []


def test_feedback_already_in_langsmith_is_the_score_and_a_run_without_it_is_an_error(server, sample, tmp_path):
    server.add_project("online-evals", sample.records)
    roots = sorted(r["id"] for r in sample.records if r.get("parent_run_id") is None)
    scored = {run_id: (i % 4) / 4 for i, run_id in enumerate(roots[:-5])}  # the last five have no feedback
    sdk = client(server)
    for run_id, score in scored.items():  # as an online evaluator would have written them
        sdk.create_feedback(run_id, key="correctness", score=score, feedback_source_type="model",
                            session_id=server.projects[next(iter(server.projects))].id)
    server.reset_log()
    called: list[tuple[str, float]] = []
    (window,) = feedback_loop(project_name="online-evals", evaluator="feedback:correctness", threshold=0.5,
                              on_failure=lambda run, score: called.append((str(run.id), score)),
                              start=START, end=END, out=str(tmp_path))["windows"]
    counts = window["evaluators"]["correctness"]
    assert counts["fail"] == sum(s < 0.5 for s in scored.values())
    assert counts["pass"] == sum(s >= 0.5 for s in scored.values()) and counts["error"] == 5
    assert sorted(called) == sorted((r, s) for r, s in scored.items() if s < 0.5)
    requests = server.counts()
    assert requests["runs_query_v2"] == 1 and requests["feedback_list"] == 0  # the scores came with the runs
    assert server.violations == []


def test_an_experiment_is_scored_against_its_dataset_examples(server, sample, tmp_path):
    sdk = client(server)
    dataset = sdk.create_dataset("support-answers")
    roots = [r for r in sample.records if r.get("parent_run_id") is None]
    wrong = {r["id"] for r in roots[::3]}
    examples = [{"id": str(uuid.uuid5(uuid.NAMESPACE_URL, r["id"])), "inputs": r["inputs"],
                 "outputs": {"answer": "another answer" if r["id"] in wrong else (r["outputs"] or {}).get("answer")}}
                for r in roots]
    sdk.create_examples(dataset_id=dataset.id, examples=examples)
    example_of = {r["id"]: e["id"] for r, e in zip(roots, examples, strict=True)}
    records = [{**r, "reference_example_id": example_of.get(r["id"])} for r in sample.records]
    server.add_project("support-answers-exp-1", records, reference_dataset_id=str(dataset.id))
    server.reset_log()

    def matches_reference(run, example) -> bool:
        return (run.outputs or {}).get("answer") == example.outputs["answer"]

    def exact(outputs, reference_outputs) -> bool:
        return (outputs or {}).get("answer") == reference_outputs["answer"]

    result = feedback_loop(experiment="support-answers-exp-1", out=str(tmp_path), evaluators=[
        {"evaluator": matches_reference, "threshold": 1.0}, {"evaluator": exact, "threshold": 1.0}])
    (window,) = result["windows"]  # every window the experiment's runs started in: here one
    assert window["evaluators"]["matches_reference"]["fail"] == len(wrong) == window["evaluators"]["exact"]["fail"]
    assert window["failing_traces"] == len(wrong)
    assert server.counts()["examples_list"] == 1  # one request for all 80 examples, not one per run
    assert server.violations == []


def test_on_failure_may_return_several_actions_and_each_is_done_once(server, sample, tmp_path):
    server.add_project("multi", sample.records)
    failing = {t["trace_id"] for t in sample.truth if t["failure_mode"] in FAILS}

    def on_failure(run, score):
        return [{"action": "create_feedback", "key": "needs_review", "value": "yes", "comment": "routed"},
                {"action": "add_to_dataset", "dataset_name": "unfaithful",
                 "metadata": {"seen_at": datetime(2026, 11, 2, tzinfo=UTC), "root": run,
                              "spans": run.child_runs[:1]}}]

    def run_loop() -> dict:
        return feedback_loop(project_name="multi", evaluator=my_faithfulness_evaluator, threshold=0.7,
                             on_failure=on_failure, start=START, end=END, out=str(tmp_path))["windows"][0]

    window = run_loop()
    assert window["actions"]["failed"] == 0
    review = [f for f in server.feedback if f["key"] == "needs_review"]
    assert {f["run_id"] for f in review} == failing and {f["value"] for f in review} == {"yes"}
    assert {e["source_run_id"] for e in server.examples.values()} == failing
    context = [f for f in server.feedback if f["key"] == "tracetriage.context"]
    assert {f["run_id"] for f in context} == failing
    metadata = context[0]["extra"]["metadata"]
    assert metadata["seen_at"].startswith("2026-11-02T00:00:00") and metadata["root"]["run_id"] == context[0]["run_id"]
    assert metadata["spans"][0]["name"] == "plan"
    state = (len(server.feedback), len(server.examples))
    assert run_loop()["actions"]["sent"] == 0 and (len(server.feedback), len(server.examples)) == state


def test_an_unknown_action_fails_cleanly_with_the_accepted_names(server, sample, tmp_path):
    server.add_project("typo", sample.records)
    (window,) = feedback_loop(project_name="typo", evaluator=my_faithfulness_evaluator, threshold=0.7,
                              on_failure=lambda run, score: {"action": "add_to_annotaton_queue", "queue_name": "q"},
                              start=START, end=END, out=str(tmp_path))["windows"]
    failing = window["failing_traces"]
    assert window["actions"]["sent"] == failing and window["actions"]["failed"] == failing  # calls; their actions
    (failure,) = window["actions"]["failures"].values()
    assert "unknown action 'add_to_annotaton_queue'" in failure["error"]
    assert "add_to_annotation_queue, add_to_dataset, trigger_webhook, create_feedback, slack" in failure["error"]
    assert server.queues == {}


@pytest.mark.parametrize("problem", ["missing project", "missing credentials"])
def test_a_missing_project_or_missing_credentials_is_one_line_and_writes_nothing(server, tmp_path, monkeypatch,
                                                                                  problem):
    server.add_project("exists", generate_traces(5, seed=1, start=START, hours=1).records)
    if problem == "missing credentials":
        monkeypatch.delenv("LANGSMITH_API_KEY")
    with pytest.raises(FeedbackLoopError) as error:
        feedback_loop(project_name="exists" if problem == "missing credentials" else "does-not-exist",
                      evaluator=my_faithfulness_evaluator, out=str(tmp_path / "out"))
    message = str(error.value)
    assert "\n" not in message and KEY not in message
    assert ("'does-not-exist' does not exist" in message) if problem == "missing project" else \
        ("no LangSmith API key" in message)
    assert not (tmp_path / "out").exists() and server.feedback == [] and server.queues == {}


def test_by_default_the_last_closed_window_is_read(server, tmp_path):
    start, end = window_range(None, None, timedelta(hours=1), timedelta(minutes=10))
    server.add_project("live", generate_traces(20, seed=5, start=start, hours=1).records
                       + generate_traces(10, seed=6, start=start - timedelta(hours=1), hours=1).records)
    (window,) = feedback_loop(project_name="live", evaluator=my_faithfulness_evaluator, out=str(tmp_path))["windows"]
    assert window["window_start"] == start.isoformat() and window["traces"] == 20


def test_a_served_loop_registers_a_deployment_with_its_schedule(server, sample, tmp_path):
    from prefect.client.orchestration import get_client

    config, callables = loop_config("my-rag-pipeline", evaluator=my_faithfulness_evaluator,
                                    on_failure=lambda run, score: None)
    deployment_id = loop_deployment(config, callables, "15 * * * *", out=str(tmp_path)).apply()

    async def read() -> Any:
        async with get_client() as prefect:
            return await prefect.read_deployment(deployment_id)

    deployment = asyncio.run(read())
    assert deployment.name == "my-rag-pipeline"
    assert [s.schedule.cron for s in deployment.schedules] == ["15 * * * *"]


def test_a_served_loop_carries_its_callables_into_a_fresh_process(tmp_path):
    """A served flow run is a new process: the flow takes the lambdas with it and registers them again there."""
    import cloudpickle

    from tasks.evaluation.evaluators import _REGISTRY

    config, callables = loop_config(source=str(Path(tmp_path) / "runs.jsonl"), evaluator=lambda outputs: 1.0)
    refs = [e.ref.removeprefix("python:") for e in config.evaluators]
    copy = cloudpickle.loads(cloudpickle.dumps(served_flow(config, callables, str(tmp_path / "out"))))
    for ref in refs:
        _REGISTRY.pop(ref)
    with pytest.raises(FileNotFoundError):  # the flow ran as far as the (missing) source, its evaluator known
        copy.fn()
    assert all(ref in _REGISTRY for ref in refs)


def test_a_webhook_asked_for_by_on_failure_is_signed_and_sent_once(server, sample, tmp_path, monkeypatch):
    from tests.webhook_receiver import SECRET, Receiver

    server.add_project("hooks", sample.records)
    failing = {t["trace_id"] for t in sample.truth if t["failure_mode"] in FAILS}
    monkeypatch.setenv("REVIEW_WEBHOOK_SECRET", SECRET)
    with Receiver() as receiver:
        def run_loop() -> dict:
            return feedback_loop(project_name="hooks", evaluator=my_faithfulness_evaluator, threshold=0.7,
                                 on_failure=lambda run, score: {"action": "trigger_webhook", "url": receiver.url,
                                                                "secret_env": "REVIEW_WEBHOOK_SECRET"},
                                 start=START, end=END, out=str(tmp_path))["windows"][0]

        assert run_loop()["actions"]["failed"] == 0
        assert {run["trace_id"] for r in receiver.requests for run in r["body"]["runs"]} == failing
        assert all(r["signed"] for r in receiver.requests)
        sent = len(receiver.requests)
        assert run_loop()["actions"]["sent"] == 0 and len(receiver.requests) == sent
    assert SECRET not in "".join(p.read_text(errors="ignore") for p in tmp_path.rglob("*.jsonl"))


def test_a_config_loop_acts_on_the_scores_an_experiment_left_in_langsmith_over_the_v1_api(server, sample, tmp_path):
    """Step 1 of #2907: `evaluate()` scored an experiment; the loop, from config, acts on those scores."""
    from flows.triage import triage
    from tasks.config import load_config

    roots = sorted(r["id"] for r in sample.records if r.get("parent_run_id") is None)
    server.add_project("rag-baseline-3f2c", sample.records, reference_dataset_id=str(uuid.uuid4()))
    sdk = client(server)
    session = next(p.id for p in server.projects.values() if p.name == "rag-baseline-3f2c")
    for i, run_id in enumerate(roots):
        sdk.create_feedback(run_id, key="correctness", score=float(i % 3 != 0), feedback_source_type="model",
                            session_id=session)
    config = load_config(data={
        "name": "experiment-review",
        "source": {"kind": "langsmith", "experiment": "rag-baseline-3f2c", "api": "v1"},
        "evaluators": [{"key": "correctness", "ref": "langsmith:feedback/correctness", "threshold": 0.5}],
        "actions": [{"when": {"evaluator": "correctness", "below": 0.5}, "do": "annotation_queue",
                     "queue": "regressions"}],
    })
    (window,) = triage(config=config, out=str(tmp_path))["windows"]
    wrong = {run_id for i, run_id in enumerate(roots) if i % 3 == 0}
    assert window["failing_traces"] == len(wrong)
    (queue,) = server.queues.values()
    assert set(server.queue_runs[queue["id"]]) == wrong
    assert server.counts()["feedback_list"] == 0 and server.violations == []


def test_credentials_may_come_from_a_langsmith_credentials_block(server, sample, tmp_path, monkeypatch):
    from blocks.langsmith import LangSmithCredentials

    LangSmithCredentials(api_key=KEY, api_url=server.url).save("loop-test-langsmith", overwrite=True)
    monkeypatch.delenv("LANGSMITH_API_KEY")
    monkeypatch.delenv("LANGSMITH_ENDPOINT")
    server.add_project("from-block", sample.records)
    (window,) = feedback_loop(project_name="from-block", credentials="loop-test-langsmith",
                              evaluator=my_faithfulness_evaluator, threshold=0.7,
                              on_failure=lambda run, score: {"action": "create_feedback", "key": "unfaithful",
                                                             "score": score},
                              start=START, end=END, out=str(tmp_path))["windows"]
    assert window["failing_traces"] == len([f for f in server.feedback if f["key"] == "unfaithful"]) > 0
