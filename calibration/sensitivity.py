"""Which quantized MatMuls hurt most: quantize one at a time and measure the output error.

Used by the precision fallback: the most sensitive operators are kept in float, one more at a time,
until the engine passes its gate. The measurement runs on calibration sentences, never on the
evaluation set the gate scores.
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
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> list[Sensitivity]:
    """Rank every quantizable MatMul by the error it alone introduces.

    Args:
        float_model: the float graph (ONNX ModelProto) that calibration quantizes.
        amax: calibrated activation magnitudes (from the calibrate stage).
        batches: token feeds from the calibration sentences.

    Returns:
        Sensitivities, most harmful first.
    """
    import onnx

    matmuls = [m.node_name for m in quantizable_matmuls(float_model)]
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        float_path = Path(scratch) / "float.onnx"
        onnx.save(float_model, str(float_path))
        reference = _outputs(float_path, batches)
        for name in progress(matmuls):
            model, _ = insert_qdq(float_model, amax, exclude=frozenset(matmuls) - {name})
            path = Path(scratch) / "one.onnx"
            onnx.save(model, str(path))
            error = _error(reference, _outputs(path, batches), batches)
            results.append(Sensitivity(name, error))
    return sorted(results, key=lambda s: s.error, reverse=True)
