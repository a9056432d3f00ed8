"""Built-in evaluators for people with no LLM at hand.

They follow the protocol of any LangSmith evaluator (openevals style): keyword-only
functions of `inputs`, `outputs` or `run` returning a `{key, score, comment}` dict.
Those that need only span columns (`error_free`, `latency_slo`) use the columnar form
that any user evaluator may use too: a single `spans` parameter (an Arrow table of the
target spans) and columns of results back.
Each `builtin:<name>` is a factory; `params` in the config are its arguments:

    >>> relevance = retrieval_relevance()
    >>> relevance(inputs={"query": "reset router"}, outputs={"documents": ["Reset the router"]})["score"]
    1.0
"""

from __future__ import annotations

import functools
import json
import re
import string
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

EvaluatorFn = Callable[..., dict[str, Any]]

_PUNCTUATION = str.maketrans(dict.fromkeys(string.punctuation, " "))
_STOP = frozenset(
    "the and for you your with can this that from how fix are was not but have has had what when where "
    "which who will would could should into about please".split()
)
_TEXT_KEYS = ("answer", "output", "text", "content", "result", "response", "generation")
_QUERY_KEYS = ("query", "question", "input", "prompt")
_DOC_KEYS = ("documents", "source_documents", "context", "docs")


@functools.lru_cache(maxsize=32_768)
def _words(text: str) -> frozenset[str]:
    """Content words (3+ characters, no stop words) of a text. Cached: the same documents,
    question and answer recur across a trace's spans (retriever outputs, answer LLM
    context, root outputs)."""
    words = set(text.lower().translate(_PUNCTUATION).split())
    words -= _STOP
    return frozenset([word for word in words if len(word) > 2])


def forget_words() -> None:
    """Empty `_words`' cache: a batch's texts do not recur in the next batch (other traces), and a full cache
    kept ~100 MB resident in each evaluation worker between batches."""
    _words.cache_clear()


def _text(value: Any) -> str:
    """Flatten any JSON value (messages, documents, strings) into plain text."""
    if type(value) is str:
        return value
    if value is None:
        return ""
    if isinstance(value, dict):
        for key in ("page_content", "content", "text"):
            text = value.get(key)
            if type(text) is str:
                return text
        return " ".join([_text(v) for v in value.values()])
    if isinstance(value, list | tuple):
        return " ".join([_text(v) for v in value])
    return str(value)


def _first(mapping: Mapping[str, Any] | None, keys: tuple[str, ...], field: str | None = None) -> Any:
    if not mapping:
        return None
    if field is not None:
        return mapping.get(field)
    for key in keys:
        if key in mapping:
            return mapping[key]
    strings = [v for v in mapping.values() if isinstance(v, str)]
    return strings[0] if len(strings) == 1 else None


def _documents(*mappings: Mapping[str, Any] | None) -> Any:
    for mapping in mappings:
        if mapping:
            for key in _DOC_KEYS:
                if key in mapping:
                    return mapping[key]
    return None


def _overlap(part: frozenset[str], whole: frozenset[str]) -> float:
    return len(part & whole) / len(part) if part else 0.0


