"""The agent's long-lived ClientApp process: what must survive between messages does, what
must not does not, and the agent restarts a crashed one (client/agent.py, client/clientapp_process.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from client import secure_random
from client.agent import supervise
from client.client_app import train
from client.privacy import PrivacyLedger
from shared.errors import FedLoraError
from shared.lora import cached_model, model_loads
from shared.params import from_record
from tests.test_policy import _context, _message, owner  # noqa: F401 - the deployed-owner fixture


def _hooks(module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_one_process_serves_many_dp_rounds_without_reloading_or_stacking_hooks(tiny_cfg, owner, monkeypatch):
    """As the long-lived ClientApp process does: the same ClientApp, the same cached model,
    three DP rounds for one owner. Every round's DP step moves every trainable tensor away
    from the global it was sent (opacus#820), Opacus wraps the model with the same number
    of hooks every round and leaves none behind (opacus#608), the model loads once, and the
    ledger keeps composing."""
    node_config, ledger, log = owner
    cfg = tiny_cfg.replace(rounds=3)  # the budget spread over the three rounds
    wrapped = []
    real = secure_random.make_private

    def spy(engine, *, module, **kwargs):  # calls through: counts the hooks Opacus put on the shared model
        out = real(engine, module=module, **kwargs)
        wrapped.append(_hooks(module))
        return out

    monkeypatch.setattr(secure_random, "make_private", spy)
    context = _context(node_config, secagg_threshold=2)
    msg = _message(cfg)
    loads = model_loads()
    epsilons = []
    for rnd in (1, 2, 3):
        msg.content["config"]["server-round"] = rnd
        sent = from_record(msg.content["arrays"])
        reply = train(msg, context)
        metrics = reply.content["metrics"]
        assert metrics["declined"] == 0, log.read_text()
        got = from_record(reply.content["arrays"])
        assert set(got) == set(sent)
        for name in sent:
            assert not np.allclose(got[name], sent[name]), f"round {rnd}: {name} did not move"
        sent_cfg = cfg.replace(labels=msg.content["config"]["labels"])
        model, _ = cached_model(sent_cfg, len(sent_cfg.label_names))
        assert _hooks(model) == 0, f"round {rnd}: Opacus hooks left on the cached model"
        assert not any(getattr(p, "grad_sample", None) is not None for p in model.parameters())
        epsilons.append(metrics["epsilon"])
        msg.content["arrays"] = reply.content["arrays"]  # the next round starts from this "global"
    assert len(wrapped) == 3 and wrapped[0] > 0 and wrapped == [wrapped[0]] * 3, wrapped
    assert model_loads() - loads <= 1
    assert log.read_text().count("loaded model") == model_loads() - loads
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert PrivacyLedger.from_json(ledger.read_text()).rounds_trained == [1, 2, 3]


def _app(tmp_path, body: str):
    """A stand-in ClientApp process: a real Python process that runs `body`."""
    def start():
        return subprocess.Popen([sys.executable, "-c", body])
    return start


def test_a_clientapp_process_that_dies_after_serving_is_restarted(tmp_path):
    ready, log, starts = tmp_path / "ready", tmp_path / "client.log", tmp_path / "starts"
    body = (f"import os, pathlib, time; s = pathlib.Path({str(starts)!r}); "
            "n = len(s.read_text()) if s.exists() else 0; s.write_text('x' * (n + 1)); "
            f"pathlib.Path({str(ready)!r}).write_text(str(os.getpid())); "
            "time.sleep(0.3 if n < 2 else 60); raise SystemExit(3)")
    node = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(6); raise SystemExit(5)"])
    try:
        assert supervise(node, _app(tmp_path, body), ready, log, poll=0.1) == 5  # the SuperNode's status
    finally:
        node.kill()
    assert len(starts.read_text()) == 3  # two crashes, two restarts
    assert log.read_text().count("exited with status 3; restarting it") == 2


def test_a_clientapp_process_that_never_serves_ends_the_agent(tmp_path):
    node = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(FedLoraError, match="exited with status 4 before it could serve"):
            supervise(node, _app(tmp_path, "raise SystemExit(4)"), tmp_path / "ready", tmp_path / "client.log", poll=0.1)
    finally:
        node.kill()
        node.wait()
