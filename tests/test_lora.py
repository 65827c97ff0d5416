"""Only adapter tensors travel, and FFA-LoRA averaging is exact."""

import numpy as np
import pytest
import torch

from shared.config import FedConfig
from shared.errors import FedLoraError
from shared.lora import build_model, load_trainable_state, trainable_state


def test_exchanged_tensors_are_exactly_the_trainable_adapter_and_head(tiny_cfg):
    model, _ = build_model(tiny_cfg, 2)
    state = trainable_state(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == trainable
    assert all(("lora_B" in n) or ("modules_to_save" in n) for n in state), sorted(state)
    assert not any("lora_A" in n for n in state)  # FFA: A stays home, fixed by the seed
    base = {n for n, _ in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n}
    assert base and not base & set(state)
    assert sum(v.size for v in state.values()) < 0.1 * sum(p.numel() for p in model.parameters())


def test_plain_lora_exchanges_a_and_b(tiny_cfg):
    model, _ = build_model(tiny_cfg.replace(lora="plain"), 2)
    names = set(trainable_state(model))
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)


def test_every_process_builds_the_same_frozen_a_and_head(tiny_cfg):
    m1, _ = build_model(tiny_cfg, 2)
    m2, _ = build_model(tiny_cfg, 2)
    p1, p2 = dict(m1.named_parameters()), dict(m2.named_parameters())
    for name in p1:
        assert torch.equal(p1[name], p2[name]), name
    other, _ = build_model(tiny_cfg.replace(seed=1), 2)
    a_name = next(n for n in p1 if "lora_A" in n)
    assert not torch.equal(p1[a_name], dict(other.named_parameters())[a_name])


def test_ffa_fedavg_of_b_equals_mean_of_weight_updates(tiny_cfg):
    model, _ = build_model(tiny_cfg, 2)
    params = dict(model.named_parameters())
    b_names = [n for n in trainable_state(model) if "lora_B" in n]
    rng = np.random.default_rng(0)
    clients = [{n: rng.normal(size=params[n].shape).astype(np.float32) for n in b_names} for _ in range(4)]
    weights = np.array([10, 20, 30, 40], dtype=np.float64)
    for name in b_names:
        a = params[name.replace("lora_B", "lora_A")].detach().numpy().astype(np.float64)
        avg_b = sum(w * c[name] for w, c in zip(weights, clients)) / weights.sum()
        mean_update = sum(w * (c[name].astype(np.float64) @ a) for w, c in zip(weights, clients)) / weights.sum()
        np.testing.assert_allclose(avg_b @ a, mean_update, rtol=1e-9, atol=1e-9)
    # and plain LoRA is not exact: averaging A and B separately differs from averaging B·A
    a_clients = [rng.normal(size=(2, 8)) for _ in range(2)]
    b_clients = [rng.normal(size=(8, 2)) for _ in range(2)]
    assert not np.allclose(np.mean(b_clients, 0) @ np.mean(a_clients, 0), np.mean([b @ a for b, a in zip(b_clients, a_clients)], 0))


def test_load_trainable_state_rejects_foreign_tensors(tiny_cfg):
    model, _ = build_model(tiny_cfg, 2)
    state = trainable_state(model)
    state["base_model.model.bert.pooler.dense.weight"] = np.zeros((32, 32), np.float32)
    try:
        load_trainable_state(model, state)
    except ValueError as exc:
        assert "unexpected" in str(exc)
    else:
        raise AssertionError("a base tensor was accepted as an adapter tensor")


def test_lora_layers_adapts_only_the_top_layers(tiny_cfg):
    model, _ = build_model(tiny_cfg.replace(lora_layers=1), 2)
    lora = [n for n in trainable_state(model) if "lora_B" in n]
    assert lora and all(".layer.1." in n for n in lora)


def test_trimmed_batches_give_the_same_outputs(tiny_cfg):
    from shared.data import encode, load_federation, trim_padding

    model, tokenizer = build_model(tiny_cfg, 2)
    model.eval()
    fed = load_federation(tiny_cfg)
    ids, mask, _ = encode(fed.test.head(8), ["negative", "positive"], tokenizer, 48).tensors
    short_ids, short_mask = trim_padding(ids, mask)
    assert short_ids.shape[1] < ids.shape[1] and short_mask.all(0).any()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        trimmed = model(input_ids=short_ids, attention_mask=short_mask).logits
    torch.testing.assert_close(full, trimmed, rtol=1e-5, atol=1e-6)


def test_head_and_adapter_learn_at_their_own_rates(tiny_cfg):
    from client.trainer import parameter_groups

    cfg = tiny_cfg.replace(lr=0.03, head_lr=0.2)
    model, _ = build_model(cfg, 2)
    groups = parameter_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {g["lr"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert by_lr[0.03] and all("lora_B" in n for n in by_lr[0.03])
    assert by_lr[0.2] and all("modules_to_save" in n for n in by_lr[0.2])
    assert by_lr[0.03] | by_lr[0.2] == set(trainable_state(model))


def test_adams_rate_is_a_budget_per_round(tiny_cfg):
    """An owner with three times the reference steps a round gets a third of Adam's rate,
    with DP or without; short rounds and the head's SGD rate keep theirs."""
    from client.trainer import ADAM_REFERENCE_STEPS, parameter_groups

    cfg = tiny_cfg.replace(dp=True, optimizer="mixed", lr=0.03, head_lr=4.0, max_grad_norm=1.0)
    model, _ = build_model(cfg, 2)

    def rates(c, steps):
        return {g["algo"]: g["lr"] for g in parameter_groups(model, c, steps=steps)}

    long_round = rates(cfg, 3 * ADAM_REFERENCE_STEPS)
    assert abs(long_round["adam"] - 0.01) < 1e-12 and long_round["sgd"] == 4.0
    assert rates(cfg, ADAM_REFERENCE_STEPS / 2)["adam"] == 0.03
    assert abs(rates(cfg.replace(dp=False), 3 * ADAM_REFERENCE_STEPS)["adam"] - 0.01) < 1e-12


def test_the_released_model_is_an_exponential_average_of_the_rounds():
    from shared.lora import release_average

    a, b, c = ({"w": np.full(3, v, dtype=np.float32)} for v in (0.0, 1.0, 3.0))
    released = None
    for state in (a, b, c):
        released = release_average(released, state, 0.5)
    np.testing.assert_allclose(released["w"], 0.25 * 0 + 0.25 * 1 + 0.5 * 3)
    assert released["w"].dtype == np.float32
    assert release_average(a, c, 0.0) is c
    with pytest.raises(FedLoraError, match="release-average"):
        FedConfig(release_average=1.0)