def retrieval_relevance(key: str = "retrieval_relevance") -> EvaluatorFn:
    """Share of the query's words found in the retrieved documents (0..1)."""

    def evaluate(*, inputs: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
        query = _words(_text(_first(inputs, _QUERY_KEYS) or inputs))
        documents = _documents(outputs, inputs)
        if documents is None:
            return {"key": key, "score": 0.0, "comment": "no documents in outputs"}
        score = _overlap(query, _words(_text(documents)))
        return {"key": key, "score": round(score, 4), "comment": f"{score:.0%} of query words in documents"}

    return evaluate


def groundedness(key: str = "groundedness") -> EvaluatorFn:
    """Share of the answer's words supported by the retrieved text (0..1); no answer scores 0."""

    def evaluate(*, inputs: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
        answer = _words(_text(_first(outputs, _TEXT_KEYS)))
        if not answer:
            return {"key": key, "score": 0.0, "comment": "no answer"}
        documents = _documents(outputs, inputs)
        if documents is None:
            return {"key": key, "score": 0.0, "comment": "no retrieved text to ground the answer in"}
        score = _overlap(answer, _words(_text(documents)))
        return {"key": key, "score": round(score, 4), "comment": f"{score:.0%} of answer words in sources"}

    return evaluate


def non_empty_answer(key: str = "non_empty_answer", field: str | None = None) -> EvaluatorFn:
    """1 when the output holds a non-blank answer."""

    def evaluate(*, outputs: dict[str, Any]) -> dict[str, Any]:
        answer = _text(_first(outputs, _TEXT_KEYS, field)).strip()
        return {"key": key, "score": float(bool(answer)), "comment": None if answer else "empty answer"}

    return evaluate


def error_free(key: str = "error_free") -> EvaluatorFn:
    """1 when the run finished without an error. Columnar: one call scores every target span."""

    def evaluate(*, spans: pa.Table) -> dict[str, Any]:
        error = spans.column("error")
        failed = pc.or_(pc.fill_null(pc.not_equal(error, ""), False), pc.equal(spans.column("status"), "error"))
        return {"score": pc.if_else(failed, 0.0, 1.0), "comment": pc.utf8_slice_codeunits(error, 0, 200)}

    return evaluate


def latency_slo(max_seconds: float, key: str = "latency_slo") -> EvaluatorFn:
    """1 when the run took at most `max_seconds`. Columnar: one call scores every target span."""
    if max_seconds <= 0:
        raise ValueError(f"latency_slo max_seconds must be positive, got {max_seconds}")

    def evaluate(*, spans: pa.Table) -> dict[str, Any]:
        seconds = spans.column("latency_s")
        within = pc.less_equal(seconds, max_seconds)
        comments = [
            "run has not finished" if s is None else f"{s:.2f}s (SLO {max_seconds}s)" for s in seconds.to_pylist()
        ]
        return {"score": pc.if_else(pc.fill_null(within, False), 1.0, 0.0), "comment": comments}

    return evaluate


def valid_json(key: str = "valid_json", field: str | None = None) -> EvaluatorFn:
    """1 when the output text (or `field`) parses as JSON."""

    def evaluate(*, outputs: dict[str, Any]) -> dict[str, Any]:
        value = _first(outputs, _TEXT_KEYS, field)
        if not isinstance(value, str):
            return {"key": key, "score": float(value is not None), "comment": None}
        try:
            json.loads(value)
        except ValueError as exc:
            return {"key": key, "score": 0.0, "comment": f"invalid JSON: {exc}"}
        return {"key": key, "score": 1.0, "comment": None}

    return evaluate


def regex(pattern: str, key: str = "regex", field: str | None = None, must_match: bool = True) -> EvaluatorFn:
    """1 when the output text matches `pattern` (or, with must_match: false, when it does not)."""
    compiled = re.compile(pattern)

    def evaluate(*, outputs: dict[str, Any]) -> dict[str, Any]:
        found = compiled.search(_text(_first(outputs, _TEXT_KEYS, field))) is not None
        comment = f"/{pattern}/ {'found' if found else 'absent'}"
        return {"key": key, "score": float(found == must_match), "comment": comment}

    return evaluate


def contains(
    text: str, key: str = "contains", field: str | None = None, case_sensitive: bool = False
) -> EvaluatorFn:
    """1 when the output text contains `text`."""
    needle = text if case_sensitive else text.lower()

    def evaluate(*, outputs: dict[str, Any]) -> dict[str, Any]:
        haystack = _text(_first(outputs, _TEXT_KEYS, field))
        found = needle in (haystack if case_sensitive else haystack.lower())
        return {"key": key, "score": float(found), "comment": None if found else f"{text!r} not found"}

    return evaluate


BUILTINS: dict[str, Callable[..., EvaluatorFn]] = {
    "retrieval_relevance": retrieval_relevance,
    "groundedness": groundedness,
    "non_empty_answer": non_empty_answer,
    "error_free": error_free,
    "latency_slo": latency_slo,
    "valid_json": valid_json,
    "regex": regex,
    "contains": contains,
}
