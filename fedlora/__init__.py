"""fedlora: federated DP LoRA fine-tuning on Flower."""

__version__ = "0.1.0"
