"""Evaluators run here exactly as LangSmith would run them: any signature it accepts, any result it reads.

Fixtures are sample traces from the generator. Evaluators are small functions referred to
from config by import path ('tests.test_evaluators:answer_given') or, when they close over
test state, by the 'python:<name>' ref that `register` returns.
"""

from __future__ import annotations

import asyncio
import copy
import pickle
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from langsmith.evaluation import EvaluationResult, run_evaluator
from langsmith.schemas import Run

from tasks.config import EvaluatorConfig, SpanTarget
from tasks.evaluation.evaluators import (
    BoundEvaluator,
    EvaluatorError,
    Result,
    bind_evaluator,
    evaluate_items,
    normalise_result,
    register,
)
from tasks.evaluation.scoring import RunRows, batch_scores, target_mask
from tasks.sources.records import spans_from_records
from tasks.sources.sample import DEFAULT_RATES, SAMPLE_START, SampleTraces, generate_traces

TINY = 0.05  # seconds: the timeout of evaluators that are meant to time out


def spans_of(sample: SampleTraces) -> pa.Table:
    return spans_from_records(sample.records)[0]


def traces_failing_by(mode: str | None, traces: int = 3) -> pa.Table:
    """Spans of sample traces that all carry the planted failure `mode` (None: all healthy)."""
    return spans_of(generate_traces(traces, seed=5, rates={m: float(m == mode) for m in DEFAULT_RATES}))


@pytest.fixture(scope="module")
def healthy() -> pa.Table:
    return traces_failing_by(None)


@pytest.fixture(scope="module")
def mixed() -> pa.Table:
    """Twelve traces with the default mix of failure modes, tool spans on some."""
    return spans_of(generate_traces(12, seed=11))


def evaluator(fn_or_ref: Callable[..., Any] | str, key: str = "quality", **settings: Any) -> BoundEvaluator:
    ref = fn_or_ref if isinstance(fn_or_ref, str) else register(fn_or_ref)
    return bind_evaluator(EvaluatorConfig(key=key, ref=ref, **settings))


def scores(spans: pa.Table, *evaluators: BoundEvaluator) -> pd.DataFrame:
    return batch_scores(spans, list(evaluators), SAMPLE_START)[0].to_pandas()


def root_results(spans: pa.Table, bound: BoundEvaluator) -> list[list[Result]]:
    rows = RunRows(spans)
    roots = [i for i, is_root in enumerate(spans.column("is_root").to_pylist()) if is_root]
    return evaluate_items(bound, [(rows.fields(i), rows.run(i) if bound.needs_run else None) for i in roots])


def root_inputs(spans: pa.Table) -> list[dict[str, Any]]:
    rows = RunRows(spans)
    return [rows.fields(i)["inputs"] for i, is_root in enumerate(spans.column("is_root").to_pylist()) if is_root]


def root_column(spans: pa.Table, name: str) -> list[Any]:
    return [v for v, is_root in zip(spans.column(name).to_pylist(), spans.column("is_root").to_pylist(),
                                    strict=True) if is_root]


# --- signatures LangSmith accepts -----------------------------------------------------------------

def answer_given(*, outputs):
    return bool(outputs["answer"])


def answer_is_not_the_question(*, inputs, outputs):
    return inputs["question"] != outputs["answer"]


def run_is_the_root(*, run):
    return run.name == "rag_agent" and run.parent_run_id is None


def no_reference_outputs(*, outputs, reference_outputs):
    return reference_outputs == {}


def no_example(*, example):
    return example is None


def legacy(run, example):
    return run.outputs["answer"] != "" and example is None


def legacy_with_own_names(root_run, dataset_example):
    return root_run.run_type == "chain" and dataset_example is None


@run_evaluator
def made_with_run_evaluator(run, example):
    return {"score": run.outputs is not None}


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("answer_given", "keywords"),
        ("answer_is_not_the_question", "keywords"),
        ("run_is_the_root", "keywords"),
        ("no_reference_outputs", "keywords"),
        ("no_example", "keywords"),
        ("legacy", "legacy"),
        ("legacy_with_own_names", "legacy"),
        ("made_with_run_evaluator", "run_evaluator"),
    ],
)
def test_each_langsmith_evaluator_signature_is_called_with_what_it_asks_for(healthy, name, mode):
    bound = evaluator(f"{__name__}:{name}")
    assert bound.mode == mode
    judged = scores(healthy, bound)
    assert len(judged) == 3
    assert judged["error"].isna().all()
    assert (judged["score"] == 1.0).all()


