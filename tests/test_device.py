"""--device: one training path on CPU and GPU; the GPU share of each simulation worker."""
import pytest
import torch

from shared.config import FedConfig
from shared.errors import FedLoraError
from shared.lora import cached_model, resolve_device
from simulations.run import CUDA_CONTEXT_BYTES, gpu_share, workers_per_gpu


def test_device_names_are_checked():
    with pytest.raises(FedLoraError, match="--device must be auto, cpu or cuda"):
        FedConfig(device="gpu0")
    with pytest.raises(FedLoraError, match="--client-gpus"):
        FedConfig(client_gpus=2.0)


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(FedLoraError, match="no CUDA GPU is visible"):
        resolve_device("cuda")
    assert gpu_share(FedConfig(device="auto")) == 0.0  # Ray gives CPU workers no GPU share
    assert gpu_share(FedConfig(device="cpu", client_gpus=0.25)) == 0.25  # an explicit share is kept


def test_workers_per_gpu_follow_free_memory_and_cpus():
    mib = 2**20
    model = 90 * mib  # MiniLM in float32
    per_worker = CUDA_CONTEXT_BYTES + 4 * model
    assert workers_per_gpu(model, 80_000 * mib, cpu_slots=16) == 16  # an H100 is CPU-bound here
    assert workers_per_gpu(model, 80_000 * mib, cpu_slots=1000) == int(0.9 * 80_000 * mib // per_worker)
    assert workers_per_gpu(540 * mib, 4_000 * mib, cpu_slots=16) == 1  # SmolLM2 on a small card
    assert workers_per_gpu(540 * mib, 100 * mib, cpu_slots=16) == 1  # never zero: the run says so when it fails


def test_cached_model_lives_on_the_chosen_device(tiny_cfg):
    model, _ = cached_model(tiny_cfg.replace(device="cpu"), 2)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cached_model_moves_to_the_gpu(tiny_cfg):
    model, _ = cached_model(tiny_cfg.replace(device="cuda"), 2)
    assert {p.device.type for p in model.parameters()} == {"cuda"}


def test_the_owner_not_the_server_chooses_where_its_agent_trains():
    from client.policy import effective_config

    server_asks = FedConfig(device="cuda")
    assert effective_config(server_asks, {"device": "cpu", "data-path": "x.csv"}).device == "cpu"
    assert effective_config(server_asks, {"partition-id": 0}).device == "cuda"  # simulation: the run's setting


def test_worker_slots_count_workers_not_cpus_over_client_cpus(monkeypatch):
    """--workers is already a worker count (Ray gets workers x client_cpus CPUs); dividing it by
    --client-cpus again gave the GPU share too few workers when both were set."""
    import os

    from simulations.bench_scale import capacity
    from simulations.run import ray_backend_config, worker_slots

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert worker_slots(FedConfig(workers=4, client_cpus=2)) == 4
    assert ray_backend_config(FedConfig(workers=4, client_cpus=2))["init_args"]["num_cpus"] == 8
    assert worker_slots(FedConfig(client_cpus=2)) == 8 and worker_slots(FedConfig(client_cpus=32)) == 1
    assert capacity(FedConfig(device="cpu", workers=4, client_cpus=2), bare=10.0) == 40.0


def test_automatic_client_cpus_share_the_cores_among_a_rounds_clients(monkeypatch):
    """--client-cpus 0: a round with fewer clients than cores spreads the cores over them (a
    1-owner run trained on one core of two); otherwise one CPU per worker, as Ray counts it.
    An explicit value, --workers and a Ray cluster keep their reservation."""
    import os

    from simulations.run import ray_backend_config, with_worker_cpus, worker_slots

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    auto = FedConfig()
    assert auto.client_cpus == 0
    assert with_worker_cpus(auto, 1).client_cpus == 16
    assert with_worker_cpus(auto, 6).client_cpus == 2 and worker_slots(with_worker_cpus(auto, 6)) == 8
    assert with_worker_cpus(auto, 100).client_cpus == 1
    assert with_worker_cpus(auto.replace(fraction=0.01), 10_000).client_cpus == 1
    assert with_worker_cpus(auto.replace(fraction=0.1), 30).client_cpus == 5
    assert with_worker_cpus(auto.replace(client_cpus=0.5), 1).client_cpus == 0.5
    assert with_worker_cpus(auto.replace(workers=2), 1).client_cpus == 1
    assert with_worker_cpus(auto.replace(ray_address="auto"), 1).client_cpus == 1
    # never a zero reservation, even where the count was not resolved
    assert ray_backend_config(auto)["client_resources"]["num_cpus"] == 1.0 and worker_slots(auto) == 16
