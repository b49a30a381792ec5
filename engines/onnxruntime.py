"""ONNX Runtime backend: an offline-optimized graph plus the session options to load it with."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import EnvironmentProblem, InputError

ENGINE_FILE = "model.onnx"
_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class OrtEngineOptions:
    """How the engine is optimized offline and how it must be loaded.

    Attributes:
        device: ``cpu`` (``cuda`` arrives with the GPU issue).
        offline_level: graph optimizations baked into the engine file. ``extended`` is the highest
            level whose output stays portable across CPUs; ``all`` adds layout changes specific to
            the building machine.
        runtime_level: optimizations applied again when the engine is loaded.
        intra_op_num_threads: 0 lets ORT use one thread per physical core.
        quantize_attention: give fused Attention nodes INT8 weights with dynamically quantized
            inputs (ORT's QAttention): static Q/DQ cannot reach the weights inside a fused
            Attention, and leaving them in float costs a third of the INT8 speed-up (measured).
        float_attention: Attention node names to keep in float (the precision fallback).
    """

    device: str = "cpu"
    offline_level: str = "extended"
    runtime_level: str = "all"
    intra_op_num_threads: int = 0
    quantize_attention: bool = False
    float_attention: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OrtEngineOptions:
        values = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if "float_attention" in values:
            values["float_attention"] = tuple(values["float_attention"])
        return cls(**values)


def _session_options(level: str, threads: int):
    import onnxruntime as ort

    if level not in _LEVELS:
        raise InputError(
            f"graph optimization level {level!r}: expected one of {', '.join(_LEVELS)}"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return options


def _provider(device: str) -> str:
    import onnxruntime as ort

    provider = _PROVIDERS.get(device)
    if provider is None:
        raise InputError(f"ONNX Runtime device {device!r}: expected one of {', '.join(_PROVIDERS)}")
    if provider not in ort.get_available_providers():
        raise EnvironmentProblem(
            f"ONNX Runtime {ort.__version__} has no {provider} on this machine "
            f"(available: {', '.join(ort.get_available_providers())})"
        )
    return provider


def build_engine(source: Path, destination: Path, options: OrtEngineOptions) -> dict[str, Any]:
    """Optimize ``source`` offline with ORT and write the result to ``destination``.

    Returns:
        Facts about the build for the manifest (provider, ORT version).

    Raises:
        InputError: ORT cannot load or optimize the graph.
        EnvironmentProblem: the requested device's provider is not available.
    """
    import tempfile

    import onnxruntime as ort

    provider = _provider(options.device)
    facts: dict[str, Any] = {"provider": provider, "onnxruntime": ort.__version__}
    with tempfile.TemporaryDirectory(dir=Path(destination).parent) as scratch:
        if options.quantize_attention:
            quantized = Path(scratch) / "attention-int8.onnx"
            facts["quantized_attention"] = quantize_attention(
                source, quantized, keep_float=options.float_attention
            )
            source = quantized
        session_options = _session_options(options.offline_level, options.intra_op_num_threads)
        session_options.optimized_model_filepath = str(destination)
        try:
            ort.InferenceSession(str(source), session_options, providers=[provider])
        except (RuntimeError, ValueError) as err:
            raise InputError(
                f"{source}: ONNX Runtime cannot build an engine from it ({err})"
            ) from err
    if not Path(destination).is_file():
        raise InputError(f"{source}: ONNX Runtime wrote no optimized model")
    return facts


def attention_nodes(model) -> list[str]:
    """Names of the fused Attention nodes of a graph."""
    return [n.name for n in model.graph.node if n.op_type == "Attention"]


def quantize_attention(
    source: Path, destination: Path, *, keep_float: tuple[str, ...]
) -> list[str]:
    """Turn fused Attention nodes into QAttention (INT8 weights, inputs quantized per batch).

    Returns:
        The Attention node names that were quantized.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    names = attention_nodes(onnx.load(str(source), load_external_data=False))
    unknown = set(keep_float) - set(names)
    if unknown:
        raise InputError(f"--keep-float names no Attention node of {source}: {sorted(unknown)}")
    quantize_dynamic(
        str(source),
        str(destination),
        op_types_to_quantize=["Attention"],
        nodes_to_exclude=list(keep_float),
        weight_type=QuantType.QInt8,
        per_channel=True,
        # ORT's quantizer cannot infer the type of every tensor in these graphs without it.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return [n for n in names if n not in keep_float]


class OrtEngine:
    """A loaded engine: one ORT session on the provider it was built for."""

    def __init__(self, session, provider: str, path: Path):
        self.session = session
        self.provider = provider
        self.path = path
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run one batch; ``feeds`` maps every input name to an int64 array [batch, sequence]."""
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise InputError(f"{self.path}: feeds lack inputs {sorted(missing)}")
        outputs = self.session.run(self.output_names, {k: feeds[k] for k in self.input_names})
        return dict(zip(self.output_names, outputs, strict=True))


def load(path: Path, options: OrtEngineOptions) -> OrtEngine:
    """Create a session for an engine file with its recorded options.

    The caller checks the file's sha256 against its manifest first (pipeline.build.load_engine).

    Raises:
        EnvironmentProblem: ORT placed the graph on another provider than the one requested.
    """
    import onnxruntime as ort

    provider = _provider(options.device)
    session_options = _session_options(options.runtime_level, options.intra_op_num_threads)
    try:
        session = ort.InferenceSession(str(path), session_options, providers=[provider])
    except (RuntimeError, ValueError) as err:
        raise InputError(f"{path}: ONNX Runtime cannot load the engine ({err})") from err
    active = session.get_providers()
    if not active or active[0] != provider:
        raise EnvironmentProblem(
            f"{path}: asked ONNX Runtime for {provider} but it runs on {active}; refusing a "
            "silent fallback"
        )
    return OrtEngine(session, provider, Path(path))
