"""A LangSmith-compatible HTTP server for tests: the unmodified `langsmith` SDK talks to it over loopback HTTP.

    with LangSmithTestServer(api_key="k", fault_rate=0.2, rate_limits=True, time_factor=0.1) as server:
        project_id = server.add_project("sample", generate_traces(50).records)
        client = langsmith.Client(api_url=server.url, api_key="k")

It serves the endpoints the pipeline uses (v1 and v2 run queries with cursors, feedback with its
per-run `feedback_stats` select, annotation queues, datasets/examples listed by ids, experiments (projects
with a `reference_dataset_id`), `/info`), under the bare paths the classic `Client` uses, the `/api/v1`
paths of the spec, and `/api/v2` or `/v2` for the generated v2 client. Every JSON request and response
body is validated against the official OpenAPI spec; what fails lands in `server.violations`.
It can also add latency, inject 429/5xx/dropped connections (before any side effect, so a retrying
client ends in the same state) and enforce the LangSmith Cloud rate limits per API key.

Spec/SDK mismatches this server accommodates:
- v2 `query.RunResponse` declares `error`, `outputs`, `end_time`... as plain (non-nullable) types, so
  null values are left out of v2 items, as LangSmith's Go service does (`omitempty`).
- v1 `RunSchema` marks `name`, `run_type`, `status`, `trace_id`, ... as required while a `select`
  may leave them out, and the SDK's `schemas.Run` needs `start_time`: those fields are always returned.
- The multipart examples upload (`/v1/platform/datasets/{id}/examples`) documents its parts with
  `{example_id}` placeholders, which JSON Schema cannot check: the parts are checked by hand.
- `Retry-After` is always a whole number of seconds (>= 1): the SDK's urllib3 retry rejects fractions.
- `/runs/multipart` takes only `feedback.<id>` parts (each checked against `FeedbackCreateSchema`, with the
  `trace_id`, `Content-Type` and `Content-Length` the spec asks for); it answers 202 before "ingesting", as
  LangSmith does: a part whose run is unknown is dropped without telling the client (`server.ingest_dropped`),
  and a feedback id already held is kept once (ingestion upserts by id).
- Not served (so a 404 here): the v2 annotation-queue items API, which the spec does not describe.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import json
import math
import random
import re
import threading
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import policy
from email.parser import BytesParser
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import jsonschema_rs

# The official spec lives in ../shared beside the project; a byte-identical copy in tests/data keeps a clone
# elsewhere testable (tests/test_langsmith_server.py checks the two agree whenever ../shared is there).
SHARED_SPEC = Path(__file__).resolve().parents[2] / "shared" / "langsmith-openapi.json"
SPEC_COPY = Path(__file__).resolve().parent / "data" / "langsmith-openapi.json"
SPEC_PATH = SHARED_SPEC if SHARED_SPEC.exists() else SPEC_COPY
TENANT_ID = "00000000-0000-4000-8000-000000007e57"
_NAMESPACE = uuid.UUID("0b6f1f0e-5d2a-4a8e-9a57-7e57e57e5700")

FAULT_KINDS = ("429", "500", "502", "503", "drop")
# LangSmith Cloud limits per API key: (requests, window seconds).
RATE_LIMITS = {"runs_query": (15, 10.0), "run_read": (30, 60.0), "feedback": (2000, 10.0), "other": (1000, 10.0)}
# The v1 fields returned whatever `select` says: required by `RunSchema`, or by the SDK's `schemas.Run`.
_V1_ALWAYS = {"id", "name", "run_type", "start_time", "trace_id", "dotted_order", "status", "session_id", "app_path"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class FilterError(ValueError):
    """A filter outside the supported subset of the LangSmith filter language."""


# ---------------------------------------------------------------------------------------------- spec


class OpenAPISpec:
    """The spec, with one compiled validator per schema location, built on first use (the spec is ~1 MB).

    Validators are jsonschema-rs (JSON Schema 2020-12, formats checked): a page of 1,000 runs checks in about
    0.4 ms, where the pure-Python `jsonschema` took 130 ms, which made the stand-in's own check most of a
    page's time in the benchmarks.
    """

    def __init__(self, path: Path):
        self.doc: dict[str, Any] = json.loads(Path(path).read_text())
        self._validators: dict[str, Any] = {}
        self._lock = threading.Lock()

    def schema(self, name: str) -> dict[str, Any]:
        return self.doc["components"]["schemas"][name]

    def pointer(self, *parts: str) -> str | None:
        """The JSON pointer to `parts` under `paths`, or None when the spec has nothing there."""
        node: Any = self.doc["paths"]
        for part in parts:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                return None
        return "/paths/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)

    def check(self, pointer: str, instance: Any) -> str | None:
        """None if `instance` matches the schema at `pointer`, else a short message."""
        with self._lock:
            validator = self._validators.get(pointer)
            if validator is None:
                # The whole document with a $ref to the location, so its `#/components/...` refs resolve (the
                # document's own keys are not schema keywords and are ignored).
                root = {**self.doc, "$schema": "https://json-schema.org/draft/2020-12/schema",
                        "$ref": "#" + quote(pointer, safe="/~")}
                validator = jsonschema_rs.validator_for(root, validate_formats=True)
                self._validators[pointer] = validator
        error = next(validator.iter_errors(instance), None)
        if error is None:
            return None
        where = "/".join(str(p) for p in error.instance_path) or "(root)"
        return f"{where}: {error.message}"[:600]


@lru_cache(maxsize=4)
def load_spec(path: str = str(SPEC_PATH)) -> OpenAPISpec:
    """Shared by every server in the process, so validators are compiled once per test session."""
    return OpenAPISpec(Path(path))


# ------------------------------------------------------------------------------------------ filters

_TOKEN = re.compile(r"""\s*(?:("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|([A-Za-z_][A-Za-z0-9_]*)|([(),])|(-?[0-9.]+))""")
FILTER_FIELDS = ("name", "run_type", "status")


def parse_filter(text: str) -> Callable[[dict[str, Any]], bool]:
    """`eq`/`neq` over name, run_type, status, combined with `and`/`or`: a predicate on a v1 record."""
    tokens: list[tuple[str, str]] = []
    pos, text = 0, text.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise FilterError(f"cannot parse filter at {text[pos:pos + 20]!r}")
        quoted, name, punct, number = match.groups()
        tokens.append(("str", quoted[1:-1].replace('\\"', '"').replace("\\'", "'")) if quoted
                      else ("name", name) if name else ("punct", punct) if punct else ("number", number))
        pos = match.end()

    def take(kind: str, value: str | None = None) -> str:
        if not tokens or tokens[0][0] != kind or (value is not None and tokens[0][1] != value):
            raise FilterError(f"expected {value or kind} in filter {text!r}")
        return tokens.pop(0)[1]

    def expr() -> Callable[[dict[str, Any]], bool]:
        func = take("name")
        take("punct", "(")
        if func in ("and", "or"):
            parts = [expr()]
            while tokens and tokens[0] == ("punct", ","):
                take("punct")
                parts.append(expr())
            take("punct", ")")
            combine = all if func == "and" else any
            return lambda run: combine(p(run) for p in parts)
        if func in ("eq", "neq"):
            name = take("name")
            if name not in FILTER_FIELDS:
                raise FilterError(f"unsupported filter field {name!r} (supported: {', '.join(FILTER_FIELDS)})")
            take("punct", ",")
            value = take("str")
            take("punct", ")")
            # Enum fields are matched case-insensitively: v1 stores `llm`, v2 shows `LLM`.
            fold = (lambda v: str(v).lower()) if name != "name" else (lambda v: v)
            if func == "eq":
                return lambda run: fold(run.get(name)) == fold(value)
            return lambda run: fold(run.get(name)) != fold(value)
        raise FilterError(f"unsupported filter function {func!r} (supported: eq, neq, and, or)")

    predicate = expr()
    if tokens:
        raise FilterError(f"unexpected trailing input in filter {text!r}")
    return predicate


# --------------------------------------------------------------------------------------------- store


def _parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class _Run:
    v1: dict[str, Any]  # the v1 record (RunSchema shape) with session_id and parent_run_ids filled in
    v2: dict[str, Any]  # every `query.RunResponse` property we can derive, nulls left out
    key: tuple[datetime, str]  # (start_time, id): the stable sort key and cursor position

    @property
    def id(self) -> str:
        return self.v1["id"]


@dataclass
class _Project:
    id: str
    name: str
    created: datetime
    runs: list[_Run] = field(default_factory=list)  # sorted by key
    traces: dict[str, list[_Run]] = field(default_factory=lambda: defaultdict(list))
    reference_dataset_id: str | None = None  # set for an evaluate() experiment


@dataclass
class RequestRecord:
    method: str
    path: str
    kind: str  # route kind, e.g. "runs_query_v2"; "unknown" when no route matched
    status: int | None  # None: the connection was dropped
    time: float
    fault: str | None = None
    sort_order: str | None = None  # a run query's, when it asked for one


@dataclass
class _Request:
    route: _Route
    params: dict[str, str]
    query: dict[str, list[str]]
    body: Any
    raw: bytes
    content_type: str


@dataclass(frozen=True)
class _Route:
    method: str
    template: str  # the path as the spec spells it
    kind: str
    bucket: str = "other"

    @property
    def family(self) -> str:
        return "v2" if self.template.startswith("/v2/") else "platform" if self.template.startswith("/v1/") else "v1"

    @property
    def regex(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(self.template)) + "$")


