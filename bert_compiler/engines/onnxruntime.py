"""ONNX Runtime backend: an offline-optimized graph plus the session and provider options to load
it with, on CPU or CUDA (optionally through ORT's TensorRT provider)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bert_compiler.core.artifacts import atomic_path
from bert_compiler.core.errors import ArtifactError, EnvironmentProblem, InputError
from bert_compiler.core.onnx_io import check_onnx_file, load_onnx
from bert_compiler.core.targets import Environment, current_gpu, fp8_refusal
from bert_compiler.engines.backend import (
    Backend,
    BuildJob,
    BuildSpec,
    TargetPlan,
    check_float_source,
    gpu_facts,
    register,
)
from bert_compiler.engines.feeds import require_inputs, run_numpy_on_gpu
from bert_compiler.engines.fp16 import convert_to_fp16, float16_fraction
from bert_compiler.engines.ort_int8 import (
    check_dynamic_scope,
    lower_qdq_matmuls,
    resolve_weight_type,
)
from bert_compiler.engines.packed_attention import PACKED_OPS, pack_attention, require_packable
from bert_compiler.engines.token_packing import find_feed_forward_regions, pack_feed_forward

ENGINE_FILE = "model.onnx"
_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# ORT graph optimization levels as Triton's ONNX Runtime backend spells them in
# optimization.graph.level (0, the default, is ORT_ENABLE_ALL).
TRITON_GRAPH_LEVELS = {"all": 0, "extended": 1, "basic": -1, "disable": 2}


# Attention kernels of ORT's CUDA provider (its `sdpa_kernel` option, a bit mask of backends:
# flash 1, memory-efficient 2, TensorRT fused 4, cuDNN flash 8, unfused 16, TensorRT flash 32,
# TensorRT cross 64). "default" leaves ORT to choose: on compute capability 9.0 and later it
# prefers cuDNN's flash attention, which took 44% of the GPU time of MiniLM batches of 1024 short
# rows on the H100 (docs/gpu-bench/2026-11-24-h100-runtime/profile-minilm.txt). "fused": every
# backend but cuDNN's, which for BERT's self-attention up to 512 tokens is TensorRT's fused MHA
# kernel: no faster on short rows there, slower at 128 tokens. "unfused": batched GEMMs and a
# softmax kernel, not yet timed (a candidate for rows of a few dozen tokens).
ATTENTION_KERNELS = {"default": None, "fused": 1 | 2 | 4 | 16 | 32 | 64, "unfused": 16}
# The attention kernels an ONNX Runtime CUDA engine is built with unless told otherwise: ORT's own
# choice was as fast or faster than "fused" for MiniLM and BERT-base on the H100, timed on the
# calibration sentences (docs/gpu-bench/2026-11-24-h100-runtime/choose-*.txt).
DEFAULT_ATTENTION_KERNELS = "default"


@dataclass(frozen=True)
class OnnxRuntimeBuildOptions:
    """The ONNX Runtime backend's own build settings (BuildSpec.options), as the flags of
    cli/backend_flags.py give them; those that do not apply to an engine's device and precision
    are reset by ``OnnxRuntimeBackend.applicable``.

    Attributes:
        intra_op_num_threads: CPU threads; 0 means one per physical core.
        pack_tokens: CPU: run feed-forward blocks on valid tokens only where the graph has them
            (the standard-ops INT8 graph does; the fused fp32 graph's blocks are not matched
            yet).
        cuda_graph: CUDA: capture and replay CUDA graphs per input shape.
        ort_tensorrt_provider: CUDA: put ORT's TensorRT provider first.
        int8_weights: CPU int8: ``s8`` (exact only with VNNI; without it ORT's u8 x s8 kernel
            saturates, to be judged by verify), ``u8`` (exact everywhere, slower without VNNI)
            or ``auto`` (s8 with VNNI, else u8; engines/ort_int8.py).
        attention_kernels: CUDA: which attention kernels the provider may use
            (ATTENTION_KERNELS).
        packed_attention: CUDA: rewrite the fused graph into ORT's packing mode
            (engines/packed_attention.py: attention and the layers around it on the valid tokens
            only); not with ``cuda_graph``. Off until it measures faster on the H100 (issue 13).
        int8_dynamic: CPU int8: which MatMuls quantize their activation per batch at run time
            instead of with the calibrated scale (engines/ort_int8.py DYNAMIC_SCOPES). ``all``
            was chosen on the selection split with `bert-compile calibrate --sweep`
            (docs/benchmarks.md, issue 14).
    """

    intra_op_num_threads: int = 0
    pack_tokens: bool = True
    cuda_graph: bool = False
    ort_tensorrt_provider: bool = False
    int8_weights: str = "auto"
    attention_kernels: str = DEFAULT_ATTENTION_KERNELS
    packed_attention: bool = False
    int8_dynamic: str = "all"


# An INT8 engine with another dynamic scope than the default is named for it.
_DEFAULT_DYNAMIC = OnnxRuntimeBuildOptions.int8_dynamic


def check_packed_attention(*, packed_attention: bool, cuda_graph: bool) -> None:
    """Raises InputError for packed attention with CUDA graphs: RemovePadding sizes its output by
    the batch's valid tokens, copied to the host mid-run, which no CUDA graph can capture."""
    if packed_attention and cuda_graph:
        raise InputError(
            "--packed-attention with --cuda-graph: ORT's RemovePadding waits for the GPU in every "
            "run (its output has one row per valid token), so no CUDA graph can capture it; "
            "build the packed engine without --cuda-graph"
        )


