"""A dispatch killed between two sends, then rerun: every receiver ends up with each action exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from prefect.settings import PREFECT_API_URL

from flows.triage import triage
from tasks.config import LoopConfig
from tasks.dispatch.ledger import read_ledger
from tasks.sources.sample import generate_traces, write_sample
from tasks.store import SnapshotStore
from tests.slack_server import SlackServer
from tests.triage_child import CHILD
from tests.webhook_receiver import SECRET, Receiver

ROOT = Path(__file__).resolve().parent.parent
BATCH = 10
KILL_AT = 3  # the third webhook request: the first two batches were answered, the third never is


class KillingReceiver(Receiver):
    """Receives the KILL_AT-th request, then kills the sender before answering it."""

    victim: subprocess.Popen | None = None

    def __init__(self) -> None:
        super().__init__()
        handler = self.server.RequestHandlerClass
        answer = handler.do_POST
        receiver = self

        def do_post(self) -> None:
            if receiver.victim is not None and len(receiver.requests) == KILL_AT - 1:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append({"status": None, "key": self.headers["Idempotency-Key"],
                                          "signed": True, "body": json.loads(body)})
                receiver.victim.send_signal(signal.SIGKILL)
                receiver.victim.wait()
                return
            answer(self)

        handler.do_POST = do_post


def test_a_dispatch_killed_between_two_sends_ends_with_every_action_once_after_the_rerun(tmp_path, monkeypatch):
    source = tmp_path / "runs.jsonl"
    write_sample(source, generate_traces(300, seed=17, hours=1))
    out = tmp_path / "out"
    with SlackServer() as slack, KillingReceiver() as hook:
        env = {"TRIAGE_WEBHOOK_SECRET": SECRET, "SLACK_WEBHOOK_URL": slack.webhook_url}
        config = LoopConfig.model_validate({
            "name": "crash", "source": {"kind": "file", "path": str(source)}, "eval_workers": 1,
            "actions": [
                {"when": {"failing": True}, "do": "slack", "name": "digest"},
                {"when": {"failing": True}, "do": "webhook", "url": hook.url, "secret_env": "TRIAGE_WEBHOOK_SECRET",
                 "batch": BATCH, "name": "hook"},
                {"when": {"failing": True}, "do": "log", "name": "log"},
            ]})
        (tmp_path / "config.json").write_text(config.model_dump_json())
        hook.victim = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path / "config.json"), str(out)], cwd=ROOT,
            env={**os.environ, **env, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": PREFECT_API_URL.value()},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stderr = hook.victim.communicate(timeout=300)[1].decode()
        assert hook.victim.returncode == -signal.SIGKILL, stderr[-3000:]
        assert len(hook.requests) == KILL_AT and len(slack.requests) == 1
        assert not (out / "actions.jsonl").exists()  # the crash came before the log rule's turn
        hook.victim = None

        for name, value in env.items():
            monkeypatch.setenv(name, value)
        (window,) = triage(config=config, out=str(out))["windows"]

    failing = window["failing_traces"]
    batches = -(-failing // BATCH)
    assert window["actions"]["skipped_duplicate"] == failing + (KILL_AT - 1) * BATCH  # the digest, two batches
    assert len(slack.requests) == 1
    keys = Counter(r["key"] for r in hook.requests)
    assert len(keys) == batches and sorted(keys.values()) == [1] * (batches - 1) + [2]
    assert keys[hook.requests[KILL_AT - 1]["key"]] == 2  # only the batch in flight went again, with its key
    delivered = {r["key"]: [run["action_id"] for run in r["body"]["runs"]] for r in hook.requests}
    per_action = Counter(a for ids in delivered.values() for a in ids)
    assert len(per_action) == failing and set(per_action.values()) == {1}
    assert all(r["signed"] for r in hook.requests)
    logged = [json.loads(line)["action_id"] for line in (out / "actions.jsonl").read_text().splitlines()]
    assert len(logged) == len(set(logged)) == failing
    store = SnapshotStore(str(out / "snapshots"))
    rows = read_ledger(store, "crash")
    assert len(rows) == 3 * failing and {r["state"] for r in rows} == {"sent"}  # compacted: one entry per action
    (window_dir,) = store.listing("_ledger/crash")
    assert len(store.listing(f"_ledger/crash/{window_dir}")) == 1
