"""The step batch as flat tensors (issue 25): rows go in and come out unchanged, bad rows are refused, and the
tensors are what a rank receives (no Python lists of every token on every rank)."""
import pytest
import torch

from megatron_topd.rollout.step_batch import StepBatch


def _batch():
    prompts = [[1, 2, 3], [4], [5, 6]]
    responses = [[7, 8], [9, 10, 11, 12], [2**31 - 1]]  # int32's largest id survives
    logprobs = [[-0.5, -1.25], [-0.125, -0.25, -0.375, -4.0], [-2.0]]  # exact in float32, as the loss reads them
    return StepBatch.from_rows(prompts, responses, logprobs, ["stop", "length", "stop"], ["3", "3", "2"],
                               {"position": 3}, staleness=1.0), prompts, responses, logprobs


def test_rows_round_trip_through_the_flat_tensors():
    batch, prompts, responses, logprobs = _batch()
    assert len(batch) == 3 and batch.row_lengths() == [5, 5, 3]
    assert batch.rows([2, 0]) == ([prompts[2], prompts[0]], [responses[2], responses[0]], [logprobs[2], logprobs[0]])
    assert batch.rows(range(3)) == (prompts, responses, logprobs)
    assert batch.tokens.dtype == torch.int32 and batch.response_logprobs.dtype == torch.float32
    assert batch.nbytes == 13 * 4 + 3 * 8 * 2 + 7 * 4  # ids, two length vectors, log-probs


def test_mismatched_rows_are_refused_with_the_row():
    with pytest.raises(ValueError, match="rollout 1: 2 response tokens but 1 log-probs"):
        StepBatch.from_rows([[1], [2]], [[3], [4, 5]], [[-1.0], [-1.0]], ["stop"] * 2, ["0"] * 2, {})
    with pytest.raises(ValueError, match="one of each per rollout"):
        StepBatch.from_rows([[1]], [[3], [4]], [[-1.0], [-1.0]], ["stop"] * 2, ["0"] * 2, {})
