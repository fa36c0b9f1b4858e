"""A server that dies mid-run: the attempt ends, the job requeues, every server starts fresh and is synced to the
last checkpoint (docs/launching.md says why this and not an in-place restart). Bounded: a server that keeps dying
must not requeue the job forever.

The server role that saw its SGLang exit while serving writes `<endpoints>/<role>/<name>.failed` (role, node, log,
its last lines, "serving": true; launch/serve.py). The trainer learns of it at its next call to that server (every rank that calls it fails; srun's
--kill-on-bad-exit ends the ranks left in a collective) or at its next step's end (the stop check, all ranks agree,
a checkpoint of that step is saved). Either way the attempt's trainer.exit says 75 and the job requeues, unless the
run saved no newer checkpoint since `launch.max_server_requeues` earlier losses: then it fails, naming the server.
Each loss is a line of `<output_dir>/server_losses.jsonl` (attempt, role, node, the checkpoint step it resumes from).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from megatron_topd.launch import endpoints

ROLES = ("student", "teacher")
LOSSES = "server_losses.jsonl"


def reported(root: str | Path, within_s: float = 0.0, poll_s: float = 0.5) -> list[dict]:
    """This attempt's servers that a role reported dead after they had served (a server that never started fails
    the job instead: endpoints.wait_for), waiting up to `within_s` for a report (a role checks its servers every
    second; a call to a dead server can fail before its role has written the report)."""
    deadline = time.monotonic() + within_s
    while True:
        lost = [f for f in endpoints.failures(root, ROLES) if f.get("serving")]
        if lost or time.monotonic() >= deadline:
            return lost
        time.sleep(poll_s)  # polling interval of a wait on what the server roles report (deadline above)


def describe(lost: list[dict]) -> str:
    return "; ".join(f"the {f['role']} server {f['name']} on node {f['node']} died ({f['error']}; log: {f['log']})"
                     for f in lost)


def decide(output_dir: str | Path, lost: list[dict], max_requeues: int) -> tuple[int, str]:
    """(exit code for trainer.exit, message): 75 (requeue) while fewer than `max_requeues` earlier attempts lost a
    server at the same checkpoint, else 1. Records this attempt's loss (once per rank that decides; the count
    ignores this attempt's own lines)."""
    from megatron_topd.checkpointing import latest_step

    out = Path(output_dir)
    step = latest_step(out / "checkpoints") or 0  # 0: no checkpoint yet, the run starts over
    path = out / LOSSES
    earlier = set()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line another rank is still writing
            if entry.get("step") == step and entry.get("attempt") != endpoints.attempt_id():
                earlier.add(entry["attempt"])
    with open(path, "a") as f:
        f.write(json.dumps({"attempt": endpoints.attempt_id(), "step": step,
                            "servers": [{k: e[k] for k in ("role", "name", "node", "log")} for e in lost]}) + "\n")
    what = describe(lost)
    if len(earlier) >= max_requeues:
        return 1, (f"{what}. Not requeued: attempts {sorted(earlier)} already lost a server since the checkpoint of "
                   f"step {step} (launch.max_server_requeues={max_requeues}); see the server's log, then resubmit "
                   "(the run resumes from that checkpoint)")
    return 75, (f"{what}. Stopping this attempt: the job requeues, its servers start fresh and are synced to the "
                f"checkpoint of step {step} (requeue {len(earlier) + 1} of launch.max_server_requeues={max_requeues} "
                "from it)")
