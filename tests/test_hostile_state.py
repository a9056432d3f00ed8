"""Damaged state, as a full disk or a stray edit leaves it: torn lines in the action log, malformed ledger and lease
entries, a cut ledger segment, missing or truncated work files, a copied `--out`. Each run ends with every action
done once: none lost, none doubled, none re-sent under a new idempotency key."""

from __future__ import annotations

import builtins
import errno
import json
import logging
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

import tasks.dispatch.lease
import tasks.dispatch.ledger
import tasks.store
from flows.cli import main
from tasks.dispatch.lease import DispatchLease
from tasks.dispatch.ledger import ActionLog, Ledger, read_ledger
from tasks.sources.sample import generate_traces, write_sample
from tasks.store import SnapshotStore
from tests.webhook_receiver import SECRET, Receiver

WINDOW = datetime(2026, 11, 2, 9, tzinfo=UTC)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hostile-state") / "runs.jsonl"
    write_sample(path, generate_traces(30, seed=8, hours=1, rates={"tool_error": 0.4}))
    return path


def _run(tmp_path: Path, source: Path, out: Path, *extra: str, config: dict | None = None) -> int:
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump({"eval_workers": 1, **(config or {})}))
    return main(["run", "--config", str(path), "--source", str(source), "--out", str(out), "--json", *extra])


def _logged_once_each(out: Path) -> list[str]:
    """The action log's entries, checked against the ledger: each action the ledger says was sent is logged once."""
    rows = [json.loads(line) for line in (out / "actions.jsonl").read_text().splitlines()]
    ids = [row["action_id"] for row in rows if isinstance(row, dict)]
    sent = {r["action_id"] for r in read_ledger(SnapshotStore(str(out / "snapshots")), "tracetriage")
            if r["state"] == "sent"}
    assert len(ids) == len(set(ids)) and set(ids) == sent
    return ids


def _failing(document: dict) -> int:
    return sum(w["failing_traces"] for w in document["windows"])


class FullDisk:
    """An `open` for the modules that write the action log, the ledger and the lease: from the first write to a file
    named `trigger` on, every write under `root` fails with ENOSPC, as on a full disk, and the write that fills it
    lands half."""

    def __init__(self, root: Path, trigger: str):
        self.root, self.trigger = str(root), trigger
        self.full = False
        self.triggered = 0

    def open(self, file, mode="r", *args, **kwargs):
        handle = builtins.open(file, mode, *args, **kwargs)
        if mode.startswith("r") and "+" not in mode or not str(file).startswith(self.root):
            return handle
        return _Writer(handle, self, Path(file).name == self.trigger)


