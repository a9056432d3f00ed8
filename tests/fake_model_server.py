"""A stand-in for an OpenAI-compatible chat-completions API on 127.0.0.1, for LLM-as-judge tests and benches.

`POST /v1/chat/completions` answers with a JSON message `{"reasoning": ..., "score": true}` (the structured
output openevals asks for), after `latency` seconds. It enforces a provider's limit as providers do: more
than `requests_per_minute` requests in any 60 s gives 429 with `Retry-After` and OpenAI's error body.
`fail_first` answers the first N requests with 429 whatever the rate.

    with FakeModelServer(requests_per_minute=600) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="test")
"""

from __future__ import annotations

import collections
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeModelServer:
    def __init__(self, requests_per_minute: int | None = None, latency: float = 0.0, fail_first: int = 0,
                 window: float = 60.0):
        self.limit, self.latency, self.fail_first, self.window = requests_per_minute, latency, fail_first, window
        self.answered: list[float] = []  # arrival time (time.time()) of each request answered 200
        self.rejected = 0
        self.prompts: list[str] = []
        self.in_flight = self.most_in_flight = 0
        self._recent: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def requests(self) -> int:
        """Requests answered with a completion (what a provider bills)."""
        return len(self.answered)

    def achieved_rpm(self) -> float:
        """Completions per minute from the first to the last answered request."""
        if len(self.answered) < 2:
            return 0.0
        return (len(self.answered) - 1) / (self.answered[-1] - self.answered[0]) * 60

    def max_in_any_window(self) -> int:
        """The most completions answered within any `window` seconds (what the limit bounds)."""
        times, most, start = sorted(self.answered), 0, 0
        for end, moment in enumerate(times):
            while moment - times[start] >= self.window:
                start += 1
            most = max(most, end - start + 1)
        return most

    def _admit(self) -> float | None:
        """None if the request may be answered (and count it); else the Retry-After seconds."""
        with self._lock:
            now = time.monotonic()
            if self.fail_first > 0:
                self.fail_first -= 1
                self.rejected += 1
                return 0.0
            if self.limit is not None:
                while self._recent and now - self._recent[0] >= self.window:
                    self._recent.popleft()
                if len(self._recent) >= self.limit:
                    self.rejected += 1
                    return self._recent[0] + self.window - now
                self._recent.append(now)
            self.answered.append(time.time())
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return None

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 - the http.server hook's name
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not self.path.endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                wait = server._admit()
                if wait is not None:
                    self._send(429, {"error": {"message": "Rate limit reached for requests", "type": "requests",
                                               "code": "rate_limit_exceeded"}},
                               {"Retry-After": str(max(math.ceil(wait * 1000) / 1000, 0.0))})
                    return
                try:
                    with server._lock:
                        server.prompts.append(json.dumps(request.get("messages", [])))
                    time.sleep(server.latency)
                    content = json.dumps({"reasoning": "The answer addresses the question.", "score": True})
                    self._send(200, {
                        "id": f"chatcmpl-{len(server.answered)}", "object": "chat.completion",
                        "created": int(time.time()), "model": request.get("model", "fake"),
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": content}}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
                    })
                finally:
                    with server._lock:
                        server.in_flight -= 1

        return Handler

    def __enter__(self) -> FakeModelServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
