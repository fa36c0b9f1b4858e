"""train.keep_checkpoints: the newest N complete checkpoints stay, older ones go; the one latest_step.txt names and
anything newer (a save in progress) are never touched; 0 keeps all."""
import pytest

from megatron_topd.checkpointing import prune_checkpoints
from megatron_topd.config import TrainConfig


def _checkpoints(root, steps, latest, partial=()):
    for step in steps:
        d = root / f"step_{step:08d}"
        d.mkdir(parents=True)
        if step not in partial:
            (d / "topd_meta.json").write_text("{}")
    (root / "latest_step.txt").write_text(str(latest))


def test_keeps_the_newest_and_never_the_latest_or_a_save_in_progress(tmp_path):
    _checkpoints(tmp_path, [25, 50, 75, 100, 125], latest=100, partial=(125,))
    assert prune_checkpoints(tmp_path, 2) == ["step_00000025", "step_00000050"]
    assert sorted(d.name for d in tmp_path.glob("step_*")) == ["step_00000075", "step_00000100", "step_00000125"]
    assert prune_checkpoints(tmp_path, 1) == ["step_00000075"]
    assert prune_checkpoints(tmp_path, 1) == []  # step 100 is the latest: it stays


def test_zero_keeps_everything_and_bad_values_are_refused(tmp_path):
    _checkpoints(tmp_path, [1, 2, 3], latest=3)
    assert prune_checkpoints(tmp_path, 0) == [] and len(list(tmp_path.glob("step_*"))) == 3
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="train.keep_checkpoints"):
            TrainConfig(keep_checkpoints=bad).validate()
