"""Which quantized MatMuls hurt most, and how many of them to keep in float.

The precision fallback ranks the MatMuls by the output error each alone adds (quantize one at a
time, on calibration sentences, never on the evaluation set the gate scores), then searches for
the shortest prefix of that ranking to keep in float that makes the engine pass its gate
(``smallest_passing_prefix``: growing groups, then bisection, bounded).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bert_compiler.calibration.qdq import insert_qdq, quantizable_matmuls


@dataclass(frozen=True)
class Sensitivity:
    """Output error when only ``node`` is quantized (1 - mean cosine against float)."""

    node: str
    error: float


def _outputs(path: Path, batches: list[dict]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [session.run(None, {k: feeds[k] for k in names})[0] for feeds in batches]


def _error(reference: list[np.ndarray], candidate: list[np.ndarray], batches: list[dict]) -> float:
    cosines = []
    for ref, cand, feeds in zip(reference, candidate, batches, strict=True):
        if ref.ndim == 3:
            keep = feeds["attention_mask"].astype(bool)
            ref, cand = ref[keep], cand[keep]
        ref = ref.reshape(len(ref), -1).astype(np.float64)
        cand = cand.reshape(len(cand), -1).astype(np.float64)
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
        cosines.append((ref * cand).sum(axis=1) / np.maximum(norms, 1e-12))
    return float(1.0 - np.concatenate(cosines).mean())


def rank_sensitivity(
    *,
    float_model,
    amax: Mapping[str, float],
    batches: list[dict],
    candidates: Iterable[str] | None = None,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> list[Sensitivity]:
    """Rank quantizable MatMuls by the error each alone introduces.

    Args:
        float_model: the float graph (ONNX ModelProto) that calibration quantizes.
        amax: calibrated activation magnitudes (from the calibrate stage).
        batches: token feeds from the calibration sentences.
        candidates: the MatMul node names to rank (default: every quantizable one).

    Returns:
        Sensitivities, most harmful first.
    """
    import onnx

    matmuls = [m.node_name for m in quantizable_matmuls(float_model)]
    ranked = matmuls if candidates is None else [m for m in matmuls if m in set(candidates)]
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        float_path = Path(scratch) / "float.onnx"
        onnx.save(float_model, str(float_path))
        reference = _outputs(float_path, batches)
        for name in progress(ranked):
            model, _ = insert_qdq(float_model, amax, exclude=frozenset(matmuls) - {name})
            path = Path(scratch) / "one.onnx"
            onnx.save(model, str(path))
            error = _error(reference, _outputs(path, batches), batches)
            results.append(Sensitivity(name, error))
    return sorted(results, key=lambda s: s.error, reverse=True)


def smallest_passing_prefix(limit: int, passes: Callable[[int], bool]) -> int | None:
    """The smallest ``k`` in 1..``limit`` for which ``passes(k)`` holds, or None when
    ``passes(limit)`` does not; ``passes(0)`` is taken to have failed already.

    ``passes(k)`` is a costly trial (keep the first ``k`` MatMuls of the ranking in float, build,
    verify), assumed to pass for every ``k`` above one that passes. Growing groups find a passing
    ``k`` fast (1, 2, 4, ... capped at ``limit``), then bisection between it and the last failing
    one narrows it to the smallest: at most about ``2 * log2(limit) + 1`` trials, never ``limit``.
    """
    if limit < 1:
        return None
    failed, size = 0, 1
    while True:
        size = min(size, limit)
        if passes(size):
            passed = size
            break
        if size == limit:
            return None
        failed, size = size, size * 2
    while passed - failed > 1:
        middle = (failed + passed) // 2
        if passes(middle):
            passed = middle
        else:
            failed = middle
    return passed
