"""NeMo-Run recipes: the same `megatron-topd train` command on a Slurm cluster or locally (docs in README)."""
