"""Launch `megatron-topd train` with NeMo-Run: a Slurm executor (torchrun per node) or a local one.

    python -m megatron_topd.launch.nemo_run --config examples/topd_8b.yaml --nodes 2 --account A --partition P \
        [--dryrun] [section.key=value ...]

`--dryrun` prints the sbatch script NeMo-Run would submit, without submitting. Pinned: nemo-run 0.11.1 with
leptonai 0.27.3 (newer leptonai breaks `import nemo_run`).
"""
from __future__ import annotations

import argparse
import shlex


def train_script(config: str, overrides: list[str]):
    import nemo_run as run

    cmd = " ".join(["-m", "megatron_topd.cli", "train", "--config", shlex.quote(config), *map(shlex.quote, overrides)])
    return run.Script(inline=f"python {cmd}")


def slurm_executor(*, account: str, partition: str, nodes: int, gpus_per_node: int = 8, time: str = "48:00:00",
                   container_image: str = "nvcr.io/nvidia/pytorch:25.10-py3", container_mounts: list[str] | None = None,
                   job_dir: str = "runs/nemo_run", env_vars: dict | None = None):
    import nemo_run as run

    return run.SlurmExecutor(
        account=account,
        partition=partition,
        nodes=nodes,
        ntasks_per_node=gpus_per_node,
        gpus_per_node=gpus_per_node,
        time=time,
        container_image=container_image,
        container_mounts=container_mounts or [],
        env_vars={"CUDA_DEVICE_MAX_CONNECTIONS": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", **(env_vars or {})},
        exclusive=True,
        mem="0",
        tunnel=run.LocalTunnel(job_dir=job_dir),
        packager=run.Packager(),
    )


def local_executor(ntasks: int = 1):
    import nemo_run as run

    return run.LocalExecutor(ntasks_per_node=ntasks, launcher="torchrun" if ntasks > 1 else None)


def main(argv: list[str] | None = None) -> None:
    import nemo_run as run

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--executor", choices=("slurm", "local"), default="slurm")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--account", default="")
    p.add_argument("--partition", default="")
    p.add_argument("--time", default="48:00:00")
    p.add_argument("--container-image", default="nvcr.io/nvidia/pytorch:25.10-py3")
    p.add_argument("--mount", action="append", default=[])
    p.add_argument("--dryrun", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.executor == "slurm":
        if not args.account or not args.partition:
            p.error("--account and --partition are required for --executor slurm")
        executor = slurm_executor(account=args.account, partition=args.partition, nodes=args.nodes,
                                  gpus_per_node=args.gpus_per_node, time=args.time,
                                  container_image=args.container_image, container_mounts=args.mount)
        executor.launcher = "torchrun"
    else:
        executor = local_executor(args.gpus_per_node)
    run.run(train_script(args.config, args.overrides), executor=executor, dryrun=args.dryrun, name="topd")


if __name__ == "__main__":
    main()
