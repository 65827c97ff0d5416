"""A real Flower simulation (Ray backend) with a tiny model: outputs, checkpoints, resume."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from shared.data import encode, load_federation
from shared.evaluation import evaluate
from shared.models import load_base_model
from simulations.run import simulate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from shared.config import FedConfig

    out = tmp_path_factory.mktemp("sim") / "run"
    cfg = FedConfig(model="tiny-bert", brands=3, num_clients=3, examples_per_brand=64, test_size=60,
                    rounds=2, batch_size=16, lr=5e-3, max_length=32, output=str(out))
    summary = simulate(cfg)
    # the simulation's signing keys are for that run only: nothing leaks into later runs
    # (a deployed server in the same environment must not trust the simulation roster)
    from shared.secagg.identity import ENV_SIM_DIR
    import os
    assert ENV_SIM_DIR not in os.environ
    return cfg, out, summary


def test_three_clients_two_rounds_write_summary_with_the_documented_keys(run):
    cfg, out, summary = run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert {"config", "rounds", "final", "clients"} <= set(on_disk)
    assert [r["round"] for r in on_disk["rounds"]] == [1, 2]
    for r in on_disk["rounds"]:
        assert {"round", "accuracy", "macro_f1", "loss", "epsilon_max", "clients_trained", "bytes_uploaded"} <= set(r)
        assert r["clients_trained"] == 3 and r["bytes_uploaded"] > 0
    assert set(on_disk["final"]) >= {"accuracy", "macro_f1"}
    assert len(on_disk["clients"]) == 3  # under DP no partition id leaves a client: keyed by node id
    for c in on_disk["clients"].values():
        assert {"epsilon", "delta", "num_examples", "rounds_trained"} <= set(c)
        assert 0 < c["epsilon"] <= cfg.target_epsilon and c["rounds_trained"] == 2 and c["delta"] == cfg.delta
    eps = [r["epsilon_max"] for r in on_disk["rounds"]]
    assert eps[1] > eps[0]
    assert (out / "metrics.csv").read_text().count("\n") == 3
    assert (out / "accuracy_epsilon.png").stat().st_size > 1000
    assert on_disk["config"]["secure-agg"] is True


def test_checkpoint_loads_with_peft_and_reproduces_the_server_evaluation(run):
    cfg, out, summary = run
    fed = load_federation(cfg)
    base, tokenizer = load_base_model(cfg.model, len(fed.labels), cfg.seed)
    model = PeftModel.from_pretrained(base, out / "checkpoints" / "round-002")
    metrics = evaluate(model, encode(fed.test, fed.labels, tokenizer, cfg.max_length), len(fed.labels))
    assert metrics["accuracy"] == pytest.approx(summary["final"]["accuracy"], abs=1e-9)
    assert metrics["loss"] == pytest.approx(summary["final"]["loss"], rel=1e-5)
    first = PeftModel.from_pretrained(load_base_model(cfg.model, len(fed.labels), cfg.seed)[0], out / "checkpoints" / "round-001")
    b = [n for n, _ in model.named_parameters() if "lora_B" in n][0]
    assert not torch.equal(dict(model.named_parameters())[b], dict(first.named_parameters())[b])


def test_predict_reproduces_the_server_evaluation(run, tmp_path, capsys):
    from fedlora.cli import main

    cfg, out, summary = run
    test_file = tmp_path / "test.csv"
    load_federation(cfg).test.to_csv(test_file, index=False)  # the server's own test split, as a file
    assert main(["predict", "--checkpoint", str(out / "checkpoints" / "round-002"), "--data", str(test_file),
                 "--output", str(tmp_path / "scored.parquet")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("accuracy", "macro_f1", "loss"):
        assert result["metrics"][key] == pytest.approx(summary["final"][key], rel=1e-5), key
    import pandas as pd

    scored = pd.read_parquet(tmp_path / "scored.parquet")
    assert set(scored["predicted_label"]) <= {"negative", "positive"}
    assert ((scored["probability"] >= 0.5) & (scored["probability"] <= 1)).all()
    assert (scored["probability_negative"] + scored["probability_positive"]).round(5).eq(1).all()
    assert (scored["predicted_label"] == scored["label"]).mean() == pytest.approx(summary["final"]["accuracy"])


def test_resume_continues_from_the_checkpoint_and_epsilon_keeps_composing(run, tmp_path):
    cfg, out, summary = run
    proc = subprocess.run(  # a fresh process, as a user resuming would (Ray starts once per process)
        [sys.executable, "-m", "fedlora", "simulate", "--model", "tiny-bert", "--brands", "3", "--examples-per-brand", "64",
         "--test-size", "60", "--batch-size", "16", "--lr", "5e-3", "--max-length", "32", "--rounds", "4", "--eval-every", "2",
         "--output", str(out), "--resume", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4]
    # --eval-every 2: round 3 has no held-out scores, the last round always has them
    assert resumed["rounds"][2]["accuracy"] is None and resumed["rounds"][2]["seconds"] > 0
    assert resumed["rounds"][3]["accuracy"] is not None and resumed["final"]["accuracy"] is not None
    # the ledgers survived in the output folder: the noise was calibrated for 2 rounds, so a
    # third round would overspend and every client declines rather than reset its budget
    assert resumed["rounds"][-1]["clients_trained"] == 0
    assert all(c["epsilon"] <= cfg.target_epsilon for c in resumed["clients"].values())
