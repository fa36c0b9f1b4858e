"""The microbatch width rule (issue 24): every rank's shard of a microbatch is valid for what the layout runs, over
TP x SP x FP8 x CP; checked from the rule's own definition of a shard, not from the function's formula."""
import itertools

import pytest

from megatron_topd.train.batches import pad_multiple, round_up


@pytest.mark.parametrize("tp,sp,fp8,cp", [c for c in itertools.product((1, 2, 4, 8), (False, True), (False, True),
                                                                       (1, 2, 4)) if not (c[1] and c[0] == 1)])
def test_every_shard_of_every_padded_width_is_valid(tp, sp, fp8, cp):
    m = pad_multiple(tp, sequence_parallel=sp, fp8=fp8, context_parallel=cp)
    for n in list(range(1, 300)) + [16376, 16383, 16385]:
        width = round_up(n, m)
        assert width >= n and width - n < m and width % 8 == 0
        shard, rest = divmod(width, (tp if sp else 1) * cp)
        assert rest == 0, (n, width)
        if cp > 1:
            assert width % (2 * cp) == 0  # Megatron's load-balanced split: 2 x CP chunks
        if fp8:
            assert shard % 16 == 0, f"{n} -> {width}: {shard} tokens per rank, not a multiple of 16 (FP8 GEMM)"


def test_the_70b_layout_pads_16376_tokens_to_2048_per_rank_not_2047():
    m = pad_multiple(8, sequence_parallel=True, fp8=True)  # examples/topd_70b.yaml: TP8, SP, FP8 hybrid
    assert m == 128 and round_up(16376, m) == 16384
    assert round_up(16376, pad_multiple(8, sequence_parallel=True, fp8=False)) == 16376  # bf16: TP alone suffices
    assert pad_multiple(1, sequence_parallel=False, fp8=False) == 8  # the CPU demo's rule is unchanged
    assert pad_multiple(2, sequence_parallel=False, fp8=True) == 16  # no SP: each rank sees the whole width
