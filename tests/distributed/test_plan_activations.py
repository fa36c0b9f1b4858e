"""Issue 12, must-show 2: predicted vs measured activation peak of a training microbatch on CPU, within the errors
measured per sequence length plus a margin (TOLERANCE).

Measured: the tiny student (local spec, fp32, DDP-wrapped as in training) runs one microbatch through Megatron's
schedule (forward, token-mean cross entropy on vocabulary-parallel logits, backward) under `torch.profiler` with
`profile_memory=True`; the allocator's allocation/free events are replayed in time order and the peak of live bytes
above the start is the activation peak (weights, grad buffers exist before and are not counted). Deterministic,
unlike ru_maxrss, which sees neither frees nor what glibc caches. Predicted: `stage_activations` with the
`local_unfused` profile. Three sequence lengths x recompute none / selective / full.
"""
import pytest

from megatron_topd.parallel.spawn import run_on_ranks
from megatron_topd.plan.microbatch import MicrobatchShape, stage_activations
from tests.distributed import plan_jobs as jobs

SEQS = (128, 256, 512)
RECOMPUTE = ("none", "selective", "full")
# |predicted / measured - 1| as measured (the trace is deterministic: the same bytes on every run), largest over the
# three recompute modes, per S: docs/planning.md. S = 512 is worse: the attention backward's S^2 transients.
MEASURED_ERROR = {128: 0.017, 256: 0.041, 512: 0.128}
MARGIN = 0.02  # two points: a regression of the model or of Megatron's memory use that is larger fails
TOLERANCE = {seq: err + MARGIN for seq, err in MEASURED_ERROR.items()}


@pytest.mark.slow
def test_activation_peak_within_measured_error_plus_margin():
    cases = [(s, r) for r in RECOMPUTE for s in SEQS]
    (measured,) = run_on_ranks(jobs.activation_peaks, 1, cases, timeout=600)
    report = []
    for (seq, recompute), got in zip(cases, measured):
        want = stage_activations(jobs.ACT, MicrobatchShape(seq), layers=jobs.ACT.num_layers, in_flight=1, first=True,
                                 last=True, recompute=recompute, profile="local_unfused", act_bytes=4).peak
        report.append((seq, recompute, got, round(want), round(want / got - 1, 3)))
    print("\n(seq, recompute, measured B, predicted B, error)\n" + "\n".join(map(str, report)))
    for seq, recompute, got, want, err in report:
        assert abs(err) <= TOLERANCE[seq], (seq, recompute, err, TOLERANCE[seq], report)
    by = {(s, r): got for s, r, got, _, _ in report}
    for r in RECOMPUTE:  # the trace is real: more tokens, more memory; recompute saves memory
        assert by[(128, r)] < by[(256, r)] < by[(512, r)]
    for s in SEQS:
        assert by[(s, "full")] < by[(s, "selective")] < by[(s, "none")]