def _ort_errors() -> tuple[type[BaseException], ...]:
    """ORT's failures: its own exception types (Fail, InvalidGraph, ...) derive from Exception
    directly, so ``except RuntimeError`` misses them. Evaluated only when something was raised."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (RuntimeError, ValueError, state.Fail, state.InvalidGraph, state.InvalidArgument)


@dataclass(frozen=True)
class OrtEngineOptions:
    """How the engine is optimized offline and how it must be loaded.

    Attributes:
        device: ``cpu`` or ``cuda``.
        offline_level: graph optimizations baked into the engine file. ``extended`` is the highest
            level whose output stays portable across CPUs; ``all`` adds layout changes specific to
            the building machine.
        runtime_level: optimizations applied again when the engine is loaded.
        intra_op_num_threads: 0 lets ORT use one thread per physical core.
        lower_int8: rewrite Q/DQ MatMuls to MatMulIntegerToFloat before optimizing
            (engines/ort_int8.py): ORT's own QDQ fusion quantizes a shared input once per
            consumer and keeps every bias Add apart (about 10% slower, one-off measurement).
        int8_weights: weight type of the lowered INT8 MatMuls (engines/ort_int8.py): ``s8``
            where the building CPU has VNNI, else ``u8``, which stays exact on CPUs without it.
        int8_dynamic: the lowered MatMuls whose activation is quantized per batch at run time
            (engines/ort_int8.py DYNAMIC_SCOPES).
        pack_tokens: run each layer's feed-forward block on the valid tokens only
            (engines/token_packing.py; about 1.37x for INT8 on STS-B dev in a one-off measurement,
            batch 32, where 39% of the positions are padding).
        allow_spinning: let idle intra-op threads spin (ORT's default: lowest latency for one
            model alone); turn off where several models or processes share the cores.
        fp16: convert the graph to fp16 before optimizing (engines/fp16.py: LayerNorm
            statistics, softmax and the pooling head stay float32).
        keep_float_ops: further op types kept float32 in an fp16 engine.
        device_id: CUDA device ordinal.
        cuda_graph: capture each input shape's run as a CUDA graph and replay it (one graph per
            [batch, sequence], buffers fixed per shape): removes kernel-launch gaps at small batch.
        tensorrt_provider: run through ORT's TensorRT provider (CUDA for what it cannot take),
            with its engine cache in ``trt_cache_dir`` inside the engine folder.
        attention_kernels: a key of ATTENTION_KERNELS: which attention kernels the CUDA
            provider may use (``default``, what an engine recorded without it was run with).
        packed_attention: rewrite the fused graph into ORT's packing mode before optimizing
            (engines/packed_attention.py; CUDA only, not with ``cuda_graph``). False is what an
            engine recorded without it was built as.
    """

    device: str = "cpu"
    offline_level: str = "extended"
    runtime_level: str = "all"
    intra_op_num_threads: int = 0
    lower_int8: bool = False
    int8_weights: str = "s8"
    int8_dynamic: str = "none"
    pack_tokens: bool = False
    allow_spinning: bool = True
    fp16: bool = False
    keep_float_ops: tuple[str, ...] = ()
    device_id: int = 0
    cuda_graph: bool = False
    tensorrt_provider: bool = False
    trt_cache_dir: str = "trt-cache"
    attention_kernels: str = "default"
    packed_attention: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OrtEngineOptions:
        values = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if "keep_float_ops" in values:
            values["keep_float_ops"] = tuple(values["keep_float_ops"])
        return cls(**values)

    def validate(self) -> None:
        if self.device not in _PROVIDERS:
            raise InputError(
                f"ONNX Runtime device {self.device!r}: expected one of {', '.join(_PROVIDERS)}"
            )
        if self.attention_kernels not in ATTENTION_KERNELS:
            raise InputError(
                f"attention kernels {self.attention_kernels!r}: expected one of "
                f"{', '.join(ATTENTION_KERNELS)}"
            )
        if self.device == "cpu" and (
            self.fp16 or self.cuda_graph or self.tensorrt_provider or self.packed_attention
        ):
            raise InputError(
                "fp16, CUDA graphs, the TensorRT provider and packed attention need --device "
                "cuda; the CPU engine is fp32 or int8"
            )
        check_packed_attention(packed_attention=self.packed_attention, cuda_graph=self.cuda_graph)


def provider_entries(options: OrtEngineOptions, engine_dir: Path | None) -> list:
    """The (provider, options) list a session is created with; recorded in the manifest.

    Args:
        engine_dir: folder of the engine, where the TensorRT provider keeps its engine cache
            (None while building: no cache is written then).
    """
    if options.device == "cpu":
        return [("CPUExecutionProvider", {})]
    cuda = {
        "device_id": str(options.device_id),
        "enable_cuda_graph": "1" if options.cuda_graph else "0",
        # fp16 GEMMs keep float32 accumulation; TF32 would only touch float32 MatMuls.
        "use_tf32": "0",
    }
    kernels = ATTENTION_KERNELS[options.attention_kernels]
    if kernels is not None:
        cuda["sdpa_kernel"] = str(kernels)
    entries = []
    if options.tensorrt_provider:
        trt = {
            "device_id": str(options.device_id),
            "trt_fp16_enable": "1" if options.fp16 else "0",
            "trt_engine_cache_enable": "1" if engine_dir is not None else "0",
        }
        if engine_dir is not None:
            trt["trt_engine_cache_path"] = str(Path(engine_dir) / options.trt_cache_dir)
            trt["trt_timing_cache_enable"] = "1"
            trt["trt_timing_cache_path"] = str(Path(engine_dir) / options.trt_cache_dir)
        entries.append(("TensorrtExecutionProvider", trt))
    entries.append(("CUDAExecutionProvider", cuda))
    return entries


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


def _check_providers(entries: list) -> str:
    """Fail unless every provider asked for exists here; return the one expected to run first."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    for name, _ in entries:
        if name not in available:
            hint = " (install onnxruntime-gpu)" if name != "CPUExecutionProvider" else ""
            raise EnvironmentProblem(
                f"ONNX Runtime {ort.__version__} has no {name} on this machine "
                f"(available: {', '.join(available)}){hint}"
            )
    if entries[0][0] != "CPUExecutionProvider":
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            preload()  # onnxruntime-gpu finds CUDA/cuDNN from the nvidia-* wheels this way
    return entries[0][0]


