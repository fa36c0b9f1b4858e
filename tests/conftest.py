import os

# One thread per process: the machine has 2 cores and distributed tests spawn several ranks.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer-running test (CI runs them all)")
    config.addinivalue_line("markers", "sglang: needs the .venv-sglang environment and starts a real SGLang server")


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> dict:
    """The CPU demo's tiny student and teacher (HF + converted Megatron checkpoints) and prompts, built once for the
    integration and Slurm tiers."""
    from megatron_topd.demo import build_assets

    return build_assets(tmp_path_factory.mktemp("demo_assets"))
