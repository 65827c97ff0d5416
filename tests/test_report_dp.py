"""The server side works without the fields that no longer leave a client under DP."""

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from client.policy import DeclineCode
from server.inprocess_grid import ensure_task_identity
from server.report import RunReport
from server.strategy import weighted_contents
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords


def _reply(value, metrics, node):
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.full(2, value, dtype=np.float32))}),
                          "metrics": MetricRecord(metrics)})
    ensure_task_identity()
    return Message(content, dst_node_id=node, message_type="train")


def test_plain_aggregation_under_dp_weighs_every_owner_equally():
    replies = [_reply(0.0, {"declined": 0, "epsilon": 1.0}, 11), _reply(3.0, {"declined": 0, "epsilon": 1.0}, 12)]
    agg = aggregate_arrayrecords(weighted_contents(replies, "num-examples"), "num-examples")
    assert np.allclose(agg["w"].numpy(), 1.5)
    counted = [_reply(0.0, {"num-examples": 1}, 11), _reply(3.0, {"num-examples": 2}, 12)]
    agg = aggregate_arrayrecords(weighted_contents(counted, "num-examples"), "num-examples")
    assert np.allclose(agg["w"].numpy(), 2.0)


def test_report_names_clients_by_node_and_counts_failure_codes(tmp_path):
    report = RunReport(tmp_path, {})
    metrics = [
        {"client-id": 11, "declined": 0, "declined-code": 0, "epsilon": 1.5, "delta": 1e-5, "bytes-uploaded": 10},
        {"client-id": 12, "declined": 1, "declined-code": int(DeclineCode.BUDGET), "epsilon": 8.0, "delta": 1e-5},
        {"client-id": 13, "declined": 1, "declined-code": int(DeclineCode.DATA)},
    ]
    row = report.add_round(1, {"accuracy": 0.5, "macro_f1": 0.5, "loss": 0.7}, metrics, 0, 1.0)
    assert (row["clients_trained"], row["clients_declined"], row["clients_failed"]) == (1, 1, 1)
    assert row["epsilon_max"] == 8.0
    c = report.clients
    assert c["11"]["num_examples"] is None and c["11"]["rounds_trained"] == 1
    assert c["13"]["declined_code"] == DeclineCode.DATA and c["13"]["epsilon"] == 0.0


def test_owners_training_losses_stay_local_and_a_loss_that_does_not_fall_is_a_warning(tmp_path):
    from client.client_app import log_training
    from client.trainer import TrainResult

    ledgers = tmp_path / "ledgers"
    ledgers.mkdir()
    a, b = ledgers / "partition-0000.json", ledgers / "partition-0001.json"
    for rnd, (la, lb) in enumerate([(1.0, 0.8), (0.6, 0.4)], start=1):
        log_training(a, rnd, TrainResult(la, 3))
        log_training(b, rnd, TrainResult(lb, 3))
    log_training(a, 2, TrainResult(0.2, 3))  # a rerun into the same folder: its round wins
    report = RunReport(tmp_path, {})
    report.rounds = [{"round": 1}, {"round": 2}]
    report.add_training_losses(ledgers)
    assert np.allclose([r["train_loss"] for r in report.rounds], [0.9, 0.3])
    assert not report.warnings and report.summary()["final"]["train_loss"] == report.rounds[-1]["train_loss"]

    log_training(a, 3, TrainResult(2.0, 3))
    report.rounds.append({"round": 3})
    report.add_training_losses(ledgers)
    assert report.warnings and "did not fall" in report.warnings[-1]
