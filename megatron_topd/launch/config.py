"""`LaunchConfig` (the `launch:` section): how a Slurm job's nodes split into roles, and where roles meet.

Torch-free on purpose: the NeMo-Run recipe (a login node's small environment) and the SGLang role (the SGLang image)
read it without the trainer's dependencies. `load_raw` reads a YAML config plus dotted overrides without building the
whole `Config`; the trainer still validates everything with `megatron_topd.config.load_config`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from megatron_topd import checks

_int_at_least = lambda name, v, lo: checks.int_at_least("launch", name, v, lo)  # noqa: E731


@dataclass
class LaunchConfig:
    """Nodes per role in one allocation, split by node index: trainer nodes first, then student, then teacher."""

    trainer_nodes: int = 1
    tasks_per_node: int = 8  # trainer ranks per node: one per GPU (CPU: one per core you give it)
    student_nodes: int = 0  # 0: no student-server nodes; trainer rank 0 launches the servers (CPU demo, one box)
    student_servers_per_node: int = 1  # GPU: gpus_per_node // rollout.tp_size
    teacher_nodes: int = 0  # 0: no teacher nodes (the teacher's window server runs where rank 0 launches it)
    teacher_nodes_per_server: int = 1  # > 1: one SGLang server over several nodes (--nnodes/--node-rank)
    gpus_per_node: int = 0  # 0 on CPU; >0: servers get --base-gpu-id slices, trainer binds LOCAL_RANK
    endpoints_dir: str = ""  # "" = <train.output_dir>/endpoints
    log_dir: str = ""  # "" = <train.output_dir>/logs
    endpoint_timeout_s: float = 1800.0  # the trainer waits this long for every server's URL
    master_port: int = 0  # trainer rendezvous port; 0 = 20000 + job id % 20000
    dist_init_port: int = 0  # multi-node teacher servers' --dist-init-addr port; 0 = master_port + 1000
    # The network the roles meet on. "" = the node names (resolved by each node); an interface name (e.g. ib0,
    # eth1) = that interface: NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME for the trainer and the servers' weight-sync
    # group, and the address servers publish and the weight-sync master gives is that interface's IPv4 address.
    network_interface: str = ""
    server_bind: str = "0.0.0.0"  # the address SGLang servers bind (default: every interface of their node)
    # The plan step asks the memory planner (megatron_topd/plan) whether the trainer's layout fits GPUs of this size
    # and refuses a job it says does not fit, naming the stage and the largest terms; force=true launches anyway.
    gpu_mem_gb: float = 80.0
    force: bool = False
    # A server that dies mid-run ends the attempt and the job requeues (launch/server_loss.py): at most this many
    # times from the same checkpoint; one more loss before a newer checkpoint fails the job.
    max_server_requeues: int = 2
    # The trainer stops with a checkpoint when the time left is below a step + a save + this (launch/deadline.py):
    # what the job still does after the trainer has ended (servers stop, the requeue) must fit before the limit too.
    stop_margin_s: float = 60.0

    def validate(self) -> "LaunchConfig":
        for name in ("trainer_nodes", "tasks_per_node", "student_servers_per_node", "teacher_nodes_per_server"):
            _int_at_least(name, getattr(self, name), 1)
        for name in ("student_nodes", "teacher_nodes", "gpus_per_node"):
            _int_at_least(name, getattr(self, name), 0)
        if self.teacher_nodes % self.teacher_nodes_per_server:
            raise ValueError(f"launch.teacher_nodes={self.teacher_nodes} is not a multiple of "
                             f"launch.teacher_nodes_per_server={self.teacher_nodes_per_server}: every teacher server "
                             "spans the same number of nodes")
        if (self.student_nodes == 0) != (self.teacher_nodes == 0):
            raise ValueError(f"launch.student_nodes={self.student_nodes}, launch.teacher_nodes={self.teacher_nodes}: "
                             "give both server roles nodes (a role-split job) or neither (rank 0 launches both)")
        checks.number_in("launch", "endpoint_timeout_s", self.endpoint_timeout_s, 0.0, float("inf"), lo_open=True)
        checks.int_in("launch", "master_port", self.master_port, 0, 65535)
        checks.int_in("launch", "dist_init_port", self.dist_init_port, 0, 65535)
        checks.number_in("launch", "gpu_mem_gb", self.gpu_mem_gb, 0.0, float("inf"), lo_open=True)
        _int_at_least("max_server_requeues", self.max_server_requeues, 0)
        checks.number_in("launch", "stop_margin_s", self.stop_margin_s, 0.0, float("inf"))
        if not isinstance(self.force, bool):
            raise ValueError(f"launch.force={self.force!r} must be true or false")
        return self

    @property
    def role_split(self) -> bool:
        """Servers on their own nodes (URLs handed over through the endpoints folder)."""
        return self.student_nodes > 0

    @property
    def total_nodes(self) -> int:
        return self.trainer_nodes + self.student_nodes + self.teacher_nodes

    @property
    def num_student_servers(self) -> int:
        return self.student_nodes * self.student_servers_per_node

    @property
    def num_teacher_servers(self) -> int:
        return self.teacher_nodes // self.teacher_nodes_per_server

    def endpoints(self, output_dir: str) -> Path:
        return Path(self.endpoints_dir or Path(output_dir) / "endpoints")

    def logs(self, output_dir: str) -> Path:
        return Path(self.log_dir or Path(output_dir) / "logs")

    def ports(self, job_id: str | int | None) -> tuple[int, int]:
        """(trainer rendezvous port, teacher --dist-init-addr port) for this job."""
        master = self.master_port or 20000 + int(job_id or 0) % 20000
        return master, self.dist_init_port or (master + 1000 if master + 1000 <= 65535 else master - 1000)


def interface_address(name: str) -> str:
    """The IPv4 address of network interface `name` on this node (a clear error if it has none)."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
        except OSError as e:
            raise ValueError(f"launch.network_interface={name!r}: no IPv4 address on this node "
                             f"({socket.gethostname()}): {e}; `ip -br addr` lists the interfaces") from None
    return socket.inet_ntoa(packed[20:24])


def network_env(lc: LaunchConfig) -> dict[str, str]:
    """Environment that pins NCCL and gloo to `launch.network_interface` (empty when unset)."""
    if not lc.network_interface:
        return {}
    return {"NCCL_SOCKET_IFNAME": lc.network_interface, "GLOO_SOCKET_IFNAME": lc.network_interface}


def published_address(lc: LaunchConfig, node: str) -> str:
    """What other nodes use to reach this node: its address on `launch.network_interface`, else its name."""
    return interface_address(lc.network_interface) if lc.network_interface else node


def load_raw(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    """The config file as a dict with dotted overrides applied (values parsed as YAML), nothing validated yet."""
    from megatron_topd.overrides import apply_overrides

    data = (yaml.safe_load(Path(path).read_text()) if path else None) or {}
    return apply_overrides(data, overrides or [])


def section(data: dict, name: str, cls):
    """Dataclass `cls` from `data[name]`; unknown keys are an error naming them (as `load_config` does)."""
    values = data.get(name) or {}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'{name}.{k}' for k in unknown]}; known keys under {name}: "
                         f"{sorted(known)}")
    return cls(**values)


def launch_section(data: dict) -> LaunchConfig:
    return section(data, "launch", LaunchConfig).validate()