def build_engine(source: Path, destination: Path, options: OrtEngineOptions) -> dict[str, Any]:
    """Optimize ``source`` offline with ORT and write the result to ``destination``.

    Returns:
        Facts about the build for the manifest (provider, ORT version).

    Raises:
        InputError: ORT cannot load or optimize the graph.
        EnvironmentProblem: the requested device's provider is not available.
    """
    import onnxruntime as ort

    options.validate()
    # The TensorRT provider compiles at load time, into the engine folder's cache; the graph
    # written here is optimized for the CUDA provider that runs whatever TensorRT does not take.
    entries = provider_entries(replace(options, tensorrt_provider=False, cuda_graph=False), None)
    provider = _check_providers(entries)
    session_options = _session_options(options.offline_level, options.intra_op_num_threads)
    session_options.optimized_model_filepath = str(destination)
    facts: dict[str, Any] = {"provider": provider, "onnxruntime": ort.__version__}
    model: Any = str(source)
    if options.lower_int8 or options.pack_tokens or options.fp16 or options.packed_attention:
        graph = load_onnx(Path(source))
        if options.fp16:
            graph = convert_to_fp16(graph, keep_float_ops=options.keep_float_ops)
            facts["fp16_weight_fraction"] = round(float16_fraction(graph), 6)
        if options.packed_attention:
            # After the fp16 conversion: its float32 head starts at the last LayerNorm's output,
            # where RestorePadding would otherwise sit (and run in float32).
            graph = pack_attention(graph, where=str(source))
            facts["packed_attention_ops"] = {
                op: sum(node.op_type == op for node in graph.graph.node) for op in PACKED_OPS
            }
        if options.lower_int8:
            graph = lower_qdq_matmuls(
                graph, weights=options.int8_weights, dynamic=options.int8_dynamic
            )
            facts["int8_weights"] = options.int8_weights
            facts["int8_dynamic"] = options.int8_dynamic
        if options.pack_tokens:
            facts["packed_regions"] = len(find_feed_forward_regions(graph))
            graph = pack_feed_forward(graph)
        model = graph.SerializeToString()
    try:
        ort.InferenceSession(
            model,
            session_options,
            providers=[name for name, _ in entries],
            provider_options=[opts for _, opts in entries],
        )
    except _ort_errors() as err:
        raise InputError(f"{source}: ONNX Runtime cannot build an engine from it ({err})") from err
    if not Path(destination).is_file():
        raise InputError(f"{source}: ONNX Runtime wrote no optimized model")
    return facts