ROUTES = [
    _Route("GET", "/api/v1/info", "info"),
    _Route("GET", "/api/v1/sessions", "sessions_list"),
    _Route("GET", "/api/v1/sessions/{session_id}", "session_read"),
    _Route("POST", "/api/v1/runs/query", "runs_query_v1", "runs_query"),
    _Route("GET", "/api/v1/runs/{run_id}", "run_read", "run_read"),
    _Route("POST", "/v2/runs/query", "runs_query_v2", "runs_query"),
    _Route("GET", "/v2/traces/{trace_id}/runs", "trace_runs_v2"),
    _Route("POST", "/api/v1/feedback", "feedback_create", "feedback"),
    _Route("GET", "/api/v1/feedback", "feedback_list"),
    _Route("POST", "/api/v1/annotation-queues", "queue_create"),
    _Route("GET", "/api/v1/annotation-queues", "queue_list"),
    _Route("GET", "/api/v1/annotation-queues/{queue_id}", "queue_read"),
    _Route("POST", "/api/v1/annotation-queues/{queue_id}/runs", "queue_add_runs"),
    _Route("POST", "/api/v1/annotation-queues/{queue_id}/runs/by-key", "queue_add_runs_by_key"),
    _Route("GET", "/api/v1/annotation-queues/{queue_id}/runs", "queue_list_runs"),
    _Route("POST", "/api/v1/datasets", "dataset_create"),
    _Route("GET", "/api/v1/datasets", "dataset_list"),
    _Route("GET", "/api/v1/datasets/{dataset_id}", "dataset_read"),
    _Route("POST", "/api/v1/examples/bulk", "examples_bulk"),
    _Route("GET", "/api/v1/examples", "examples_list"),
    _Route("POST", "/v1/platform/datasets/{dataset_id}/examples", "examples_multipart"),
]
# Multipart ingest (feedback parts), spelled as the spec does: at the API root, not under /api/v1.
INGEST_PATHS = ("/runs/multipart",)
ROUTES.append(_Route("POST", "/runs/multipart", "runs_multipart"))
_COMPILED = [(route, route.regex) for route in ROUTES]


