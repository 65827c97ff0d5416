"""`--task click` end to end with a tiny model: simulate (with local-only baselines), then
`fedlora predict` and plain peft on the checkpoint reproduce the server's evaluation."""

import json
import subprocess
import sys

import pandas as pd
import pytest
from peft import PeftModel

from fedlora.cli import main
from server.checkpoint import checkpoint_config
from shared.data import encode, load_federation, synthetic_clicks
from shared.evaluation import evaluate
from shared.models import load_base_model

pytestmark = pytest.mark.slow

FLAGS = ["--task", "click", "--model", "tiny-bert", "--brands", "3", "--examples-per-brand", "64", "--test-size", "60",
         "--rounds", "2", "--batch-size", "16", "--lr", "5e-3", "--max-length", "48"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("click") / "run"
    proc = subprocess.run([sys.executable, "-m", "fedlora", "simulate", *FLAGS, "--local-baseline", "--output", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    test_file = out.parent / "test.csv"
    synthetic_clicks(3, 64, 60, seed=0)[1].to_csv(test_file, index=False)  # the run's own test split, as a file
    return out, summary, test_file


def test_click_run_reports_the_task_metrics(run):
    out, summary, _ = run
    assert summary["task"] == "click"
    final = summary["final"]
    assert {"roc_auc", "log_loss", "top_decile_click_rate", "accuracy"} <= set(final)
    assert 0.0 <= final["roc_auc"] <= 1.0 and final["log_loss"] > 0
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["round", "roc_auc", "log_loss", "top_decile_click_rate"] and "macro_f1" not in header
    assert all(0 < c["epsilon"] <= 8.0 for c in summary["clients"].values())
    # every owner: its local-only model beside the federated model, on its own test rows, by ROC-AUC
    assert len(summary["owners"]) == 3
    for owner in summary["owners"].values():
        assert "roc_auc" in owner["local"] and "roc_auc" in owner["federated"] and owner["epsilon"] <= 8.0
        assert owner["gain"] == pytest.approx(owner["federated"]["roc_auc"] - owner["local"]["roc_auc"])


def test_predict_reproduces_the_server_evaluation(run, tmp_path, capsys):
    out, summary, test_file = run
    scored = tmp_path / "scored.jsonl"
    assert main(["predict", "--checkpoint", str(out), "--data", str(test_file), "--output", str(scored)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["checkpoint"].endswith("round-002") and result["rows"] == 60
    for key in ("roc_auc", "log_loss", "top_decile_click_rate", "accuracy"):
        assert result["metrics"][key] == pytest.approx(summary["final"][key], rel=1e-5), key
    rows = pd.read_json(scored, lines=True)
    assert list(rows.columns) == ["profile", "offer", "label", "brand", "click_probability"]
    assert rows["click_probability"].between(0, 1).all() and rows["click_probability"].nunique() > 1


def test_predict_scores_unlabelled_rows_with_other_column_names(run, tmp_path, capsys):
    out, _, test_file = run
    raw = pd.read_csv(test_file).drop(columns="label").rename(columns={"profile": "customer", "offer": "promo"})
    raw.to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", "--checkpoint", str(out / "checkpoints" / "round-001"), "--data", str(tmp_path / "new.csv"),
                 "--output", str(tmp_path / "new_scored.csv"), "--profile-column", "customer", "--offer-column", "promo"]) == 0
    assert "metrics" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "click_probability" in pd.read_csv(tmp_path / "new_scored.csv").columns


@pytest.mark.parametrize("argv, message", [
    (["--data", "{d}/nope.csv"], "data file not found"),
    (["--data", "{d}/test.csv", "--offer-column", "promo"], "column 'promo' not in"),
    (["--checkpoint", "{d}/missing"], "checkpoint not found"),
    (["--output", "{d}/scored.xlsx"], "--output must end in"),
])
def test_predict_bad_input_is_one_line(run, capsys, argv, message):
    out, _, test_file = run
    args = {"--checkpoint": str(out), "--data": str(test_file), "--output": str(out.parent / "s.csv")}
    for flag, value in zip(argv[::2], argv[1::2]):
        args[flag] = value.format(d=out.parent)
    assert main(["predict", *[x for kv in args.items() for x in kv]]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_peft_from_pretrained_loads_the_checkpoint(run):
    out, summary, _ = run
    folder = out / "checkpoints" / "round-002"
    cfg = checkpoint_config(folder)
    fed = load_federation(cfg)
    base, tokenizer = load_base_model(cfg.model, 2, cfg.seed, task="click")
    model = PeftModel.from_pretrained(base, folder)
    metrics = evaluate(model, encode(fed.test, fed.labels, tokenizer, cfg.max_length), 2, task="click")
    assert metrics["roc_auc"] == pytest.approx(summary["final"]["roc_auc"], rel=1e-6)
    assert metrics["log_loss"] == pytest.approx(summary["final"]["log_loss"], rel=1e-5)