def test_on_production_runs_inputs_are_the_runs_own_inputs(healthy):
    def question_echo(*, inputs, outputs):
        return {"score": 1, "comment": inputs["question"]}

    judged = scores(healthy, evaluator(question_echo))
    questions = [inputs["question"] for inputs in root_inputs(healthy)]
    assert judged["comment"].tolist() == questions


def test_an_openevals_evaluator_works_unchanged(healthy):
    judged = scores(healthy, evaluator("openevals.exact:exact_match", key="exact"))
    assert judged["feedback_key"].unique().tolist() == ["exact_match"]
    assert judged["error"].isna().all()
    assert judged["score"].notna().all()


def test_a_run_object_carries_the_span_as_langsmith_would(healthy):
    rows = RunRows(healthy)
    root_fields = rows.fields(0)
    root, child = rows.run(0), rows.run(1)
    assert root.id == uuid.UUID(healthy.column("id")[0].as_py())
    assert (root.name, root.run_type, root.parent_run_id) == ("rag_agent", "chain", None)
    assert child.parent_run_id == root.id == child.trace_id
    assert root.start_time < root.end_time
    assert root.start_time.tzinfo is not None
    assert root.inputs == root_fields["inputs"] and root.outputs == root_fields["outputs"]
    assert root.metadata == root_fields["metadata"] and "model" in root.metadata
    assert root.error is None and root.status == "success"
    assert root.model_dump()["dotted_order"] == healthy.column("dotted_order")[0].as_py()


def test_a_child_run_is_parsed_when_first_read_even_after_its_batch_is_closed(healthy):
    """The children in `run.child_runs` are read when first used, field by field (an attribute) or whole (a dump,
    a pickle, a copy): each is then the same `Run` as one built from its parsed record."""
    rows = RunRows(healthy)
    children = list(rows.run(0).child_runs)
    rows.records.close()  # as after a batch, or in dispatch once the roots are built
    fresh, row_of = RunRows(healthy), {run_id: i for i, run_id in enumerate(healthy.column("id").to_pylist())}
    first, second, *rest = children
    i = row_of[str(first.id)]
    assert first.outputs == fresh.fields(i)["outputs"] and isinstance(first.inputs, dict)
    assert (first.start_time, first.parent_run_id, first.metadata) == (
        fresh.run(i).start_time, fresh.run(i).parent_run_id, fresh.run(i).metadata)
    assert type(first) is not Run and isinstance(first, Run)  # looked at, not yet read whole
    assert copy.deepcopy(second).inputs == fresh.fields(row_of[str(second.id)])["inputs"]
    assert all(type(pickle.loads(pickle.dumps(child))) is Run for child in rest)
    for child in children:
        i = row_of[str(child.id)]
        fresh.fields(i)  # parsed first: `fresh.run(i)` is built whole
        assert child.model_dump(exclude={"child_runs"}) == fresh.run(i).model_dump(exclude={"child_runs"})
        assert type(child) is Run



def test_a_trace_whose_root_id_is_not_its_trace_id_still_gets_its_whole_tree():
    """Trees are found by trace id, not by assuming a root's id is its trace's: an export whose root carries
    another id still hands the evaluator every span of the trace."""
    records = generate_traces(2, seed=5).records
    root = next(r for r in records if r["parent_run_id"] is None)
    old_id, new_id = root["id"], str(uuid.uuid4())
    records = [{**r, "id": new_id, "dotted_order": r["dotted_order"].replace(old_id, new_id)} if r is root else r
               for r in records]
    spans = spans_from_records(records)[0]
    rows = RunRows(spans)
    i = spans.column("id").to_pylist().index(new_id)

    def spans_below(run) -> list[str]:
        return [str(c.id) for c in run.child_runs] + [s for c in run.child_runs for s in spans_below(c)]

    members = {r["id"] for r in records if r["trace_id"] == old_id and r["id"] != new_id}
    assert str(rows.run(i).trace_id) == old_id
    assert members and sorted(spans_below(rows.run(i))) == sorted(members)


