"""Defects 2 and 3: the owner's policy is enforced at the client, and under DP a reply
carries nothing the accounting does not cover (no loss, no count, no partition id, no text)."""

import json

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.client_app import train
from client.policy import DeclineCode, OwnerPolicy, SecAggInfo
from client.secagg_mod import SECAGG_ACTIVE
from shared.data import SYNTHETIC_LABELS, client_partition
from shared.errors import FedLoraError
from shared.lora import build_model, trainable_state
from shared.params import to_record
from server.inprocess_grid import ensure_task_identity

ALLOWED = {"declined", "declined-code", "epsilon", "delta", "bytes-uploaded"}


@pytest.fixture
def owner(tiny_cfg, tmp_path):
    """A deployed owner: its own CSV, ledger and log in the node config (default policy)."""
    csv = tmp_path / "owner.csv"
    client_partition(tiny_cfg, 0)[["text", "label"]].to_csv(csv, index=False)
    node_config = {"data-path": str(csv), "text-column": "text", "label-column": "label",
                   "ledger-path": str(tmp_path / "ledger.json"), "log-path": str(tmp_path / "client.log")}
    return node_config, tmp_path / "ledger.json", tmp_path / "client.log"


def _message(cfg, server_round=1):
    ensure_task_identity()
    model, _ = build_model(cfg, 2)
    config = ConfigRecord(cfg.replace(labels=json.dumps(SYNTHETIC_LABELS)).to_run_config() | {"server-round": server_round})
    return Message(RecordDict({"arrays": to_record(trainable_state(model)), "config": config}), dst_node_id=1,
                   message_type="train")


def _context(node_config, secagg_threshold=None):
    ctx = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    if secagg_threshold is not None:  # as client/secagg_mod.py sets it around training in the collect stage
        ctx.state.config_records[SECAGG_ACTIVE] = ConfigRecord({"t-global": secagg_threshold, "t-local": secagg_threshold,
                                                                "group-size": 3})
    return ctx


@pytest.mark.parametrize("change, code", [
    ({"dp": False}, DeclineCode.DP_REQUIRED),
    ({"target_epsilon": 20.0}, DeclineCode.EPSILON),
    ({"delta": 1e-3}, DeclineCode.DELTA),
    ({"max_grad_norm": 5.0}, DeclineCode.CLIP),
    ({"rounds": 500}, DeclineCode.ROUNDS),
])
def test_a_request_that_breaks_the_owner_policy_is_declined_with_the_ledger_untouched(tiny_cfg, owner, change, code):
    node_config, ledger, log = owner
    ledger.write_text('{"sentinel": true}')  # would fail validation if the client even read it
    before = ledger.read_bytes()
    reply = train(_message(tiny_cfg.replace(**change)), _context(node_config, secagg_threshold=2))
    metrics = reply.content["metrics"]
    assert metrics["declined"] == 1 and metrics["declined-code"] == code
    assert set(metrics) <= ALLOWED and len(reply.content["arrays"]) == 0
    assert ledger.read_bytes() == before and not ledger.with_name("ledger.json.lock").exists()
    assert code.name in log.read_text()  # the details stay with the owner


def test_an_owner_that_joined_for_one_task_declines_another_with_the_ledger_untouched(tiny_cfg, owner):
    """The server is the adversary: it cannot switch an owner's data to a task the owner
    did not join for (`fedlora client --task click` writes `task` into the node config)."""
    node_config, ledger, log = owner
    ledger.write_text('{"sentinel": true}')
    before = ledger.read_bytes()
    reply = train(_message(tiny_cfg), _context({**node_config, "task": "click"}, secagg_threshold=2))
    metrics = reply.content["metrics"]
    assert metrics["declined"] == 1 and metrics["declined-code"] == DeclineCode.TASK
    assert ledger.read_bytes() == before and "joined for 'click'" in log.read_text()


def test_without_secure_aggregation_or_below_the_threshold_the_owner_declines(tiny_cfg, owner):
    node_config, ledger, _ = owner
    reply = train(_message(tiny_cfg), _context(node_config))  # no secure-aggregation collect stage around it
    assert reply.content["metrics"]["declined-code"] == DeclineCode.SECURE_AGG_REQUIRED
    strict = node_config | {"policy-min-secagg-threshold": 3}
    reply = train(_message(tiny_cfg), _context(strict, secagg_threshold=2))
    assert reply.content["metrics"]["declined-code"] == DeclineCode.SECAGG_THRESHOLD
    assert not ledger.exists()


def test_under_dp_a_reply_carries_no_loss_count_partition_or_text(tiny_cfg, owner):
    node_config, ledger, _ = owner
    reply = train(_message(tiny_cfg), _context(node_config, secagg_threshold=2))
    metrics = reply.content["metrics"]
    assert metrics["declined"] == 0 and metrics["declined-code"] == 0
    assert set(metrics) <= ALLOWED, set(metrics) - ALLOWED
    assert 0 < metrics["epsilon"] <= tiny_cfg.target_epsilon
    assert json.loads(ledger.read_text())["rounds_trained"] == [1]
    # simulation: the same, and no partition id either
    sim = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(),
                  run_config={})
    metrics = train(_message(tiny_cfg), sim).content["metrics"]
    assert metrics["declined"] == 0 and set(metrics) <= ALLOWED


def test_a_client_failure_reaches_the_server_as_a_code_only(tiny_cfg, owner, tmp_path):
    node_config, _, log = owner
    bad = tmp_path / "secret-customer-file.csv"
    bad.write_text("text,label\n\"unterminated,1\nfoo\n")
    reply = train(_message(tiny_cfg), _context(node_config | {"data-path": str(bad)}, secagg_threshold=2))
    assert not reply.has_error()  # a Flower error reply would carry the exception text
    metrics = reply.content["metrics"]
    assert metrics["declined-code"] == DeclineCode.DATA and set(metrics) <= ALLOWED
    assert "secret-customer-file" in log.read_text()


def test_the_owners_budget_tightens_the_servers_request(tiny_cfg, owner):
    node_config, _, _ = owner
    reply = train(_message(tiny_cfg), _context(node_config | {"target-epsilon": 2.0}, secagg_threshold=2))
    assert 0 < reply.content["metrics"]["epsilon"] <= 2.0 + 1e-6


def test_policy_defaults_and_bad_values():
    p = OwnerPolicy()
    assert p.require_dp and p.require_secure_agg
    assert OwnerPolicy.from_node_config(p.to_node_config()) == p
    assert OwnerPolicy.from_node_config({"policy-max-epsilon": "2.5"}).max_epsilon == 2.5
    with pytest.raises(FedLoraError, match="max-epsilon"):
        OwnerPolicy(max_epsilon=0)
    with pytest.raises(FedLoraError, match="not a valid"):
        OwnerPolicy.from_node_config({"policy-max-rounds": "many"})
    assert SecAggInfo(2, 3).threshold == 2


@pytest.mark.parametrize("node_threads, client_cpus, expected", [(None, 2.0, 2), (1, 2.0, 1), (None, 0.5, 1)])
def test_training_threads_come_from_the_owner_or_the_workers_reservation(tiny_cfg, owner, node_threads, client_cpus,
                                                                         expected):
    """A deployed owner's `num-threads` wins; a simulation worker uses the CPUs Ray reserved."""
    import torch

    node_config, _, _ = owner
    if node_threads is not None:
        node_config["num-threads"] = node_threads
    before = torch.get_num_threads()
    try:
        train(_message(tiny_cfg.replace(client_cpus=client_cpus)), _context(node_config, secagg_threshold=2))
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)
