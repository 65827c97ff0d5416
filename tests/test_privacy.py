"""Epsilon composes over every round, never resets, and an exhausted client declines."""

import json

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from opacus.accountants import RDPAccountant

from client.client_app import LEDGER_KEY, train
from client.policy import DeclineCode
from client.privacy import ALPHAS, PrivacyLedger, history_epsilon, plan_privacy
from client.trainer import train_local
from shared.data import SYNTHETIC_LABELS, client_partition, encode
from shared.config import FedConfig
from shared.errors import FedLoraError
from shared.lora import resolve_device, build_model, trainable_state
from shared.params import to_record
from server.inprocess_grid import ensure_task_identity


def _dataset(cfg, pid=0):
    model, tok = build_model(cfg, 2)
    return model, encode(client_partition(cfg, pid), SYNTHETIC_LABELS, tok, cfg.max_length)


def test_epsilon_after_two_rounds_is_the_accountants_epsilon_for_the_combined_history(tiny_cfg):
    model, ds = _dataset(tiny_cfg)
    plan = plan_privacy(tiny_cfg, len(ds))
    ledger = PrivacyLedger(tiny_cfg.delta, tiny_cfg.target_epsilon)
    train_local(model, ds, tiny_cfg, ledger, plan, server_round=1)
    eps1 = ledger.epsilon()
    ledger = PrivacyLedger.from_json(ledger.to_json())  # carried between rounds as the ClientApp is rebuilt
    train_local(model, ds, tiny_cfg, ledger, plan, server_round=2)
    eps2 = ledger.epsilon()

    reference = RDPAccountant()
    assert plan.prior_noise == tiny_cfg.label_prior_noise  # the label prior's release, once, before round 1
    reference.step(noise_multiplier=plan.prior_noise, sample_rate=1.0)
    for _ in range(2 * plan.steps_per_round):
        reference.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    assert eps2 == pytest.approx(reference.get_epsilon(tiny_cfg.delta, alphas=ALPHAS), rel=1e-9)
    assert eps2 > eps1 > 0
    assert eps2 <= tiny_cfg.target_epsilon * (1 + 1e-6)  # calibrated over all planned rounds
    assert ledger.rounds_trained == [1, 2] and ledger.label_releases == 1


@pytest.mark.parametrize("history", [
    [(0.95, 0.25, 4)] * 3 + [(1.3, 0.01, 100)],
    [(0.6, 1.0, 1), (4.0, 0.5, 2), (0.95, 0.25, 4), (0.6, 1.0, 1)],  # a repeated entry, served from the cache
    [(30.0, 0.001, 5000)],
])
def test_the_cached_epsilon_is_opacus_epsilon_to_the_last_bit(history):
    """The ledger caches per-step RDP per (noise, rate); the figure must stay Opacus's own."""
    reference = RDPAccountant()
    reference.history = list(history)
    expected = reference.get_epsilon(1e-5, alphas=ALPHAS)
    assert history_epsilon(history, 1e-5) == expected
    assert history_epsilon(history, 1e-5) == expected  # again, from the cache
    assert PrivacyLedger(1e-5, 8.0, {"history": list(history)}).epsilon() == expected


def test_what_if_queries_never_change_the_recorded_spend(tiny_cfg):
    ledger = PrivacyLedger(tiny_cfg.delta, tiny_cfg.target_epsilon)
    plan = plan_privacy(tiny_cfg, 64)
    for _ in range(3):
        ledger.epsilon_after(plan)
        ledger.can_train(plan)
    assert ledger.epsilon() == 0.0 and ledger.accountant().history == []


def _train_message(cfg, model, server_round):
    ensure_task_identity()
    config = ConfigRecord(cfg.replace(labels=json.dumps(SYNTHETIC_LABELS)).to_run_config() | {"server-round": server_round})
    return Message(RecordDict({"arrays": to_record(trainable_state(model)), "config": config}), dst_node_id=1, message_type="train")


def _context(node_config, state=None):
    return Context(run_id=1, node_id=1, node_config=node_config, state=state or RecordDict(), run_config={})


