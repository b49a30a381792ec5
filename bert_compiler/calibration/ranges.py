"""Activation range collection and the three ways of turning it into an INT8 amax.

Ranges come from running the graph with ONNX Runtime on real tokenized text and reading the chosen
tensors; padded token positions are left out (they are not data). Two passes: the first finds each
tensor's largest magnitude, the second fills a histogram of magnitudes up to it, from which
``minmax``, ``percentile``, ``entropy`` (TensorRT's KL-divergence method) and ``mse`` (the clip
point of least squared INT8 error) derive the amax.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bert_compiler.core.errors import InputError

METHODS = ("minmax", "percentile", "entropy", "mse")
INT8_LEVELS = 127


@dataclass
class TensorHistogram:
    """Magnitudes seen for one tensor: the maximum and a histogram on [0, amax_seen]."""

    amax_seen: float
    counts: np.ndarray

    @property
    def bin_width(self) -> float:
        return self.amax_seen / len(self.counts) if self.amax_seen > 0 else 0.0


def _valid_values(value: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Values at real token positions of a [batch, sequence, ...] tensor; others as they are."""
    if value.ndim >= 2 and value.shape[:2] == mask.shape:
        return value[mask.astype(bool)]
    return value


def _run_with_outputs(model, tensor_names: list[str], batches: Iterable[dict]):
    """Yield (feeds, {name: value}) with ``tensor_names`` exposed as extra graph outputs."""
    import onnx
    import onnxruntime as ort

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    existing = {o.name for o in exposed.graph.output}
    for name in tensor_names:
        if name not in existing:
            exposed.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "exposed.onnx"
        onnx.save(exposed, str(path))
        options = ort.SessionOptions()
        # Graph rewrites could fold away the very tensors being measured.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    for feeds in batches:
        values = session.run(tensor_names, {k: feeds[k] for k in input_names})
        yield feeds, dict(zip(tensor_names, values, strict=True))