def test_a_root_run_dumps_its_children_whole_as_plain_runs_would(healthy):
    """A parent's dump reads each child's fields itself (not through the child's `model_dump`): an unread child
    in it is read first, so the dump holds the same child as one built from its parsed record."""
    rows = RunRows(healthy)
    root = rows.run(0)
    assert len(root.child_runs) > 0  # grown, the children still unread
    fresh, row_of = RunRows(healthy), {run_id: i for i, run_id in enumerate(healthy.column("id").to_pylist())}
    for child in root.child_runs:
        fresh.fields(row_of[str(child.id)])
    expected = [fresh.run(row_of[str(child.id)]).model_dump(exclude={"child_runs"}) for child in root.child_runs]
    dumped = root.model_dump()["child_runs"]
    assert [{k: v for k, v in child.items() if k != "child_runs"} for child in dumped] == expected

# --- concurrency ---------------------------------------------------------------------------------

class InFlight:
    """Counts evaluations running at once."""

    def __init__(self) -> None:
        self.now = self.most = 0
        self.lock = threading.Lock()

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


def test_an_async_evaluator_is_awaited(healthy):
    async def answer_given_async(*, outputs):
        await asyncio.sleep(0)
        return bool(outputs["answer"])

    bound = evaluator(answer_given_async)
    assert bound.is_async
    assert scores(healthy, bound)["score"].tolist() == [1.0, 1.0, 1.0]


def test_an_async_evaluator_runs_up_to_max_concurrency_at_once_and_keeps_row_order(mixed):
    flight = InFlight()

    async def question_length(*, inputs):
        flight.enter()
        await asyncio.sleep(0.01 * (len(inputs["question"]) % 3))
        flight.leave()
        return len(inputs["question"])

    judged = scores(mixed, evaluator(question_length, max_concurrency=4, score_range=(0, 1000)))
    assert judged["score"].tolist() == [len(i["question"]) for i in root_inputs(mixed)]
    assert 1 < flight.most <= 4


def test_a_sync_evaluator_with_max_concurrency_runs_in_threads_and_keeps_row_order(mixed):
    flight = InFlight()

    def question_length(*, inputs):
        flight.enter()
        time.sleep(0.02)
        flight.leave()
        return len(inputs["question"])

    judged = scores(mixed, evaluator(question_length, max_concurrency=3, score_range=(0, 1000)))
    assert judged["score"].tolist() == [len(i["question"]) for i in root_inputs(mixed)]
    assert 1 < flight.most <= 3


# --- what evaluators return ----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("returned", "rows"),
    [
        (True, [("quality", 1.0, None, None)]),
        (False, [("quality", 0.0, None, None)]),
        (3, [("quality", 3.0, None, None)]),
        (0.25, [("quality", 0.25, None, None)]),
        ("relevant", [("quality", None, "relevant", None)]),
        ({"key": "grounded", "score": 0.5, "comment": "half the words"}, [("grounded", 0.5, None, "half the words")]),
        ({"score": True}, [("quality", 1.0, None, None)]),
        (
            [{"key": "grounded", "score": 1}, {"key": "tone", "value": "polite", "comment": "says please"}],
            [("grounded", 1.0, None, None), ("tone", None, "polite", "says please")],
        ),
        (EvaluationResult(key="grounded", score=0.75, comment="most words"), [("grounded", 0.75, None, "most words")]),
        (
            {"results": [EvaluationResult(key="grounded", score=0.0), {"key": "tone", "value": "curt"}]},
            [("grounded", 0.0, None, None), ("tone", None, "curt", None)],
        ),
    ],
    ids=["bool-true", "bool-false", "int", "float", "str", "dict", "dict-bool-score", "list-of-dicts",
         "EvaluationResult", "EvaluationResults"],
)
def test_each_kind_of_result_is_read_as_langsmith_reads_it(healthy, returned, rows):
    def returns_it(*, outputs):
        return returned

    [first, *_] = root_results(healthy, evaluator(returns_it))
    assert [(r.feedback_key, r.score, r.value, r.comment) for r in first] == rows
    assert all(r.error is None for r in first)
    assert normalise_result(returned, "quality") == first


@pytest.mark.parametrize("returned", [None, [], {}, {"key": "only_a_key"}, {"score": "high"}, object()])
def test_a_result_langsmith_could_not_read_is_an_error_row(healthy, returned):
    def returns_it(*, outputs):
        return returned

    judged = scores(healthy, evaluator(returns_it))
    assert judged["score"].isna().all()
    assert judged["error"].str.startswith("ValueError: ").all()


# --- errors and timeouts -------------------------------------------------------------------------

def test_an_evaluator_that_raises_gives_an_error_row_with_its_message(healthy):
    def quota_exhausted(*, outputs):
        raise RuntimeError("judge model quota exhausted")

    judged = scores(healthy, evaluator(quota_exhausted))
    assert judged["error"].tolist() == ["RuntimeError: judge model quota exhausted"] * 3
    assert judged["score"].isna().all()


