"""A root run's trace as a tree of `Run` objects, the way LangSmith's `evaluate()` hands runs to evaluators.

`run.child_runs` holds the root's direct children, each with its own `child_runs`, in
`dotted_order` (the order the spans started in, parents before children), with inputs
and outputs parsed. Trees exist only where a `Run` object is built, that is for callables
that take `run`: evaluators of `(inputs, outputs)` never pay for them. And they are grown
when first read: the first look at any root's `child_runs` builds the trees of all the
roots built with it (one pass over the batch), so an evaluator that takes `run` but never
reads `child_runs` pays nothing either. A child holds its name and run_type; each other field is
converted when first used, its record (inputs, outputs, metadata) parsed when first used
(`tasks.evaluation.evaluators.unread_run_object`): an evaluator that looks for one span by
name parses only that span's.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class _Forest:
    """The trees of some root rows of a `tasks.evaluation.scoring.RunRows`, grown once, on first read."""

    def __init__(self, rows: Any, roots: list[int]):
        self.rows, self.roots = rows, roots
        self.children: dict[int, ChildRuns] = {}
        self._grown = False
        self._lock = threading.Lock()

    def grow(self) -> None:
        if self._grown:  # every read of every root's `child_runs` comes here: no lock once grown
            return
        with self._lock:
            if not self._grown:
                self._link()
                # Each root's `ChildRuns` refers to this forest: without these, the trees are a cycle that only
                # the collector frees (it walked every run of the batch to do it).
                self.children, self.rows = {}, None
                self._grown = True  # last: a reader that sees it sees whole trees

    def _link(self) -> None:
        rows, spans, roots = self.rows, self.rows.spans, self.roots
        is_root = spans.column("is_root").to_numpy(zero_copy_only=False)
        trace_ids = spans.column("trace_id")
        root_traces = trace_ids.take(pa.array(roots, pa.int64()))
        in_traces = pc.is_in(trace_ids, value_set=root_traces).to_numpy(zero_copy_only=False)
        members = np.flatnonzero(in_traces & ~is_root)
        if len(members):
            members = members[pc.sort_indices(spans.column("dotted_order").take(pa.array(members))).to_numpy()]
        taken = spans.select(["id", "parent_run_id", "trace_id", "name", "run_type"]).take(pa.array(members))
        # Each member's parent among the members, else (its parent is the root, or not among the trace's spans:
        # it still belongs to the trace) its root.
        parent = pc.index_in(taken.column("parent_run_id"), value_set=taken.column("id")).fill_null(-1)
        root = pc.index_in(taken.column("trace_id"), value_set=root_traces).to_pylist()
        children, lists = rows.tree_runs(members.tolist(), taken.column("name").to_pylist(),
                                         taken.column("run_type").to_pylist())
        root_lists = [self.children[i] for i in roots]
        for child, up, trace in zip(children, parent.to_pylist(), root, strict=True):
            list.append(lists[up] if up >= 0 else root_lists[trace], child)


class ChildRuns(list):
    """A root run's `child_runs`: a list, filled (with those of every root built with it) when first read."""

    __slots__ = ("_forest",)

    def __init__(self, forest: _Forest):
        super().__init__()
        self._forest = forest

    def _grown(self) -> ChildRuns:
        self._forest.grow()
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:  # copies and pickles are plain lists of the runs
        return list, (list(self._grown()),)


def _reading(name: str) -> Any:
    method = getattr(list, name)

    def read(self: ChildRuns, *args: Any) -> Any:
        return method(self._grown(), *args)

    read.__name__ = name
    return read


for _name in ("__iter__", "__len__", "__getitem__", "__contains__", "__reversed__", "__eq__", "__ne__", "__lt__",
              "__le__", "__gt__", "__ge__", "__add__", "__mul__", "__repr__", "index", "count", "copy"):
    setattr(ChildRuns, _name, _reading(_name))


def link_child_runs(rows: Any, built: list[int]) -> None:
    """Give the root runs among rows `built` of `rows` (a `scoring.RunRows`) their `child_runs`, grown on
    first read. The children's `Run` objects come from `rows` too (reused when a span evaluator already has
    them), so a span seen from its root is the span that evaluator scored."""
    is_root = rows.spans.column("is_root").to_numpy(zero_copy_only=False)
    roots = [i for i in built if is_root[i]]
    if not roots:
        return
    forest = _Forest(rows, roots)
    for i in roots:
        forest.children[i] = rows.run(i).__dict__["child_runs"] = ChildRuns(forest)


def grown(runs: dict[str, Any]) -> dict[str, Any]:
    """`runs` with their trees grown now, while the records they are parsed from are still open."""
    for run in runs.values():
        children = run.__dict__.get("child_runs")
        if isinstance(children, ChildRuns):
            children._grown()
    return runs
