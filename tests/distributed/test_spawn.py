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


def test_a_failing_rank_is_reported_with_its_traceback():
    with pytest.raises(RankFailed, match=r"(?s)--- rank 1 ---.*ValueError: rank one was told to fail"):
        run_on_ranks(spawn_jobs.fail_on_rank_one, 2, timeout=300)
