"""Training components: process group, sharding, train/eval loops (the demo and benchmarks use them)."""
from .loop import evaluate, local_process_group, shard_for_training, train_steps

__all__ = ["evaluate", "local_process_group", "shard_for_training", "train_steps"]
