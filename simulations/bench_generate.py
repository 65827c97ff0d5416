"""The done-when figure of `--task generate`: held-out response perplexity of the untuned
base model against the federated DP model (secure aggregation on), on the synthetic copy data.

    python -m simulations.bench_generate [key=value ...]   # FedConfig overrides

The baseline is the same test set through the same evaluation with the adapter at its
initial state (B = 0: exactly the base model). Writes `bench_generate.json` in the output.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from shared.quiet import offline_and_quiet
from simulations.bench_accuracy import _config

DEFAULTS = dict(task="generate", brands=3, num_clients=3, examples_per_brand=120, test_size=45, rounds=2, batch_size=24,
                target_epsilon=8.0, output="runs/bench-generate")
"""The federation (small, for a 2-core CPU: the frozen bottom 26 layers run once per owner);
the recipe (model, clipping norm, rate, adapted layers) is the task's own default (shared/tasks/generate.py)."""


def main(argv: list[str]) -> dict:
    offline_and_quiet()
    from shared.tasks.generate import TASK

    cfg = _config([f"{k}={v}" for k, v in DEFAULTS.items()] + argv)  # an override wins; the task's recipe fills the rest
    from server.report import epsilon_max
    from shared.data import choose_max_length, encode, load_federation
    from shared.evaluation import evaluate
    from shared.lora import cached_model, load_trainable_state
    from simulations.run import simulate

    t0 = time.perf_counter()
    fed = load_federation(cfg)
    model, tokenizer = cached_model(cfg, 0)
    load_trainable_state(model, model.fedlora_initial_state)
    test = encode(fed.test, [], tokenizer, choose_max_length(fed.test, tokenizer, cfg, model), "test data",
                  task=cfg.task, model=model)
    base = evaluate(model, test, 0, task=cfg.task)
    print(f"base model: perplexity {base['perplexity']:.3f} on {base['response_tokens']} response tokens "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    summary = simulate(cfg)
    tuned = summary["final"]
    result = {"config": {k: getattr(cfg, k) for k in {**TASK.defaults, **DEFAULTS}}, "base_perplexity": base["perplexity"],
              "tuned_perplexity": tuned["perplexity"], "ratio": tuned["perplexity"] / base["perplexity"],
              "reduction": 1 - tuned["perplexity"] / base["perplexity"], "epsilon_max": epsilon_max(summary),
              "rounds": [{"round": r["round"], "perplexity": r["perplexity"]} for r in summary["rounds"]],
              "wall_seconds": round(time.perf_counter() - t0, 1)}
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output) / "bench_generate.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
