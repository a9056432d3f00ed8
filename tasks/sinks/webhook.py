"""Signed webhooks: failing runs POSTed to a team's own service, each batch exactly once.

A request carries a versioned JSON body, `X-Tracetriage-Timestamp` (Unix seconds),
`X-Tracetriage-Signature: v1=<hex>` (HMAC-SHA256 with the shared secret over
`<timestamp>.<body>`) and `Idempotency-Key` (the same on every retry of the batch;
each run in the body carries its action id too). Timeouts, connection errors and 5xx
are retried with backoff; a 4xx is not (the receiver said no).
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import orjson

from tasks.config import check_url
from tasks.contracts import Action, Outcome, SendContext, error_text

PAYLOAD_VERSION = 1
BATCH = 100
ATTEMPTS = 5
TIMEOUT = 10.0

def signature(secret: str, timestamp: str, body: bytes) -> str:
    """`v1=` and the hex HMAC-SHA256 of `<timestamp>.<body>`: what a receiver recomputes to trust a request."""
    return "v1=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def idempotency_key(records: list[dict[str, Any]]) -> str:
    """One send's key, from the ids of the actions it carries: the same on every retry and rerun of that send."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "tracetriage/webhook/" + ",".join(r["action_id"] for r in records)))


def webhook_payload(records: list[dict[str, Any]], action: str, loop: str, window_start: str) -> dict[str, Any]:
    """The body of one batch: the window, and each failing run with its score and culprit span; for the rules
    about a window (`when: spike` / `pattern`), `events` instead: the spike, its recovery, or the failure mode."""
    keys = ("action_id", "trace_id", "run_id", "evaluator", "score", "verdict", "culprit_run_id", "culprit_span",
            "culprit_reason")
    event_keys = ("action_id", "event", "spike", "episode", "pattern", "bound")
    return {"version": PAYLOAD_VERSION, "loop": loop, "action": action, "window_start": window_start,
            "runs": [{k: r.get(k) for k in keys} for r in records if r["trace_id"] is not None],
            "events": [{k: r[k] for k in event_keys if k in r} for r in records if r["trace_id"] is None]}


def send_webhooks(
    url: str, secret: str, records: list[dict[str, Any]], action: str, loop: str,
    post: Callable[..., httpx.Response] | None = None, batch: int = BATCH, sleep: Callable[[float], None] = time.sleep,
) -> list[Outcome]:
    """POST the records `batch` at a time; one outcome per record."""
    check_url(url)
    if post is None:
        with httpx.Client() as client:  # one connection pool: a client per request costs ~30 ms of TLS setup
            return send_webhooks(url, secret, records, action, loop, client.post, batch, sleep)
    outcomes: list[Outcome] = []
    for begin in range(0, len(records), batch):
        part = records[begin:begin + batch]
        body = orjson.dumps(webhook_payload(part, action, loop, part[0]["window_start"]))
        key = idempotency_key(part)
        result: Outcome = ("failed", "not sent")
        for attempt in range(ATTEMPTS):
            timestamp = str(int(time.time()))
            headers = {"Content-Type": "application/json", "Idempotency-Key": key, "X-Tracetriage-Timestamp": timestamp,
                       "X-Tracetriage-Signature": signature(secret, timestamp, body)}
            try:
                response = post(url, content=body, headers=headers, timeout=TIMEOUT)
            except httpx.TransportError as exc:
                result = ("failed", error_text(exc, 300))
            else:
                if response.status_code < 300:
                    result = ("sent", {"status": response.status_code, "idempotency_key": key})
                    break
                result = ("failed", f"HTTP {response.status_code}: {response.text[:200]}")
                if response.status_code < 500 and response.status_code != 429:
                    break  # the receiver refused this payload: sending it again changes nothing
            if attempt + 1 < ATTEMPTS:
                sleep(min(0.5 * 2**attempt, 8.0))
        outcomes += [result] * len(part)
    return outcomes


class Webhooks:
    """The `webhook` sink: the secrets of a loop's webhook rules, resolved once (from env or a Prefect Secret
    block), and the sending. A webhook a call asked for has its secret resolved by `resolve` when it is sent (a
    missing one fails that action)."""

    def __init__(self, secrets: dict[str, str], resolve: Callable[[Any], str] | None = None):
        self._secrets, self._resolve = secrets, resolve
        self._client: httpx.Client | None = None

    def __repr__(self) -> str:
        return f"Webhooks(actions={sorted(self._secrets)})"  # never the secrets

    def chunk(self, rule: Any, first: Action, total: int) -> int:
        return rule.batch

    def send(self, rule: Any, actions: list[Action], context: SendContext) -> list[Outcome]:
        """One batch (the ledger is written between batches), over a connection pool kept across them."""
        name = actions[0]["action"]
        secret = self._secrets.get(name)
        if secret is None:
            if self._resolve is None:
                return [("failed", "no webhook secrets were resolved")] * len(actions)
            secret = self._resolve(rule)
        self._client = self._client or httpx.Client()
        return send_webhooks(rule.url, secret, actions, name, context.loop, self._client.post, rule.batch)