def test_client_app_composes_across_rounds_and_declines_when_budget_is_spent(tiny_cfg, tmp_path):
    model, _ = build_model(tiny_cfg, 2)
    ctx = _context({"partition-id": 0, "num-partitions": 3})
    eps = []
    for rnd in (1, 2):
        reply = train(_train_message(tiny_cfg, model, rnd), ctx)
        metrics = reply.content["metrics"]
        assert metrics["declined"] == 0
        eps.append(metrics["epsilon"])
    assert eps[1] > eps[0]
    assert LEDGER_KEY in ctx.state.config_records
    ledger_file = tmp_path / "run" / "ledgers" / "partition-0000.json"
    assert json.loads(ledger_file.read_text())["rounds_trained"] == [1, 2]

    # both planned rounds are spent: a third round would exceed the target, so the client declines
    reply = train(_train_message(tiny_cfg, model, 3), _context({"partition-id": 0, "num-partitions": 3}))
    metrics = reply.content["metrics"]
    assert metrics["declined"] == 1 and metrics["declined-code"] == DeclineCode.BUDGET
    assert "num-examples" not in metrics and "epsilon-next" not in metrics  # details stay in the owner's log
    assert len(reply.content["arrays"]) == 0
    assert metrics["epsilon"] == pytest.approx(eps[1])
    assert json.loads(ledger_file.read_text())["rounds_trained"] == [1, 2]  # declining spends nothing


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_dp_step_changes_adapter_weights_and_leaves_no_hooks(tiny_cfg, device):
    """opacus#820 (optimizer steps stale tensors when the model moves device after Opacus
    hooks it) and opacus#608 (hooks stack per round), on each device the run can use."""
    tiny_cfg = tiny_cfg.replace(device=device)
    model, ds = _dataset(tiny_cfg)
    model.to(resolve_device(device))  # where cached_model puts it, before Opacus wraps it
    plan = plan_privacy(tiny_cfg, len(ds))
    ledger = PrivacyLedger(tiny_cfg.delta, tiny_cfg.target_epsilon)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    for rnd in (1, 2):
        before = trainable_state(model)
        train_local(model, ds, tiny_cfg, ledger, plan, server_round=rnd)
        after = trainable_state(model)
        changed = [n for n in before if not (before[n] == after[n]).all()]
        assert set(changed) == set(before), f"round {rnd}: unchanged adapter tensors {set(before) - set(changed)}"
        hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
        assert hooks == 0, f"round {rnd}: {hooks} Opacus hooks left on the shared model"
        assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), f"frozen base tensor {n} moved"


def test_a_20_row_owner_trains_with_dp_at_its_own_sampling_rate(tiny_cfg):
    """Fewer rows than the run's batch: a smaller Poisson batch, accounted at its own rate."""
    cfg = tiny_cfg.replace(batch_size=128)
    model, ds = _dataset(cfg)
    small = torch.utils.data.TensorDataset(*(t[:20] for t in ds.tensors))
    plan = plan_privacy(cfg, len(small))
    assert plan.batch_size == 5 and plan.sample_rate == pytest.approx(0.25)
    before = {k: v.copy() for k, v in trainable_state(model).items()}
    ledger = PrivacyLedger(cfg.delta, cfg.target_epsilon)
    train_local(model, small, cfg, ledger, plan, server_round=1)
    after = trainable_state(model)
    assert any(not (before[k] == after[k]).all() for k in before if "lora_B" in k), "adapter did not move"
    reference = RDPAccountant()
    reference.step(noise_multiplier=plan.prior_noise, sample_rate=1.0)  # its label prior's release
    for _ in range(plan.steps_per_round):
        reference.step(noise_multiplier=plan.noise_multiplier, sample_rate=0.25)
    assert ledger.epsilon() == pytest.approx(reference.get_epsilon(cfg.delta, alphas=ALPHAS), rel=1e-9)
    assert 0 < ledger.epsilon() <= cfg.target_epsilon


