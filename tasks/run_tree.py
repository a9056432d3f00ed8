"""A root run's trace as a tree of `Run` objects, the way LangSmith's `evaluate()` hands runs to evaluators.

`run.child_runs` holds the root's direct children, each with its own `child_runs`, in
`dotted_order` (the order the spans started in, parents before children), with inputs
and outputs parsed. Trees are built only where a `Run` object is built, that is for
callables that take `run`: evaluators of `(inputs, outputs)` never pay for them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def link_child_runs(rows: Any, built: list[int]) -> None:
    """Fill `child_runs` of the root runs among rows `built` of `rows` (a `tasks.scoring.RunRows`).

    The children's `Run` objects come from `rows` too (built in one go, or reused when a
    span evaluator already has them), so a span seen from its root is the span that
    evaluator scored.
    """
    spans = rows.spans
    is_root = spans.column("is_root").to_numpy(zero_copy_only=False)
    roots = [i for i in built if is_root[i]]
    if not roots:
        return
    trace_ids = spans.column("trace_id")
    in_traces = pc.is_in(trace_ids, value_set=trace_ids.take(pa.array(roots, pa.int64()))).to_numpy(
        zero_copy_only=False)
    members = np.flatnonzero(in_traces & ~is_root)
    if len(members):
        dotted = spans.column("dotted_order").take(pa.array(members, pa.int64()))
        members = members[pc.sort_indices(dotted).to_numpy()]
    rows.prepare_runs(members.tolist())  # not roots: no trees of their own to link
    by_id: dict[str, Any] = {}
    for i in roots:
        run = rows.run(i)
        run.__dict__["child_runs"] = []
        by_id[str(run.id)] = run
    for i in members.tolist():
        run = rows.run(i)
        run.__dict__["child_runs"] = []
        by_id[str(run.id)] = run
    for i in members.tolist():
        run = rows.run(i)
        # A span whose parent is not among the trace's spans still belongs to the trace: under its root.
        parent = by_id.get(str(run.parent_run_id)) or by_id[str(run.trace_id)]
        parent.child_runs.append(run)
