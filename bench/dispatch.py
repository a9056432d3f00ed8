"""Benchmark: what exactly-once costs. Dispatch 20,000 webhook actions (batches of 100) to a local receiver,
with the ledger on a local disk and on S3 (a local moto server), then rerun (everything already sent).

    .venv/bin/python bench/dispatch.py
    .venv/bin/python bench/dispatch.py --actions 50000

Prints, for each storage: dispatch wall time, actions/s, webhook requests, ledger segments written, the
rerun's time (it reads the ledger and sends nothing), and the receiver alone (the same requests without a
ledger) to separate the ledger's share; then what taking and giving back the dispatch lease costs.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request

from tasks.config import ActionConfig, LoopConfig, When  # noqa: E402
from tasks.contracts import SendContext  # noqa: E402
from tasks.dispatch.lease import DispatchLease  # noqa: E402
from tasks.dispatch.ledger import ActionLog, Ledger  # noqa: E402
from tasks.dispatch.plan import Plan, action_id  # noqa: E402
from tasks.dispatch.send import dispatch_actions  # noqa: E402
from tasks.sinks.connections import sinks_for  # noqa: E402
from tasks.sinks.webhook import send_webhooks  # noqa: E402
from tasks.store import SnapshotStore  # noqa: E402

WINDOW = datetime(2026, 11, 2, tzinfo=UTC)


class Receiver:
    def __init__(self) -> None:
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def plan(config: LoopConfig, n: int) -> Plan:
    return Plan([{"action_id": action_id(config.name, WINDOW, f"trace-{i:06d}", "hook"), "loop": config.name,
                  "action": "hook", "do": "webhook", "window_start": WINDOW.isoformat(), "trace_id": f"trace-{i:06d}",
                  "run_id": f"trace-{i:06d}", "evaluator": "answer_grounded", "score": 0.2, "verdict": "fail",
                  "culprit_run_id": None, "culprit_span": "search_docs", "culprit_reason": "below_threshold"}
                 for i in range(n)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--actions", type=int, default=20_000)
    args = parser.parse_args()
    receiver = Receiver()
    config = LoopConfig(name="bench", actions=[ActionConfig(when=When(failing=True), do="webhook", url=receiver.url,
                                                            secret_env="BENCH_SECRET", name="hook", batch=100)])
    planned = plan(config, args.actions)
    os.environ["BENCH_SECRET"] = "bench-secret"
    context = SendContext(loop="bench", source="bench")

    send_webhooks(receiver.url, "bench-secret", planned.actions[:100], "hook", "bench", batch=100)  # warm up
    started = time.perf_counter()
    send_webhooks(receiver.url, "bench-secret", planned.actions, "hook", "bench", batch=100)
    alone = time.perf_counter() - started
    print(f"receiver alone (no ledger): {args.actions:,} actions in {alone:.2f} s")

    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench"}
    import s3fs

    s3fs.S3FileSystem(**options).mkdir("bench-ledger")
    with tempfile.TemporaryDirectory() as tmp:
        stores = {"local disk": SnapshotStore(f"{tmp}/snapshots"),
                  "S3 (moto)": SnapshotStore("s3://bench-ledger/loop", options)}
        for where, store in stores.items():
            before = receiver.requests
            started = time.perf_counter()
            with DispatchLease(store, "bench") as lease:
                ledger = Ledger(store, "bench", WINDOW, lease)
                counts = dispatch_actions(config, planned, ledger, sinks_for(config, ActionLog(f"{tmp}/a.jsonl")),
                                          context, "")
            took = time.perf_counter() - started
            requests = receiver.requests - before
            segments = f"{ledger.written} ledger segments compacted to {len(store.listing(ledger.directory))}"
            started = time.perf_counter()
            again = dispatch_actions(config, planned, Ledger(store, "bench", WINDOW),
                                     sinks_for(config, ActionLog(f"{tmp}/a.jsonl")), context, "")
            rerun = time.perf_counter() - started
            assert counts.sent == args.actions and again.sent == 0 and receiver.requests - before == requests
            print(f"{where}: {args.actions:,} actions in {took:.2f} s ({args.actions / took:,.0f} actions/s), "
                  f"{requests} requests, {segments}, ledger share {max(took - alone, 0):.2f} s; "
                  f"rerun {rerun:.2f} s, 0 sent")
            leases = []
            for _ in range(20):
                started = time.perf_counter()
                with DispatchLease(store, "bench"):
                    pass
                leases.append(time.perf_counter() - started)
            print(f"{where}: the dispatch lease, taken and given back: median {statistics.median(leases) * 1000:.1f} ms"
                  f" of 20")
    moto.stop()


if __name__ == "__main__":
    main()
