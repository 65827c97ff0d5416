"""Defect 4: a ledger to trust (lock, durable atomic write, validation, history adds up)."""

import json
import multiprocessing as mp
import os

import pytest
from opacus.accountants import RDPAccountant

from client.privacy import PrivacyLedger
from shared.errors import FedLoraError


def _ledger(rounds=2, steps=3):
    ledger = PrivacyLedger(1e-5, 8.0)
    for r in range(1, rounds + 1):
        acc = ledger.accountant()
        for _ in range(steps):
            acc.step(noise_multiplier=1.1, sample_rate=0.1)
        ledger.record(acc, r)
    return ledger


def test_round_trip_records_steps_per_round_and_adds_up(tmp_path):
    ledger = _ledger()
    path = tmp_path / "l.json"
    ledger.save(path)
    raw = json.loads(path.read_text())
    assert raw["round_steps"] == [3, 3] and raw["history"] == [[1.1, 0.1, 6]]
    back = PrivacyLedger.from_json(path.read_text())
    assert back.epsilon() == pytest.approx(ledger.epsilon()) and back.rounds_trained == [1, 2]
    assert sorted(os.listdir(tmp_path)) == ["l.json"]  # no temporary file left behind


@pytest.mark.parametrize("mutate, message", [
    (lambda r: "{not json", "not JSON"),
    (lambda r: [], "not a JSON object"),
    (lambda r: {k: v for k, v in r.items() if k != "history"}, "missing history"),
    (lambda r: r | {"delta": 2}, "delta"),
    (lambda r: r | {"target_epsilon": "8"}, "target_epsilon"),
    (lambda r: r | {"history": [[1.1, 0.1]]}, "history entry"),
    (lambda r: r | {"history": [[-1, 0.1, 6]]}, "history entry"),
    (lambda r: r | {"rounds_trained": [1, 2, 3]}, "does not add up"),  # a round that spent nothing
    (lambda r: r | {"round_steps": [3, 4]}, "does not add up"),
    (lambda r: r | {"history": []}, "does not add up"),  # spend erased, rounds kept
    (lambda r: {k: v for k, v in r.items() if k != "round_steps"} | {"history": []}, "does not add up"),
])
def test_a_malformed_or_inconsistent_ledger_is_one_line_error(tmp_path, tiny_cfg, mutate, message):
    raw = json.loads(_ledger().to_json())
    bad = mutate(raw)
    path = tmp_path / "l.json"
    path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(FedLoraError, match=message) as info:
        PrivacyLedger.load(path, tiny_cfg)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert info.value.__cause__ is None  # no chained traceback


def _hold(path, ready, release):
    with PrivacyLedger.lock(path):
        ready.set()
        release.wait(20)


def test_a_second_process_cannot_take_the_ledger_while_a_round_holds_it(tmp_path):
    path = tmp_path / "l.json"
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(path, ready, release))
    holder.start()
    try:
        assert ready.wait(20)
        with pytest.raises(FedLoraError, match="in use by another process"):
            with PrivacyLedger.lock(path, timeout=0.3):
                pass
    finally:
        release.set()
        holder.join(20)
    with PrivacyLedger.lock(path, timeout=0.3):  # released with the holder's round
        pass


def test_save_fsyncs_the_file_and_the_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.realpath(f"/proc/self/fd/{fd}")), real(fd)))
    _ledger().save(tmp_path / "l.json")
    assert any(p.startswith(str(tmp_path / ".l.json.")) for p in synced)  # the temporary file, before the rename
    assert str(tmp_path) in synced


def test_legacy_ledgers_without_step_counts_still_load():
    raw = json.loads(_ledger().to_json())
    del raw["round_steps"]
    ledger = PrivacyLedger.from_json(json.dumps(raw))
    assert ledger.round_steps is None and ledger.rounds_trained == [1, 2]
    acc = RDPAccountant()
    acc.load_state_dict(ledger.accountant_state)
    ledger.record(acc, 3)
    assert "round_steps" not in json.loads(ledger.to_json())