def test_bad_privacy_requests_are_refused(tiny_cfg):
    with pytest.raises(FedLoraError, match="no examples"):
        plan_privacy(tiny_cfg, 0)
    with pytest.raises(FedLoraError, match="must be below 1/N"):
        plan_privacy(tiny_cfg.replace(delta=0.05), 64)
    with pytest.raises(FedLoraError, match="epsilon target cannot be met"):
        plan_privacy(tiny_cfg.replace(target_epsilon=1e-4, rounds=50), 64)


def test_an_empty_poisson_batch_is_a_noise_only_step(tiny_cfg, monkeypatch):
    """A 20-row owner draws an empty batch about once in a hundred rounds: it must not crash,
    and the step still adds noise (the accountant counted it)."""
    from client import secure_random

    draw = secure_random.SecurePoissonSampler.__iter__

    def first_batch_empty(self):
        yield []
        yield from list(draw(self))[1:]

    monkeypatch.setattr(secure_random.SecurePoissonSampler, "__iter__", first_batch_empty)
    model, ds = _dataset(tiny_cfg)
    small = torch.utils.data.TensorDataset(*(t[:20] for t in ds.tensors))
    plan = plan_privacy(tiny_cfg, len(small))
    ledger = PrivacyLedger(tiny_cfg.delta, tiny_cfg.target_epsilon)
    result = train_local(model, small, tiny_cfg, ledger, plan, server_round=1)
    assert result.steps == plan.steps_per_round
    assert ledger.epsilon() > 0


@pytest.mark.parametrize("freeze_head", [True, False])
def test_lp_ft_rounds_train_the_head_alone_then_the_adapter_joins(tiny_cfg, freeze_head):
    """--head-rounds: a DP linear probe first (adapter untouched, not in the clipped norm),
    then fine-tuning, with the probed head frozen by default (--no-freeze-head: it trains
    on); the ledger counts every kind of round the same way."""
    cfg = tiny_cfg.replace(rounds=4, head_rounds=2, freeze_head=freeze_head)
    assert cfg.dp
    model, ds = _dataset(cfg)
    plan = plan_privacy(cfg, len(ds))
    ledger = PrivacyLedger(cfg.delta, cfg.target_epsilon)
    for rnd, head_moves, adapter_moves in ((1, True, False), (2, True, False), (3, not freeze_head, True)):
        before = trainable_state(model)
        train_local(model, ds, cfg, ledger, plan, server_round=rnd)
        after = trainable_state(model)
        moved = {k for k in before if not (before[k] == after[k]).all()}
        assert any("modules_to_save" in k for k in moved) == head_moves, f"round {rnd}: head moved={not head_moves}"
        assert any("lora_B" in k for k in moved) == adapter_moves, f"round {rnd}: adapter moved={not adapter_moves}"
        assert all(p.requires_grad for k, p in model.named_parameters() if "lora_B" in k or "modules_to_save" in k)
    reference = RDPAccountant()
    reference.step(noise_multiplier=plan.prior_noise, sample_rate=1.0)  # the label prior's release
    for _ in range(3 * plan.steps_per_round):
        reference.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    assert ledger.epsilon() == pytest.approx(reference.get_epsilon(cfg.delta, alphas=ALPHAS), rel=1e-9)


def test_the_head_freezes_after_the_probe_only_under_dp_and_only_after_probe_rounds(tiny_cfg):
    from client.trainer import head_frozen

    cfg = tiny_cfg.replace(rounds=8, head_rounds=1)
    assert [head_frozen(cfg, r) for r in (1, 2, 8)] == [False, True, True]
    assert not any(head_frozen(cfg.replace(dp=False), r) for r in range(1, 9))  # no budget or noise to save
    assert not any(head_frozen(cfg.replace(head_rounds=0), r) for r in range(1, 9))  # a random head trains on
    assert not any(head_frozen(cfg.replace(freeze_head=False), r) for r in range(1, 9))
    assert not any(head_frozen(cfg.replace(task="generate"), r) for r in range(1, 9))  # no head of its own


