"""Evaluators as LangSmith runs them: resolution by import path, invocation, result normalisation.

Accepted, unchanged: a `RunEvaluator` (e.g. `@run_evaluator`), a function whose
parameters are named from `run, example, inputs, outputs, reference_outputs,
attachments`, or a legacy two-argument `(run, example)` function; sync or async;
returning bool / number / str / dict / list of dicts / `EvaluationResult(s)`.

Production runs have no dataset example, so `example` is None, `reference_outputs`
and `attachments` are `{}`, and `inputs` is the run's own inputs (LangSmith's
`evaluate()` would pass the example's inputs; there is none here). The runs of an
`evaluate()` experiment have one: `example` is it and `reference_outputs` its outputs.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import inspect
import sys
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from langsmith.schemas import Run

from tasks.config import ConfigError, EvaluatorConfig
from tasks.evaluation.builtins import BUILTINS
from tasks.evaluation.calls import (
    DEFAULT_ASYNC_CONCURRENCY,
    DEFAULT_SYNC_CONCURRENCY,
    CallCounters,
    CallLimiter,
    CallPolicy,
    Outcomes,
    call_async,
    call_in_lanes,
)
from tasks.evaluation.langsmith_scores import feedback_score_evaluator

SUPPORTED_ARGS = ("run", "example", "inputs", "outputs", "reference_outputs", "attachments")

_REGISTRY: dict[str, Any] = {}
_REGISTRY_LOCK = threading.Lock()


class EvaluatorError(ConfigError):
    """An evaluator that cannot be used; raised before anything runs."""


def register(obj: Any, name: str | None = None) -> str:
    """Make an in-process callable referable from config as 'python:<name>' (used by `feedback_loop`)."""
    name = name or f"{getattr(obj, '__qualname__', type(obj).__name__)}-{id(obj):x}"
    with _REGISTRY_LOCK:
        _REGISTRY[name] = obj
    return f"python:{name}"


def import_ref(ref: str, what: str = "evaluator") -> Any:
    """The object at 'package.module:attr' (or 'python:<registered name>')."""
    module_name, _, attr = ref.partition(":")
    if module_name == "python":
        if attr not in _REGISTRY:
            raise EvaluatorError(f"{what} ref {ref!r} is not registered in this process")
        return _REGISTRY[attr]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EvaluatorError(f"{what} ref {ref!r}: module {module_name!r} cannot be imported ({exc})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            hint = difflib.get_close_matches(part, names, n=1)
            fix = f"; did you mean {hint[0]!r}?" if hint else ""
            raise EvaluatorError(f"{what} {attr!r} not found in module {module_name!r}{fix}")
        obj = getattr(obj, part)
    return obj


@dataclass
class BoundEvaluator:
    """An evaluator ready to call on a run, with what it needs and how to call it."""

    config: EvaluatorConfig
    target: Any
    mode: str  # "keywords" | "legacy" | "run_evaluator" | "columnar"
    wants: tuple[str, ...]
    is_async: bool
    source_hash: str

    @property
    def key(self) -> str:
        return self.config.key

    @property
    def concurrency(self) -> int:
        """Calls in flight at once: the config's `max_concurrency`, else the default for async or sync code. The
        built-ins are pure Python on the CPU: more threads would only contend for the GIL (8 lanes made the
        sample's evaluation 30% slower than one), so they default to one lane, as `max_concurrency: 1` gives."""
        if self.config.max_concurrency is not None:
            return self.config.max_concurrency
        if self.is_async:
            return DEFAULT_ASYNC_CONCURRENCY
        return 1 if self.config.ref.startswith("builtin:") else DEFAULT_SYNC_CONCURRENCY

    @property
    def cached(self) -> bool:
        """Whether results are kept per (run, version): `cache`, else on for evaluators by import path."""
        if self.mode == "columnar":
            return False
        return self.config.cache if self.config.cache is not None else not self.config.ref.startswith("builtin:")

    @property
    def version(self) -> str:
        """What a cached result depends on besides the run: ref, key, params and the evaluator's code."""
        text = f"{self.config.ref}\0{self.key}\0{self.mode}\0{self.source_hash}"
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    @property
    def needs_run(self) -> bool:
        return self.mode not in ("keywords", "columnar") or "run" in self.wants

    def call(self, run_fields: dict[str, Any], run: Run | None) -> Any:
        if self.mode == "run_evaluator":
            return self.target.evaluate_run(run, run_fields.get("example"))
        if self.mode == "legacy":
            return self.target(run, run_fields.get("example"))
        if self.wants == ("inputs", "outputs"):  # the common openevals shape, without building a dict twice
            return self.target(inputs=run_fields["inputs"], outputs=run_fields["outputs"])
        return self.target(**_arguments(self.wants, run_fields, run))

    async def acall(self, run_fields: dict[str, Any], run: Run | None) -> Any:
        if self.mode == "run_evaluator":
            return await self.target.aevaluate_run(run, run_fields.get("example"))
        if self.mode == "legacy":
            return await self.target(run, run_fields.get("example"))
        return await self.target(**_arguments(self.wants, run_fields, run))


def _arguments(wants: tuple[str, ...], run_fields: dict[str, Any], run: Run | None) -> dict[str, Any]:
    example = run_fields.get("example")
    values = {
        "run": run,
        "example": example,
        "inputs": run_fields["inputs"],
        "outputs": run_fields["outputs"],
        "reference_outputs": (example.outputs or {}) if example is not None else {},
        "attachments": {},
    }
    return {name: values[name] for name in wants}


def _source_hash(obj: Any) -> str:
    """A hash of the evaluator's code and of its module's source, so cached scores are dropped when either changes.

    The module counts too: a judge made at import (`judge = create_llm_as_judge(prompt=PROMPT, ...)`) is a closure
    whose own code stays the same when its prompt or model changes.
    """
    target = getattr(obj, "func", None) or getattr(obj, "afunc", None) or obj
    code = inspect.unwrap(target) if callable(target) else type(target)
    try:
        source = inspect.getsource(code)
    except (OSError, TypeError):
        source = repr(target)
    module = inspect.getmodule(code)
    try:
        source += inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        pass
    return hashlib.sha256(source.encode()).hexdigest()[:16]


@functools.cache
def _builtin_hash(name: str) -> str:
    """`_source_hash` of a built-in: its module does not change while the process runs (each batch binds its
    evaluators again, and reading the module's source was a third of that)."""
    return _source_hash(BUILTINS[name])


def _signature_mode(fn: Callable[..., Any], label: str) -> tuple[str, tuple[str, ...]]:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        raise EvaluatorError(f"{label} is not a function LangSmith can call") from None
    params = [p for p in signature.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if [p.name for p in params if p.default is p.empty] == ["spans"]:
        return "columnar", ("spans",)
    required = [p for p in params if p.default is p.empty]
    names = tuple(p.name for p in params if p.name in SUPPORTED_ARGS)
    if [p.name for p in params] == ["run", "example"]:
        return "legacy", ()
    if params and all(p.name in SUPPORTED_ARGS for p in required) and names:
        return "keywords", names
    if len(required) == 2:
        return "legacy", ()
    found = ", ".join(p.name for p in params) or "none"
    raise EvaluatorError(
        f"{label} takes parameters ({found}); LangSmith evaluators take parameters named from "
        f"{', '.join(SUPPORTED_ARGS)}, or two positional parameters (run, example)"
    )


def bind_evaluator(config: EvaluatorConfig) -> BoundEvaluator:
    """Resolve `config.ref` (calling it with `params` when given) into a callable evaluator."""
    label = f"evaluator {config.key!r} (ref {config.ref!r})"
    scheme, _, name = config.ref.partition(":")
    if scheme == "builtin":
        if name not in BUILTINS:
            hint = difflib.get_close_matches(name, list(BUILTINS), n=1)
            fix = f"did you mean 'builtin:{hint[0]}'?" if hint else f"built-ins are {sorted(BUILTINS)}"
            raise EvaluatorError(f"{label}: no built-in evaluator {name!r}; {fix}")
        params = {"key": config.key, **(config.params or {})}
        try:
            target = BUILTINS[name](**params)
        except Exception as exc:
            raise EvaluatorError(f"{label}: bad params {config.params}: {exc}") from None
        source = _builtin_hash(name) + repr(sorted(params.items()))
    elif config.feedback_key:
        target, source = feedback_score_evaluator(config.feedback_key), config.ref
    else:
        target = import_ref(config.ref)
        source = _source_hash(target)
        if config.params is not None:
            try:
                target = target(**config.params)
            except Exception as exc:
                raise EvaluatorError(f"{label}: the factory failed with params {config.params}: {exc}") from None
            source += repr(sorted(config.params.items()))
    if _is_langsmith(target, "RunEvaluator"):
        is_async = bool(getattr(target, "is_async", False))
        return BoundEvaluator(config, target, "run_evaluator", (), is_async, _source_hash(target) + source)
    if not callable(target):
        raise EvaluatorError(f"{label} is a {type(target).__name__}, not a function or RunEvaluator")
    mode, wants = _signature_mode(target, label)
    is_async = inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(type(target).__call__)
    return BoundEvaluator(config, target, mode, wants, is_async, hashlib.sha256(source.encode()).hexdigest()[:16])


def _is_langsmith(value: Any, name: str) -> bool:
    """`isinstance(value, langsmith.evaluation.evaluator.<name>)`, without importing that module (with the SDK's
    client, 0.4 s) in a process that never meets one: there is no such object before its module is imported."""
    module = sys.modules.get("langsmith.evaluation.evaluator")
    return module is not None and isinstance(value, getattr(module, name))


# --- results -------------------------------------------------------------------------------------

class Result(NamedTuple):
    feedback_key: str
    score: float | None
    value: str | None
    comment: str | None
    error: str | None


_RESULT_FIELDS = ("score", "value", "comment")


def _from_dict(item: dict[str, Any], default_key: str) -> Result:
    score, value, comment = item.get("score"), item.get("value"), item.get("comment")
    if score is None and value is None and comment is None and not any(k in item for k in _RESULT_FIELDS):
        raise ValueError(f"expected a dict with 'score', 'value' or 'comment'; got {item!r:.120}")
    kind = type(score)
    if kind is not float and score is not None:
        if kind is bool or kind is int or isinstance(score, int | float):
            score = float(score)
        else:
            raise ValueError(f"score must be a number or bool, got {score!r:.60}")
    if value is not None:
        if score is None and isinstance(value, bool):
            score, value = float(value), None
        else:
            value = str(value)
    return Result(
        str(item.get("key") or default_key), score, value, None if comment is None else str(comment), None
    )


def _one_result(item: Any, default_key: str) -> Result:
    if _is_langsmith(item, "EvaluationResult"):
        item = {"key": item.key, "score": item.score, "value": item.value, "comment": item.comment}
    if not isinstance(item, dict):
        raise ValueError(f"expected a dict or EvaluationResult, got {type(item).__name__}: {item!r:.80}")
    return _from_dict(item, default_key)


def normalise_result(result: Any, default_key: str) -> list[Result]:
    """Whatever an evaluator returned, as LangSmith would read it: a list of Results."""
    kind = type(result)
    if kind is dict:
        if "results" in result:
            return [_one_result(item, default_key) for item in result["results"]]
        if result:
            return [_from_dict(result, default_key)]
    elif kind is bool or kind is int or kind is float:
        return [Result(default_key, float(result), None, None, None)]
    elif kind is str:
        return [Result(default_key, None, result, None, None)]
    elif _is_langsmith(result, "EvaluationResult"):
        return [_one_result(result, default_key)]
    elif isinstance(result, list) and result:
        return [_one_result(item, default_key) for item in result]
    elif isinstance(result, int | float):  # numpy scalars and other number types
        return [Result(default_key, float(result), None, None, None)]
    elif isinstance(result, dict) and result:
        return normalise_result(dict(result), default_key)
    raise ValueError(f"evaluator returned {result!r:.80}; expected bool, number, str, dict, list or EvaluationResult")


def error_result(key: str, message: str) -> list[Result]:
    return [Result(key, None, None, None, message)]


# --- running -------------------------------------------------------------------------------------

_RUN_DEFAULTS: dict[str, Any] = Run.model_construct(
    id=uuid.UUID(int=0), name="", run_type="chain", start_time=None, trace_id=uuid.UUID(int=0)
).__dict__
_RUN_FIELDS_SET = frozenset(_RUN_DEFAULTS)


def run_object(values: Iterable[tuple[str, Any]] | dict[str, Any], fields: dict[str, Any]) -> Run:
    """A langsmith `Run` for evaluators that take `run`.

    `values` are the span's run fields as the `Run` holds them (ids as UUIDs, times as
    datetimes), a dict or (name, value) pairs; `fields` its parsed record (`RunRows.fields`). Built the way
    `Run.model_construct` builds one, with the defaults resolved once instead of per
    run: the values come from our own validated table.
    """
    run = Run.__new__(Run)
    object.__setattr__(run, "__dict__", _state(values, fields))
    object.__setattr__(run, "__pydantic_fields_set__", set(_RUN_FIELDS_SET))
    object.__setattr__(run, "__pydantic_extra__", None)
    object.__setattr__(run, "__pydantic_private__", None)
    return run


def unread_run_object(values: dict[str, Any], source: Any, row: int) -> Run:
    """A `Run` of row `row` of `source` (a `tasks.evaluation.scoring.RowSource`) that holds only `values` (a
    child's name and run_type, its `child_runs`) until more is used: most of the spans in a root's `child_runs`
    are passed over with a look at their name.

    A table field (its id, times, status...) is converted when first used, the record (inputs, outputs,
    metadata) parsed when first used; anything that reads the run whole (its `__dict__` as a parent's dump reads
    it, comparison, dumps, copies, pickles, setting an attribute) makes it, in place, the plain `Run` that
    `run_object` builds."""
    run = _UnreadRun.__new__(_UnreadRun)
    object.__setattr__(run, "__dict__", values)
    object.__setattr__(run, "__pydantic_private__", (source, row))
    return run


def _state(values: Iterable[tuple[str, Any]] | dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """A `Run`'s `__dict__`, its fields in the order of `Run`'s (the order of its dumps)."""
    state = dict(_RUN_DEFAULTS)
    state.update(values)
    state["inputs"], state["outputs"] = fields["inputs"], fields["outputs"]
    state["extra"] = {"metadata": fields["metadata"] or {}}
    return state


_RECORD_FIELDS = frozenset(("inputs", "outputs", "extra"))


class _UnreadRun(Run):
    """A `Run` of `unread_run_object` until it is read whole; then, in place, the plain `Run` that `run_object`
    builds."""

    def __getattribute__(self, name: str) -> Any:
        if name == "__dict__":
            _read(self)
        return object.__getattribute__(self, name)

    def __getattr__(self, name: str) -> Any:  # a field not yet in the run's `__dict__`
        private = object.__getattribute__(self, "__pydantic_private__")
        if private is not None:
            source, row = private
            state = object.__getattribute__(self, "__dict__")
            if name in _RECORD_FIELDS:
                fields = source.fields(row)
                state["inputs"], state["outputs"] = fields["inputs"], fields["outputs"]
                state["extra"] = {"metadata": fields["metadata"] or {}}
                return state[name]
            if source.has_field(name):
                value = state[name] = source.value(name, row)
                return value
        return getattr(_read(self), name)


def _read(run: Run) -> Run:
    private = object.__getattribute__(run, "__pydantic_private__") if type(run) is _UnreadRun else None
    if private is not None:  # None: a plain `Run`, or one another thread has just read
        # The whole state goes in before the class changes and the source goes last: a thread that sees a plain
        # `Run`, or no source, sees it whole. What the run holds already (its `child_runs`, fields used) wins.
        source, row = private
        state = _state({**source.values(row), **object.__getattribute__(run, "__dict__")}, source.fields(row))
        object.__setattr__(run, "__dict__", state)
        object.__setattr__(run, "__pydantic_fields_set__", set(_RUN_FIELDS_SET))
        object.__setattr__(run, "__pydantic_extra__", None)
        object.__setattr__(run, "__class__", Run)
        object.__setattr__(run, "__pydantic_private__", None)
    return run


def _reading_first(name: str) -> Callable[..., Any]:
    method = getattr(Run, name)

    def read(self: Run, *args: Any, **kwargs: Any) -> Any:
        return method(_read(self), *(_read(a) if isinstance(a, _UnreadRun) else a for a in args), **kwargs)

    read.__name__ = name
    return read


for _name in ("__eq__", "__iter__", "__repr__", "__str__", "__repr_args__", "__copy__", "__deepcopy__",
              "__getstate__", "__reduce_ex__", "__setattr__", "__delattr__", "model_copy", "model_dump",
              "model_dump_json", "dict", "json", "copy", "_iter", "_copy_and_set_values", "_calculate_keys"):
    setattr(_UnreadRun, _name, _reading_first(_name))


def policy(evaluator: BoundEvaluator, limiter: CallLimiter | None = None,
           counters: CallCounters | None = None) -> CallPolicy:
    config = evaluator.config
    return CallPolicy(evaluator.concurrency, config.timeout, config.retry, limiter, counters or CallCounters())


def evaluate_items(
    evaluator: BoundEvaluator,
    items: list[tuple[dict[str, Any], Run | None]],
    limiter: CallLimiter | None = None,
    counters: CallCounters | None = None,
    on_result: Callable[[int, list[Result]], None] | None = None,
    publish: Callable[[], None] | None = None,
) -> list[list[Result]]:
    """Results for each (fields, run) item, in order; errors, timeouts and retries spent become error results.

    `limiter` paces every attempt (the evaluator's rate limit), `counters` count the calls,
    `on_result(i, results)` hears each item as it settles, `publish()` runs about every 0.2 s.
    """
    if evaluator.mode == "columnar":
        raise TypeError("a columnar evaluator scores a whole table: use evaluate_columnar")
    key = evaluator.key

    def settle(returned: Any) -> list[Result]:
        return normalise_result(returned, key)

    def failed(message: str) -> list[Result]:
        return error_result(key, message)

    rules = policy(evaluator, limiter, counters)
    rules.counters.add(total=len(items))
    outcomes = Outcomes(settle, failed, on_result, publish)
    if evaluator.is_async:
        return call_async(items, lambda item: evaluator.acall(*item), outcomes, rules)
    return call_in_lanes(items, lambda item: evaluator.call(*item), outcomes, rules)


def evaluate_columnar(evaluator: BoundEvaluator, spans: Any) -> list[list[Result]]:
    """Results of a columnar evaluator (one call for all target spans, a Table of SPANS), one list per row.

    It may return a sequence with one result per row (any kind a per-run evaluator may
    return), or a dict of columns: `score` (required), `comment`, `value`, `error` (the row is an error). It runs
    on a watched thread like a sync evaluator, so one that hangs is an error at its timeout.
    """
    key, n = evaluator.key, spans.num_rows

    def settle(returned: Any) -> list[list[Result]]:
        if isinstance(returned, dict):
            rows = _column_results(returned, key, n)
        else:
            rows = [normalise_result(item, key) for item in returned]
        if len(rows) != n:
            raise ValueError(f"returned {len(rows)} results for {n} spans")
        return rows

    def failed(message: str) -> list[list[Result]]:
        return [error_result(key, message)] * n

    rules = CallPolicy(1, evaluator.config.timeout, evaluator.config.retry.model_copy(update={"attempts": 1}), None,
                       CallCounters())
    [rows] = call_in_lanes([spans], lambda table: evaluator.target(spans=table), Outcomes(settle, failed), rules)
    return rows


def _column_results(columns: dict[str, Any], key: str, n: int) -> list[list[Result]]:
    def as_list(name: str) -> list[Any]:
        value = columns.get(name)
        if value is None:
            return [None] * n
        return value.tolist() if hasattr(value, "tolist") else list(value)

    scores, comments, values, errors = as_list("score"), as_list("comment"), as_list("value"), as_list("error")
    return [
        [Result(key, None if s is None else float(s), None if v is None else str(v), c, e)]
        for s, c, v, e in zip(scores, comments, values, errors, strict=True)
    ]