@pytest.mark.parametrize("max_concurrency", [1, 2])
def test_an_async_evaluator_that_raises_gives_an_error_row_with_its_message(healthy, max_concurrency):
    async def quota_exhausted(*, outputs):
        raise RuntimeError("judge model quota exhausted")

    judged = scores(healthy, evaluator(quota_exhausted, max_concurrency=max_concurrency))
    assert judged["error"].tolist() == ["RuntimeError: judge model quota exhausted"] * 3


def test_a_sync_evaluator_that_raises_in_a_thread_gives_an_error_row_with_its_message(healthy):
    def quota_exhausted(*, outputs):
        raise RuntimeError("judge model quota exhausted")

    judged = scores(healthy, evaluator(quota_exhausted, max_concurrency=2))
    assert judged["error"].tolist() == ["RuntimeError: judge model quota exhausted"] * 3


def test_a_serial_sync_evaluator_over_its_timeout_is_given_up_on_at_the_timeout(healthy):
    released = threading.Event()

    def stuck(*, outputs):
        released.wait(5)
        return 1.0

    [result] = root_results(healthy.slice(0, 1), evaluator(stuck, timeout=TINY, max_concurrency=1))[0]
    released.set()
    assert (result.score, result.error) == (None, f"timed out after {TINY}s")


def test_a_sync_evaluator_in_threads_is_abandoned_at_its_timeout(healthy):
    def stuck(*, outputs):
        time.sleep(0.5)
        return 1.0

    began = time.perf_counter()
    [results] = root_results(healthy.slice(0, 1), evaluator(stuck, timeout=TINY, max_concurrency=2))
    assert time.perf_counter() - began < 0.4
    assert [(r.score, r.error) for r in results] == [(None, f"timed out after {TINY}s")]


def test_the_call_counters_show_calls_in_flight_while_they_run_and_every_call_done_at_the_end():
    from tasks.evaluation.calls import CallCounters

    release, seen = threading.Event(), []
    counters = CallCounters()

    def slow_first(*, outputs):
        if outputs["n"] == 0:
            release.wait(5)
        return 1.0

    def publish():
        seen.append((counters.done, counters.in_flight))
        if counters.done == 3:  # the other lane has done the three quick calls: let the first one finish
            release.set()

    items = [({"inputs": {}, "outputs": {"n": n}}, None) for n in range(4)]
    bound = evaluator(slow_first, max_concurrency=2)
    results = evaluate_items(bound, items, counters=counters, publish=publish)
    assert [r[0].score for r in results] == [1.0] * 4
    assert (3, 1) in seen  # reported while the first call still ran
    assert (counters.total, counters.done, counters.in_flight) == (4, 4, 0)
    assert seen[-1] == (4, 0)

    stuck = evaluator(lambda *, outputs: time.sleep(0.5), timeout=TINY, max_concurrency=1)
    given_up = CallCounters()
    [[result]] = evaluate_items(stuck, items[:1], counters=given_up)
    assert (result.error, given_up.done, given_up.in_flight) == (f"timed out after {TINY}s", 1, 0)


def test_an_async_evaluator_is_cancelled_at_its_timeout(healthy):
    finished = []

    async def stuck(*, outputs):
        await asyncio.sleep(1)
        finished.append(True)
        return 1.0

    began = time.perf_counter()
    judged = scores(healthy, evaluator(stuck, timeout=TINY, max_concurrency=3))
    assert time.perf_counter() - began < 0.5
    assert judged["error"].tolist() == [f"timed out after {TINY}s"] * 3
    assert finished == []


def test_a_sync_evaluator_in_threads_that_outlasts_its_timeout_is_an_error_row_whatever_its_row(healthy):
    def seconds_asked(*, outputs):
        time.sleep(outputs["seconds"])
        return 1.0

    timeout = 0.2
    fields = RunRows(healthy).fields(0)
    items = [({**fields, "outputs": {"seconds": 0.6}}, None), ({**fields, "outputs": {"seconds": 0.3}}, None)]
    first, second = evaluate_items(evaluator(seconds_asked, timeout=timeout, max_concurrency=2), items)
    assert first[0].error == f"timed out after {timeout}s"
    assert second[0].error == f"timed out after {timeout}s"  # took 0.3 s, over the 0.2 s timeout


