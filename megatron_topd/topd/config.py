"""`TopdConfig`: every knob of the TOPD objective (DESIGN section 2; docs/method.md explains each one).

The lead's top-level config nests this dataclass; `validate()` fails early with the field name and the fix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

from megatron_topd import checks

VARIANTS = ("opd", "opd_suppress", "topd")
CANDIDATE_MODES = ("top_k", "fraction")
POSITION_WEIGHTINGS = ("uniform", "geometric", "ot_plan")
EMBEDDING_SOURCES = ("auto", "student", "teacher")
SUPPRESS_RULES = ("low", "high", "random")
TRAJ_NORMALIZATIONS = ("window_mean", "sum")
TEACHER_PLACEMENTS = ("colocated", "remote")

_choice = partial(checks.choice, "topd")
_int_at_least = partial(checks.int_at_least, "topd")
_number_in = partial(checks.number_in, "topd")


@dataclass
class TopdConfig:
    # Objective variant: plain OPD, OPD with suppression of low-divergence candidates, or full TOPD.
    variant: str = "topd"
    # Candidates (step 3): top-k per response at least `min_gap` tokens apart, or a global top fraction.
    candidate_mode: str = "top_k"
    top_k: int = 3
    min_gap: int | None = 8  # None: no spacing (same as 1)
    candidate_fraction: float = 0.01
    # Near-future probe (step 4): window length K, continuations per side, sampling of the probes.
    window: int = 50
    samples_per_side: int = 1
    probe_temperature: float = 1.0  # the paper's rollout temperature; keep equal to the rollout temperature
    probe_greedy: bool = False
    probe_top_p: float = 1.0
    # Divergence (step 5): whose input-embedding table defines the OT cost 1 - cos. `auto`: the teacher's (frozen)
    # when it is co-located, the student's with a remote teacher (`resolve_embedding_source`).
    embedding_source: str = "auto"
    # Order-aware OT (`ot.position_cost`): adds ot_position_weight * |i/n - j/m| to the cost of matching window
    # positions i and j, so a reordered window ("=31;" for "=13;") is no longer at distance 0. 0: the paper's cost.
    ot_position_weight: float = 0.0
    # Suppression (step 6): bottom `low_fraction` by OT distance (or distance < `threshold`) get weight `w_low`;
    # `suppress: high | random` suppress the same number of the highest-OT / random candidates instead (controls).
    # Decided over the whole batch (all data-parallel replicas' candidates at once).
    suppress: str = "low"
    low_fraction: float = 0.3
    threshold: float | None = None
    w_low: float = 0.0
    # Trajectory guidance (step 7): L = L_OPD + lambda_traj * L_traj; per-position weights within a window,
    # normalised per window (`window_mean`: each window's weights sum to 1) or per position (`sum`: 1 per position).
    lambda_traj: float = 1.0
    position_weighting: str = "uniform"
    gamma: float = 0.9
    traj_normalization: str = "window_mean"

    def validate(self) -> "TopdConfig":
        """Raise ValueError naming the first bad field and how to fix it; return self for chaining."""
        _choice("variant", self.variant, VARIANTS)
        _choice("candidate_mode", self.candidate_mode, CANDIDATE_MODES)
        _choice("position_weighting", self.position_weighting, POSITION_WEIGHTINGS)
        _choice("embedding_source", self.embedding_source, EMBEDDING_SOURCES)
        _choice("suppress", self.suppress, SUPPRESS_RULES)
        _choice("traj_normalization", self.traj_normalization, TRAJ_NORMALIZATIONS)
        _int_at_least("top_k", self.top_k, 1)
        if self.min_gap is not None:
            _int_at_least("min_gap", self.min_gap, 1, "(1 or null means adjacent candidates are allowed)")
        _int_at_least("window", self.window, 1)
        _int_at_least("samples_per_side", self.samples_per_side, 1)
        _number_in("candidate_fraction", self.candidate_fraction, 0.0, 1.0, lo_open=True)
        _number_in("low_fraction", self.low_fraction, 0.0, 1.0, hi_open=True)
        _number_in("probe_top_p", self.probe_top_p, 0.0, 1.0, lo_open=True)
        _number_in("gamma", self.gamma, 0.0, 1.0, lo_open=True)
        _number_in("w_low", self.w_low, 0.0, math.inf)
        _number_in("lambda_traj", self.lambda_traj, 0.0, math.inf)
        _number_in("ot_position_weight", self.ot_position_weight, 0.0, math.inf)
        if self.threshold is not None:
            _number_in("threshold", self.threshold, 0.0, 2.0)
        if not isinstance(self.probe_greedy, bool):
            raise ValueError(f"topd.probe_greedy={self.probe_greedy!r}: use true or false")
        if not self.probe_greedy:
            _number_in("probe_temperature", self.probe_temperature, 0.0, math.inf, lo_open=True)
        elif self.samples_per_side != 1:
            raise ValueError(
                f"topd.samples_per_side={self.samples_per_side} with probe_greedy=true: greedy windows are identical, "
                "set samples_per_side=1 or probe_greedy=false"
            )
        return self

    @property
    def candidate_gap(self) -> int:
        """The spacing handed to `select_candidates`: ``min_gap``, or 1 (no spacing) when it is null."""
        return 1 if self.min_gap is None else int(self.min_gap)

    def embedding_table(self, teacher_placement: str) -> str:
        """Whose embedding table the OT cost uses (``student`` or ``teacher``): `resolve_embedding_source`."""
        return resolve_embedding_source(self.embedding_source, teacher_placement)

    @property
    def sampling_temperature(self) -> float:
        """Temperature handed to the continuation sampler (0.0 = greedy, see `ContinuationSampler`)."""
        return 0.0 if self.probe_greedy else float(self.probe_temperature)



def resolve_embedding_source(source: str, teacher_placement: str) -> str:
    """The one place ``topd.embedding_source`` is resolved: ``student`` or ``teacher`` (whose table the trainer reads).

    ``auto``: the co-located teacher's input-embedding table (frozen: the OT space stays fixed while the student's
    table drifts with training); with ``teacher.placement=remote`` the trainer holds no teacher table, so the
    student's. ``teacher`` with a remote teacher is an error (there is no table to read).
    """
    _choice("embedding_source", source, EMBEDDING_SOURCES)
    if teacher_placement not in TEACHER_PLACEMENTS:
        raise ValueError(f"teacher.placement={teacher_placement!r}: use one of {', '.join(TEACHER_PLACEMENTS)}")
    if source == "auto":
        return "teacher" if teacher_placement == "colocated" else "student"
    if source == "teacher" and teacher_placement == "remote":
        raise ValueError("topd.embedding_source=teacher needs the teacher's input-embedding table in the trainer, but "
                         "teacher.placement=remote holds no teacher model: set topd.embedding_source=auto or student "
                         "(the student's table), or teacher.placement=colocated")
    return source