def _spec_path(path: str) -> str:
    """Map what a client sends to the spec's path: `/info` and `/api/info` -> `/api/v1/info`, `/api/v2/x` -> `/v2/x`."""
    path = path.rstrip("/") or "/"
    if path.startswith("/api/"):
        path = path[4:]
    if path in INGEST_PATHS:
        return path
    if path.startswith(("/v2/", "/v1/platform/", "/api/v1/")):
        return path
    if path.startswith("/v1/"):
        return "/api" + path
    return "/api/v1" + path


def _encode_cursor(key: tuple[datetime, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps([key[0].isoformat(), key[1]]).encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        start, run_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(start), str(run_id)
    except (ValueError, TypeError) as error:
        raise ApiError(400, f"invalid cursor {cursor[:40]!r}") from error


# -------------------------------------------------------------------------------------------- server


class LangSmithTestServer:
    """A LangSmith stand-in on 127.0.0.1: state, fault injection, rate limits and spec checks.

    Options:
        api_key: the only key accepted in `X-API-Key` (else 401).
        v2: serve `/v2/...` (else 404) and advertise both query backends in `/info` (else ClickHouse only).
        v1: serve the v1 run query (else 404 there, and `/info` says SmithDB only).
        version, instance_flags: what `/info` says (flags are merged over the ones v1/v2 imply).
        latency: seconds added to every request.
        fault_rate, fault_kinds, seed: that share of requests fails with one of `fault_kinds`
            ("429", "500", "502", "503", "drop"), drawn from a `random.Random` per route seeded from `seed` (so
            which of a route's requests fail does not hang on how other routes' requests interleave with them),
            before any side effect.
        rate_limits: enforce `RATE_LIMITS` per API key (sliding windows).
        time_factor: scales rate-limit windows and Retry-After values, so tests stay fast.
        check_answers: check each answer against the spec too (requests always are). The check is this
            server's own cost, most of its time on a page of runs (~0.2 s per 1,000); a benchmark that wants
            LangSmith's speed rather than this stand-in's may turn it off.
    """

    def __init__(
        self,
        api_key: str = "test-api-key",
        *,
        v2: bool = True,
        v1: bool = True,
        version: str = "0.16.20",
        instance_flags: dict[str, Any] | None = None,
        latency: float = 0.0,
        fault_rate: float = 0.0,
        fault_kinds: Sequence[str] = FAULT_KINDS,
        seed: int = 0,
        rate_limits: bool = False,
        time_factor: float = 1.0,
        spec_path: Path | str = SPEC_PATH,
        check_answers: bool = True,
    ):
        if not 0 <= fault_rate <= 1:
            raise ValueError(f"fault_rate must be in [0, 1], got {fault_rate}")
        unknown = set(fault_kinds) - set(FAULT_KINDS)
        if unknown or not fault_kinds:
            raise ValueError(f"fault_kinds must be a non-empty subset of {FAULT_KINDS}, got {list(fault_kinds)}")
        self.api_key, self.v1, self.v2, self.version = api_key, v1, v2, version
        self.instance_flags = {"ch_query_enabled": v1, "sdb_query_enabled": v2, **(instance_flags or {})}
        self.latency, self.fault_rate, self.fault_kinds = latency, fault_rate, tuple(fault_kinds)
        self.rate_limits, self.time_factor, self.check_answers = rate_limits, time_factor, check_answers
        self.spec = load_spec(str(spec_path))
        self._rngs: dict[str, random.Random] = {}
        self._seed = seed
        self._lock = threading.RLock()
        self._windows: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # State.
        self.projects: dict[str, _Project] = {}
        self.runs: dict[str, _Run] = {}
        self.feedback: list[dict[str, Any]] = []  # created feedback bodies, as sent (plus the id)
        self.queues: dict[str, dict[str, Any]] = {}
        self.queue_runs: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)  # queue -> run id -> entry
        self.datasets: dict[str, dict[str, Any]] = {}
        self.examples: dict[str, dict[str, Any]] = {}
        # Logs (cleared by reset_log).
        self.requests: list[RequestRecord] = []
        self.violations: list[dict[str, Any]] = []
        self.queue_adds: list[tuple[str, str]] = []  # every (queue_id, run_id) add, duplicates included
        self.ingest_parts: list[int] = []  # parts per accepted multipart ingest request
        # Route kind -> how many of its next requests are carried out, then answered by a dropped connection.
        self.lose_answers: Counter[str] = Counter()
        self.ingest_dropped: list[dict[str, Any]] = []  # feedback parts accepted, then dropped (unknown run)

    # ---- lifecycle

    @property
    def url(self) -> str:
        if self._http is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    def start(self) -> LangSmithTestServer:
        handler = type("Handler", (_Handler,), {"app": self})
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._http.daemon_threads = True
        # A short poll interval: shutdown() waits for it, and tests start and stop many servers.
        self._thread = threading.Thread(target=self._http.serve_forever, args=(0.05,), daemon=True,
                                        name="langsmith-test-server")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._thread.join(timeout=5)
            self._http = self._thread = None

    def __enter__(self) -> LangSmithTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- data and logs

    def add_project(self, name: str, records: Iterable[dict[str, Any]] = (), project_id: str | None = None,
                    reference_dataset_id: str | None = None) -> str:
        """Create project `name` (or add to it) with v1 run records; returns its id (uuid5 of the name by default).
        With `reference_dataset_id` it is an experiment on that dataset (its runs carry `reference_example_id`)."""
        with self._lock:
            project = next((p for p in self.projects.values() if p.name == name), None)
            if project is None:
                project_id = project_id or str(uuid.uuid5(_NAMESPACE, f"project/{name}"))
                project = self.projects[project_id] = _Project(project_id, name, datetime.now(UTC),
                                                               reference_dataset_id=reference_dataset_id)
            for record in records:
                run = self._make_run(record, project.id)
                self.runs[run.id] = run
                project.traces[run.v1["trace_id"]].append(run)
                project.runs.append(run)
            project.runs.sort(key=lambda r: r.key)
            return project.id

    def _make_run(self, record: dict[str, Any], project_id: str) -> _Run:
        v1 = {**record, "session_id": project_id}
        # Ancestors from the dotted order: each segment is a 22-character timestamp and the run id.
        lineage = [segment[22:] for segment in v1["dotted_order"].split(".")]
        v1.setdefault("parent_run_ids", lineage[:-1])
        v1.setdefault("app_path", f"/o/{TENANT_ID}/projects/p/{project_id}/r/{v1['id']}")
        start, end = _parse_time(v1["start_time"]), _parse_time(v1.get("end_time"))
        known = self.spec.schema("query.RunResponse")["properties"]
        v2 = {k: v for k, v in v1.items() if k in known and v is not None}
        v2.update(run_type=v1["run_type"].upper(), status=str(v1["status"]).upper(), project_id=project_id,
                  is_root=len(lineage) == 1, metadata=(v1.get("extra") or {}).get("metadata"))
        if end is not None:
            v2["latency_seconds"] = (end - start).total_seconds()
        for cost in ("total_cost", "prompt_cost", "completion_cost"):  # v1 sends decimals as strings
            if v1.get(cost) is not None:
                v2[cost] = float(v1[cost])
        return _Run(v1, {k: v for k, v in v2.items() if v is not None}, (start, v1["id"]))

    def reset_log(self) -> None:
        with self._lock:
            self.requests.clear()
            self.violations.clear()
            self.queue_adds.clear()
            self.ingest_parts.clear()

    def counts(self, status: int | None | str = "any") -> Counter[str]:
        """Requests per route kind (optionally only those that ended with `status`; None = dropped)."""
        with self._lock:
            return Counter(r.kind for r in self.requests if status == "any" or r.status == status)

    # ---- request pipeline

    def _serve(self, handler: _Handler) -> None:
        split = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        path = _spec_path(split.path)
        route: _Route | None = None
        params: dict[str, str] = {}
        for candidate, regex in _COMPILED:
            match = regex.match(path)
            if candidate.method == handler.command and match:
                route, params = candidate, match.groupdict()
                break
        record = RequestRecord(handler.command, split.path, route.kind if route else "unknown", None, time.time())
        if self.latency:
            time.sleep(self.latency)
        with self._lock:
            self.requests.append(record)
            kind = record.kind
            rng = self._rngs.setdefault(kind, random.Random(f"{self._seed}/{kind}"))
            fault = rng.choice(self.fault_kinds) if rng.random() < self.fault_rate else None
            record.fault = fault
            if fault == "drop":
                handler.close_connection = True  # close the socket without a response
                return
            if route is not None and route.kind == "runs_query_v2":
                with contextlib.suppress(ValueError, AttributeError):
                    record.sort_order = json.loads(raw).get("sort_order")
            status, payload, headers = self._respond(handler, route, params, parse_qs(split.query), raw, fault)
            record.status = status
            if route is not None and self.lose_answers[route.kind] > 0:  # done, but the client never hears
                self.lose_answers[route.kind] -= 1
                record.status, record.fault = None, "lost answer"
                handler.close_connection = True
                return
        body = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)

    def _respond(
        self, handler: _Handler, route: _Route | None, params: dict[str, str], query: dict[str, list[str]],
        raw: bytes, fault: str | None,
    ) -> tuple[int, Any, dict[str, str]]:
        family = route.family if route else "v1"
        try:
            if fault == "429":
                raise ApiError(429, "Too many requests (injected)", self._retry_after(10.0 * self.time_factor))
            if fault is not None:
                raise ApiError(int(fault), f"injected {fault}")
            if handler.headers.get("X-API-Key") != self.api_key:
                raise ApiError(401, "Invalid or missing API key (X-API-Key)")
            if route is None or (family == "v2" and not self.v2) or (route.kind == "runs_query_v1" and not self.v1):
                raise ApiError(404, "Not Found")
            self._check_rate(route)
            request = self._parse_request(route, params, query, raw, handler.headers.get("Content-Type") or "")
            status, payload = getattr(self, f"_h_{route.kind}")(request)
            headers: dict[str, str] = {}
        except ApiError as error:
            status, payload, headers = error.status, self._error_body(family, error), error.headers
        except Exception as error:  # a bug in this server: answer, and make the test fail on it
            self.violations.append({"direction": "server", "method": handler.command, "path": handler.path,
                                    "status": 500, "message": repr(error)})
            status, payload, headers = 500, self._error_body(family, ApiError(500, repr(error))), {}
        if route is not None and self.check_answers:
            self._check_response(route, status, payload)
        return status, payload, headers

    def _error_body(self, family: str, error: ApiError) -> dict[str, Any]:
        # Each backend's own error shape: FastAPI for v1, RFC 7807 problem details for the Go v2 service.
        if family == "v2":
            return {"type": "about:blank", "status": error.status, "detail": error.message}
        if family == "platform":
            return {"error": error.message}
        if error.status == 422:
            return {"detail": [{"loc": ["body"], "msg": error.message, "type": "value_error"}]}
        return {"detail": error.message}

    def _retry_after(self, seconds: float) -> dict[str, str]:
        # Whole seconds: urllib3 (the SDK's requests transport) raises on a fractional Retry-After.
        return {"Retry-After": str(max(1, math.ceil(seconds)))}

    def _check_rate(self, route: _Route) -> None:
        if not self.rate_limits:
            return
        limit, window = RATE_LIMITS[route.bucket]
        window *= self.time_factor
        now = time.monotonic()
        hits = self._windows[(self.api_key, route.bucket)]
        while hits and hits[0] <= now - window:
            hits.popleft()
        if len(hits) >= limit:
            raise ApiError(429, f"Rate limit exceeded: {limit} requests per {window:g} s",
                           self._retry_after(hits[0] + window - now))
        hits.append(now)

    def _violation(self, direction: str, route: _Route, status: int | None, message: str) -> None:
        self.violations.append({"direction": direction, "method": route.method, "path": route.template,
                                "status": status, "message": message})

    def _reject(self, route: _Route, message: str) -> ApiError:
        self._violation("request", route, 422, message)
        return ApiError(422, message)

    def _parse_request(
        self, route: _Route, params: dict[str, str], query: dict[str, list[str]], raw: bytes, content_type: str,
    ) -> _Request:
        method = route.method.lower()
        for index, spec_param in enumerate(self.spec.doc["paths"][route.template][method].get("parameters", [])):
            if spec_param["in"] == "path":
                pointer = self.spec.pointer(route.template, method, "parameters", str(index), "schema")
                problem = self.spec.check(pointer, params[spec_param["name"]])
                if problem:
                    raise self._reject(route, f"path parameter {spec_param['name']}: {problem}")
        body: Any = None
        if content_type.startswith("application/json") or (raw and not content_type.startswith("multipart/")):
            try:
                body = json.loads(raw) if raw else None
            except ValueError as error:
                raise self._reject(route, f"request body is not JSON: {error}") from error
        pointer = self.spec.pointer(route.template, method, "requestBody", "content", "application/json", "schema")
        if pointer is not None:
            if body is None:
                raise self._reject(route, "a JSON request body is required")
            problem = self.spec.check(pointer, body)
            if problem:
                raise self._reject(route, f"request body {problem}")
        return _Request(route, params, query, body, raw, content_type)

    def _check_response(self, route: _Route, status: int, payload: Any) -> None:
        method = route.method.lower()
        responses = self.spec.doc["paths"][route.template][method]["responses"]
        code = str(status) if str(status) in responses else "default" if "default" in responses else None
        if code is None:
            return  # the spec documents no body for this status (e.g. 401/404/409 on v1 operations)
        pointer = self.spec.pointer(route.template, method, "responses", code, "content", "application/json", "schema")
        problem = pointer and self.spec.check(pointer, payload)
        if problem:
            self._violation("response", route, status, f"response body {problem}")

    # ---- helpers for handlers

    def _project(self, project_id: str) -> _Project:
        if project_id not in self.projects:
            raise ApiError(404, f"session {project_id} not found")
        return self.projects[project_id]

    def _filters(self, body: dict[str, Any]) -> Callable[[_Run], bool]:
        """`filter` on the run, `trace_filter` on its trace's root, `tree_filter` on any run of its trace."""
        try:
            run_f, trace_f, tree_f = (parse_filter(body[k]) if body.get(k) else None
                                      for k in ("filter", "trace_filter", "tree_filter"))
        except FilterError as error:
            raise ApiError(400, str(error)) from error

        def keep(run: _Run) -> bool:
            if run_f and not run_f(run.v1):
                return False
            if trace_f or tree_f:
                trace = self.projects[run.v1["session_id"]].traces[run.v1["trace_id"]]
                if trace_f and not any(r.v2["is_root"] and trace_f(r.v1) for r in trace):
                    return False
                if tree_f and not any(tree_f(r.v1) for r in trace):
                    return False
            return True

        return keep

    @staticmethod
    def _unsupported(body: dict[str, Any], keys: Sequence[str]) -> None:
        used = [k for k in keys if body.get(k) not in (None, False, "", [])]
        if used:
            raise ApiError(400, f"not supported by the test server: {', '.join(used)}")

    @staticmethod
    def _page(runs: list[_Run], cursor: str | None, size: int, descending: bool) -> tuple[list[_Run], str | None]:
        """A page after `cursor` from `runs` (sorted ascending by key), and the next cursor if more remain."""
        keys = [r.key for r in runs]
        after = _decode_cursor(cursor) if cursor else None
        if descending:
            end = bisect.bisect_left(keys, after) if after else len(runs)
            page = runs[max(0, end - size):end][::-1]
            more = end - size > 0
        else:
            begin = bisect.bisect_right(keys, after) if after else 0
            page = runs[begin:begin + size]
            more = begin + size < len(runs)
        return page, (_encode_cursor(page[-1].key) if more and page else None)

    @staticmethod
    def _window(query: dict[str, list[str]]) -> tuple[int, int]:
        offset = int((query.get("offset") or ["0"])[0])
        return offset, offset + int((query.get("limit") or ["100"])[0])

    # ---- handlers: info and projects

    def _h_info(self, req: _Request) -> tuple[int, Any]:
        batch = self.spec.schema("InfoGetResponse")["properties"]["batch_ingest_config"]["default"]
        return 200, {"version": self.version, "instance_flags": self.instance_flags, "batch_ingest_config": batch,
                     "license_expiration_time": None, "customer_info": None, "git_sha": None}

    def _session_json(self, project: _Project) -> dict[str, Any]:
        # start_time is the earliest run: the SDK's v2 readers use it as `min_start_time`.
        start = project.runs[0].key[0] if project.runs else project.created
        last = _iso(project.runs[-1].key[0]) if project.runs else None
        return {"id": project.id, "name": project.name, "tenant_id": TENANT_ID, "start_time": _iso(start),
                "end_time": None, "reference_dataset_id": project.reference_dataset_id, "extra": None,
                "run_count": len(project.runs), "last_run_start_time": last}

    def _h_sessions_list(self, req: _Request) -> tuple[int, Any]:
        names, ids = req.query.get("name"), req.query.get("id")
        found = [p for p in self.projects.values() if (not names or p.name in names) and (not ids or p.id in ids)]
        begin, end = self._window(req.query)
        return 200, [self._session_json(p) for p in found[begin:end]]  # unknown name: [] (the SDK raises)

    def _h_session_read(self, req: _Request) -> tuple[int, Any]:
        return 200, self._session_json(self._project(req.params["session_id"]))

    # ---- handlers: runs

    def _h_runs_query_v1(self, req: _Request) -> tuple[int, Any]:
        body = req.body
        if not any(body.get(k) for k in ("session", "trace", "id", "parent_run", "reference_example")):
            raise ApiError(400, "At least one of 'session', 'id', 'parent_run', 'trace' or 'reference_example' "
                                "must be specified")
        self._unsupported(body, ("query", "search_filter", "data_source_type", "execution_order", "skip_pagination",
                                 "use_experimental_search"))
        projects = [self._project(s) for s in body.get("session") or []] or list(self.projects.values())
        start, end = _parse_time(body.get("start_time")), _parse_time(body.get("end_time"))
        ids, examples = set(body.get("id") or ()), set(body.get("reference_example") or ())
        keep = self._filters(body)
        runs = [
            r for p in projects for r in p.runs
            if (start is None or r.key[0] >= start) and (end is None or r.key[0] <= end)
            and (not ids or r.id in ids) and (not examples or r.v1.get("reference_example_id") in examples)
            and body.get("trace") in (None, r.v1["trace_id"])
            and body.get("parent_run") in (None, r.v1.get("parent_run_id"))
            and body.get("is_root") in (None, r.v2["is_root"])
            and body.get("run_type") in (None, r.v1["run_type"])
            and body.get("error") in (None, r.v1.get("error") is not None)
            and keep(r)
        ]
        runs.sort(key=lambda r: r.key)
        select = body.get("select") or self.spec.schema("BodyParamsForRunsQuerySchema")["properties"]["select"][
            "default"]
        fields = set(select) | _V1_ALWAYS
        page, cursor = self._page(runs, body.get("cursor"), body.get("limit", 100), body.get("order", "desc") == "desc")
        stats = "feedback_stats" in fields
        return 200, {"runs": [{**{k: v for k, v in r.v1.items() if k in fields},
                               **({"feedback_stats": self._feedback_stats(r.id)} if stats else {})} for r in page],
                     "cursors": {"next": cursor, "prev": None}}

    def _h_run_read(self, req: _Request) -> tuple[int, Any]:
        run = self.runs.get(req.params["run_id"])
        if run is None:
            raise ApiError(404, "Run not found")
        return 200, run.v1

    def _h_runs_query_v2(self, req: _Request) -> tuple[int, Any]:
        body = req.body
        self._unsupported(body, ("ai_query", "ai_search", "sem_filter", "reference_dataset_id", "reference_examples",
                                 "min_feedback_modified_at", "max_feedback_modified_at", "include_subtree_usage"))
        if not body.get("project_ids"):
            raise ApiError(400, "project_ids is required (or reference_dataset_id)")
        projects = [self._project(p) for p in body["project_ids"]]
        now = datetime.now(UTC)
        # Like LangSmith: an omitted min_start_time silently means the last 24 hours.
        start = _parse_time(body.get("min_start_time")) or now - timedelta(days=1)
        end = _parse_time(body.get("max_start_time")) or now
        ids, keep = set(body.get("ids") or ()), self._filters(body)
        runs = [
            r for p in projects for r in p.runs
            if start <= r.key[0] <= end and (not ids or r.id in ids)
            and body.get("trace_id") in (None, r.v1["trace_id"])
            and body.get("is_root") in (None, r.v2["is_root"])
            and body.get("run_type") in (None, r.v2["run_type"])
            and body.get("has_error") in (None, r.v1.get("error") is not None)
            and keep(r)
        ]
        runs.sort(key=lambda r: r.key)
        selects = [s.lower() for s in body.get("selects") or ["ID"]]
        page, cursor = self._page(runs, body.get("cursor"), body.get("page_size", 100),
                                  body.get("sort_order", "DESC") == "DESC")
        stats = "feedback_stats" in selects
        out: dict[str, Any] = {"items": [{**{k: r.v2[k] for k in selects if k in r.v2},
                                          **({"feedback_stats": self._feedback_stats(r.id)} if stats else {})}
                                         for r in page],
                               "has_more": cursor is not None}
        if cursor:
            out["next_cursor"] = cursor  # omitted on the last page, as the spec says
        return 200, out

    def _h_trace_runs_v2(self, req: _Request) -> tuple[int, Any]:
        missing = [k for k in ("project_id", "min_start_time", "max_start_time") if not req.query.get(k)]
        if missing:
            raise ApiError(400, f"missing required query parameters: {', '.join(missing)}")
        try:
            start, end = (_parse_time(req.query[k][0]) for k in ("min_start_time", "max_start_time"))
        except ValueError as error:
            raise ApiError(400, f"invalid time: {error}") from error
        project = self._project(req.query["project_id"][0])
        keep = self._filters({"filter": (req.query.get("filter") or [None])[0]})
        runs = sorted((r for r in project.traces.get(req.params["trace_id"], ()) if start <= r.key[0] <= end
                       and keep(r)), key=lambda r: r.key)
        selects = [s.lower() for s in req.query.get("selects") or ["ID"]]
        return 200, {"items": [{k: r.v2[k] for k in selects if k in r.v2} for r in runs]}

    # ---- handlers: feedback

    def _h_feedback_create(self, req: _Request) -> tuple[int, Any]:
        body = req.body
        feedback_id = body.get("id") or str(uuid.uuid4())
        if any(f["id"] == feedback_id for f in self.feedback):
            raise ApiError(409, f"Feedback {feedback_id} already exists")
        if body.get("run_id") and body["run_id"] not in self.runs:
            raise ApiError(404, f"Run {body['run_id']} not found")  # the SDK retries this: ingestion lag
        stored = {**body, "id": feedback_id}
        self.feedback.append(stored)
        return 200, self._feedback_json(stored)

    def _feedback_stats(self, run_id: str) -> dict[str, Any]:
        """Per feedback key on a run: count, mean score and a few comments (v2 `query.RunFeedbackStat`)."""
        by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for f in self.feedback:
            if f.get("run_id") == run_id:
                by_key[f["key"]].append(f)
        out = {}
        for key, items in by_key.items():
            scores = [f["score"] for f in items if isinstance(f.get("score"), int | float)]
            out[key] = {"n": len(items), "comments": [f["comment"] for f in items if f.get("comment")][:3],
                        **({"avg": sum(scores) / len(scores)} if scores else {})}
        return out

    def _feedback_json(self, stored: dict[str, Any]) -> dict[str, Any]:
        known = self.spec.schema("FeedbackSchema")["properties"]
        now = _iso(datetime.now(UTC))
        out = {"created_at": now, "modified_at": now, **{k: v for k, v in stored.items() if k in known}}
        run = self.runs.get(stored.get("run_id") or "")
        if run is not None:
            out.setdefault("session_id", run.v1["session_id"])
            out.setdefault("trace_id", run.v1["trace_id"])
            out["is_root"] = run.v2["is_root"]
        return out

    def _h_feedback_list(self, req: _Request) -> tuple[int, Any]:
        runs, keys, sessions = (set(req.query.get(k) or ()) for k in ("run", "key", "session"))
        found = [f for f in self.feedback if (not runs or f.get("run_id") in runs) and (not keys or f["key"] in keys)
                 and (not sessions or self._feedback_json(f).get("session_id") in sessions)]
        begin, end = self._window(req.query)
        return 200, [self._feedback_json(f) for f in found[begin:end]]

    # ---- handlers: annotation queues

    def _h_queue_create(self, req: _Request) -> tuple[int, Any]:
        body = req.body
        queue_id = body.get("id") or str(uuid.uuid4())
        if queue_id in self.queues:
            raise ApiError(409, f"Annotation queue {queue_id} already exists")
        now = _iso(datetime.now(UTC))
        queue = {"num_reviewers_per_item": 1, "enable_reservations": True, "reservation_minutes": 1, **body,
                 "id": queue_id, "tenant_id": TENANT_ID, "queue_type": "single", "created_at": now, "updated_at": now}
        self.queues[queue_id] = queue
        return 200, queue

    def _queue(self, queue_id: str) -> dict[str, Any]:
        if queue_id not in self.queues:
            raise ApiError(404, f"Annotation queue {queue_id} not found")
        return self.queues[queue_id]

    def _h_queue_list(self, req: _Request) -> tuple[int, Any]:
        names, ids = req.query.get("name"), req.query.get("ids")
        contains = (req.query.get("name_contains") or [""])[0]
        found = [q for q in self.queues.values()
                 if (not names or q["name"] in names) and (not ids or q["id"] in ids) and contains in q["name"]]
        begin, end = self._window(req.query)
        return 200, [{**q, "total_runs": len(self.queue_runs[q["id"]])} for q in found[begin:end]]

    def _h_queue_read(self, req: _Request) -> tuple[int, Any]:
        return 200, self._queue(req.params["queue_id"])

    def _add_to_queue(self, queue_id: str, items: list[tuple[str, str | None]]) -> tuple[int, Any]:
        """Add (run_id, session_id or None) pairs, all or none; every add is logged, the queue keeps one entry."""
        self._queue(queue_id)
        for run_id, session_id in items:
            run = self.runs.get(run_id)
            if run is None or session_id not in (None, run.v1["session_id"]):
                raise ApiError(404, f"Run {run_id} not found" + (f" in session {session_id}" if session_id else ""))
        entries = []
        for run_id, _ in items:
            self.queue_adds.append((queue_id, run_id))
            entry = self.queue_runs[queue_id].setdefault(run_id, {
                "id": str(uuid.uuid4()), "run_id": run_id, "queue_id": queue_id,
                "added_at": _iso(datetime.now(UTC)), "last_reviewed_time": None})
            entries.append(entry)
        return 200, entries

    def _h_queue_add_runs(self, req: _Request) -> tuple[int, Any]:
        return self._add_to_queue(req.params["queue_id"],
                                  [(i if isinstance(i, str) else i["run_id"], None) for i in req.body])

    def _h_queue_add_runs_by_key(self, req: _Request) -> tuple[int, Any]:
        return self._add_to_queue(req.params["queue_id"], [(i["run_id"], i["session_id"]) for i in req.body])

    def _h_queue_list_runs(self, req: _Request) -> tuple[int, Any]:
        entries = list(self.queue_runs[self._queue(req.params["queue_id"])["id"]].values())
        begin, end = self._window(req.query)
        return 200, [{**self.runs[e["run_id"]].v1, "queue_run_id": e["id"], "added_at": e["added_at"],
                      "last_reviewed_time": None} for e in entries[begin:end]]

    # ---- handlers: datasets and examples

    def _h_dataset_create(self, req: _Request) -> tuple[int, Any]:
        body = req.body
        if any(d["name"] == body["name"] for d in self.datasets.values()):
            raise ApiError(409, f"Dataset {body['name']} already exists")
        dataset_id = body.get("id") or str(uuid.uuid4())
        now = _iso(datetime.now(UTC))
        self.datasets[dataset_id] = {
            "data_type": "kv", **body, "id": dataset_id, "tenant_id": TENANT_ID, "created_at": now,
            "modified_at": now, "example_count": 0, "session_count": 0,
            "metadata": (body.get("extra") or {}).get("metadata")}
        return 200, self.datasets[dataset_id]

    def _h_dataset_list(self, req: _Request) -> tuple[int, Any]:
        names, ids = req.query.get("name"), req.query.get("id")
        contains = (req.query.get("name_contains") or [""])[0]
        found = [d for d in self.datasets.values()
                 if (not names or d["name"] in names) and (not ids or d["id"] in ids) and contains in d["name"]]
        begin, end = self._window(req.query)
        return 200, found[begin:end]

    def _h_dataset_read(self, req: _Request) -> tuple[int, Any]:
        if req.params["dataset_id"] not in self.datasets:
            raise ApiError(404, "Dataset not found")
        return 200, self.datasets[req.params["dataset_id"]]

    def _store_examples(self, dataset_id: str, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Insert, all or none. A repeated id is a 409: POST creates (updates are PATCH in the spec)."""
        if dataset_id not in self.datasets:
            raise ApiError(404, f"Dataset {dataset_id} not found")
        ids = [e.get("id") or str(uuid.uuid4()) for e in examples]
        repeated = [i for i in ids if i in self.examples or ids.count(i) > 1]
        if repeated:
            raise ApiError(409, f"Examples already exist: {', '.join(sorted(set(repeated)))}")
        now = _iso(datetime.now(UTC))
        stored = []
        for example_id, example in zip(ids, examples, strict=True):
            metadata = dict(example.get("metadata") or {})
            if example.get("split"):  # LangSmith keeps splits in the metadata
                split = example["split"]
                metadata["dataset_split"] = [split] if isinstance(split, str) else split
            self.examples[example_id] = {
                "id": example_id, "dataset_id": dataset_id, "name": f"#{example_id[:4]}",
                "inputs": example.get("inputs") or {}, "outputs": example.get("outputs"),
                "metadata": metadata or None, "source_run_id": example.get("source_run_id"),
                "created_at": example.get("created_at") or now, "modified_at": now}
            stored.append(self.examples[example_id])
        self.datasets[dataset_id]["example_count"] += len(stored)
        return stored

    def _h_examples_bulk(self, req: _Request) -> tuple[int, Any]:
        by_dataset: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for example in req.body:
            by_dataset[example["dataset_id"]].append(example)
        for dataset_id in by_dataset:  # check every dataset first: a failed request writes nothing
            if dataset_id not in self.datasets:
                raise ApiError(404, f"Dataset {dataset_id} not found")
        return 200, [e for dataset_id, batch in by_dataset.items() for e in self._store_examples(dataset_id, batch)]

    def _h_examples_list(self, req: _Request) -> tuple[int, Any]:
        datasets, ids = req.query.get("dataset"), req.query.get("id")
        found = [e for e in self.examples.values()
                 if (not datasets or e["dataset_id"] in datasets) and (not ids or e["id"] in ids)]
        begin, end = self._window(req.query)
        return 200, found[begin:end]

    def _h_examples_multipart(self, req: _Request) -> tuple[int, Any]:
        if not req.content_type.startswith("multipart/form-data"):
            raise self._reject(req.route, f"expected multipart/form-data, got {req.content_type!r}")
        message = BytesParser(policy=policy.HTTP).parsebytes(
            b"Content-Type: " + req.content_type.encode() + b"\r\n\r\n" + req.raw)
        parts = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                 for part in message.iter_parts()}
        examples = []
        for name in (n for n in parts if "." not in n):
            if f"{name}.inputs" not in parts:  # required by the spec, as placeholder part names
                raise self._reject(req.route, f"part {name}.inputs is required")
            example = {**json.loads(parts[name]), "id": name, "inputs": json.loads(parts[f"{name}.inputs"])}
            if f"{name}.outputs" in parts:
                example["outputs"] = json.loads(parts[f"{name}.outputs"])
            examples.append(example)
        stored = self._store_examples(req.params["dataset_id"], examples)
        return 201, {"example_ids": [e["id"] for e in stored], "count": len(stored), "as_of": _iso(datetime.now(UTC))}


    # ---- handlers: multipart ingest (feedback parts)

    def _h_runs_multipart(self, req: _Request) -> tuple[int, Any]:
        if not req.content_type.startswith("multipart/form-data"):
            raise self._reject(req.route, f"expected multipart/form-data, got {req.content_type!r}")
        message = BytesParser(policy=policy.HTTP).parsebytes(
            b"Content-Type: " + req.content_type.encode() + b"\r\n\r\n" + req.raw)
        bodies = []
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition") or ""
            event, _, part_id = name.partition(".")
            if event != "feedback":
                raise ApiError(422, f"part {name!r}: only feedback parts are served here")
            if part.get_content_type() != "application/json" or part["Content-Length"] is None:
                raise self._reject(req.route, f"part {name!r} needs Content-Type: application/json and "
                                              "Content-Length")
            body = json.loads(part.get_payload(decode=True))
            problem = self.spec.check("/components/schemas/FeedbackCreateSchema", body)
            if problem or not body.get("trace_id") or body.get("id") != part_id:
                raise self._reject(req.route, f"part {name!r}: {problem or 'needs trace_id and the id of its name'}")
            bodies.append(body)
        held = {f["id"] for f in self.feedback}
        for body in bodies:  # accepted now, ingested "later": nothing below reaches the client
            if body.get("run_id") not in self.runs:
                self.ingest_dropped.append(body)
            elif body["id"] not in held:
                self.feedback.append(body)
                held.add(body["id"])
        self.ingest_parts.append(len(bodies))
        return 202, {}


class _Handler(BaseHTTPRequestHandler):
    app: LangSmithTestServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's pooled sessions expect

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.app._serve(self)

    do_POST = do_PATCH = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass
