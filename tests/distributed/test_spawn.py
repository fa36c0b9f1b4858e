"""The multi-rank harness: the parent owns the rendezvous (a store on a port the OS chose, bound before any rank
starts), so no rank binds a port of its own; results come back in rank order and a failing rank's traceback is
reported while its peer is still blocked in a collective."""
import pytest

from megatron_topd.parallel.spawn import RankFailed, run_on_ranks
from tests.distributed import spawn_jobs


def test_ranks_meet_at_the_parents_store_and_return_in_order():
    results = run_on_ranks(spawn_jobs.all_reduce_rank, 3, timeout=300)
    assert [r["rank"] for r in results] == [0, 1, 2] and all(r["world"] == 3 for r in results)
    assert all(r["sum"] == 6.0 for r in results)
    assert all(r["master_port"] is None for r in results)  # nothing in a rank may bind the rendezvous port


def test_ranks_see_the_callers_environment_of_the_call_not_the_fork_servers(monkeypatch):
    """Ranks are forked from a server started at the first call (it imported torch and Megatron once); the
    environment must still be the caller's at each call: a variable set, changed or removed since reaches them."""
    monkeypatch.setenv("TOPD_SPAWN_PROBE", "first")
    monkeypatch.setenv("TOPD_SPAWN_GONE", "here")
    first = run_on_ranks(spawn_jobs.environment_and_modules, 2, ["TOPD_SPAWN_PROBE", "TOPD_SPAWN_GONE"])
    monkeypatch.setenv("TOPD_SPAWN_PROBE", "second")
    monkeypatch.delenv("TOPD_SPAWN_GONE")
    second = run_on_ranks(spawn_jobs.environment_and_modules, 2,
                          ["TOPD_SPAWN_PROBE", "TOPD_SPAWN_GONE", "TOPD_SPAWN_EXTRA"], env={"TOPD_SPAWN_EXTRA": "call"})
    assert [r["env"] for r in first] == [{"TOPD_SPAWN_PROBE": "first", "TOPD_SPAWN_GONE": "here"}] * 2
    assert [r["env"] for r in second] == [{"TOPD_SPAWN_PROBE": "second", "TOPD_SPAWN_GONE": None,
                                           "TOPD_SPAWN_EXTRA": "call"}] * 2
    assert all(r["preloaded"] for r in first + second)  # forked with Megatron-Core imported, not imported anew
    assert len({r["pid"] for r in first + second}) == 4


def test_a_failing_rank_is_reported_with_its_traceback():
    with pytest.raises(RankFailed, match=r"(?s)--- rank 1 ---.*ValueError: rank one was told to fail"):
        run_on_ranks(spawn_jobs.fail_on_rank_one, 2, timeout=300)


def test_rank0_work_fails_on_every_rank_with_its_type_and_message():
    """`parallel.on_rank0`: set-up work rank 0 does alone; its failure is raised on every rank at once (a type that
    cannot be rebuilt from its message arrives as the listed type it belongs to)."""
    rank0, rank1 = run_on_ranks(spawn_jobs.rank0_work_outcomes, 2)
    failures = ["FileNotFoundError: prompts.jsonl does not exist",
                "ValueError: _NeedsTwoArguments: prompt too long (row 500)"]
    assert rank0 == failures + ["\"rank 0's result\""] and rank1 == failures + ["None"]
