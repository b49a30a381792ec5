"""How close a quantized engine's outputs must be to the float model's in the tests: at the
verify gate's own limits for the precision, and close enough to tell the inputs apart. The tiny
random models embed every text alike (two unrelated sentences score a cosine of about 0.98), so a
cosine floor alone would pass an engine that returns one text's embedding for every row; each
quantized row must also lie far nearer its own float row than any other row does."""

from __future__ import annotations

import numpy as np

from bert_compiler.calibration import datasets
from bert_compiler.models.loading import ModelInfo, load_tokenizer
from bert_compiler.run_summary import EngineReport
from bert_compiler.runtime.parity import DEFAULT_TOLERANCES

# A quantized row's distance to its own float row, at most this fraction of its distance to the
# nearest other float row.
NEIGHBOUR_MARGIN = 0.1


def sentence_feeds(info: ModelInfo, input_names: list[str], count: int = 32) -> dict:
    """Padded token matrices of ``count`` distinct STS-B dev sentences (real text, the kind
    calibration saw), for the graph inputs ``input_names``."""
    sentences = list(dict.fromkeys(datasets.load_stsb(datasets.STSB_DEV).sentences1))[:count]
    encoded = load_tokenizer(info)(
        sentences, padding=True, truncation=True, max_length=64, return_tensors="np"
    )
    return {name: encoded[name].astype(np.int64) for name in input_names}


def assert_tracks_float(reference: np.ndarray, quantized: np.ndarray, precision: str) -> None:
    """``quantized`` rows within the gate's limits for ``precision`` of ``reference`` rows
    (cosine, relative L2), not equal to them, and each nearer its own row than any other."""
    tolerance = DEFAULT_TOLERANCES[precision]
    reference, quantized = reference.astype(np.float64), quantized.astype(np.float64)
    assert reference.shape == quantized.shape and len(reference) >= 8
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(quantized, axis=1)
    cosine = (reference * quantized).sum(1) / norms
    assert cosine.min() >= tolerance.min_cosine, cosine.min()
    rel_l2 = np.linalg.norm(quantized - reference) / np.linalg.norm(reference)
    assert 0 < rel_l2 <= tolerance.rel_l2_err, rel_l2  # quantized: close, never identical
    distances = np.linalg.norm(quantized[:, None, :] - reference[None, :, :], axis=2)
    own = np.diag(distances).copy()
    np.fill_diagonal(distances, np.inf)
    assert (own <= NEIGHBOUR_MARGIN * distances.min(axis=1)).all(), (own, distances.min(axis=1))


def assert_passed_at_the_gate(engine: EngineReport, precision: str) -> None:
    """A run summary's engine passed, its parity inside the gate's default limits for
    ``precision`` (whatever limits the run was given), and quantized: not identical."""
    tolerance = DEFAULT_TOLERANCES[precision]
    parity = engine.parity
    assert engine.passed, engine.failures
    assert parity.min_cosine >= tolerance.min_cosine, parity
    assert 0 < parity.rel_l2_err <= tolerance.rel_l2_err, parity
    assert 0 < parity.max_abs_err <= tolerance.max_abs_err, parity