# --- errors before anything runs -----------------------------------------------------------------

def test_an_unknown_builtin_suggests_the_nearest_one():
    with pytest.raises(EvaluatorError, match=r"no built-in evaluator 'groundednes'; "
                                             r"did you mean 'builtin:groundedness'\?"):
        evaluator("builtin:groundednes")


def test_a_module_that_cannot_be_imported_is_named():
    with pytest.raises(EvaluatorError, match=r"module 'tracetriage_evals' cannot be imported"):
        evaluator("tracetriage_evals:faithfulness")


def test_a_missing_function_suggests_the_nearest_name_in_its_module():
    with pytest.raises(EvaluatorError, match=r"'groundednes' not found in module 'tasks.evaluation.builtins'; "
                                             r"did you mean 'groundedness'\?"):
        evaluator("tasks.evaluation.builtins:groundednes")


def test_a_ref_to_something_not_callable_is_refused():
    with pytest.raises(EvaluatorError, match=r"is a dict, not a function or RunEvaluator"):
        evaluator("tasks.evaluation.builtins:BUILTINS")


@pytest.mark.parametrize(
    "fn",
    [lambda *, answer: 1.0, lambda answer, question, context: 1.0, lambda **kwargs: 1.0],
    ids=["one-unknown-keyword", "three-positional", "only-kwargs"],
)
def test_a_function_with_parameters_langsmith_does_not_pass_is_refused_with_the_names_it_could_take(fn):
    with pytest.raises(EvaluatorError, match=r"takes parameters \(.*\); LangSmith evaluators take parameters named "
                                             r"from run, example, inputs, outputs, reference_outputs, attachments"):
        evaluator(fn)


@pytest.mark.parametrize(
    ("ref", "params", "complaint"),
    [
        ("builtin:latency_slo", {"max_second": 2}, "unexpected keyword argument 'max_second'"),
        ("builtin:latency_slo", None, "missing 1 required positional argument: 'max_seconds'"),
        ("builtin:contains", {"txt": "refund"}, "unexpected keyword argument 'txt'"),
    ],
)
def test_a_builtin_factory_with_bad_params_is_refused_naming_the_evaluator_and_params(ref, params, complaint):
    with pytest.raises(EvaluatorError, match=rf"evaluator 'slo' \(ref '{ref}'\): bad params .*{re.escape(complaint)}"):
        evaluator(ref, key="slo", params=params)


def test_a_builtin_regex_with_an_invalid_pattern_is_refused_naming_the_evaluator():
    with pytest.raises(EvaluatorError, match=r"evaluator 'order_number' \(ref 'builtin:regex'\)"):
        evaluator("builtin:regex", key="order_number", params={"pattern": r"order (\d+"})


def test_an_evaluator_factory_by_import_path_is_called_with_its_params(healthy):
    bound = evaluator("tasks.evaluation.builtins:contains", key="mentions", params={"text": "zzz-not-there"})
    assert scores(healthy, bound)["score"].tolist() == [0.0, 0.0, 0.0]


# --- built-in evaluators -------------------------------------------------------------------------

def builtin_scores(spans: pa.Table, name: str, target: Any = "root", **params: Any) -> list[float]:
    bound = evaluator(f"builtin:{name}", key=name, target=target, params=params or None)
    return scores(spans, bound)["score"].tolist()


def test_retrieval_relevance_scores_on_topic_documents_high_and_off_topic_ones_zero():
    retriever = SpanTarget(run_type="retriever")
    assert builtin_scores(traces_failing_by(None), "retrieval_relevance", retriever) == [1.0, 1.0, 1.0]
    assert builtin_scores(traces_failing_by("irrelevant_retrieval"), "retrieval_relevance", retriever) == [0.0] * 3


def test_groundedness_scores_answers_from_the_documents_high_and_hallucinations_zero():
    assert builtin_scores(traces_failing_by(None), "groundedness") == [1.0, 1.0, 1.0]
    assert builtin_scores(traces_failing_by("hallucinated_answer"), "groundedness") == [0.0, 0.0, 0.0]


def test_non_empty_answer_fails_a_trace_that_gave_no_answer():
    assert builtin_scores(traces_failing_by(None), "non_empty_answer") == [1.0, 1.0, 1.0]
    assert builtin_scores(traces_failing_by("tool_error"), "non_empty_answer") == [0.0, 0.0, 0.0]


