"""`fedlora segment`: federated DP k-means through the real ClientApp, ledger and secure aggregation."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from opacus.accountants import RDPAccountant

from client.client_app import train
from client.policy import DeclineCode
from client.privacy import ALPHAS, PrivacyLedger
from fedlora.cli import main
from server.segment import _messages
from server.inprocess_grid import ensure_task_identity
from shared.segment import (
    COUNT_WEIGHT, SENSITIVITY, cluster_stats, describe_segments, noise_schedule, simulation_owners, update_centroids,
)


@pytest.fixture
def seg_cfg(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))  # the owners' embedding cache
    return tiny_cfg.replace(segment_k=4, segment_rounds=2)


def _context(pid=0):
    return Context(run_id=1, node_id=1, node_config={"partition-id": pid, "num-partitions": 3}, state=RecordDict(),
                   run_config={})


def _release(cfg, ctx, release, centroids, stage="stats"):
    ensure_task_identity()
    msg = _messages([1], cfg, release, stage, release, cfg.segment_rounds + 1, centroids)[0]
    return train(msg, ctx).content


def _owner_x(cfg, pid=0):
    from client.segment import embeddings

    _, frames, _ = simulation_owners(cfg)
    return embeddings(cfg, frames[pid][cfg.text_column].astype(str).tolist())


def _ledger(cfg, pid=0):
    return PrivacyLedger.from_json((_ledger_path(cfg, pid)).read_text())


def _ledger_path(cfg, pid=0):
    from pathlib import Path

    return Path(cfg.output) / "ledgers" / f"partition-{pid:04d}.json"


@pytest.mark.parametrize("releases", [2, 3, 6])
def test_the_schedule_spends_exactly_the_budget_and_most_of_it_on_the_last_release(releases):
    zs = noise_schedule(2.0, 1e-5, releases)
    acc = RDPAccountant()
    acc.history = [(z, 1.0, 1) for z in zs]
    assert acc.get_epsilon(1e-5, alphas=ALPHAS) == pytest.approx(2.0, rel=1e-6)
    assert zs[-1] == min(zs) and zs[0] == max(zs)
    with pytest.raises(ValueError):
        noise_schedule(2.0, 1e-5, 1)


def test_every_release_is_in_the_ledger_and_its_epsilon_is_the_accountants_for_the_noise_used(seg_cfg):
    ctx = _context()
    d = _owner_x(seg_cfg).shape[1]
    rng = np.random.default_rng(0)
    releases = seg_cfg.segment_rounds + 1
    eps = []
    for release in range(1, releases + 1):
        centroids = np.zeros((1, d)) if release == 1 else rng.normal(size=(seg_cfg.segment_k, d)) * 0.1
        metrics = _release(seg_cfg, ctx, release, centroids)["metrics"]
        assert metrics["declined"] == 0, metrics
        eps.append(metrics["epsilon"])
    ledger = _ledger(seg_cfg)
    zs = noise_schedule(seg_cfg.segment_epsilon, seg_cfg.delta, releases)
    reference = RDPAccountant()
    for z in zs:
        reference.step(noise_multiplier=z, sample_rate=1.0)
    assert [tuple(h) for h in ledger.accountant_state["history"]] == [(z, 1.0, 1) for z in zs]
    assert ledger.epsilon() == pytest.approx(reference.get_epsilon(seg_cfg.delta, alphas=ALPHAS), rel=1e-12)
    assert eps == sorted(eps) and eps[-1] == pytest.approx(ledger.epsilon())
    assert ledger.epsilon() <= seg_cfg.segment_epsilon * (1 + 1e-6)
    # the budget is spent: the server asking again is declined, and the ledger stays as it was
    before = _ledger_path(seg_cfg).read_text()
    metrics = _release(seg_cfg, _context(), releases, rng.normal(size=(seg_cfg.segment_k, d)))["metrics"]
    assert (metrics["declined"], metrics["declined-code"]) == (1, DeclineCode.BUDGET)
    assert _ledger_path(seg_cfg).read_text() == before


def test_the_noise_does_not_follow_any_seed_the_server_can_choose_and_has_the_calibrated_size(seg_cfg):
    cfg = seg_cfg.replace(segment_k=8, seed=1234)
    x = _owner_x(cfg)
    centroids = x[:8] + 0.01  # 8 clusters, so many coordinates to measure the noise on
    exact = cluster_stats(x, centroids)
    noisy = []
    for attempt in range(2):
        torch.manual_seed(cfg.seed)  # whatever the run seed fixes, the noise is not drawn from it
        np.random.seed(cfg.seed)
        content = _release(cfg, _context(), 2, centroids)
        assert content["metrics"]["declined"] == 0
        noisy.append(content["arrays"]["stats"].numpy())
    assert not np.allclose(noisy[0], noisy[1])
    z = noise_schedule(cfg.segment_epsilon, cfg.delta, cfg.segment_rounds + 1)[1]
    residual = np.concatenate([n - exact for n in noisy])
    assert residual.std() == pytest.approx(z * SENSITIVITY, rel=0.2)
    assert abs(residual.mean()) < 4 * z * SENSITIVITY / np.sqrt(residual.size)


@pytest.mark.parametrize("bad", ["wrong dimension", "not finite", "k above the run's", "k above the rows"])
def test_untrusted_centroids_are_declined_before_the_ledger_is_touched(seg_cfg, bad):
    x = _owner_x(seg_cfg)
    n, d = x.shape
    cfg = seg_cfg
    centroids = {"wrong dimension": np.zeros((2, d + 1)), "not finite": np.full((2, d), np.nan),
                 "k above the run's": np.zeros((cfg.segment_k + 1, d)), "k above the rows": np.zeros((n + 1, d))}[bad]
    if bad == "k above the rows":
        cfg = cfg.replace(segment_k=n + 1)
    metrics = _release(cfg, _context(), 2, centroids)["metrics"]
    assert (metrics["declined"], metrics["declined-code"]) == (1, DeclineCode.REQUEST)
    assert not _ledger_path(cfg).exists()


def test_summed_exact_statistics_are_a_pooled_lloyd_step():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = x[:5].copy()
    total = sum(cluster_stats(part, c) for part in np.array_split(x, 3))
    new, counts = update_centroids(total, c, floor=1.0)
    labels = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
    assert counts == pytest.approx(np.bincount(labels, minlength=5))
    assert total[-5:] == pytest.approx(COUNT_WEIGHT * counts)
    for j in range(5):
        assert new[j] == pytest.approx(x[labels == j].mean(0))


def test_shrinkage_pulls_noisy_means_towards_the_center_and_small_clusters_keep_their_centroid():
    d = 100
    center, prev = np.zeros(d), np.ones((2, d)) * 0.05
    stats = np.concatenate([np.full(d, 10.0), np.full(d, 1.0), [COUNT_WEIGHT * 100, COUNT_WEIGHT * 1]])
    new, _ = update_centroids(stats, prev, floor=5.0, center=center, noise_var=100.0)
    assert np.linalg.norm(new[0]) < np.linalg.norm(np.full(d, 0.1))  # shrunk: part of that mean is noise
    assert new[1] == pytest.approx(prev[1])  # a count under the floor: unchanged


def test_segment_descriptions_name_typical_texts_and_distinctive_words():
    texts = ["late flight delayed again", "flight delayed gate", "delayed flight crew late"] * 2 + \
            ["great crew friendly service", "friendly staff great seat", "great service friendly"] * 2
    x = np.array([[1.0, 0.0]] * 6 + [[0.0, 1.0]] * 6)
    labels = np.array([0] * 6 + [1] * 6)
    out = describe_segments(texts, x, np.eye(2), labels, n_texts=2, n_words=3)
    assert [s["size"] for s in out] == [6, 6]
    assert set(out[0]["top_words"]) <= {"delayed", "flight", "late", "gate"} and "delayed" in out[0]["top_words"]
    assert "friendly" in out[1]["top_words"] and out[1]["typical_texts"][0] in texts[6:]


@pytest.fixture
def segment_files(tmp_path):
    from shared.data import synthetic_federation

    train, _ = synthetic_federation(3, 30, 30, seed=1)
    train.to_csv(tmp_path / "train.csv", index=False)
    return tmp_path


SEGMENT_CASES = {
    "k larger than an owner's rows": (["--k", "31"], "--k 31 is larger than owner brand-000's 30 rows"),
    "missing text column": (["--text-column", "review"], "column 'review' not in"),
    "missing owner column": (["--partition-by", "store"], "column 'store' not in"),
    "k below 2": (["--k", "1"], "--k must be at least 2"),
    "unmeetable delta": (["--delta", "0.5"], "must be below 1/N"),
}


@pytest.mark.parametrize("case", list(SEGMENT_CASES))
def test_segment_bad_input_gives_one_line_exit_2_and_keeps_the_ledgers(case, segment_files, tmp_path, capsys):
    argv, message = SEGMENT_CASES[case]
    out = tmp_path / "out"
    ledger = out / "ledgers" / "partition-0000.json"
    ledger.parent.mkdir(parents=True)
    ledger.write_text('{"kept": true}')
    code = main(["segment", "--model", "tiny-bert", "--data", str(segment_files / "train.csv"),
                 "--partition-by", "brand", "--min-client-examples", "5", "--output", str(out), *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("fedlora: error")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err[-2000:]
    assert ledger.read_text() == '{"kept": true}'


def test_segment_flags_are_the_config_fields_with_their_help():
    from dataclasses import fields

    from fedlora.cli import build_parser
    from shared.config import FedConfig, flag_help

    parser = build_parser()
    seg = parser._subparsers._group_actions[0].choices["segment"]
    actions = {a.dest: a for a in seg._actions}
    field = {f.name: f for f in fields(FedConfig)}
    for dest, flag in (("segment_k", "--k"), ("segment_epsilon", "--target-epsilon"), ("data", "--data"),
                       ("text_column", "--text-column"), ("seed", "--seed"), ("num_clients", "--num-clients")):
        assert actions[dest].option_strings == [flag] and actions[dest].help == flag_help(field[dest])
    assert actions["output"].help.endswith("(default: runs/segments)")
    args = parser.parse_args(["segment", "--k", "3", "--target-epsilon", "1.5", "--client-cpus", "0.5"])
    assert (args.segment_k, args.segment_epsilon, args.client_cpus, args.output, args.dp) == (3, 1.5, 0.5, None, True)


@pytest.mark.slow
def test_segment_end_to_end_through_flower_with_secure_aggregation(seg_cfg):
    from simulations.segment import simulate_segment

    cfg = seg_cfg.replace(examples_per_brand=120, segment_k=3, segment_rounds=2, segment_epsilon=20.0)
    summary = simulate_segment(cfg)
    out = __import__("pathlib").Path(cfg.output)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert [r["stage"] for r in summary["rounds"]] == ["mean", "lloyd", "lloyd"]
    assert all(r["contributors"] == 3 for r in summary["rounds"]) and summary["owners_written"] == 3
    assert summary["config"]["secure-agg"] is True
    # the server saw the sum of three owners' noisy counts: close to all 360 rows, not one owner's 120
    assert abs(sum(summary["rounds"][-1]["noisy_counts"]) - 360) < 60
    zs = noise_schedule(cfg.segment_epsilon, cfg.delta, 3)
    for pid in range(3):
        ledger = _ledger(cfg, pid)
        assert [h[0] for h in ledger.accountant_state["history"]] == pytest.approx(zs, rel=1e-12)
        assert ledger.epsilon() == pytest.approx(cfg.segment_epsilon, rel=1e-6)
    assert len(summary["clients"]) == 3  # keyed by node id: no partition id leaves an owner
    assert all(c["epsilon"] == pytest.approx(cfg.segment_epsilon, rel=1e-6) for c in summary["clients"].values())
    centroids = np.load(out / "centroids.npy")
    assert centroids.shape == (3, 32) and np.isfinite(centroids).all()
    final = summary["final"]
    assert final["rows"] == 360 and 0.99 < final["objective_ratio"] < 1.5 and -1 <= final["ari"] <= 1
    for name in summary["owners"]:
        rows = __import__("pandas").read_csv(out / "owners" / name / "segments.csv")
        assert len(rows) == 120 and set(rows["segment"]) <= {0, 1, 2} and (rows["brand"] == name).all()
        assert "Top words:" in (out / "owners" / name / "segments.md").read_text()


def test_a_checkpoint_embeds_with_its_adapted_encoder(seg_cfg, tmp_path):
    from peft import PeftModel

    from client.segment import embeddings
    from shared.lora import build_model, save_adapter
    from shared.models import load_base_model
    from shared.segment import embed

    model, _ = build_model(seg_cfg, 3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter
    save_adapter(model, tmp_path / "ckpt" / "checkpoints" / "round-002")
    texts = ["my flight was late", "great crew", "lost my bag again"]
    tuned = embeddings(seg_cfg.replace(segment_checkpoint=str(tmp_path / "ckpt")), texts)
    base = embeddings(seg_cfg, texts)
    base_model, tok = load_base_model(seg_cfg.model, 3, seg_cfg.seed)
    expected = embed(PeftModel.from_pretrained(base_model, tmp_path / "ckpt" / "checkpoints" / "round-002"), tok, texts, 32)
    assert tuned == pytest.approx(expected, abs=1e-5)
    assert not np.allclose(tuned, base, atol=1e-3)
    assert np.linalg.norm(tuned, axis=1) == pytest.approx(1.0)
