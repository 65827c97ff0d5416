"""What a person reads after a run: summary.json, metrics.csv, a plot, a final table.

Files are rewritten after every round (atomically), so an interrupted run still leaves
its history next to its checkpoints.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from client.policy import FAILURE_CODES, DeclineCode
from rich.table import Table
from shared.atomic import atomic_write
from shared.tasks import Task, get_task

# every round's row: "round", then the task's metrics (shared/tasks/), then these
RUN_FIELDS = ["train_loss", "epsilon_max", "clients_trained", "clients_declined", "clients_failed", "bytes_uploaded", "seconds", "train_seconds"]


def _finite(x):
    return x if isinstance(x, (int, str)) or (isinstance(x, float) and math.isfinite(x)) else None


def epsilon_max(summary: dict) -> float | None:
    """Largest epsilon any client spent; None when no client has a finite one (DP off)."""
    spent = [c["epsilon"] for c in summary["clients"].values() if c["epsilon"] is not None]
    return max(spent) if spent else None


@dataclass
class RunReport:
    output: Path
    config: dict
    rounds: list[dict] = field(default_factory=list)
    clients: dict[str, dict] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    owners: dict[str, dict] = field(default_factory=dict)  # per owner: federated (and local-only) scores
    warnings: list[str] = field(default_factory=list)

    @property
    def task(self) -> Task:
        return get_task(str(self.config.get("task", "classify")))

    def round_fields(self) -> list[str]:
        recall = [f"recall_{n}" for n in self.labels] if self.task.per_class_recall else []
        return ["round", *self.task.metrics, *RUN_FIELDS, *recall]

    @classmethod
    def resume(cls, output: Path, config: dict) -> "RunReport":
        path = output / "summary.json"
        if path.exists():
            old = json.loads(path.read_text())
            return cls(output, config, old.get("rounds", []), old.get("clients", {}), old.get("labels", []),
                       old.get("owners", {}), old.get("warnings", []))
        return cls(output, config)

    def add_round(self, server_round: int, evaluation: dict, client_metrics: list[dict], failed: int, seconds: float,
                  train_seconds: float | None = None) -> dict:
        trained = [m for m in client_metrics if not m.get("declined")]
        errored = [m for m in client_metrics if m.get("declined") and int(m.get("declined-code", 0)) in FAILURE_CODES]
        for m in client_metrics:
            cid = str(m.get("client-id"))
            entry = self.clients.setdefault(cid, {"epsilon": 0.0, "delta": m.get("delta", 0.0), "num_examples": None,
                                                  "rounds_trained": 0, "bytes_uploaded": []})
            if "epsilon" in m:  # a client that failed before reading its ledger reports none
                entry["epsilon"] = _finite(float(m["epsilon"]))
            entry["delta"] = m.get("delta", entry["delta"])
            if not m.get("declined"):
                if "num-examples" in m:  # non-private runs only: under DP no count leaves a client
                    entry["num_examples"] = int(m["num-examples"])
                entry["rounds_trained"] += 1
                entry["bytes_uploaded"].append({"round": server_round, "bytes": int(m.get("bytes-uploaded", 0))})
            else:
                entry["declined_round"] = server_round
                entry["declined_code"] = int(m.get("declined-code", DeclineCode.BUDGET))
        eps = [float(m["epsilon"]) for m in client_metrics if "epsilon" in m]
        row = {
            "round": server_round, **{k: evaluation.get(k) for k in self.task.metrics},
            **{f"recall_{name}": r for name, r in zip(self.labels, evaluation.get("recall", []))},
            "epsilon_max": _finite(max(eps)) if eps else None,
            "clients_trained": len(trained), "clients_declined": len(client_metrics) - len(trained) - len(errored),
            "clients_failed": failed + len(errored),
            "bytes_uploaded": int(sum(int(m.get("bytes-uploaded", 0)) for m in trained)),
            "seconds": round(seconds, 2),  # the whole round: training, aggregation, evaluation, checkpoint
            "train_seconds": None if train_seconds is None else round(train_seconds, 2),  # sampling to aggregate
        }
        self.rounds = [r for r in self.rounds if r["round"] != server_round] + [row]
        for owner, owner_scores in evaluation.get("owners", {}).items():
            self.owners.setdefault(owner, {})["federated"] = owner_scores
        uniform = evaluation.get("uniform_loss")
        if uniform is not None and evaluation["loss"] > uniform and server_round > 1:
            self.warnings.append(
                f"round {server_round}: held-out loss {evaluation['loss']:.3f} is above {uniform:.3f}, "
                "the loss of a uniform guess: training is diverging (lower --lr / --head-lr, or raise --target-epsilon)")
        self.write()
        return row

    def add_training_losses(self, folder: Path) -> None:
        """Simulation only: the owners' local training-loss logs (client_app.log_training,
        on this machine) averaged per round, and a warning when the last is not below the
        first. A deployed server never sees them."""
        per_round: dict[int, list[float]] = {}
        for path in sorted(folder.glob("*.train.csv")):
            latest = {}  # a rerun into the same folder appends: its rounds win
            for line in path.read_text().splitlines()[1:]:
                rnd, loss, _ = line.split(",")
                latest[int(rnd)] = float(loss)
            for rnd, loss in latest.items():
                if math.isfinite(loss):
                    per_round.setdefault(rnd, []).append(loss)
        for row in self.rounds:
            losses = per_round.get(row["round"])
            if losses:
                row["train_loss"] = sum(losses) / len(losses)
        seen = [r["train_loss"] for r in self.rounds if r.get("train_loss") is not None]
        if len(seen) > 1 and seen[-1] >= seen[0]:
            self.warnings.append(f"mean training loss did not fall: {seen[0]:.3f} in the first round, "
                                 f"{seen[-1]:.3f} in the last")
        self.write()

    def summary(self) -> dict:
        last = self.rounds[-1] if self.rounds else {}
        return {
            "config": self.config,
            "rounds": self.rounds,
            "labels": self.labels,
            "task": self.task.name,
            "final": {k: last.get(k) for k in (*self.task.metrics, "train_loss")}
            | ({"recall": {name: last.get(f"recall_{name}") for name in self.labels}} if self.task.per_class_recall else {}),
            "clients": self.clients,
            "owners": self.owners,
            "warnings": self.warnings,
        }

    def write(self) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        atomic_write(self.output / "summary.json", json.dumps(self.summary(), indent=2))
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=self.round_fields())
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in writer.fieldnames} for r in self.rounds)
        atomic_write(self.output / "metrics.csv", table.getvalue())

    def plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in self.rounds]
        fig, ax1 = plt.subplots(figsize=(6.4, 4))
        for metric, style in zip(self.task.plot, ("o-", "^-", "v-", "d-")):
            ax1.plot(rounds, [_nan(r.get(metric)) for r in self.rounds], style, label=_LABELS.get(metric, metric))
        reference = self.rounds[-1].get(self.task.reference) if self.rounds and self.task.reference else None
        if reference is not None:
            ax1.axhline(reference, color="grey", linestyle=":", label=_LABELS.get(self.task.reference, self.task.reference))
        ax1.set_xlabel("round")
        ax1.set_ylabel("held-out score")
        ax1.set_ylim(0, 1)
        if self.task.plot or reference is not None:
            ax1.legend(loc="lower right", fontsize="small")
        ax2 = ax1.twinx()
        ax2.plot(rounds, [r["epsilon_max"] if r["epsilon_max"] is not None else float("nan") for r in self.rounds],
                 "s--", color="tab:red", label="max client epsilon")
        ax2.set_ylabel("max client epsilon", color="tab:red")
        ax2.set_ylim(bottom=0)
        ax1.set_title(f"fedlora {self.task.name}: held-out scores and privacy spent per round")
        fig.tight_layout()
        path = self.output / "accuracy_epsilon.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def print_table(self, console: Console | None = None) -> None:
        """Fits an 80-column terminal: the full history is in metrics.csv and summary.json."""
        console = console or Console()
        table = Table(title=f"fedlora run ({self.task.name})")
        columns = {"round": "round", **self.task.table, "epsilon_max": "eps max", "clients_trained": "clients", "seconds": "sec"}
        for header in columns.values():
            table.add_column(header, justify="right")
        for r in self.rounds:
            table.add_row(*[_cell(r.get(c), 1 if c == "seconds" else 2 if c == "epsilon_max" else 3) for c in columns])
        console.print(table)
        last = self.rounds[-1] if self.rounds else {}
        if self.labels and last and self.task.per_class_recall:
            recall = ", ".join(f"{n} {last.get(f'recall_{n}', float('nan')):.2f}" for n in self.labels)
            console.print(f"recall per class: {recall}; majority-class accuracy {last.get('majority_accuracy', float('nan')):.3f}")
        for warning in self.warnings[-3:]:
            console.print(f"[yellow]warning: {warning}")


_LABELS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "majority_accuracy": "majority class", "roc_auc": "ROC-AUC",
           "top_decile_click_rate": "click rate, top decile", "click_rate": "click rate, all"}


def _nan(value) -> float:
    return float("nan") if value is None else value


def status_line(task: Task, row: dict) -> str:
    """The progress bar's line: the task's table metrics and epsilon."""
    eps = f"{row['epsilon_max']:.2f}" if row.get("epsilon_max") is not None else "off"
    cells = [f"{header} {row[k]:.3f}" for k, header in task.table.items() if isinstance(row.get(k), float)]
    return "  ".join(cells + [f"eps {eps}"])


def _cell(value, digits: int) -> str:
    if value is None:
        return "off"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
