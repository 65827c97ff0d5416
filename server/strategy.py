"""FedAvg over adapter tensors that leaves out clients who declined (budget spent) or failed."""

from __future__ import annotations

import time
from typing import Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from shared.config import FedConfig


def with_client_id(metrics: Mapping, node_id: int) -> dict:
    """Name a client by its simulated partition, or by its node id in deployment."""
    out = dict(metrics)
    out["client-id"] = int(out["partition-id"]) if out.get("partition-id", -1) >= 0 else int(node_id)
    return out


def client_metrics(reply: Message) -> dict:
    return with_client_id(reply.content["metrics"], reply.metadata.src_node_id)


class FedLoraStrategy(FedAvg):
    def __init__(self, cfg: FedConfig, num_nodes: int) -> None:
        super().__init__(
            fraction_train=cfg.fraction, fraction_evaluate=0.0, min_train_nodes=1,
            min_available_nodes=num_nodes, weighted_by_key="num-examples",
        )

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # FedAvg sizes the sample from the nodes online *before* it waits for
        # min_available_nodes, so a round that starts while an agent is reconnecting would
        # leave it out even at fraction 1.0: wait for the federation first.
        while len(list(grid.get_node_ids())) < self.min_available_nodes:
            time.sleep(1.0)
        return super().configure_train(server_round, arrays, config, grid)

    def split_replies(self, replies: Iterable[Message]) -> tuple[list[Message], list[dict], int]:
        """(replies that trained, metrics of every client that answered, number that failed)."""
        valid, errors = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        trained = [m for m in valid if not m.content["metrics"].get("declined", 0)]
        return trained, [client_metrics(m) for m in valid], len(errors)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, list[dict], int]:
        trained, metrics, failed = self.split_replies(replies)
        if not trained:
            return None, metrics, failed
        trained = sorted(trained, key=reply_order)
        return aggregate_arrayrecords(weighted_contents(trained, self.weighted_by_key), self.weighted_by_key), metrics, failed


def reply_order(reply: Message) -> tuple[int, int]:
    """Replies in a fixed order before their float sum: by simulated partition when the
    reply names it (non-private runs), else by node id. Replies arrive in the order the
    clients finish, which changes with the number of simulation workers and the load, and
    float addition is not associative: unsorted, 1 and 4 workers gave different adapters
    for the same seed. (Secure aggregation sums integers in a ring: any order is exact.)"""
    metrics = reply.content["metrics"]
    partition = int(metrics["partition-id"]) if "partition-id" in metrics else -1
    return (partition, int(reply.metadata.src_node_id))


def weighted_contents(trained: list[Message], key: str) -> list[RecordDict]:
    """FedAvg by example count when every client reports one (non-private runs); under DP
    no count leaves a client, so every owner's update weighs the same."""
    if all(key in m.content["metrics"] for m in trained):
        return [m.content for m in trained]
    return [RecordDict({"arrays": m.content["arrays"], "metrics": MetricRecord({key: 1})}) for m in trained]