class _Writer:
    def __init__(self, handle, disk: FullDisk, trigger: bool):
        self.handle, self.disk, self.trigger = handle, disk, trigger

    def write(self, data: bytes) -> int:
        if self.trigger and not self.disk.full:
            self.disk.full, self.disk.triggered = True, self.disk.triggered + 1
            self.handle.write(data[:len(data) // 2])
            self.handle.flush()
        if self.disk.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.handle.write(data)

    def __getattr__(self, name: str):
        return getattr(self.handle, name)

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


class _NoWait:
    """The lease module's `time`, whose sleep (a wait for a lease) fails the test; nothing else's sleep is touched."""

    def sleep(self, seconds: float) -> None:
        raise AssertionError("the dispatch waited for a lease")

    def __getattr__(self, name: str):
        return getattr(time, name)


def _no_lease_wait(monkeypatch) -> None:
    monkeypatch.setattr(tasks.dispatch.lease, "time", _NoWait())


def test_a_full_disk_in_dispatch_fails_fast_naming_the_path_and_the_rerun_neither_waits_nor_loses_an_action(
        source, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    disk = FullDisk(out, "actions.jsonl")
    with monkeypatch.context() as patch:
        patch.setattr(tasks.dispatch.ledger, "open", disk.open, raising=False)
        patch.setattr(tasks.store, "open", disk.open, raising=False)
        assert _run(tmp_path, source, out) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"tracetriage: {out / 'snapshots' / '_ledger'}") and \
           last.endswith(": No space left on device")
    assert disk.triggered == 1  # no Prefect retry against a disk that is still full
    assert not (out / "actions.jsonl").read_bytes().endswith(b"\n")  # the torn line the disk left

    _no_lease_wait(monkeypatch)  # the lease this process failed to release is not waited for
    assert _run(tmp_path, source, out) == 0
    document = json.loads(capsys.readouterr().out)
    assert len(_logged_once_each(out)) == _failing(document) > 0


def test_malformed_ledger_action_log_and_lease_entries_are_skipped_with_a_warning_naming_file_and_line(
        source, tmp_path, monkeypatch, capsys, caplog):
    out = tmp_path / "out"
    assert _run(tmp_path, source, out) == 0
    failing = _failing(json.loads(capsys.readouterr().out))
    (ledger_dir,) = (out / "snapshots" / "_ledger" / "tracetriage").iterdir()
    (ledger_dir / "00000000000000000001-1-000001.jsonl").write_bytes(b'[1, 2]\n{"state": "sent"}\n')
    with open(out / "actions.jsonl", "ab") as log:
        log.write(b"[]\n")
    lease_dir = out / "snapshots" / "_leases" / "dispatch-tracetriage"
    lease_dir.mkdir(parents=True, exist_ok=True)
    (lease_dir / "000000000099.json").write_bytes(b"\x00garbage")

    _no_lease_wait(monkeypatch)
    caplog.set_level(logging.WARNING)
    assert _run(tmp_path, source, out) == 0
    (window,) = json.loads(capsys.readouterr().out)["windows"]
    assert window["actions"]["ledger_damaged"] == 2
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert f"line 1 of file://{ledger_dir}/00000000000000000001-1-000001.jsonl" in warnings
    assert f"line 2 of file://{ledger_dir}/00000000000000000001-1-000001.jsonl" in warnings
    assert f"line {failing + 1} of {out / 'actions.jsonl'}" in warnings
    assert f"lease file file://{lease_dir}/000000000099.json is not JSON" in warnings
    assert len(_logged_once_each(out)) == failing


def test_a_cut_ledger_segment_sends_again_only_under_the_idempotency_keys_receivers_have_seen(
        source, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRIAGE_WEBHOOK_SECRET", SECRET)
    out = tmp_path / "out"
    with Receiver() as receiver:
        config = {"actions": [{"when": {"failing": True}, "do": "webhook", "url": receiver.url, "batch": 3,
                               "secret_env": "TRIAGE_WEBHOOK_SECRET", "name": "hook"}]}
        assert _run(tmp_path, source, out, config=config) == 0
        capsys.readouterr()
        first = {r["key"]: sorted(run["action_id"] for run in r["body"]["runs"]) for r in receiver.requests}
        assert len(first) > 2 and len(receiver.delivered()) == len(set(receiver.delivered()))
        (segment,) = (out / "snapshots" / "_ledger" / "tracetriage").glob("*/*.jsonl")
        data = segment.read_bytes()
        segment.write_bytes(data[:len(data) // 2])  # a disk that lost the end of the file

        assert _run(tmp_path, source, out, config=config) == 0
        (window,) = json.loads(capsys.readouterr().out)["windows"]
        again = receiver.requests[len(first):]
    assert again, "the actions the cut hid were not sent again"
    for request in again:  # the same batches as before, so the receiver drops each as a repeat
        assert sorted(run["action_id"] for run in request["body"]["runs"]) == first[request["key"]]
    assert window["actions"]["ledger_damaged"] >= 1
    ledger = Ledger(SnapshotStore(str(out / "snapshots")), "tracetriage", datetime.fromisoformat(
        window["window_start"]))
    assert ledger.damaged == 0 and sum(r["state"] == "sent" for r in ledger.last.values()) == window["failing_traces"]


@pytest.mark.parametrize(("files", "damage"), [("window", "deleted"), ("window", "truncated"), ("scores", "deleted"),
                                              ("scores", "truncated")])
def test_a_missing_or_truncated_work_file_is_rebuilt(source, tmp_path, capsys, files, damage):
    out = tmp_path / "out"
    assert _run(tmp_path, source, out) == 0
    before = json.loads(capsys.readouterr().out)
    damaged = list(out.glob(f"work/sources/*/{files}-*.parquet"))
    assert damaged
    for work_file in damaged:
        if damage == "deleted":
            work_file.unlink()
        else:
            work_file.write_bytes(work_file.read_bytes()[:100])
    assert _run(tmp_path, source, out) == 0
    after = json.loads(capsys.readouterr().out)
    assert [w["traces"] for w in after["windows"]] == [w["traces"] for w in before["windows"]]
    assert all(w["actions"]["sent"] == 0 for w in after["windows"])  # nothing twice
    assert len(_logged_once_each(out)) == _failing(before)


def test_a_copied_out_works_on_its_own_files(source, tmp_path, capsys):
    out, copy = tmp_path / "out", tmp_path / "copy"
    assert _run(tmp_path, source, out) == 0
    capsys.readouterr()
    shutil.copytree(out, copy)
    assert _run(tmp_path, source, copy) == 0
    capsys.readouterr()
    def tokens(root: Path) -> set[str]:
        return {p.name for p in (root / "work" / "sources").iterdir()}

    mine = tokens(copy) - tokens(out)
    assert mine, "the copy reused cached results that point into the original --out"
    shutil.rmtree(out)
    assert _run(tmp_path, source, copy) == 0


def test_a_lease_whose_release_failed_is_not_waited_for_by_its_own_process(tmp_path, monkeypatch):
    store = SnapshotStore(str(tmp_path))
    held = DispatchLease(store, "demo")
    held.acquire()
    _no_lease_wait(monkeypatch)
    with pytest.raises(AssertionError, match="waited"):  # while it is held, this process waits like any other
        DispatchLease(store, "demo").acquire()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "lease")

    with monkeypatch.context() as patch:
        patch.setattr(store, "put_bytes", full)
        with pytest.raises(OSError):
            held.release()
    again = DispatchLease(store, "demo")
    again.acquire()
    assert again.epoch == held.epoch + 1
    again.release()


def test_a_garbage_lease_file_is_skipped_with_a_warning_naming_it(tmp_path, monkeypatch, caplog):
    store = SnapshotStore(str(tmp_path))
    store.put_bytes("_leases/dispatch-demo/000000000003.json", b'["not", "a", "lease"]')
    _no_lease_wait(monkeypatch)
    with caplog.at_level(logging.WARNING, "tracetriage"), DispatchLease(store, "demo") as lease:
        assert lease.epoch == 4
    assert f"lease file {store.url}/_leases/dispatch-demo/000000000003.json is not a lease" in caplog.text


def test_malformed_ledger_entries_are_counted_as_damage_never_a_crash(tmp_path, caplog):
    store = SnapshotStore(str(tmp_path))
    ledger = Ledger(store, "demo", WINDOW)
    ledger.record_many([{"action_id": "a1", "action": "log"}], "sent")
    store.put_bytes(f"{ledger.directory}/00000000000000000002-1-000001.jsonl",
                    b'[1, 2]\n{"state": "sent"}\n{"action_id": "a2", "state": "lost"}\n{"action_id": "a3", "sta')
    with caplog.at_level(logging.WARNING, "tracetriage"):
        read = Ledger(store, "demo", WINDOW)
    assert read.state("a1") == "sent" and read.state("a2") is None and read.damaged == 5  # 4 lines, and the cut
    assert "line 4 of" in caplog.text and "is cut short" in caplog.text


def test_a_torn_last_line_of_the_action_log_is_repaired_before_anything_is_appended(tmp_path):
    path = tmp_path / "actions.jsonl"
    path.write_bytes(b'{"action_id": "a1"}\n[]\n{"action_id": "a2", "tr')
    log = ActionLog(path)
    assert log.ids == {"a1"}
    assert log.write_many([{"action_id": "a2"}, {"action_id": "a1"}]) == [True, False]
    assert path.read_bytes() == b'{"action_id": "a1"}\n[]\n{"action_id":"a2"}\n'
    path.write_bytes(b'{"action_id": "a1"}')  # whole, only its newline lost
    assert ActionLog(path).write_many([{"action_id": "a3"}]) == [True]
    assert path.read_bytes() == b'{"action_id": "a1"}\n{"action_id":"a3"}\n'
