"""`--task generate`: copy data, the chat-template encoding and its response-only loss, a DP
step that moves B, the bad-input errors, and end to end with a tiny Llama: simulate (DP and
secure aggregation on), then plain peft and `fedlora generate` on the checkpoint."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from peft import PeftModel

from fedlora.cli import main
from shared.config import FedConfig
from shared.data import choose_max_length, encode, load_federation, normalize, synthetic_copy
from shared.errors import FedLoraError
from shared.evaluation import evaluate
from shared.lora import build_model
from shared.models import load_base_model
from shared.tasks import get_task
from shared.tasks.generate import pair_ids


@pytest.fixture
def gen_cfg(tmp_path) -> FedConfig:
    return FedConfig(task="generate", model="tiny-llama", brands=2, num_clients=2, examples_per_brand=32, test_size=8,
                     rounds=2, batch_size=8, lr=0.01, output=str(tmp_path / "run"))


def test_synthetic_copy_is_deterministic_and_its_tone_differs_by_brand_and_channel():
    train, test = synthetic_copy(4, 60, 40, seed=0)
    pd.testing.assert_frame_equal(train, synthetic_copy(4, 60, 40, seed=0)[0])
    assert len(train) == 240 and len(test) == 40 and train["brand"].nunique() == 4
    assert set(train["channel"]) == {"email", "sms", "social"}
    assert train["prompt"].str.contains("Segment: ").all() and train["prompt"].str.contains("Channel: ").all()
    openers = train.assign(opener=train["response"].str.split().str[:2].str.join(" "))
    # each brand's copy opens its own way, and within a brand each channel differs
    by_brand = openers.groupby("brand")["opener"].agg(set)
    assert all(not (a & b) for i, a in enumerate(by_brand) for b in list(by_brand)[i + 1:])
    for _, rows in openers.groupby("brand"):
        by_channel = rows.groupby("channel")["opener"].agg(set)
        assert len(by_channel) == 3 and not (by_channel["email"] & by_channel["sms"])
    words = train["response"].str.split().str.len()
    assert words.max() <= 40 and words.min() >= 5  # short copy: CPU training stays feasible


def test_loss_is_on_response_tokens_only(gen_cfg):
    model, tokenizer = build_model(gen_cfg, 0)
    fed = load_federation(gen_cfg)
    assert fed.labels == [] and {"text", "response", "brand"} <= set(fed.train.columns)
    data = encode(fed.test, [], tokenizer, 128, task="generate", model=model)
    ids, mask, labels = data.tensors
    for i, (prompt, response) in enumerate(zip(fed.test["text"], fed.test["response"])):
        head, tail = pair_ids(tokenizer, prompt, response)
        n = len(head) + len(tail)
        assert (labels[i, : len(head)] == -100).all() and (labels[i, n:] == -100).all()  # prompt and padding
        assert labels[i, len(head): n].tolist() == tail == ids[i, len(head): n].tolist()
        assert mask[i].sum() == n
    assert tokenizer.decode(labels[0][labels[0] >= 0]).endswith("<|im_end|>")  # the model learns to stop
    # one example: the task's loss is the LM's own mean NLL over exactly the labelled tokens
    task = get_task("generate")
    one = [t[:1, : int(mask[0].sum())] for t in data.tensors]
    ours = task.loss(model, *one).detach()
    assert float(ours) == pytest.approx(float(model(one[0], attention_mask=one[1], labels=one[2]).loss.detach()), rel=1e-5)
    # the prompt is context, not a target: a different prompt token changes the loss only through the response
    scores = evaluate(model, data, 0, task=task)
    assert scores["response_tokens"] == int((labels[:, 1:] >= 0).sum()) and scores["perplexity"] > 1


def test_only_lora_b_trains_and_a_dp_step_moves_it(gen_cfg):
    from client.privacy import PrivacyLedger, plan_privacy
    from client.trainer import train_local

    model, tokenizer = build_model(gen_cfg, 0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_B" in n for n in trainable)  # A frozen (FFA), embeddings and tied lm_head frozen
    fed = load_federation(gen_cfg)
    data = encode(fed.train.head(32), [], tokenizer, 128, task="generate", model=model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = gen_cfg.replace(rounds=1, batch_size=16)
    ledger = PrivacyLedger(cfg.delta, cfg.target_epsilon)
    result = train_local(model, data, cfg, ledger, plan_privacy(cfg, len(data)), server_round=1)
    assert result.steps >= 1 and 0 < ledger.epsilon() <= cfg.target_epsilon
    after = dict(model.named_parameters())
    moved = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert moved and set(moved) == set(trainable)  # every B moved (the shared model, not an Opacus copy), nothing else
    assert not hasattr(after[trainable[0]], "grad_sample") or after[trainable[0]].grad_sample is None


def test_generate_bad_input_is_one_clear_error(gen_cfg):
    cfg = FedConfig(task="generate")
    df = pd.DataFrame({"prompt": ["Brand: Vela. Channel: sms."], "copy": ["Hi!"]})
    with pytest.raises(FedLoraError, match="column 'response' not in copy.csv"):
        normalize(df, cfg, "copy.csv")
    assert list(normalize(df, cfg.replace(response_column="copy"), "copy.csv").columns[:2]) == ["text", "response"]
    with pytest.raises(FedLoraError, match="column 'prompt' not in"):
        normalize(df.rename(columns={"prompt": "brief"}), cfg, "copy.csv", require_label=False)
    empty = pd.DataFrame({"prompt": ["a", "b"], "response": ["ok", "  "]})
    with pytest.raises(FedLoraError, match="column 'response' has 1 empty responses"):
        normalize(empty, cfg, "copy.csv")
    model, tokenizer = build_model(gen_cfg, 0)
    long = normalize(pd.DataFrame({"prompt": ["word " * 400], "response": ["ok"]}), cfg, "copy.csv")
    with pytest.raises(FedLoraError, match="1 prompts in copy.csv are longer than the model's context .256 tokens."):
        encode(long, [], tokenizer, 128, "copy.csv", task="generate", model=model)
    with pytest.raises(FedLoraError, match="needs a causal language model: 'minilm' is an encoder"):
        load_base_model("minilm", 0, 0, task="generate")


def test_generate_takes_its_default_model_and_dp_recipe_from_the_task():
    from fedlora.cli import build_parser, config_from_args
    from shared.tasks.generate import GENERATE_CLIP_NORM, GENERATE_LORA_LAYERS, GENERATE_LR

    parse = lambda *a: config_from_args(build_parser().parse_args(["simulate", *a]))  # noqa: E731
    gen = parse("--task", "generate")
    assert (gen.model, gen.max_grad_norm, gen.lr) == ("smollm2-135m", GENERATE_CLIP_NORM, GENERATE_LR)
    assert gen.lora_layers == GENERATE_LORA_LAYERS and parse("--task", "generate", "--lora-layers", "0").lora_layers == 0
    assert GENERATE_CLIP_NORM < FedConfig().max_grad_norm
    given = parse("--task", "generate", "--model", "tiny-llama", "--max-grad-norm", "0.5", "--lr", "0.01")
    assert (given.model, given.max_grad_norm, given.lr) == ("tiny-llama", 0.5, 0.01)  # a flag always wins
    plain = parse()
    assert (plain.model, plain.max_grad_norm, plain.lr) == ("minilm", FedConfig().max_grad_norm, FedConfig().lr)
    from simulations.bench_accuracy import _config  # the benchmarks' key=value parser starts from the same recipe

    assert (_config(["task=generate"]).max_grad_norm, _config(["task=generate", "max-grad-norm=0.5"]).max_grad_norm) \
        == (GENERATE_CLIP_NORM, 0.5)


def test_owner_gain_is_positive_when_the_federated_perplexity_is_lower():
    from io import StringIO

    from rich.console import Console

    from simulations.local_only import print_owner_table

    owners = {"helped": {"rows": 10, "local": {"perplexity": 40.0}, "federated": {"perplexity": 30.0}},
              "hurt": {"rows": 10, "local": {"perplexity": 20.0}, "federated": {"perplexity": 25.0}},
              "declined": {"rows": 3, "local": None, "federated": {"perplexity": 25.0}}}
    generate = get_task("generate")
    assert not generate.higher_is_better and generate.gain(40.0, 30.0) == 10.0 and generate.gain(20.0, 25.0) == -5.0
    out = StringIO()
    print_owner_table(owners, Console(file=out, width=200), generate)
    rows = {line.split()[1]: line.split()[-2] for line in out.getvalue().splitlines() if line.split()[1:2] in
            (["helped"], ["hurt"], ["declined"])}
    assert rows == {"helped": "+10.000", "hurt": "-5.000", "declined": "-"}
    assert "lower is better" in out.getvalue()
    # a score in [0, 1] where higher is better: the gain in points, federated minus local
    out = StringIO()
    owners = {"a": {"rows": 10, "local": {"macro_f1": 0.6}, "federated": {"macro_f1": 0.75}}}
    print_owner_table(owners, Console(file=out, width=200), get_task("classify"))
    assert "+15.0 pt" in out.getvalue() and "higher is better" in out.getvalue()


def test_client_agent_accepts_a_generate_file(tmp_path):
    from client.agent import validate_data

    train = synthetic_copy(2, 10, 4, seed=0)[0]
    train.to_csv(tmp_path / "copy.csv", index=False)
    assert validate_data(tmp_path / "copy.csv", model="tiny-llama") == 20  # the task from its columns
    train.rename(columns={"prompt": "brief", "response": "copy"}).to_csv(tmp_path / "renamed.csv", index=False)
    assert validate_data(tmp_path / "renamed.csv", prompt_column="brief", response_column="copy", task="generate",
                         model="tiny-llama") == 20


@pytest.mark.parametrize("rows, flags, message", [
    ({"prompt": ["hi"], "copy": ["ok"]}, [], "column 'response' not in"),
    ({"brief": ["hi"], "response": ["ok"]}, ["--task", "generate"], "column 'prompt' not in"),
    ({"brief": ["hi"], "copy": ["ok"]}, [], "fits no task: it needs a 'text' column (classify)"),
    ({"prompt": ["a", "b"], "response": ["ok", " "]}, [], "column 'response' has 1 empty responses (first at row 1)"),
    ({"prompt": ["hi", "word " * 400], "response": ["ok", "ok"]}, ["--task", "generate"],
     "1 prompts in {f} are longer than the model's context (256 tokens), e.g. row 1"),
], ids=["no response column", "no prompt column", "no task fits", "empty response", "prompt longer than the context"])
def test_client_agent_refuses_a_bad_generate_file_in_one_line(rows, flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("client.agent.start_foreground", lambda *a: pytest.fail("the agent joined with a bad file"))
    path = tmp_path / "copy.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    argv = ["client", "--superlink", "127.0.0.1:9092", "--insecure", "--data", str(path), "--model", "tiny-llama", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.format(f=path) in err, err


FLAGS = ["--task", "generate", "--model", "tiny-llama", "--brands", "2", "--examples-per-brand", "48",
         "--test-size", "16", "--rounds", "2", "--batch-size", "16", "--lr", "0.01"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("generate") / "run"
    proc = subprocess.run([sys.executable, "-m", "fedlora", "simulate", *FLAGS, "--output", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_simulate_generate_end_to_end(run):
    out, summary = run
    assert summary["task"] == "generate" and summary["config"]["dp"] and summary["config"]["secure-agg"]
    final = summary["final"]
    assert final["perplexity"] > 1 and final["loss"] == pytest.approx(__import__("math").log(final["perplexity"]))
    assert all(r["clients_trained"] == 2 for r in summary["rounds"])  # no head round: B trains from round 1
    assert all(0 < c["epsilon"] <= 8.0 for c in summary["clients"].values())
    samples = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(samples) == 5 and all({"prompt", "reference", "generated"} <= set(s) for s in samples)


@pytest.mark.slow
def test_peft_from_pretrained_reproduces_the_server_perplexity(run):
    out, summary = run
    folder = out / "checkpoints" / "round-002"
    cfg = FedConfig.from_run_config(json.loads((folder / "fedlora.json").read_text()))
    base, tokenizer = load_base_model(cfg.model, 0, cfg.seed, task="generate")
    model = PeftModel.from_pretrained(base, folder)
    fed = load_federation(cfg)
    data = encode(fed.test, [], tokenizer, choose_max_length(fed.test, tokenizer, cfg, model), task="generate", model=model)
    assert evaluate(model, data, 0, task="generate")["perplexity"] == pytest.approx(summary["final"]["perplexity"], rel=1e-5)


@pytest.mark.slow
def test_fedlora_generate_prompt_and_file(run, tmp_path, capsys):
    out, summary = run
    assert main(["generate", "--checkpoint", str(out), "--prompt", "Brand: Vela. Segment: families. Product: tea. "
                 "Channel: sms. Write the copy.", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()  # streamed copy
    test = synthetic_copy(2, 48, 16, seed=0)[1]
    test.to_csv(tmp_path / "test.csv", index=False)
    assert main(["generate", "--checkpoint", str(out), "--data", str(tmp_path / "test.csv"), "--max-new-tokens", "4",
                 "--output", str(tmp_path / "copy.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["rows"] == 16 and result["column"] == "generated_response"
    assert result["metrics"]["perplexity"] == pytest.approx(summary["final"]["perplexity"], rel=1e-5)
    rows = pd.read_json(tmp_path / "copy.jsonl", lines=True)
    assert "generated_response" in rows.columns and len(rows) == 16
    test[["prompt"]].to_csv(tmp_path / "prompts.csv", index=False)
    assert main(["generate", "--checkpoint", str(out), "--data", str(tmp_path / "prompts.csv"), "--max-new-tokens", "4"]) == 0
    assert "response" in pd.read_csv(tmp_path / "prompts-generated.csv").columns


@pytest.mark.slow
@pytest.mark.parametrize("argv, message", [
    (["--prompt", "word " * 400], "the prompt is longer than the model's context"),
    (["--prompt", "  "], "the prompt is empty"),
    (["--data", "{d}/brief.csv"], "column 'prompt' not in"),
    (["--data", "{d}/empty.csv", "--response-column", "copy"], "column 'copy' has 1 empty responses"),
    (["--checkpoint", "{d}/round-001", "--prompt", "hi"], "is a --task classify checkpoint: fedlora generate needs one"),
])
def test_generate_bad_input_is_one_line(run, tmp_path, capsys, argv, message):
    out, _ = run
    pd.DataFrame({"brief": ["hi"]}).to_csv(tmp_path / "brief.csv", index=False)
    pd.DataFrame({"prompt": ["hi", "there"], "copy": ["ok", None]}).to_csv(tmp_path / "empty.csv", index=False)
    classify = tmp_path / "round-001"
    classify.mkdir()
    cfg = json.loads((out / "checkpoints" / "round-002" / "fedlora.json").read_text())
    (classify / "fedlora.json").write_text(json.dumps(cfg | {"task": "classify", "model": "tiny-bert", "labels": '["a", "b"]'}))
    (classify / "adapter_model.safetensors").write_bytes(b"")
    args = {"--checkpoint": str(out)}
    for flag, value in zip(argv[::2], argv[1::2]):
        args[flag] = value.format(d=tmp_path)
    assert main(["generate", *[x for kv in args.items() for x in kv]]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_predict_refuses_a_generate_checkpoint(run, tmp_path, capsys):
    out, _ = run
    synthetic_copy(2, 8, 4, seed=0)[1].to_csv(tmp_path / "t.csv", index=False)
    assert main(["predict", "--checkpoint", str(out), "--data", str(tmp_path / "t.csv"), "--output", str(tmp_path / "s.csv")]) == 2
    assert "use fedlora generate" in capsys.readouterr().err


def test_frozen_prefix_of_a_decoder_gives_the_full_models_perplexity(gen_cfg):
    """--lora-layers on a Llama: the layers below the adapters run once; the top reproduces the
    full model's response NLL, and a DP step on the top moves the full model's adapter (opacus#820)."""
    from client.privacy import PrivacyLedger, plan_privacy
    from client.trainer import train_local
    from shared.frozen_prefix import DecoderTop, split_layer, training_view
    from shared.lora import load_trainable_state, trainable_state

    cfg = gen_cfg.replace(lora_layers=1)
    model, tokenizer = build_model(cfg, 0)
    assert split_layer(model, 1) == model.config.num_hidden_layers - 1
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    fed = load_federation(cfg)
    data = encode(fed.test, [], tokenizer, 128, task="generate", model=model)
    full = evaluate(model, data, 0, task="generate")
    top, features = training_view(model, data, 1, "test")
    assert isinstance(top, DecoderTop) and features.tensors[0].dim() == 3
    cached = evaluate(top, features, 0, task="generate")
    assert cached["perplexity"] == pytest.approx(full["perplexity"], rel=1e-4)
    assert cached["response_tokens"] == full["response_tokens"]

    before = trainable_state(model)
    train = encode(fed.train.head(32), [], tokenizer, 128, task="generate", model=model)
    train_local(model, train, cfg, PrivacyLedger(cfg.delta, cfg.target_epsilon), plan_privacy(cfg, len(train)), 1)
    after = trainable_state(model)
    moved = [k for k in before if not torch.equal(torch.as_tensor(before[k]), torch.as_tensor(after[k]))]
    top_layer = f"layers.{model.config.num_hidden_layers - 1}."
    assert moved and all(top_layer in k and "lora_B" in k for k in moved)
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()) == 0
    load_trainable_state(model, before)
