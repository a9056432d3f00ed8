"""The code's structure: no module-level import cycle among tasks/, flows/ and blocks/ (a cycle makes import
order matter, and a module half-imported when another reads it)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "flows", "blocks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules a module imports when it is imported: its top-level imports, not those inside
    functions (which run later) or under `if TYPE_CHECKING:`."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    return {name: top_level_imports(path, set(paths)) - {name} for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_module_level_import_cycle():
    graph = import_graph()
    assert len(graph) > 20, "the project's modules were not found"
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_every_action_kind_has_a_sink_that_speaks_the_send_protocol(monkeypatch):
    from tasks.config import ActionConfig, LoopConfig, When
    from tasks.sinks.connections import sinks_for

    monkeypatch.setenv("HOOK_SECRET", "s")
    monkeypatch.setenv("SLACK_WEBHOOK_URL", "https://hooks.slack.com/services/T/B/x")
    config = LoopConfig(actions=[ActionConfig(when=When(failing=True), do="webhook", url="https://example.com/hook",
                                              secret_env="HOOK_SECRET"),
                                 ActionConfig(when=When(failing=True), do="slack")])
    sinks = sinks_for(config, None)
    kinds = set(ActionConfig.model_fields["do"].annotation.__args__) - {"log"}  # the log sink is the action log
    assert kinds | {"invalid"} <= set(sinks)
    for kind in kinds | {"invalid"}:
        sink = sinks[kind]
        assert callable(getattr(sink, "chunk", None)) and callable(getattr(sink, "send", None)), kind


def test_the_evaluation_workers_code_imports_no_prefect():
    """The forkserver imports the scoring code once and every worker forks from it: Prefect (1 s to import) is
    the flow process's, not a worker's. (pandas it does import: pyarrow's `ChunkedArray.to_numpy` loads it, so
    it is preloaded once in the forkserver rather than by each worker's first batch.)"""
    import subprocess
    import sys

    script = ("import sys, tasks.evaluation.scoring\n"
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'pandas'}))")
    answer = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == "['pandas']"


def test_a_loop_that_uses_neither_langsmith_nor_slack_never_imports_their_clients(tmp_path):
    """The CLI's process imports the LangSmith client (0.4 s) and the Slack SDK (0.15 s) only for a loop that uses
    them: not for the default run's modules, config check and sinks; the LangSmith `Run` model it does import."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "import flows.cli, flows.triage, flows.loop\n"
        "from tasks.config import LoopConfig\n"
        "from tasks.sinks.connections import sinks_for, validate\n"
        "config = validate(LoopConfig())\n"
        "sinks = sinks_for(config, None)\n"
        "print(sorted(m for m in ('langsmith.client', 'langsmith.evaluation', 'slack_sdk', 'tasks.sinks.slack',\n"
        "                         'tasks.sinks.langsmith') if m in sys.modules))\n"
        "sinks['slack'].chunk(None, {'trace_id': None}, 1)  # a Slack message an on_failure asks for\n"
        "print('slack_sdk' in sys.modules)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("LANGSMITH_", "LANGCHAIN_"))}
    answer = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.split("\n")[:2] == ["[]", "True"]
