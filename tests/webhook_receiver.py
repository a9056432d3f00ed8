"""A webhook receiver on 127.0.0.1 for tests: it checks every signature, as the README shows a receiver doing,
and records every request."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = "whsec-canary-3f9a1c"  # must never be written anywhere but the signature


def verify(secret: str, headers, body: bytes, tolerance: int = 300) -> bool:
    """The README's receiver check: recompute the HMAC over '<timestamp>.<body>' and compare in constant time."""
    timestamp = headers["X-Tracetriage-Timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance:  # refuse replays of old requests
        return False
    expected = "v1=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers["X-Tracetriage-Signature"])


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers with the scripted statuses, then 200."""

    def __init__(self, statuses: list[int] | None = None):
        self.statuses = list(statuses or [])
        self.requests: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                receiver.requests.append({"status": status, "key": self.headers["Idempotency-Key"],
                                          "signed": verify(SECRET, self.headers, body), "body": json.loads(body)})
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/triage"

    def __enter__(self) -> Receiver:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def delivered(self) -> list[str]:
        return [run["action_id"] for r in self.requests if r["status"] < 300 for run in r["body"]["runs"]]
