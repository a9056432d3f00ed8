"""One dispatch of a loop at a time, across processes and machines that share the snapshot store."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from prefect.settings import PREFECT_API_URL

from tasks.config import LoopConfig
from tasks.dispatch.lease import DispatchLease, LeaseLost
from tasks.dispatch.ledger import Ledger, read_ledger
from tasks.sources.sample import generate_traces, write_sample
from tasks.store import SnapshotStore
from tests.moto_s3 import MOTO_KEY, MOTO_SECRET
from tests.triage_child import CHILD
from tests.webhook_receiver import SECRET, Receiver

ROOT = Path(__file__).resolve().parent.parent
ELSEWHERE = {"host": "worker-2", "boot": "another-boot-id", "pidns": "pid:[1]"}


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> SnapshotStore:
    if request.param == "local":
        return SnapshotStore(str(tmp_path / "snapshots"))
    endpoint = request.getfixturevalue("s3_endpoint")
    return SnapshotStore(f"s3://snapshots-bucket/lease-{tmp_path.name}",
                         {"key": MOTO_KEY, "secret": MOTO_SECRET, "endpoint_url": endpoint})


def test_of_writers_racing_for_one_name_exactly_one_creates_it(store):
    won: list[int] = []

    def race(i: int) -> None:
        if store.put_bytes("race/000000000001.json", str(i).encode(), exclusive=True):
            won.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and store.get_bytes("race/000000000001.json") == str(won[0]).encode()


def _hold(lease: DispatchLease, seconds: float, held: list[tuple[float, float]]) -> None:
    with lease:
        began = time.monotonic()
        time.sleep(seconds)
        held.append((began, time.monotonic()))


def test_two_runs_of_a_loop_at_once_dispatch_one_after_the_other(store):
    """A scheduled run and a rerun of a window on one machine: the second dispatches once the first is done."""
    held: list[tuple[float, float]] = []
    runs = [threading.Thread(target=_hold, args=(DispatchLease(store, "loop", poll=0.05), 0.5, held))
            for _ in range(2)]
    for thread in runs:
        thread.start()
    for thread in runs:
        thread.join()
    first, second = sorted(held)
    assert second[0] >= first[1] and released(store, "loop")


def test_a_thread_that_reads_a_claim_just_written_by_another_thread_of_its_process_waits(store, monkeypatch):
    """The claimer is descheduled right after writing its claim (as happened under load): the other thread, which
    reads it then, must not take it for a dead holder's."""
    claim = DispatchLease._claim

    def slow_claim(self, epoch: int, released: bool = False) -> bool:
        won = claim(self, epoch, released)
        if won and not released:
            time.sleep(0.3)
        return won

    monkeypatch.setattr(DispatchLease, "_claim", slow_claim)
    test_two_runs_of_a_loop_at_once_dispatch_one_after_the_other(store)


def released(store: SnapshotStore, loop: str) -> bool:
    """The loop's latest lease epoch is a release: nobody holds it."""
    latest = store.listing(f"_leases/dispatch-{loop}")[-1]
    return orjson.loads(store.get_bytes(f"_leases/dispatch-{loop}/{latest}")).get("released", False)


def test_a_run_on_another_machine_waits_while_the_holder_renews_past_its_ttl(store):
    held: list[tuple[float, float]] = []
    # A TTL of 1.5 s renewed every 0.5 s: a renewer held up for up to 1 s (a loaded CI machine stalled one for
    # 0.6 s when the TTL was 0.6 s) still keeps the lease.
    holder = threading.Thread(target=_hold, args=(DispatchLease(store, "loop", ttl=1.5), 4.5, held))
    holder.start()
    time.sleep(0.3)
    _hold(DispatchLease(store, "loop", ttl=1.5, poll=0.05, machine=ELSEWHERE), 0.0, held)
    holder.join()
    first, second = sorted(held)
    assert first[1] - first[0] >= 4.5 and second[0] >= first[1]  # renewals kept the lease three TTLs


