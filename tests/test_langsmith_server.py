"""The LangSmith test server works with the real, unmodified `langsmith` SDK over HTTP.

Every test ends with `server.violations == []`: each request the SDK sent and each response the
server gave matched the official OpenAPI spec.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Iterator
from datetime import datetime

import httpx
import langsmith
import pytest
from langsmith import utils as ls_utils
from langsmith._internal._v2_migration_utils import QueryBackend, get_query_backend

from tasks.sources.sample import generate_traces
from tests.langsmith_server import LangSmithTestServer

KEY = "lsv2_test_key"
SAMPLE = generate_traces(50, seed=3)
ROOTS = [r for r in SAMPLE.records if r["parent_run_id"] is None]
WINDOW = {"min_start_time": "2026-11-01T00:00:00Z", "max_start_time": "2026-11-03T00:00:00Z"}


def _client(server: LangSmithTestServer, api_key: str = KEY, **options: object) -> langsmith.Client:
    return langsmith.Client(api_url=server.url, api_key=api_key, **options)


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[LangSmithTestServer]:
    options = getattr(request, "param", {})
    with LangSmithTestServer(api_key=KEY, **options) as srv:
        srv.add_project("sample", SAMPLE.records)
        yield srv
        assert srv.violations == []


@pytest.fixture
def project_id(server: LangSmithTestServer) -> str:
    return server.add_project("sample")


def test_info_says_which_query_backends_exist() -> None:
    with LangSmithTestServer(api_key=KEY) as dual, LangSmithTestServer(api_key=KEY, v2=False) as v1_only:
        info = _client(dual).info
        assert info.version == "0.16.20"
        assert get_query_backend(info.instance_flags) == QueryBackend.DUAL
        assert get_query_backend(_client(v1_only).info.instance_flags) == QueryBackend.CLICKHOUSE_ONLY
        for prefix in ("/api/v2", "/v2"):
            response = httpx.post(v1_only.url + prefix + "/runs/query", json={}, headers={"X-API-Key": KEY})
            assert response.status_code == 404
        assert dual.violations == v1_only.violations == []


def test_read_project_by_name_and_id(server: LangSmithTestServer, project_id: str) -> None:
    client = _client(server)
    project = client.read_project(project_name="sample")
    assert str(project.id) == project_id
    assert project.start_time == datetime.fromisoformat(ROOTS[0]["start_time"])  # the earliest run
    assert str(client.read_project(project_id=project_id).id) == project_id
    with pytest.raises(ls_utils.LangSmithNotFoundError):
        client.read_project(project_name="no-such-project")
    with pytest.raises(ls_utils.LangSmithNotFoundError):
        client.read_project(project_id=str(uuid.uuid4()))


def test_bad_api_key_is_an_auth_error(server: LangSmithTestServer) -> None:
    with pytest.raises(ls_utils.LangSmithAuthError):
        _client(server, api_key="wrong").read_project(project_name="sample")
    response = httpx.get(server.url + "/api/v1/sessions", params={"name": "sample"})
    assert response.status_code == 401 and "detail" in response.json()


def test_v2_query_pages_through_every_span_once(server: LangSmithTestServer, project_id: str) -> None:
    api = _client(server)._get_langsmith_api_sync()
    selects = ["ID", "NAME", "RUN_TYPE", "STATUS", "START_TIME", "PARENT_RUN_IDS", "OUTPUTS", "ERROR"]
    items = list(api.runs.query_v2(project_ids=[project_id], selects=selects, page_size=40, **WINDOW))
    assert sorted(i.id for i in items) == sorted(r["id"] for r in SAMPLE.records)
    assert server.counts()["runs_query_v2"] == math.ceil(len(SAMPLE.records) / 40)
    starts = [i.start_time for i in items]
    assert starts == sorted(starts, reverse=True)  # DESC by default
    by_id = {r["id"]: r for r in SAMPLE.records}
    for item in items:
        record = by_id[item.id]
        assert item.run_type == record["run_type"].upper() and item.status == record["status"].upper()
        assert item.error == record["error"] and item.outputs == record["outputs"]
        assert item.trace_id is None and item.inputs is None  # not selected, not sent
    # Without selects only `id` comes back; without min_start_time only the last 24 h (none of the sample).
    assert set(next(iter(api.runs.query_v2(project_ids=[project_id], page_size=1, **WINDOW))).model_dump(
        exclude_none=True)) == {"id"}
    assert list(api.runs.query_v2(project_ids=[project_id], selects=["ID"])) == []
    # The public async accessor (`Client.runs`, gated on /info's version) reaches the same endpoint.
    client = _client(server)

    async def collect() -> list[str]:
        return [r.id async for r in client.runs.query_v2(project_ids=[project_id], page_size=1000, **WINDOW)]

    assert sorted(asyncio.run(collect())) == sorted(r["id"] for r in SAMPLE.records)


def test_v2_filters_and_trace_runs(server: LangSmithTestServer, project_id: str) -> None:
    api = _client(server)._get_langsmith_api_sync()
    items = list(api.runs.query_v2(
        project_ids=[project_id], selects=["ID", "NAME", "RUN_TYPE", "STATUS"], page_size=1000, is_root=False,
        filter='and(eq(run_type, "llm"), neq(status, "error"))', trace_filter='eq(status, "error")', **WINDOW))
    failed_traces = {r["trace_id"] for r in ROOTS if r["status"] == "error"}
    expected = {r["id"] for r in SAMPLE.records
                if r["run_type"] == "llm" and r["status"] != "error" and r["trace_id"] in failed_traces}
    assert expected and {i.id for i in items} == expected
    trace = ROOTS[0]
    runs = api.traces.list_runs(trace["id"], project_id=project_id, selects=["ID", "NAME"], **WINDOW)
    assert {r.id for r in runs.items} == {r["id"] for r in SAMPLE.records if r["trace_id"] == trace["id"]}
    response = httpx.post(server.url + "/api/v2/runs/query", headers={"X-API-Key": KEY},
                          json={"project_ids": [project_id], "filter": 'gt(latency, 5)'})
    assert response.status_code == 400 and "gt" in response.json()["detail"]


def test_v1_list_runs_pages_with_cursors(server: LangSmithTestServer, project_id: str) -> None:
    client = _client(server)
    runs = list(client.list_runs(project_name="sample"))
    assert sorted(str(r.id) for r in runs) == sorted(r["id"] for r in SAMPLE.records)
    assert server.counts()["runs_query_v1"] == math.ceil(len(SAMPLE.records) / 100)
    roots = list(client.list_runs(project_id=project_id, is_root=True, select=["id", "name", "start_time"]))
    assert {str(r.id) for r in roots} == {r["id"] for r in ROOTS}
    response = httpx.post(server.url + "/runs/query", json={"is_root": True}, headers={"X-API-Key": KEY})
    assert response.status_code == 400  # no session, trace, id, parent_run or reference_example


def test_feedback_with_a_repeated_id_is_a_conflict(server: LangSmithTestServer, project_id: str) -> None:
    client = _client(server)
    feedback_id = uuid.uuid5(uuid.NAMESPACE_URL, "feedback/1")
    args = dict(run_id=ROOTS[0]["id"], key="triage", score=0.5, comment="why", feedback_id=feedback_id,
                feedback_source_type="model", session_id=project_id, extra={"culprit": "rerank"})
    client.create_feedback(**args)
    with pytest.raises(ls_utils.LangSmithConflictError):
        client.create_feedback(**args)
    assert [(f["id"], f["key"], f["score"]) for f in server.feedback] == [(str(feedback_id), "triage", 0.5)]
    assert [f.key for f in client.list_feedback(run_ids=[ROOTS[0]["id"]])] == ["triage"]


def test_annotation_queue_records_every_add(server: LangSmithTestServer, project_id: str) -> None:
    client = _client(server)
    queue = client.create_annotation_queue(name="triage-review", description="spans to check")
    assert [q.id for q in client.list_annotation_queues(name="triage-review")] == [queue.id]
    keys = [{"run_id": r["id"], "session_id": project_id, "start_time": r["start_time"]} for r in ROOTS[:2]]
    client.add_runs_to_annotation_queue(queue.id, runs=keys)
    client.add_runs_to_annotation_queue(queue.id, run_ids=[ROOTS[0]["id"]])  # the same run again
    assert server.queue_adds == [(str(queue.id), ROOTS[0]["id"]), (str(queue.id), ROOTS[1]["id"]),
                                 (str(queue.id), ROOTS[0]["id"])]
    assert len(server.queue_runs[str(queue.id)]) == 2
    with pytest.raises(ls_utils.LangSmithNotFoundError):
        client.add_runs_to_annotation_queue(queue.id, run_ids=[str(uuid.uuid4())])


@pytest.mark.parametrize("server", [{}, {"instance_flags": {"dataset_examples_multipart_enabled": True}}],
                         indirect=True, ids=["bulk", "multipart"])
def test_dataset_examples_with_ids_and_source_runs(server: LangSmithTestServer) -> None:
    client = _client(server)
    dataset = client.create_dataset("triage-cases", description="hard cases")
    examples = [{"id": str(uuid.uuid5(uuid.NAMESPACE_URL, r["id"])), "inputs": r["inputs"],
                 "outputs": {"culprit": "rerank"}, "source_run_id": r["id"]} for r in ROOTS[:3]]
    client.create_examples(dataset_id=dataset.id, examples=examples)
    assert {e["id"]: e["source_run_id"] for e in server.examples.values()} == {
        e["id"]: e["source_run_id"] for e in examples}
    assert all(e["outputs"] == {"culprit": "rerank"} for e in server.examples.values())
    with pytest.raises(ls_utils.LangSmithConflictError):  # POST creates; a repeated id is a conflict
        client.create_examples(dataset_id=dataset.id, examples=examples[:1])
    assert len(server.examples) == 3
    assert client.read_dataset(dataset_name="triage-cases").id == dataset.id
    kind = "examples_multipart" if server.instance_flags.get("dataset_examples_multipart_enabled") else "examples_bulk"
    assert server.counts(status=201 if kind == "examples_multipart" else 200)[kind] == 1


@pytest.mark.parametrize("server", [{"fault_rate": 0.3, "seed": 0, "time_factor": 0.1}], indirect=True)
def test_sdk_retries_ride_out_faults(server: LangSmithTestServer, project_id: str) -> None:
    # No tracing thread: in langsmith 0.15.1 it starts before the retrying HTTP adapter is mounted and may
    # fetch /info without retries (a dropped connection then leaves `client.info` empty for good), and its
    # concurrent requests would make the seeded fault sequence depend on thread timing.
    client = _client(server, auto_batch_tracing=False)
    assert str(client.read_project(project_name="sample").id) == project_id
    assert len(list(client.list_runs(project_id=project_id))) == len(SAMPLE.records)
    api = client._get_langsmith_api_sync()
    assert len(list(api.runs.query_v2(project_ids=[project_id], page_size=100, **WINDOW))) == len(SAMPLE.records)
    for i in range(3):  # writes: a fault happens before any side effect, so a retry is safe
        client.create_feedback(run_id=ROOTS[i]["id"], key="k", score=1, session_id=project_id,
                               feedback_id=uuid.uuid5(uuid.NAMESPACE_URL, f"fb/{i}"))
    assert len(server.feedback) == 3
    faults = {r.fault for r in server.requests if r.fault}
    assert len(faults) >= 3, faults  # several kinds happened, and the SDK recovered from each


@pytest.mark.parametrize("server", [{"rate_limits": True, "time_factor": 0.1}], indirect=True)
def test_run_queries_are_rate_limited(server: LangSmithTestServer, project_id: str) -> None:
    body = {"session": [project_id], "limit": 1, "select": ["id"]}
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}) as http:
        codes = [http.post("/runs/query", json=body) for _ in range(20)]
        assert [r.status_code for r in codes] == [200] * 15 + [429] * 5  # 15 per (scaled) 10 s window
        assert all(int(r.headers["Retry-After"]) >= 1 for r in codes[15:])
        assert http.post("/api/v2/runs/query", json={"project_ids": [project_id]}).status_code == 429  # shared
        assert http.get("/info").status_code == 200  # other routes have their own budget
        time.sleep(1.05)  # the 1 s window (10 s x 0.1) has slid past
        assert http.post("/runs/query", json=body).status_code == 200
    assert server.counts(status=429)["runs_query_v1"] == 5


def test_spec_violations_are_rejected_and_recorded(server: LangSmithTestServer, project_id: str) -> None:
    response = httpx.post(server.url + "/api/v2/runs/query", headers={"X-API-Key": KEY},
                          json={"project_ids": [project_id], "page_size": 5000, "selects": ["id"]})
    assert response.status_code == 422
    assert [v["direction"] for v in server.violations] == ["request"]
    assert "page_size" in server.violations[0]["message"] or "selects" in server.violations[0]["message"]
    # A response that breaks the spec is recorded too: here a run record with a bad token count.
    bad = {**SAMPLE.records[0], "id": str(uuid.uuid4()), "total_tokens": "many"}
    bad["dotted_order"] = bad["dotted_order"][:22] + bad["id"]
    bad["trace_id"] = bad["id"]
    server.add_project("broken", [bad])
    httpx.post(server.url + "/runs/query", headers={"X-API-Key": KEY}, json={"trace": bad["id"]})
    assert server.violations[-1]["direction"] == "response" and "total_tokens" in server.violations[-1]["message"]
    server.reset_log()


def test_without_the_answer_check_requests_are_still_checked_and_answers_not() -> None:
    """`check_answers=False` (a benchmark's LangSmith speed): the broken record goes out unremarked; a request
    that breaks the spec is still refused and recorded."""
    bad = {**SAMPLE.records[0], "id": str(uuid.uuid4()), "total_tokens": "many"}
    bad["dotted_order"], bad["trace_id"] = bad["dotted_order"][:22] + bad["id"], bad["id"]
    with LangSmithTestServer(api_key=KEY, check_answers=False) as server:
        server.add_project("broken", [bad])
        assert httpx.post(server.url + "/runs/query", headers={"X-API-Key": KEY},
                          json={"trace": bad["id"]}).json()["runs"][0]["total_tokens"] == "many"
        assert server.violations == []
        assert httpx.post(server.url + "/api/v2/runs/query", headers={"X-API-Key": KEY},
                          json={"project_ids": ["x"], "page_size": 5000}).status_code == 422
        assert [v["direction"] for v in server.violations] == ["request"]


def test_the_spec_copy_in_tests_data_is_the_shared_one():
    from tests.langsmith_server import SHARED_SPEC, SPEC_COPY

    copy = SPEC_COPY
    if not SHARED_SPEC.exists():
        pytest.skip("no ../shared here: the copy is what the server validates against")
    assert copy.read_bytes() == SHARED_SPEC.read_bytes()
