import os

# One thread per process: the machine has 2 cores and distributed tests spawn several ranks.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--job-runs", type=int, default=1,
                     help="run the Slurm tier's fault job N times in one session, its tests against each run; the "
                          "cluster and the uninterrupted reference are made once (make test-repeat-job)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer-running test (CI runs them all)")
    config.addinivalue_line("markers", "sglang: needs the .venv-sglang environment and starts a real SGLang server")


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> dict:
    """A tiny random student and teacher (HF + converted Megatron checkpoints) and prompts, built once for the
    integration and Slurm tiers (the mechanics; the demo's trained task models are tested in
    distributed/test_task_assets.py)."""
    from megatron_topd.testing.tiny_assets import build_tiny_assets

    return build_tiny_assets(tmp_path_factory.mktemp("demo_assets"))


TASK_ASSET_ARGS = ["--digits", "2", "--teacher-steps", "250", "--student-steps", "30", "--n-train", "3000",
                   "--n-heldout", "60", "--n-prompts", "100"]


@pytest.fixture(scope="session")
def task_assets(tmp_path_factory) -> dict:
    """The demo's task assets at a small recipe (2-digit addition, ~20 s of SFT): a trained teacher and a
    warm-started student, through megatron_topd.task_assets' command line."""
    import subprocess
    import sys
    from pathlib import Path

    from megatron_topd.task_assets import asset_paths

    out = tmp_path_factory.mktemp("task_assets") / "assets"
    subprocess.run([sys.executable, "-m", "megatron_topd.task_assets", "--out", str(out), *TASK_ASSET_ARGS],
                   cwd=Path(__file__).resolve().parents[1], check=True, capture_output=True)
    return asset_paths(out)