class OrtEngine:
    """A loaded engine: one ORT session on the provider it was built for.

    ``run`` takes numpy feeds (verify); ``run_device`` takes torch CUDA tensors and binds them
    with IO binding, so a GPU engine reads and writes device memory without host copies.
    """

    packed_rows = False

    def __init__(
        self, session, provider: str, path: Path, options: OrtEngineOptions, stream: Any = None
    ):
        self.session = session
        self.provider = provider
        self.path = path
        self.options = options
        self.device = options.device
        # Any batch runs (no profiles to fit).
        self.max_batch: int | None = None
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        # Intra-op threads the build recorded; 0: ONNX Runtime's choice, one per physical core.
        self.threads = options.intra_op_num_threads
        # Sessions of other thread counts (with_threads), unless the build recorded a count: a
        # user's choice is kept as it is.
        self.concurrent_runs = not self.threads
        self._threaded: dict[int, OrtEngine] = {}
        self._threaded_lock = threading.Lock()
        self._identity = _file_identity(path)
        self._input_axes = {i.name: i.shape for i in session.get_inputs()}
        self._output_axes = {o.name: o.shape for o in session.get_outputs()}
        self._graph_buffers: dict[tuple[int, ...], tuple[dict, dict, Any, Any]] = {}
        # The torch stream ORT computes on (a CUDA engine whose provider took it, else None):
        # run_device then orders its work with the caller's stream by events and returns without
        # waiting for the GPU, so a caller can queue the next batch while this one runs.
        self.stream = stream

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run one batch; ``feeds`` maps every input name to an int64 array [batch, sequence]."""
        require_inputs(self.path, self.input_names, feeds)
        if self.options.device == "cuda":
            return run_numpy_on_gpu(self.run_device, self.input_names, feeds)
        outputs = self.session.run(self.output_names, {k: feeds[k] for k in self.input_names})
        return dict(zip(self.output_names, outputs, strict=True))

    def with_threads(self, threads: int) -> OrtEngine:
        """This CPU engine in a session with ``threads`` intra-op threads, for a caller that
        runs several batches at once (the runtime on a CPU; one session takes concurrent runs):
        this engine where its session has that count, else a second session over the same file,
        made once per count and kept.

        Raises:
            ArtifactError: the engine file changed since this engine loaded it (its sha256 was
                checked then; a changed file is not loaded unchecked).
        """
        if self.device != "cpu" or threads == self.threads:
            return self
        with self._threaded_lock:
            if threads not in self._threaded:
                try:
                    same = _file_identity(self.path) == self._identity
                except OSError:  # removed, or no longer readable
                    same = False
                if not same:
                    raise ArtifactError(
                        f"{self.path}: the engine file changed since it was loaded; load the "
                        "engine folder again"
                    )
                self._threaded[threads] = load(
                    self.path, replace(self.options, intra_op_num_threads=threads)
                )
            return self._threaded[threads]

    def output_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """An output's concrete shape for inputs of ``shape``, from the graph's axis names."""
        sizes = dict(zip(self._input_axes[self.input_names[0]], shape, strict=True))
        try:
            return tuple(d if isinstance(d, int) else sizes[d] for d in self._output_axes[name])
        except KeyError as err:
            raise InputError(
                f"{self.path}: output {name} has axis {err} that no input defines"
            ) from err

    def run_device(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """Run one batch of torch CUDA tensors [batch, sequence]; returns torch CUDA tensors,
        ordered with the caller's current stream (use them on it, or synchronise).

        With ``cuda_graph`` each distinct shape gets fixed input and output buffers and its own
        graph id: ORT captures the graph on the first runs of that shape and replays it after.
        The returned tensors are then those fixed buffers, overwritten by the next run of the
        same shape: copy them to keep them.
        """
        import torch

        require_inputs(self.path, self.input_names, tensors)
        shape = tuple(tensors[self.input_names[0]].shape)
        device = torch.device("cuda", self.options.device_id)
        caller = torch.cuda.current_stream(device)
        if self.stream is not None:
            self.stream.wait_stream(caller)
        if self.options.cuda_graph:
            if shape not in self._graph_buffers:
                self._graph_buffers[shape] = self._bind(
                    {
                        n: torch.empty(shape, dtype=torch.int64, device=device)
                        for n in self.input_names
                    },
                    graph_id=str(len(self._graph_buffers) + 1),  # ORT reserves -1 and uses 0
                )
            inputs, outputs, binding, run_options = self._graph_buffers[shape]
            with torch.cuda.stream(self.stream or caller):
                for name in self.input_names:
                    inputs[name].copy_(tensors[name])
        else:
            inputs, outputs, binding, run_options = self._bind(
                {
                    n: tensors[n].to(device=device, dtype=torch.int64).contiguous()
                    for n in self.input_names
                },
                graph_id=None,
            )
        if self.stream is None:
            # ORT runs on a stream of its own: what the caller queued must be done first.
            caller.synchronize()
        self.session.run_with_iobinding(binding, run_options)
        if self.stream is None:
            binding.synchronize_outputs()
        else:
            if not self.options.cuda_graph:
                # Allocated on the caller's stream, used on ORT's: not reused before ORT is done.
                for tensor in (*inputs.values(), *outputs.values()):
                    tensor.record_stream(self.stream)
            caller.wait_stream(self.stream)
        return dict(outputs)

    def _bind(self, inputs: dict, graph_id: str | None) -> tuple[dict, dict, Any, Any]:
        """IO binding of ``inputs`` and freshly allocated float32 outputs on the same device."""
        import numpy as np
        import onnxruntime as ort
        import torch

        shape = tuple(inputs[self.input_names[0]].shape)
        device = inputs[self.input_names[0]].device
        outputs = {
            n: torch.empty(self.output_shape(n, shape), dtype=torch.float32, device=device)
            for n in self.output_names
        }
        binding = self.session.io_binding()
        for name, tensor in inputs.items():
            binding.bind_input(
                name, "cuda", self.options.device_id, np.int64, shape, tensor.data_ptr()
            )
        for name, tensor in outputs.items():
            binding.bind_output(
                name,
                "cuda",
                self.options.device_id,
                np.float32,
                tuple(tensor.shape),
                tensor.data_ptr(),
            )
        run_options = ort.RunOptions()
        if graph_id is not None:
            run_options.add_run_config_entry("gpu_graph_id", graph_id)
        if self.stream is not None:
            # The caller's stream waits for ORT's by an event: no host wait at the end of a run.
            run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        return inputs, outputs, binding, run_options


def _file_identity(path: Path) -> tuple[int, int, int, int]:
    """What says a file is the one read before: device, inode, size, modification time."""
    status = Path(path).stat()
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def load(path: Path, options: OrtEngineOptions) -> OrtEngine:
    """Create a session for an engine file with its recorded options.

    The caller checks the file's sha256 against its manifest first (backend.load_engine).

    Raises:
        EnvironmentProblem: a provider is missing, or ORT placed the graph on another provider
            than the one requested (no silent CPU fallback).
    """
    import onnxruntime as ort

    options.validate()
    # ORT follows the file's external-data paths itself: the same containment check as every
    # graph this tool reads (an engine folder or a repository can be edited after the build).
    check_onnx_file(Path(path))
    entries = provider_entries(options, Path(path).parent)
    provider = _check_providers(entries)
    stream = None
    if options.device == "cuda" and not options.tensorrt_provider:
        import torch

        # Not in provider_entries: a process's stream handle is no setting of the engine. (ORT's
        # TensorRT provider would compute on a stream of its own: that engine waits for runs.)
        stream = torch.cuda.Stream(device=options.device_id)
        name, cuda = entries[-1]
        entries[-1] = (
            name,
            {
                **cuda,
                "has_user_compute_stream": "1",
                "user_compute_stream": str(stream.cuda_stream),
            },
        )
    session_options = _session_options(
        options.runtime_level, options.intra_op_num_threads, options.allow_spinning
    )
    try:
        session = ort.InferenceSession(
            str(path),
            session_options,
            providers=[name for name, _ in entries],
            provider_options=[opts for _, opts in entries],
        )
    except _ort_errors() as err:
        raise InputError(f"{path}: ONNX Runtime cannot load the engine ({err})") from err
    active = session.get_providers()
    if not active or active[0] != provider:
        raise EnvironmentProblem(
            f"{path}: asked ONNX Runtime for {provider} but it runs on {active}; refusing a "
            "silent fallback"
        )
    if stream is not None and not _runs_on(session, stream):
        stream = None  # ORT kept a stream of its own: run_device waits for every run
    return OrtEngine(session, provider, Path(path), options, stream)


def _runs_on(session, stream) -> bool:
    """Whether the session's CUDA provider computes on ``stream`` (it echoes the option)."""
    cuda = session.get_provider_options().get("CUDAExecutionProvider", {})
    return cuda.get("user_compute_stream") == str(stream.cuda_stream)


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU or CUDA: the fused graph (fp32, fp16) or the lowered Q/DQ graph
    (int8, CPU only), optimized offline and loaded with the recorded session options."""

    name = "onnxruntime"
    tag = "ort"
    file_suffix = ".onnx"
    triton_platform = "onnxruntime_onnx"
    version_key = "onnxruntime"
    options_type = OnnxRuntimeBuildOptions
    label = "ONNX Runtime CUDA"
    targets = ("cpu", "cuda")
    auto_gpu_rank = 1
    auto_cpu_fallback = True
    cpu_label = "CPU ONNX Runtime engine"

    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def check(self, spec: BuildSpec) -> None:
        options: OnnxRuntimeBuildOptions = spec.options
        resolve_weight_type(options.int8_weights)
        if options.attention_kernels not in ATTENTION_KERNELS:
            raise InputError(
                f"--attention-kernels {options.attention_kernels!r}: expected one of "
                f"{', '.join(ATTENTION_KERNELS)}"
            )
        check_dynamic_scope(options.int8_dynamic)
        check_packed_attention(
            packed_attention=options.packed_attention, cuda_graph=options.cuda_graph
        )
        if options.packed_attention and spec.device != "cuda":
            raise InputError(
                f"--packed-attention: only ONNX Runtime CUDA engines take it, not {self.name} "
                f"on {spec.device}; build with --target cuda, or without --packed-attention"
            )
        if spec.device == "cuda" and spec.precision == "int8":
            raise InputError(
                "ONNX Runtime's CUDA provider has no fast path for Q/DQ INT8 graphs; build int8 "
                "with --target tensorrt, or fp16 for ONNX Runtime CUDA"
            )

    def gpu_problem(self, env: Environment) -> str:
        if env.has_ort_cuda:
            return ""
        return (
            f"ONNX Runtime {env.onnxruntime} has no CUDAExecutionProvider (install onnxruntime-gpu)"
        )

    def plan(self, target: str, precisions: tuple[str, ...], env: Environment) -> TargetPlan:
        if "fp8" in precisions:
            raise InputError(fp8_refusal(f"--target {target}"))
        if target == "cpu":
            if "fp16" in precisions:
                raise InputError("--target cpu --precision fp16: the CPU engine is fp32 or int8")
            return self.plan_cpu(precisions)
        gpus = env.compute_capabilities()
        problem = self.gpu_problem(env) if gpus else "no NVIDIA GPU found"
        if problem:
            raise EnvironmentProblem(
                f"--target {target}: {problem}; use --target auto to fall back to the CPU engine"
            )
        return TargetPlan(self.gpu_engines(precisions, gpus))

    def plan_cpu(self, precisions: tuple[str, ...]) -> TargetPlan:
        # fp16 has no CPU engine: it becomes fp32, and says so.
        chosen = dict.fromkeys("fp32" if p == "fp16" else p for p in precisions or ("fp32",))
        engines = tuple(
            {"backend": self.name, "device": "cpu", "precision": p, "compute_capability": ""}
            for p in chosen
        )
        fp16 = "fp16" in precisions
        return TargetPlan(engines, ("fp16 has no CPU engine: built fp32 instead",) if fp16 else ())

    def applicable(self, spec: BuildSpec) -> BuildSpec:
        # CUDA graphs, ORT's TensorRT provider, the attention kernels and packing mode exist
        # only on the CUDA provider; the INT8 weight type and dynamic scope only on the CPU
        # int8 engine.
        options: OnnxRuntimeBuildOptions = spec.options
        defaults = OnnxRuntimeBuildOptions()
        if spec.device != "cpu" or spec.precision != "int8":
            options = replace(
                options, int8_weights=defaults.int8_weights, int8_dynamic=defaults.int8_dynamic
            )
        if spec.device != "cuda":
            options = replace(
                options,
                cuda_graph=defaults.cuda_graph,
                ort_tensorrt_provider=defaults.ort_tensorrt_provider,
                attention_kernels=defaults.attention_kernels,
                packed_attention=defaults.packed_attention,
            )
        return replace(spec, options=options)

    @staticmethod
    def _attention_variant(spec: BuildSpec) -> str:
        # The build's default kernels keep the plain name; the other choice names its engine.
        kernels = spec.options.attention_kernels
        named = spec.device == "cuda" and kernels != DEFAULT_ATTENTION_KERNELS
        return f"attn-{kernels}" if named else ""

    def source_stage(self, spec: BuildSpec) -> str:
        return "calibrate" if spec.precision == "int8" else "fuse"

    def folder_parts(self, spec: BuildSpec) -> list[str]:
        if spec.device == "cuda":
            return [spec.device, "sm" + spec.compute_capability.replace(".", "")]
        return [spec.device]

    def variants(self, spec: BuildSpec) -> list[str]:
        # An explicit INT8 weight type names its engine, so that s8 and u8 engines of one model
        # can be built, verified and benchmarked side by side; ``auto`` keeps the plain name.
        options: OnnxRuntimeBuildOptions = spec.options
        return [
            name
            for name, on in (
                ("cudagraph", options.cuda_graph),
                ("trtep", options.ort_tensorrt_provider),
                (options.int8_weights, options.int8_weights != "auto"),
                (self._attention_variant(spec), bool(self._attention_variant(spec))),
                ("packed-attention", options.packed_attention),
                (f"dynamic-{options.int8_dynamic}", options.int8_dynamic != _DEFAULT_DYNAMIC),
            )
            if on
        ]

    @staticmethod
    def session_options(spec: BuildSpec) -> OrtEngineOptions:
        """The engine's session options a build spec asks for."""
        build: OnnxRuntimeBuildOptions = spec.options
        int8 = spec.precision == "int8"
        return OrtEngineOptions(
            device=spec.device,
            intra_op_num_threads=build.intra_op_num_threads,
            lower_int8=int8,
            # Part of the build record: an engine built on a VNNI CPU differs from one without.
            int8_weights=resolve_weight_type(build.int8_weights) if int8 else "s8",
            int8_dynamic=build.int8_dynamic if int8 else "none",
            pack_tokens=build.pack_tokens and spec.device == "cpu",
            fp16=spec.precision == "fp16",
            keep_float_ops=spec.keep_float_ops,
            cuda_graph=build.cuda_graph,
            tensorrt_provider=build.ort_tensorrt_provider,
            attention_kernels=build.attention_kernels
            if spec.device == "cuda"
            else DEFAULT_ATTENTION_KERNELS,
            packed_attention=build.packed_attention and spec.device == "cuda",
        )

    def build_job(self, source: Path, spec: BuildSpec, *, input_names: tuple[str, ...]) -> BuildJob:
        options = self.session_options(spec)

        def prepare() -> None:
            # ORT would follow the graph's external-data paths itself: check containment first.
            graph = load_onnx(source)
            check_float_source(graph, precision=spec.precision, where=str(source))
            if options.packed_attention:
                require_packable(graph, where=str(source))

        def body(folder: Path) -> tuple[list[str], dict[str, Any]]:
            facts = gpu_facts(spec)
            with atomic_path(folder / ENGINE_FILE) as staging:
                facts.update(build_engine(source, staging, options))
            # Prove the engine loads with the options recorded for it before calling it complete.
            engine = load(folder / ENGINE_FILE, options)
            return [ENGINE_FILE], {
                **facts,
                "engine_file": ENGINE_FILE,
                "inputs": engine.input_names,
                "outputs": engine.output_names,
            }

        settings = {
            "session": options.to_dict(),
            # Relative cache path: the record must not change when the output tree moves.
            "providers": provider_entries(options, Path(".")),
        }
        if spec.options.int8_weights != "auto":
            # What was asked for (it names the engine); the session records what it resolved to.
            settings["int8_weights"] = spec.options.int8_weights
        return BuildJob(settings=settings, prepare=prepare, body=body)

    def load(self, engine_path: Path, spec: Mapping[str, Any], results: Mapping[str, Any]):
        options = OrtEngineOptions.from_dict(spec.get("session", {}))
        if options.device == "cuda":
            # An ORT CUDA engine is optimized offline for one GPU: refuse it on another.
            capability, _ = current_gpu(f"{engine_path}: this CUDA engine")
            if results.get("compute_capability") != capability:
                raise EnvironmentProblem(
                    f"{engine_path}: built for compute capability "
                    f"{results.get('compute_capability')}, this GPU is {capability}; build an "
                    "engine for it (--target auto)"
                )
        return load(engine_path, options)

    def from_record(self, spec: Mapping[str, Any]) -> BuildSpec:
        session = OrtEngineOptions.from_dict(spec.get("session", {}))
        return BuildSpec(
            backend=self.name,
            device=spec["device"],
            precision=spec["precision"],
            compute_capability=spec.get("compute_capability", ""),
            keep_float_ops=session.keep_float_ops,
            options=OnnxRuntimeBuildOptions(
                intra_op_num_threads=session.intra_op_num_threads,
                pack_tokens=session.pack_tokens,
                cuda_graph=session.cuda_graph,
                ort_tensorrt_provider=session.tensorrt_provider,
                int8_weights=spec.get("int8_weights", "auto"),
                attention_kernels=session.attention_kernels,
                packed_attention=session.packed_attention,
                int8_dynamic=session.int8_dynamic
                if spec["precision"] == "int8"
                else _DEFAULT_DYNAMIC,
            ),
        )

    def kind_parts(self, spec: BuildSpec) -> list[str]:
        return [spec.device]

    def python_session_problem(self, spec: Mapping[str, Any]) -> str:
        session = spec.get("session", {})
        if session.get("cuda_graph"):
            return (
                "a CUDA-graph engine replays runs of fixed shapes through bound buffers, and a "
                "text model's runs vary in shape; package an engine built without --cuda-graph"
            )
        if session.get("tensorrt_provider"):
            return "it runs through ORT's TensorRT provider, which Triton's Python lacks"
        return ""

    def triton_parameters(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        session = spec.get("session", {})
        gpu = spec["device"] == "cuda"
        return {
            "graph_level": TRITON_GRAPH_LEVELS[session.get("runtime_level", "all")],
            "parameters": session_parameters(session),
            # fp32 CUDA engines were verified without TF32; ORT's CUDA provider enables it.
            "gpu_accelerator": {"use_tf32": "0"} if gpu and spec["precision"] == "fp32" else None,
        }


def recorded_cuda_options(spec: Mapping[str, Any]) -> dict[str, str]:
    """The CUDA provider options a recorded CUDA engine's build ran it with, but its device id
    (a server runs each copy on the GPU it is given).

    Raises:
        ArtifactError: the record names no CUDA provider (not a CUDA engine).
    """
    for name, options in spec.get("providers", []):
        if name == _PROVIDERS["cuda"]:
            return {k: str(v) for k, v in options.items() if k != "device_id"}
    names = [entry[0] for entry in spec.get("providers", [])]
    raise ArtifactError(f"the build record has no {_PROVIDERS['cuda']} (providers: {names})")


def session_parameters(session: Mapping[str, Any], python: bool = False) -> dict[str, str]:
    """Triton parameters that load a recorded ORT engine as its build recorded: the thread count,
    and (for the Python backend, which creates its own session) the graph optimization level."""
    parameters = {}
    if session.get("intra_op_num_threads"):
        parameters["intra_op_thread_count"] = str(session["intra_op_num_threads"])
    if python:
        parameters["graph_optimization_level"] = session.get("runtime_level", "all")
    return parameters


BACKEND = register(OnnxRuntimeBackend())