def test_a_lease_left_by_a_dead_run_on_this_machine_is_taken_at_once(tmp_path):
    store = SnapshotStore(str(tmp_path / "snapshots"))
    dead = subprocess.run([sys.executable, "-c", (
        "import os; from tasks.store import SnapshotStore; from tasks.dispatch.lease import DispatchLease\n"
        f"DispatchLease(SnapshotStore({str(tmp_path / 'snapshots')!r}), 'loop').acquire(); os._exit(9)")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert dead.returncode == 9, dead.stderr
    (left,) = store.listing("_leases/dispatch-loop")
    began = time.monotonic()
    with DispatchLease(store, "loop") as lease:
        assert time.monotonic() - began < 1.0 and lease.epoch == 2
        assert store.listing("_leases/dispatch-loop") == ["000000000002.json"]  # the dead one's is gone


def test_a_lease_of_another_machine_is_honoured_until_it_expires(tmp_path, caplog):
    store = SnapshotStore(str(tmp_path / "snapshots"))
    expires = time.time() + 1.0
    store.put_bytes("_leases/dispatch-loop/000000000007.json",
                    orjson.dumps({**ELSEWHERE, "pid": 1, "started": "1", "expires": expires}), exclusive=True)
    with caplog.at_level("INFO", logger="tracetriage.lease"), DispatchLease(store, "loop", poll=0.05) as lease:
        assert time.time() >= expires and lease.epoch == 8
    (waiting,) = [r.getMessage() for r in caplog.records if "waits" in r.getMessage()]
    assert "host worker-2, pid 1" in waiting and "expire" in waiting


def test_a_run_whose_lease_was_taken_stops_at_its_next_ledger_write(tmp_path):
    store = SnapshotStore(str(tmp_path / "snapshots"))
    window = datetime(2026, 11, 2, 9, tzinfo=UTC)
    with DispatchLease(store, "loop", ttl=0.3) as lease:
        ledger = Ledger(store, "loop", window, lease)
        ledger.record_many([{"action_id": "a1"}], "planned")
        # What another machine does when this run looks dead to it: it takes the next epoch.
        store.put_bytes(f"_leases/dispatch-loop/{lease.epoch + 1:012d}.json",
                        orjson.dumps({**ELSEWHERE, "pid": 1, "started": "1", "expires": time.time() + 60}),
                        exclusive=True)
        time.sleep(0.3)
        with pytest.raises(LeaseLost, match="another run took over"):
            ledger.record_many([{"action_id": "a1", "response": "ok"}], "sent")
    assert [r["state"] for r in read_ledger(store, "loop")] == ["planned", "sent"]  # the send stays on record
    assert not released(store, "loop")  # the other run's lease is the latest, left alone


def test_a_stalled_holder_whose_epoch_was_reused_and_cleaned_up_still_knows_it_lost(tmp_path):
    """Another run took over, finished and released, and a third cleaned up: the stalled run's renewal could
    claim its next epoch number again, but a later epoch is there, so it stops."""
    store = SnapshotStore(str(tmp_path / "snapshots"))
    with DispatchLease(store, "loop", ttl=0.6, machine=ELSEWHERE) as stalled:
        stalled._stop.set()  # stalled: no renewals for now
        stalled._renewer.join()
        time.sleep(0.6)  # its lease expires
        for _ in range(2):  # two later runs come and go; the second removes every earlier epoch
            with DispatchLease(store, "loop", poll=0.05):
                pass
        assert store.listing("_leases/dispatch-loop") == ["000000000004.json", "000000000005.json"]
        stalled._stop.clear()
        threading.Thread(target=stalled._renew_until_released, daemon=True).start()
        time.sleep(0.5)
        assert stalled.lost
        with pytest.raises(LeaseLost):
            stalled.check()
    assert released(store, "loop")


class SlowReceiver(Receiver):
    """Answers each request after 0.5 s, so two dispatches of one window would overlap."""

    def __init__(self) -> None:
        super().__init__()
        handler = self.server.RequestHandlerClass
        answer = handler.do_POST

        def do_post(self) -> None:
            time.sleep(0.5)
            answer(self)

        handler.do_POST = do_post


def test_two_machines_sharing_the_s3_store_send_each_action_once(tmp_path, s3_endpoint):
    """Two runs of one window at once, each with its own working directory (as on two workers), one S3 store."""
    source = tmp_path / "runs.jsonl"
    write_sample(source, generate_traces(200, seed=29, hours=1))
    with SlowReceiver() as hook:
        config = LoopConfig.model_validate({
            "name": "shared", "source": {"kind": "file", "path": str(source)}, "eval_workers": 1,
            "snapshots": {"url": "s3://snapshots-bucket/two-machines",
                          "storage_options": {"endpoint_url": s3_endpoint}},
            "actions": [{"when": {"failing": True}, "do": "webhook", "url": hook.url,
                         "secret_env": "TRIAGE_WEBHOOK_SECRET", "batch": 10, "name": "hook"}]})
        (tmp_path / "config.json").write_text(config.model_dump_json())
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": PREFECT_API_URL.value(),
               "TRIAGE_WEBHOOK_SECRET": SECRET, "AWS_ACCESS_KEY_ID": MOTO_KEY, "AWS_SECRET_ACCESS_KEY": MOTO_SECRET}
        workers = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "config.json"),
                                     str(tmp_path / f"worker-{i}")], cwd=ROOT, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in (1, 2)]
        errors = [worker.communicate(timeout=300)[1].decode() for worker in workers]
        assert [worker.returncode for worker in workers] == [0, 0], errors
    keys = Counter(r["key"] for r in hook.requests)
    runs = Counter(run["action_id"] for r in hook.requests for run in r["body"]["runs"])
    assert len(hook.requests) >= 3 and set(keys.values()) == {1} and set(runs.values()) == {1}
    store = SnapshotStore("s3://snapshots-bucket/two-machines",
                          {"key": MOTO_KEY, "secret": MOTO_SECRET, "endpoint_url": s3_endpoint})
    rows = read_ledger(store, "shared")
    assert {r["action_id"] for r in rows} == set(runs) and {r["state"] for r in rows} == {"sent"}
    assert released(store, "shared")
