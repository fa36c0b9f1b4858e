"""A server launched from a torchrun/srun trainer rank must not inherit the trainer's rendezvous variables."""
from megatron_topd.rollout import SGLangServer


def test_server_environment_drops_trainer_rendezvous_variables(monkeypatch, tmp_path):
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(k, v)
    env = SGLangServer(str(tmp_path), device="cpu").environment()
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"} & set(env)
    assert env["OMP_NUM_THREADS"] == "1" and env["SGLANG_USE_CPU_ENGINE"] == "1"
