"""Output comparison between PyTorch and an engine: strict structure first, then numbers.

Statistics accumulate over batches: max absolute error, relative L2 error over everything compared,
and the minimum cosine similarity of any row (pooled outputs) or valid token (token outputs). Padded
token positions are excluded: neither PyTorch nor a fused attention kernel defines them. An output
of one value per row (a cross-encoder's score) has no direction per row (the cosine of two scalars
is their signs' agreement, -1 for a score near 0 off by a hair): its cosine is that of all its
compared values as one vector.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

_EPS = 1e-12


@dataclass(frozen=True)
class Tolerance:
    """Limits one output must meet: all three must hold."""

    max_abs_err: float
    rel_l2_err: float
    min_cosine: float


DEFAULT_TOLERANCES = {
    "fp32": Tolerance(max_abs_err=1e-3, rel_l2_err=1e-4, min_cosine=0.9999),
    "fp16": Tolerance(max_abs_err=5e-2, rel_l2_err=1e-2, min_cosine=0.999),
    # The floor catches a broken engine: a correct INT8 engine's rows stay above it, a wrong
    # scale's fall far below (all-MiniLM-L6-v2's figures: docs/benchmarks.md, "INT8 range
    # methods on STS-B dev"); the task-metric retention gate is what judges INT8 accuracy.
    "int8": Tolerance(max_abs_err=math.inf, rel_l2_err=0.25, min_cosine=0.90),
    # INT8's limits, as a start until a TensorRT fp8 engine has been verified: e4m3 keeps 3
    # mantissa bits (relative rounding up to 2^-4) against INT8's 7 bits of a shared scale, and
    # the CPU sweep of its Q/DQ graph scores it beside INT8 (docs/benchmarks.md, "fp8 accuracy on
    # the CPU"), so INT8's floor and gates are where to begin.
    "fp8": Tolerance(max_abs_err=math.inf, rel_l2_err=0.25, min_cosine=0.90),
}
# Task-metric gates against PyTorch fp32: the largest drop in points (x100 scale), and the smallest
# fraction of the fp32 metric an engine must keep. None: that gate is off for the precision.
# fp8 starts from INT8's (see its tolerance above).
DEFAULT_MAX_METRIC_DROP = {"fp32": 0.05, "fp16": 0.1, "int8": None, "fp8": None}
DEFAULT_MIN_METRIC_RETENTION = {"fp32": None, "fp16": None, "int8": 0.995, "fp8": 0.995}


@dataclass
class OutputParity:
    """Accumulated comparison of one named output."""

    name: str
    max_abs_err: float = 0.0
    min_cosine: float = 1.0
    compared: int = 0
    nonfinite: int = 0
    problems: list[str] = field(default_factory=list)
    _diff_sq: float = 0.0
    _ref_sq: float = 0.0
    _cand_sq: float = 0.0
    _dot: float = 0.0

    @property
    def rel_l2_err(self) -> float:
        return math.sqrt(self._diff_sq) / max(math.sqrt(self._ref_sq), _EPS)

    def update(self, reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray | None) -> None:
        """Add one batch. ``mask`` ([batch, sequence]) selects valid tokens of 3-D outputs."""
        if candidate.dtype != reference.dtype:
            self.problems.append(f"dtype {candidate.dtype} != reference {reference.dtype}")
            return
        if candidate.shape != reference.shape:
            self.problems.append(f"shape {candidate.shape} != reference {reference.shape}")
            return
        ref = reference.astype(np.float64)
        cand = candidate.astype(np.float64)
        if ref.ndim == 3 and mask is not None:
            keep = mask.astype(bool)
            ref, cand = ref[keep], cand[keep]
        ref = ref.reshape(-1, ref.shape[-1]) if ref.ndim > 1 else ref.reshape(-1, 1)
        cand = cand.reshape(ref.shape)
        if not np.isfinite(ref).all():
            self.problems.append("reference output has NaN or Inf")
            return
        bad = int((~np.isfinite(cand)).sum())
        if bad:
            self.nonfinite += bad
            return
        diff = cand - ref
        self.compared += ref.size
        self.max_abs_err = max(self.max_abs_err, float(np.abs(diff).max(initial=0.0)))
        self._diff_sq += float((diff * diff).sum())
        self._ref_sq += float((ref * ref).sum())
        if ref.shape[1] == 1:
            self._cand_sq += float((cand * cand).sum())
            self._dot += float((ref * cand).sum())
            norm = math.sqrt(self._ref_sq * self._cand_sq)
            both_zero = self._ref_sq < _EPS**2 and self._cand_sq < _EPS**2
            self.min_cosine = 1.0 if both_zero else self._dot / max(norm, _EPS)
            return
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
        dots = (ref * cand).sum(axis=1)
        both_zero = (np.linalg.norm(ref, axis=1) < _EPS) & (np.linalg.norm(cand, axis=1) < _EPS)
        cosines = np.where(both_zero, 1.0, dots / np.maximum(norms, _EPS))
        if cosines.size:
            self.min_cosine = min(self.min_cosine, float(cosines.min()))

    def failures(self, tolerance: Tolerance) -> list[str]:
        """Every reason this output fails ``tolerance`` (empty when it passes)."""
        reasons = list(dict.fromkeys(self.problems))
        reasons += [
            f"{limit} limit is NaN: no limit"
            for limit, value in asdict(tolerance).items()
            if math.isnan(value)
        ]
        if self.nonfinite:
            reasons.append(f"{self.nonfinite} NaN/Inf values")
        if not self.compared and not reasons:
            reasons.append("nothing was compared")
        if self.max_abs_err > tolerance.max_abs_err:
            reasons.append(f"max_abs_err {self.max_abs_err:.3g} > {tolerance.max_abs_err:g}")
        if self.rel_l2_err > tolerance.rel_l2_err:
            reasons.append(f"rel_l2_err {self.rel_l2_err:.3g} > {tolerance.rel_l2_err:g}")
        if self.min_cosine < tolerance.min_cosine:
            reasons.append(f"min_cosine {self.min_cosine:.6f} < {tolerance.min_cosine:g}")
        return reasons

    def report(self, tolerance: Tolerance) -> dict:
        failures = self.failures(tolerance)
        return {
            "name": self.name,
            "max_abs_err": self.max_abs_err,
            "rel_l2_err": self.rel_l2_err,
            "min_cosine": self.min_cosine,
            "values_compared": self.compared,
            "tolerance": asdict(tolerance),
            "passed": not failures,
            "failures": failures,
        }


def compare_batch(
    parity: dict[str, OutputParity],
    reference: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    mask: np.ndarray | None,
) -> None:
    """Compare one batch output by output, matching by name (never by position)."""
    for name in reference:
        entry = parity.setdefault(name, OutputParity(name))
        if name not in candidate:
            entry.problems.append("missing from the engine's outputs")
            continue
        entry.update(reference[name], candidate[name], mask)
    for name in candidate:
        if name not in reference:
            parity.setdefault(name, OutputParity(name)).problems.append(
                "engine output has no PyTorch counterpart"
            )
