"""The task seam: registry, click data and metrics, pair encoding, the CLI without import cycles."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from shared.config import FedConfig
from shared.data import choose_max_length, encode, load_federation, normalize, synthetic_clicks
from shared.errors import FedLoraError
from shared.models import minilm_path
from shared.tasks import TASKS, get_task
from shared.tasks.click import scores as click_scores


def test_every_task_names_its_head_metrics_and_columns():
    for name in TASKS:
        task = get_task(name)
        assert task.name == name and task.headline in task.metrics and set(task.table) <= set(task.metrics)
        assert task.model_class().__name__.startswith("AutoModelFor")
        assert task.columns(FedConfig(task=name))


def test_unknown_task_is_one_clear_error():
    with pytest.raises(FedLoraError, match="--task must be one of classify, click"):
        FedConfig(task="segment")


def test_click_metrics_rank_and_top_decile():
    y = np.array([0] * 15 + [1] * 5)
    p = np.linspace(0.01, 0.99, 20)  # the 5 clickers score highest: a perfect ranking
    out = click_scores(np.stack([1 - p, p], 1), y, 2, 0.5)
    assert out["roc_auc"] == 1.0 and out["top_decile_click_rate"] == 1.0 and out["click_rate"] == 0.25
    reversed_ = click_scores(np.stack([p, 1 - p], 1), y, 2)
    assert reversed_["roc_auc"] == 0.0 and reversed_["top_decile_click_rate"] == 0.0
    expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert out["log_loss"] == pytest.approx(expected) and out["loss"] == 0.5


def test_synthetic_clicks_differ_by_brand_and_follow_the_profile():
    train, test = synthetic_clicks(4, 400, 200, seed=0)
    assert set(train["label"]) == {"0", "1"} and len(test) == 200 and train["brand"].nunique() == 4
    again, _ = synthetic_clicks(4, 400, 200, seed=0)
    pd.testing.assert_frame_equal(train, again)
    # the profile text carries signal: engaged customers click far more often
    clicked = train["label"].astype(int)
    engaged = train["profile"].str.contains("opens most emails")
    rare = train["profile"].str.contains("rarely opens emails")
    assert clicked[engaged].mean() > clicked[rare].mean() + 0.15
    # and brands' customers click different offers: which offer items get clicked differs by brand
    items = train["offer"].str.extract(r"(?:on |off |drop: )?([a-z ]+?)(?:,| with| trending|$)")[0]
    by_brand = pd.crosstab(train["brand"], items, values=clicked, aggfunc="mean")
    assert (by_brand.max() - by_brand.min()).max() > 0.3


def test_click_federation_uses_pairs_and_fixed_labels(tiny_cfg):
    cfg = tiny_cfg.replace(task="click")
    fed = load_federation(cfg)
    assert fed.labels == ["0", "1"] and {"text", "text_pair", "label", "brand"} <= set(fed.train.columns)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    data = encode(fed.test.head(4), fed.labels, tok, 64)
    sep = tok.sep_token_id
    assert all(int((row == sep).sum()) == 2 for row in data.tensors[0])  # [CLS] profile [SEP] offer [SEP]
    words = " ".join(["coffee beans"] * 10)  # ~20 tokens each: one text fits 32, the pair needs 64
    pairs = pd.DataFrame({"text": [words] * 20, "text_pair": [words] * 20})
    auto = cfg.replace(max_length=0)
    assert choose_max_length(pairs["text"], tok, auto) == 32 and choose_max_length(pairs, tok, auto) == 64


def test_click_file_without_the_offer_column_is_refused():
    df = pd.DataFrame({"profile": ["age 30; bought: tea"], "offer_text": ["free shipping on tea"], "label": [1]})
    with pytest.raises(FedLoraError, match="column 'offer' not in clicks.csv"):
        normalize(df, FedConfig(task="click"), "clicks.csv")
    ok = normalize(df, FedConfig(task="click", offer_column="offer_text"), "clicks.csv")
    assert list(ok.columns[:3]) == ["text", "text_pair", "label"] and ok["label"].tolist() == ["1"]
    unlabelled = normalize(df.drop(columns="label"), FedConfig(task="click", offer_column="offer_text"), "x",
                           require_label=False)
    assert "label" not in unlabelled.columns


def test_cli_modules_do_not_import_each_other():
    code = ("import sys, fedlora.deploy_commands, fedlora.predict_command; "
            "assert 'fedlora.cli' not in sys.modules, 'deploy_commands imports fedlora.cli'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_flag_help_comes_from_the_config_fields():
    from fedlora.cli import build_parser

    text = " ".join(build_parser()._subparsers._group_actions[0].choices["simulate"].format_help().split())
    assert "profile + offer -> clicked 0/1" in text and "click: the offer text column" in text


def test_client_agent_accepts_a_click_file_and_refuses_one_that_fits_no_task(tmp_path):
    from client.agent import validate_data

    train, _ = synthetic_clicks(2, 30, 10, seed=0)
    train.to_csv(tmp_path / "clicks.csv", index=False)
    assert validate_data(tmp_path / "clicks.csv", "text", "label") == 60
    train.rename(columns={"offer": "promo"}).to_csv(tmp_path / "renamed.csv", index=False)
    assert validate_data(tmp_path / "renamed.csv", "text", "label", offer_column="promo") == 60
    with pytest.raises(FedLoraError, match="fits no task: it needs a 'text' column .classify., 'profile' and 'offer'"):
        validate_data(tmp_path / "renamed.csv", "text", "label")


def test_predict_batches_rows_by_length_and_returns_them_in_the_data_order(tiny_cfg):
    """The held-out pass sorts rows by length to trim each batch; a row's probabilities and
    label must still come back at its own position, and equal its scores scored alone."""
    from torch.utils.data import TensorDataset

    from shared.evaluation import predict
    from shared.lora import cached_model

    fed = load_federation(tiny_cfg)
    model, tokenizer = cached_model(tiny_cfg, len(fed.labels))
    ds = encode(fed.test.iloc[:24], fed.labels, tokenizer, 32)
    lengths = ds.tensors[1].sum(1)
    assert len(set(lengths.tolist())) > 3  # rows of several lengths, not in length order
    assert not bool((lengths[1:] >= lengths[:-1]).all())
    probs, gold, loss = predict(model, ds, batch_size=5)
    alone = [predict(model, TensorDataset(*(t[i:i + 1] for t in ds.tensors)), batch_size=1) for i in range(len(ds))]
    np.testing.assert_allclose(probs, np.concatenate([a[0] for a in alone]), atol=1e-5)
    assert np.array_equal(gold, ds.tensors[2].numpy())
    assert loss == pytest.approx(np.mean([a[2] for a in alone]), rel=1e-4)