def collect_histograms(
    model,
    tensor_names: list[str],
    batches: list[dict],
    *,
    bins: int = 2048,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> dict[str, TensorHistogram]:
    """Run ``batches`` twice through ``model`` and histogram the magnitudes of each tensor.

    Raises:
        InputError: a tensor never received a value (no batches).
    """
    if not batches:
        raise InputError("calibration: no batches to collect ranges from")
    amax = dict.fromkeys(tensor_names, 0.0)
    for feeds, values in progress(_run_with_outputs(model, tensor_names, batches)):
        mask = feeds["attention_mask"]
        for name, value in values.items():
            valid = _valid_values(value, mask)
            if valid.size:
                amax[name] = max(amax[name], float(np.abs(valid).max()))
    histograms = {
        name: TensorHistogram(amax[name], np.zeros(bins, dtype=np.int64)) for name in tensor_names
    }
    for feeds, values in progress(_run_with_outputs(model, tensor_names, batches)):
        mask = feeds["attention_mask"]
        for name, value in values.items():
            hist = histograms[name]
            if hist.amax_seen > 0:
                counts, _ = np.histogram(
                    np.abs(_valid_values(value, mask)), bins=bins, range=(0.0, hist.amax_seen)
                )
                hist.counts += counts
    return histograms


def collect_channel_amax(
    model, tensor_names: list[str], batches: list[dict]
) -> dict[str, np.ndarray]:
    """The largest magnitude of each last-axis channel of each tensor over ``batches`` (real
    token positions only): what activation smoothing balances against the weights.

    Raises:
        InputError: no batches.
    """
    if not batches:
        raise InputError("calibration: no batches to collect ranges from")
    amax: dict[str, np.ndarray] = {}
    for feeds, values in _run_with_outputs(model, tensor_names, batches):
        mask = feeds["attention_mask"]
        for name, value in values.items():
            valid = np.abs(_valid_values(value, mask)).reshape(-1, value.shape[-1])
            if valid.size:
                seen = valid.max(axis=0)
                amax[name] = seen if name not in amax else np.maximum(amax[name], seen)
    return amax


def amax_minmax(hist: TensorHistogram) -> float:
    return hist.amax_seen


def amax_percentile(hist: TensorHistogram, percentile: float) -> float:
    """The magnitude below which ``percentile`` % of the values lie (upper bin edge)."""
    total = int(hist.counts.sum())
    if total == 0:
        return hist.amax_seen
    cumulative = np.cumsum(hist.counts)
    index = int(np.searchsorted(cumulative, total * percentile / 100.0))
    return min(hist.amax_seen, (index + 1) * hist.bin_width)


def _kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    keep = p > 0
    return float(np.sum(p[keep] * np.log(p[keep] / q[keep])))


def amax_entropy(hist: TensorHistogram, *, levels: int = INT8_LEVELS + 1) -> float:
    """TensorRT's entropy calibration: the clip point whose INT8 histogram loses least (KL)."""
    counts = hist.counts.astype(np.float64)
    bins = len(counts)
    if counts.sum() == 0 or bins <= levels:
        return hist.amax_seen
    best_kl, best_end = np.inf, bins
    for end in range(levels, bins + 1, max(1, bins // 512)):
        reference = counts[:end].copy()
        reference[end - 1] += counts[end:].sum()  # outliers clip into the last bin
        # Merge the first `end` bins into `levels` groups, then spread each group back over its
        # non-empty bins: the distribution INT8 can represent with this clip point.
        groups = np.array_split(np.arange(end), levels)
        candidate = np.zeros(end)
        for group in groups:
            chunk = counts[group]
            nonzero = chunk > 0
            if nonzero.any():
                candidate[group[nonzero]] = chunk.sum() / nonzero.sum()
        p = reference / reference.sum()
        q_total = candidate.sum()
        if q_total == 0:
            continue
        q = candidate / q_total
        if np.any((p > 0) & (q == 0)):
            q = np.where(q == 0, 1e-12, q)
        kl = _kl_divergence(p, q)
        if kl < best_kl:
            best_kl, best_end = kl, end
    return min(hist.amax_seen, best_end * hist.bin_width)


def quantization_mse(hist: TensorHistogram, clips: np.ndarray) -> np.ndarray:
    """Expected squared error of symmetric INT8 with each amax in ``clips``, per value of the
    histogram (bin centres): rounding noise (step^2 / 12) below the clip, the distance to it
    above."""
    counts = hist.counts.astype(np.float64)
    centres = (np.arange(len(counts)) + 0.5) * hist.bin_width
    clips = np.asarray(clips, dtype=np.float64)[:, None]
    rounding = (clips / INT8_LEVELS) ** 2 / 12
    clipped = np.maximum(centres[None, :] - clips, 0.0) ** 2
    error = np.where(centres[None, :] <= clips, rounding, clipped)
    return (error * counts[None, :]).sum(axis=1) / max(counts.sum(), 1.0)


def amax_mse(hist: TensorHistogram, *, candidates: int = 256) -> float:
    """The clip point (an upper bin edge, ``candidates`` of them spread up to the maximum seen)
    with the least expected squared INT8 error over the histogram."""
    bins = len(hist.counts)
    if hist.counts.sum() == 0 or hist.amax_seen <= 0:
        return hist.amax_seen
    edges = np.unique(np.linspace(1, bins, min(candidates, bins)).round().astype(int))
    clips = edges * hist.bin_width
    return float(min(hist.amax_seen, clips[int(np.argmin(quantization_mse(hist, clips)))]))


def compute_amax(
    histograms: Mapping[str, TensorHistogram], method: str, *, percentile: float | None = None
) -> dict[str, float]:
    """Per-tensor amax by ``method`` (minmax, percentile, entropy or mse).

    Raises:
        InputError: unknown method or percentile outside (0, 100].
    """
    if method not in METHODS:
        raise InputError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "percentile" and (percentile is None or not 0 < percentile <= 100):
        raise InputError(f"--percentile {percentile}: must be in (0, 100]")
    pick = {
        "minmax": amax_minmax,
        "percentile": lambda h: amax_percentile(h, float(percentile or 100.0)),
        "entropy": amax_entropy,
        "mse": amax_mse,
    }[method]
    return {name: pick(hist) for name, hist in histograms.items()}
