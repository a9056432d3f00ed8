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
import ipaddress
import os
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import httpx
import orjson

from tasks.config import ConfigError, load_block

PAYLOAD_VERSION = 1
BATCH = 100
ATTEMPTS = 5
TIMEOUT = 10.0

Outcome = tuple[str, Any]


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """`v1=` and the hex HMAC-SHA256 of `<timestamp>.<body>`: what a receiver recomputes to trust a request."""
    return "v1=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def is_allowed_url(url: str) -> bool:
    """https to a host, or plain http to this machine only (tests, a local relay)."""
    parsed = urlparse(url)
    return bool(parsed.netloc) and (parsed.scheme == "https"
                                    or (parsed.scheme == "http" and is_loopback(parsed.hostname or "")))


def check_url(url: str) -> str:
    """Webhooks go over https; plain http only to this machine."""
    if is_allowed_url(url):
        return url
    raise ConfigError(f"webhook url {url!r} must use https (http is allowed only to localhost)")


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
                result = ("failed", f"{type(exc).__name__}: {exc}"[:300])
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
    """The secrets of a loop's webhook rules, resolved once (from env or a Prefect Secret block), and the sending."""

    def __init__(self, secrets: dict[str, str]):
        self._secrets = secrets
        self._client: httpx.Client | None = None

    def __repr__(self) -> str:
        return f"Webhooks(actions={sorted(self._secrets)})"  # never the secrets

    def send(self, rule: Any, name: str, records: list[dict[str, Any]], loop: str) -> list[Outcome]:
        """One batch (the ledger is written between batches), over a connection pool kept across them."""
        self._client = self._client or httpx.Client()
        return send_webhooks(rule.url, self._secrets[name], records, name, loop, self._client.post, rule.batch)


def webhook_secret(rule: Any) -> str:
    """The rule's secret: the environment variable `secret_env`, or the Prefect Secret block `secret_block`."""
    if rule.secret_block:
        from prefect.blocks.system import Secret

        return str(load_block(Secret, rule.secret_block, "secret_block").get())
    value = os.environ.get(rule.secret_env or "")
    if not value:
        raise ConfigError(f"webhook secret: environment variable {rule.secret_env} is not set")
    return value