def test_error_free_fails_a_trace_whose_tool_raised():
    assert builtin_scores(traces_failing_by(None), "error_free") == [1.0, 1.0, 1.0]
    assert builtin_scores(traces_failing_by("tool_error"), "error_free") == [0.0, 0.0, 0.0]


def test_latency_slo_fails_a_reranker_slower_than_its_slo():
    rerank = SpanTarget(name="rerank")
    assert builtin_scores(traces_failing_by(None), "latency_slo", rerank, max_seconds=2.0) == [1.0, 1.0, 1.0]
    assert builtin_scores(traces_failing_by("slow_reranker"), "latency_slo", rerank, max_seconds=2.0) == [0.0] * 3


def output_scores(name: str, outputs: list[dict[str, Any]], **params: Any) -> list[float | None]:
    bound = evaluator(f"builtin:{name}", key=name, params=params or None)
    results = evaluate_items(bound, [({"inputs": {}, "outputs": o}, None) for o in outputs])
    return [r.score for [r] in results]


def test_valid_json_passes_parseable_output_and_fails_broken_output():
    assert output_scores("valid_json", [{"answer": '{"order": 42}'}, {"answer": '{"order": 42'}]) == [1.0, 0.0]


def test_regex_passes_a_match_and_fails_its_absence_or_the_reverse_with_must_match_false():
    answers = [{"answer": "Your order 4417 has shipped."}, {"answer": "Your order has shipped."}]
    assert output_scores("regex", answers, pattern=r"order \d+") == [1.0, 0.0]
    assert output_scores("regex", answers, pattern=r"order \d+", must_match=False) == [0.0, 1.0]


def test_contains_passes_text_that_mentions_it_in_any_case_and_fails_text_that_does_not():
    answers = [{"answer": "A Refund is on its way."}, {"answer": "We cannot help with that."}]
    assert output_scores("contains", answers, text="refund") == [1.0, 0.0]
    assert output_scores("contains", answers, text="refund", case_sensitive=True) == [0.0, 0.0]


# --- which spans an evaluator scores -------------------------------------------------------------

def answer_given_or_none(*, outputs):
    return bool(outputs and outputs.get("answer"))


def test_a_root_evaluator_scores_only_the_root_of_each_trace(mixed):
    judged = scores(mixed, evaluator(answer_given_or_none))
    assert judged["is_root"].all()
    assert judged["run_id"].tolist() == root_column(mixed, "id")
    assert judged["span_name"].unique().tolist() == ["rag_agent"]


def test_a_run_type_target_scores_only_spans_of_that_run_type(mixed):
    judged = scores(mixed, evaluator("builtin:retrieval_relevance", target=SpanTarget(run_type="retriever")))
    assert len(judged) == 12
    assert not judged["is_root"].any()
    assert judged["run_type"].unique().tolist() == ["retriever"]
    assert judged["span_name"].unique().tolist() == ["search_docs"]


def test_a_name_target_scores_only_spans_of_that_name(mixed):
    rerank = SpanTarget(name="rerank")
    judged = scores(mixed, evaluator("builtin:latency_slo", params={"max_seconds": 2.0}, target=rerank))
    assert len(judged) == 12
    assert judged["span_name"].unique().tolist() == ["rerank"]


def test_a_target_with_run_type_and_name_needs_both(mixed):
    plan = target_mask(mixed, EvaluatorConfig(key="plan", ref="builtin:contains", target=SpanTarget(run_type="LLM",
                                                                                                    name="plan")))
    assert set(mixed.filter(pa.array(plan)).column("name").to_pylist()) == {"plan"}
    assert plan.sum() == 12


def test_every_evaluator_scores_its_own_spans_in_one_scores_table(mixed):
    judged = scores(
        mixed,
        evaluator(answer_given_or_none, key="answered", threshold=1.0),
        evaluator("builtin:retrieval_relevance", key="relevance", threshold=0.3,
                  target=SpanTarget(run_type="retriever")),
        evaluator("builtin:error_free", key="tool_ok", target=SpanTarget(name="lookup_order")),
    )
    tools = sum(name == "lookup_order" for name in mixed.column("name").to_pylist())
    assert judged.groupby("evaluator", sort=False).size().to_dict() == {
        "answered": 12, "relevance": 12, "tool_ok": tools}
    assert judged.groupby("evaluator", sort=False)["threshold"].first().to_dict() == {
        "answered": 1.0, "relevance": 0.3, "tool_ok": 0.5}
    assert judged["status"].isna().all()
    assert (judged["window_start"] == SAMPLE_START).all()
