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
        lower_int8: rewrite Q/DQ MatMuls to MatMulIntegerToFloat before optimizing
            (engines/ort_int8.py): ORT's own QDQ fusion quantizes a shared input once per
            consumer and keeps every bias Add apart (about 10% slower, one-off measurement).
        pack_tokens: run each layer's feed-forward block on the valid tokens only
            (engines/token_packing.py; about 1.37x for INT8 on STS-B dev in a one-off measurement,
            batch 32, where 39% of the positions are padding).
        allow_spinning: let idle intra-op threads spin (ORT's default: lowest latency for one
            model alone); turn off where several models or processes share the cores.
    """

    device: str = "cpu"
    offline_level: str = "extended"
    runtime_level: str = "all"
    intra_op_num_threads: int = 0
    lower_int8: bool = False
    pack_tokens: bool = False
    allow_spinning: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OrtEngineOptions:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def _session_options(level: str, threads: int, allow_spinning: bool = True):
    import onnxruntime as ort

    if level not in _LEVELS:
        raise InputError(
            f"graph optimization level {level!r}: expected one of {', '.join(_LEVELS)}"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not allow_spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
    import onnxruntime as ort

    provider = _provider(options.device)
    session_options = _session_options(options.offline_level, options.intra_op_num_threads)
    session_options.optimized_model_filepath = str(destination)
    facts: dict[str, Any] = {"provider": provider, "onnxruntime": ort.__version__}
    model: Any = str(source)
    if options.lower_int8 or options.pack_tokens:
        from engines.ort_int8 import lower_qdq_matmuls
        from engines.token_packing import find_feed_forward_regions, pack_feed_forward
        from pipeline.onnx_io import load_onnx

        graph = load_onnx(Path(source))
        if options.lower_int8:
            graph = lower_qdq_matmuls(graph)
        if options.pack_tokens:
            facts["packed_regions"] = len(find_feed_forward_regions(graph))
            graph = pack_feed_forward(graph)
        model = graph.SerializeToString()
    try:
        ort.InferenceSession(model, session_options, providers=[provider])
    except (RuntimeError, ValueError) as err:
        raise InputError(f"{source}: ONNX Runtime cannot build an engine from it ({err})") from err
    if not Path(destination).is_file():
        raise InputError(f"{source}: ONNX Runtime wrote no optimized model")
    return facts


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
    session_options = _session_options(
        options.runtime_level, options.intra_op_num_threads, options.allow_spinning
    )
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
