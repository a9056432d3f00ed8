"""The loop config: what a valid one looks like, and how each mistake is named with its fix before anything runs."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tasks.analysis.verdicts import score_statuses
from tasks.config import ConfigError, FileSource, LoopConfig, SpanTarget, load_config
from tasks.evaluation.evaluators import EvaluatorError, register
from tasks.evaluation.scoring import batch_scores, bind_all
from tasks.sinks.connections import validate
from tasks.sources.records import spans_from_records
from tasks.sources.sample import DEFAULT_RATES, SAMPLE_START, generate_traces

ISSUE_EXAMPLE = """\
source: {kind: file, path: runs.jsonl}
window: {size: 1h}
evaluators:
  - key: answer_quality
    ref: builtin:groundedness
    threshold: 0.7
    target: root
  - key: retrieval_relevance
    ref: builtin:retrieval_relevance
    threshold: 0.5
    target: {run_type: retriever}
actions:
  - when: {evaluator: answer_quality, below: 0.7}
    do: log
"""


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tracetriage.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def with_evaluators(*evaluators: dict[str, Any], **rest: Any) -> dict[str, Any]:
    return {"evaluators": list(evaluators), **rest}


GROUNDED = {"key": "answer_grounded", "ref": "builtin:groundedness"}
RELEVANT = {"key": "retrieval_relevance", "ref": "builtin:retrieval_relevance", "target": {"run_type": "retriever"}}


# --- valid configs -------------------------------------------------------------------------------

def test_the_example_config_from_the_issue_parses(tmp_path):
    (tmp_path / "runs.jsonl").touch()
    config = load_config(config_file(tmp_path, ISSUE_EXAMPLE))
    assert config.source == FileSource(path=str((tmp_path / "runs.jsonl").resolve()))  # next to the config
    assert config.window.size_delta == timedelta(hours=1)
    quality, relevance = config.evaluators
    assert (quality.key, quality.ref, quality.threshold, quality.is_root) == (
        "answer_quality", "builtin:groundedness", 0.7, True)
    assert (relevance.key, relevance.threshold, relevance.target) == (
        "retrieval_relevance", 0.5, SpanTarget(run_type="retriever"))
    [action] = config.actions
    assert (action.when.evaluator, action.when.below, action.do) == ("answer_quality", 0.7, "log")
    assert validate(config) is config


def test_an_empty_file_or_no_data_gives_the_default_loop(tmp_path):
    assert load_config(config_file(tmp_path, "")) == load_config(data={}) == load_config() == LoopConfig()


def test_durations_are_read_in_seconds_minutes_hours_and_days():
    config = load_config(data={"window": {"size": "15m", "lag": "90s"}})
    assert (config.window.size_delta, config.window.lag_delta) == (timedelta(minutes=15), timedelta(seconds=90))
    assert load_config(data={"window": {"size": "1d"}}).window.size_delta == timedelta(days=1)


# --- each mistake, named with its fix ------------------------------------------------------------

@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"windw": {"size": "1h"}}, "windw: unknown field; did you mean 'window'?"),
        (with_evaluators({**GROUNDED, "treshold": 0.4}),
         "evaluators.0.treshold: unknown field; did you mean 'threshold'?"),
        ({"source": {"kind": "file", "pth": "runs.jsonl"}}, "source.pth: unknown field; did you mean 'path'?"),
        ({"window": {"size": "1 hour"}},
         "window.size: duration '1 hour' is not understood; write it like '30s', '15m', '1h' or '1d'"),
        ({"window": {"lag": "10 min"}}, "window.lag: duration '10 min' is not understood"),
        (with_evaluators({**GROUNDED, "threshold": 7}),
         "evaluators.0: threshold 7.0 of evaluator 'answer_grounded' is outside its score_range [0.0, 1.0]; "
         "lower the threshold or set score_range"),
        (with_evaluators({**GROUNDED, "threshold": -1, "score_range": [0, 10]}),
         "threshold -1.0 of evaluator 'answer_grounded' is outside its score_range [0.0, 10.0]"),
        (with_evaluators({**GROUNDED, "ref": "groundedness"}),
         "evaluators.0.ref: evaluator ref 'groundedness' must be 'package.module:function' or 'builtin:<name>'"),
        (with_evaluators(GROUNDED, {**RELEVANT, "key": "answer_grounded"}),
         "evaluator keys must be unique; ['answer_grounded'] appear more than once"),
        (with_evaluators(RELEVANT),
         "at least one evaluator needs `target: root`: root evaluators decide pass/fail"),
        (with_evaluators(GROUNDED, actions=[{"when": {"evaluator": "answer_grouned", "below": 0.5}, "do": "log"}]),
         "actions[0].when.evaluator 'answer_grouned' is not an evaluator key; did you mean 'answer_grounded'?"),
        (with_evaluators(GROUNDED, actions=[{"when": {"failing": True}, "do": "call"}]),
         "actions.0: `do: call` needs `ref: package.module:function`"),
        (with_evaluators(GROUNDED, {**RELEVANT, "target": {}}),
         "evaluators.1.target: a span target needs run_type or name, e.g. {run_type: retriever}"),
        ({"source": {"kind": "file"}}, "source.path: Field required"),
        (with_evaluators(GROUNDED, actions=[{"when": {"spike": True, "failing": True}, "do": "log"}]),
         "`when: {spike: ...}` is about the window; it takes no failing"),
        (with_evaluators(GROUNDED, actions=[{"when": {"pattern": {"share_above": 0.3}}, "do": "feedback"}]),
         "`do: feedback` acts on runs; `when: {pattern: ...}` is about a window"),
        (with_evaluators(GROUNDED, actions=[{"when": {"spike": True}, "do": "slack", "cooldown": "0s"}]),
         "cooldown '0s' must be longer than zero"),
        (with_evaluators(GROUNDED, actions=[{"when": {"spike": True}, "do": "slack", "credentials": "bot"}]),
         "`do: slack` with `credentials:` (a bot token) needs `channel: '#name'`"),
        (with_evaluators(GROUNDED, actions=[{"when": {"span": "search_docs", "failing": True}, "do": "log"}]),
         "`when: {span: search_docs}` compares a span evaluator's score: add `evaluator:`"),
        (with_evaluators(GROUNDED, actions=[{"when": {"failing": True}, "do": "log", "sample": 1.5}]),
         "actions.0.sample: Input should be less than or equal to 1"),
        (with_evaluators(GROUNDED, actions=[{"when": {"failing": True}, "do": "slak"}]),
         "actions.0.do: Input should be 'log', 'call', 'feedback', 'annotation_queue', 'dataset', 'webhook', "
         "'slack' or 'prefect_event'"),
    ],
    ids=["unknown-top-level-field", "unknown-evaluator-field", "unknown-source-field", "malformed-window-size",
         "malformed-window-lag", "threshold-above-range", "threshold-below-custom-range", "ref-without-colon",
         "duplicate-keys", "no-root-evaluator", "action-evaluator-not-a-key", "call-without-ref",
         "empty-span-target", "file-source-without-path", "spike-with-trace-condition", "run-action-on-a-pattern",
         "zero-cooldown", "bot-token-without-channel", "span-without-evaluator", "sample-above-one",
         "unknown-do"],
)
def test_each_config_mistake_is_named_with_its_field_and_fix(data, message):
    with pytest.raises(ConfigError) as raised:
        load_config(data=data)
    assert message in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_a_mistake_in_a_file_names_the_file_and_the_field(tmp_path):
    path = config_file(tmp_path, """\
        evaluators:
          - key: answer_grounded
            ref: builtin:groundedness
            treshold: 0.4
    """)
    with pytest.raises(ConfigError, match=rf"invalid config in {path}:\n  evaluators.0.treshold: unknown field; "
                                          r"did you mean 'threshold'\?"):
        load_config(path)


def test_every_mistake_in_a_config_is_listed_at_once():
    with pytest.raises(ConfigError) as raised:
        load_config(data={"windw": {}, "batch_sise": 10})
    assert str(raised.value).splitlines()[1:] == [
        "  windw: unknown field; did you mean 'window'?",
        "  batch_sise: unknown field; did you mean 'batch_size'?",
    ]


def test_invalid_yaml_is_refused_naming_the_file(tmp_path):
    path = config_file(tmp_path, "evaluators: [{key: answer_grounded, ref: builtin:groundedness\n")
    with pytest.raises(ConfigError, match=rf"config file {path} is not valid YAML"):
        load_config(path)


def test_a_missing_file_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=rf"config file {tmp_path / 'nope.yaml'} does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("text", "kind"), [("- answer_grounded\n", "list"), ("just words\n", "str")])
def test_yaml_that_is_not_a_mapping_is_refused(tmp_path, text, kind):
    path = config_file(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"{path} must be a YAML mapping, got {kind}"):
        load_config(path)


def test_data_that_is_not_a_mapping_is_refused():
    with pytest.raises(ConfigError, match="config must be a YAML mapping, got list"):
        load_config(data=[GROUNDED])


def test_a_zero_length_window_is_refused():
    with pytest.raises(ConfigError, match="window.size"):
        load_config(data={"window": {"size": "0s"}})


def test_a_misspelt_root_target_says_root_is_the_fix():
    with pytest.raises(ConfigError, match="'root'"):
        load_config(data=with_evaluators({**GROUNDED, "target": "roots"}))


# --- pass and fail -------------------------------------------------------------------------------

def rerank_seconds(*, run):
    return (run.end_time - run.start_time).total_seconds()


def rerank_statuses(higher_is_better: bool) -> list[str]:
    """Statuses of a seconds-taken score on the rerank spans of one fast and one slow trace, threshold 2 s."""
    fast = generate_traces(1, seed=5, rates=dict.fromkeys(DEFAULT_RATES, 0.0)).records
    slow = generate_traces(1, seed=6, rates={**dict.fromkeys(DEFAULT_RATES, 0.0), "slow_reranker": 1.0}).records
    spans = spans_from_records(fast + slow)[0]
    config = load_config(data=with_evaluators(GROUNDED, {
        "key": "rerank_seconds", "ref": register(rerank_seconds), "threshold": 2.0, "score_range": [0, 60],
        "higher_is_better": higher_is_better, "target": {"name": "rerank"},
    }))
    evaluators = [e for e in config.evaluators if e.key == "rerank_seconds"]
    judged = score_statuses(batch_scores(spans, bind_all(evaluators), SAMPLE_START)[0], evaluators).to_pandas()
    assert judged["span_name"].tolist() == ["rerank", "rerank"]
    return judged["status"].tolist()


def test_scores_below_the_threshold_fail_by_default():
    assert rerank_statuses(higher_is_better=True) == ["fail", "pass"]


def test_higher_is_better_false_makes_scores_above_the_threshold_fail():
    assert rerank_statuses(higher_is_better=False) == ["pass", "fail"]


# --- checks before anything runs -----------------------------------------------------------------

def test_validate_refuses_an_evaluator_import_path_that_does_not_exist():
    config = load_config(data=with_evaluators({"key": "faithful", "ref": "tasks.evaluation.builtins:groundednes"}))
    with pytest.raises(EvaluatorError, match=r"'groundednes' not found in module 'tasks.evaluation.builtins'; "
                                             r"did you mean 'groundedness'\?"):
        validate(config)


def test_validate_refuses_an_evaluator_module_that_cannot_be_imported():
    config = load_config(data=with_evaluators({"key": "faithful", "ref": "my_evals.judges:faithfulness"}))
    with pytest.raises(EvaluatorError, match=r"module 'my_evals.judges' cannot be imported"):
        validate(config)


def test_validate_refuses_an_action_function_that_does_not_exist():
    config = load_config(data=with_evaluators(GROUNDED, actions=[
        {"when": {"failing": True}, "do": "call", "ref": "tasks.dispatch.send:open_tiket"},
    ]))
    with pytest.raises(EvaluatorError, match=r"action function 'open_tiket' not found in module 'tasks.dispatch.send'"):
        validate(config)


def test_the_last_closed_window_waits_for_the_lag_and_ranges_align_to_windows():
    from datetime import UTC, datetime, timedelta

    from tasks.sources.langsmith import window_range

    hour, lag = timedelta(hours=1), timedelta(minutes=10)
    at = datetime(2026, 11, 2, 10, 5, tzinfo=UTC)  # 09:00-10:00 is not final until 10:10
    assert window_range(None, None, hour, lag, now=at) == (datetime(2026, 11, 2, 8, tzinfo=UTC),
                                                           datetime(2026, 11, 2, 9, tzinfo=UTC))
    assert window_range(datetime(2026, 11, 2, 9, 30, tzinfo=UTC), datetime(2026, 11, 2, 11, tzinfo=UTC), hour,
                        lag) == (datetime(2026, 11, 2, 9, tzinfo=UTC), datetime(2026, 11, 2, 11, tzinfo=UTC))


def test_a_root_cause_rule_names_a_span_or_a_reason():
    from tasks.config import When

    with pytest.raises(ValueError, match="a root_cause needs span or reason"):
        When(root_cause={})
    assert When(root_cause={"reason": "error"}).root_cause.span is None
