"""A server lost mid-run (launch/server_loss.py): the role's report is read for this attempt only; each loss requeues
the job (75) until `launch.max_server_requeues` earlier attempts lost a server since the same checkpoint, then the job
fails (1), naming the server, its node and its log. A newer checkpoint (progress) starts the count again."""
from __future__ import annotations

import json

import pytest

from megatron_topd.launch import endpoints, server_loss


@pytest.fixture
def job(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.delenv("SLURM_HET_JOB_ID", raising=False)

    def attempt(restart: int, checkpoint: int | None = None):
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
        if checkpoint is not None:
            (tmp_path / "checkpoints").mkdir(exist_ok=True)
            (tmp_path / "checkpoints" / "latest_step.txt").write_text(str(checkpoint))
        root = tmp_path / "endpoints"
        endpoints.publish_failure(root, "student", "n3-0", node="n3", log="/logs/sglang-n3.log", tail="Killed",
                                  error="exited with code -9 while serving", serving=True)
        return root

    return tmp_path, attempt


def test_this_attempts_report_only(job, monkeypatch):
    out, attempt = job
    root = attempt(0)
    endpoints.publish_failure(root, "teacher", "n4-0", node="n4", log="/logs/t.log", tail="", error="not healthy")
    assert [f["name"] for f in server_loss.reported(root)] == ["n3-0"]  # a start-up failure fails the job instead
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeued attempt does not see the last one's report
    assert server_loss.reported(root) == []


def test_requeues_are_bounded_per_checkpoint(job):
    out, attempt = job
    lost = server_loss.reported(attempt(0, checkpoint=25))
    code, message = server_loss.decide(out, lost, max_requeues=2)
    assert code == 75 and "the student server n3-0 on node n3 died (exited with code -9 while serving; log: " \
        "/logs/sglang-n3.log)" in message and "checkpoint of step 25 (requeue 1 of " in message
    assert server_loss.decide(out, lost, max_requeues=2)[0] == 75  # another rank of the same attempt: same answer
    assert server_loss.decide(out, server_loss.reported(attempt(1)), max_requeues=2)[0] == 75  # still step 25
    code, message = server_loss.decide(out, server_loss.reported(attempt(2)), max_requeues=2)
    assert code == 1 and "Not requeued: attempts ['7.0', '7.1'] already lost a server since the checkpoint of " \
        "step 25 (launch.max_server_requeues=2)" in message
    # Progress: a newer checkpoint, and the next loss requeues again.
    assert server_loss.decide(out, server_loss.reported(attempt(3, checkpoint=50)), max_requeues=2)[0] == 75
    records = [json.loads(line) for line in (out / server_loss.LOSSES).read_text().splitlines()]
    assert [(r["attempt"], r["step"]) for r in records] == [("7.0", 25), ("7.0", 25), ("7.1", 25), ("7.2", 25),
                                                             ("7.3", 50)]
    assert records[0]["servers"] == [{"role": "student", "name": "n3-0", "node": "n3", "log": "/logs/sglang-n3.log"}]


def test_zero_requeues_fails_at_once(job):
    out, attempt = job
    assert server_loss.decide(out, server_loss.reported(attempt(0)), max_requeues=0)[0] == 1
