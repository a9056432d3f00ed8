"""A local stand-in for Slack on 127.0.0.1: incoming webhooks and the Web API's chat.postMessage.

It answers as Slack does (webhooks: `ok` as text; chat.postMessage: `{"ok": true, "channel", "ts"}`,
`invalid_auth` for a wrong token) and records every request. Scripted statuses come first: a 429 carries
`Retry-After`, as Slack's rate limiting does.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class SlackServer:
    def __init__(self, token: str = "xoxb-test", statuses: list[int] | None = None, retry_after: int = 1):
        self.token = token
        self.statuses = list(statuses or [])
        self.retry_after = retry_after
        self.requests: list[dict] = []
        slack = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = slack.statuses.pop(0) if slack.statuses else 200
                slack.requests.append({"path": self.path, "status": status, "at": time.monotonic(),
                                       "authorization": self.headers.get("Authorization"),
                                       "raw": raw, "body": json.loads(raw or b"{}")})
                if status == 429:
                    self._answer(429, b"rate_limited", {"Retry-After": str(slack.retry_after)})
                elif status != 200:
                    self._answer(status, b"server_error")
                elif self.path.startswith("/services/"):
                    self._answer(200, b"ok")
                elif self.path == "/api/chat.postMessage":
                    ok = self.headers.get("Authorization") == f"Bearer {slack.token}"
                    reply = {"ok": True, "channel": "C0TRIAGE", "ts": f"{time.time():.6f}"} if ok else \
                        {"ok": False, "error": "invalid_auth"}
                    self._answer(200, json.dumps(reply).encode(), {"Content-Type": "application/json"})
                else:
                    self._answer(404, b"no_service")

            def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.webhook_url = f"{self.url}/services/T000/B000/hook-secret-part"
        self.api_url = f"{self.url}/api/"

    def messages(self, path_prefix: str = "") -> list[dict]:
        """The bodies Slack accepted (answered 200), optionally only those to one endpoint."""
        return [r["body"] for r in self.requests if r["status"] == 200 and r["path"].startswith(path_prefix)]

    def __enter__(self) -> SlackServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