def test_automatic_probe_rounds_grow_with_the_label_count_under_dp_and_are_one_round_without(tiny_cfg):
    """--head-rounds -1 (the default): a noisy DP probe averages over C / (C + 6) of the run
    for C labels before the head freezes (a quarter for two labels, half for eight); an
    exact one converges in a round. An explicit count is kept (at most half the run)."""
    import json

    from client.trainer import head_frozen, head_only, probe_rounds

    cfg = tiny_cfg.replace(rounds=8, head_rounds=-1)
    assert FedConfig().head_rounds == -1
    assert probe_rounds(cfg) == 2 and probe_rounds(cfg.replace(rounds=20)) == 5  # labels not yet known: two
    labelled = {c: cfg.replace(labels=json.dumps([f"l{i}" for i in range(c)])) for c in (2, 3, 4, 8, 20)}
    assert [probe_rounds(labelled[c]) for c in (2, 3, 4, 8, 20)] == [2, 2, 3, 4, 4]
    assert probe_rounds(labelled[8].replace(rounds=20)) == 10 and probe_rounds(labelled[8].replace(rounds=3)) == 1
    assert probe_rounds(labelled[8].replace(dp=False)) == 1
    assert probe_rounds(cfg.replace(rounds=3)) == 1 and probe_rounds(cfg.replace(rounds=1)) == 0
    assert [head_only(cfg, r) for r in (1, 2, 3)] == [True, True, False]
    assert [head_frozen(cfg, r) for r in (2, 3, 8)] == [False, True, True]
    assert probe_rounds(cfg.replace(dp=False)) == 1 and probe_rounds(cfg.replace(dp=False, rounds=1)) == 0
    assert probe_rounds(cfg.replace(head_rounds=2)) == 2 and probe_rounds(cfg.replace(head_rounds=9)) == 4
    assert probe_rounds(cfg.replace(task="generate")) == 0
    with pytest.raises(FedLoraError):
        cfg.replace(head_rounds=-2)


def test_round_rates_decay_by_cosine_and_head_rounds_never_exceed_half_the_run(tiny_cfg):
    from client.trainer import head_only, round_scale

    cfg = tiny_cfg.replace(rounds=8, lr_decay="cosine", head_rounds=2)
    scales = [round_scale(cfg, r) for r in range(1, 9)]
    assert scales[0] == 1.0 and scales[-1] == pytest.approx(0.1) and scales == sorted(scales, reverse=True)
    assert round_scale(cfg.replace(lr_decay="none"), 8) == 1.0
    assert [head_only(cfg, r) for r in (1, 2, 3)] == [True, True, False]
    assert not head_only(cfg.replace(rounds=1), 1) and head_only(cfg.replace(rounds=3), 1)
    assert not head_only(cfg.replace(rounds=3), 2)


def test_noise_calibration_is_cached_on_disk_and_a_tampered_entry_is_recomputed(tmp_path, monkeypatch):
    """Workers share calibrations through the cache folder; a file that claims a smaller
    noise multiplier (more utility, more epsilon) must not be believed."""
    import client.privacy as privacy

    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    calls = []
    real = privacy.get_noise_multiplier
    monkeypatch.setattr(privacy, "get_noise_multiplier", lambda **kw: calls.append(kw) or real(**kw))
    args = (3.0, 1e-5, 0.125, 40)
    privacy._noise_multiplier.cache_clear()
    sigma = privacy._noise_multiplier(*args)
    privacy._noise_multiplier.cache_clear()  # a new worker process
    assert privacy._noise_multiplier(*args) == sigma and len(calls) == 1
    assert 3.0 - 0.01 <= history_epsilon([(sigma, 0.125, 40)], 1e-5) <= 3.0

    [entry] = (tmp_path / "noise-multipliers").glob("*.json")
    entry.write_text(json.dumps({**json.loads(entry.read_text()), "sigma": sigma * 0.8}))
    privacy._noise_multiplier.cache_clear()
    assert privacy._noise_multiplier(*args) == sigma and len(calls) == 2
    entry.write_text("{not json")
    privacy._noise_multiplier.cache_clear()
    assert privacy._noise_multiplier(*args) == sigma and len(calls) == 3
    privacy._noise_multiplier.cache_clear()
