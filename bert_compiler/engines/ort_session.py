"""An ONNX Runtime engine at run time: its session and provider options (OrtEngineOptions, as a
build records them), loading it on the provider it was built for, and running it (OrtEngine:
numpy feeds, or torch CUDA tensors bound without host copies). engines/onnxruntime.py builds
the engines and is the backend."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bert_compiler.core.errors import ArtifactError, EnvironmentProblem, InputError
from bert_compiler.core.onnx_io import check_onnx_file
from bert_compiler.engines.feeds import require_inputs, run_numpy_on_gpu

_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Attention kernels of ORT's CUDA provider (its `sdpa_kernel` option, a bit mask of backends:
# flash 1, memory-efficient 2, TensorRT fused 4, cuDNN flash 8, unfused 16, TensorRT flash 32,
# TensorRT cross 64). "default" leaves ORT to choose: on compute capability 9.0 and later it
# prefers cuDNN's flash attention, the largest single cost of MiniLM's short-row batches in the
# profile (docs/gpu-bench/2026-11-24-h100-runtime/profile-minilm.txt). "fused": every backend but
# cuDNN's, which for BERT's self-attention up to 512 tokens is TensorRT's fused MHA kernel: no
# faster on short rows, slower at 128 tokens. "unfused": batched GEMMs and a softmax kernel,
# slower than ORT's choice on short rows (docs/benchmarks.md, "GPU third pass").
ATTENTION_KERNELS = {"default": None, "fused": 1 | 2 | 4 | 16 | 32 | 64, "unfused": 16}
# The attention kernels an ONNX Runtime CUDA engine is built with unless told otherwise: ORT's own
# choice, which neither alternative beat for MiniLM or BERT-base on the calibration sentences
# (docs/benchmarks.md, "GPU real text through the runtime, second pass" and "GPU third pass"; raw:
# docs/gpu-bench/2026-11-24-h100-runtime/choose-*.txt).
DEFAULT_ATTENTION_KERNELS = "default"


def check_packed_attention(*, packed_attention: bool, cuda_graph: bool) -> None:
    """Raises InputError for packed attention with CUDA graphs: RemovePadding sizes its output by
    the batch's valid tokens, copied to the host mid-run, which no CUDA graph can capture."""
    if packed_attention and cuda_graph:
        raise InputError(
            "--packed-attention with --cuda-graph: ORT's RemovePadding waits for the GPU in every "
            "run (its output has one row per valid token), so no CUDA graph can capture it; "
            "build the packed engine without --cuda-graph"
        )


def ort_errors() -> tuple[type[BaseException], ...]:
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
            consumer and keeps every bias Add apart, which runs slower (docs/guides/int8.md).
        int8_weights: weight type of the lowered INT8 MatMuls (engines/ort_int8.py): ``s8``
            where the building CPU has VNNI, else ``u8``, which stays exact on CPUs without it.
        int8_dynamic: the lowered MatMuls whose activation is quantized per batch at run time
            (engines/ort_int8.py DYNAMIC_SCOPES).
        pack_tokens: run each layer's feed-forward block on the valid tokens only
            (engines/token_packing.py), so the padding of a batch costs it nothing there (what
            that buys INT8: docs/guides/int8.md, "Token packing").
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
        if self.device not in PROVIDERS:
            raise InputError(
                f"ONNX Runtime device {self.device!r}: expected one of {', '.join(PROVIDERS)}"
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


def session_options_for(level: str, threads: int, allow_spinning: bool = True):
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


def check_providers(entries: list) -> str:
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
    provider = check_providers(entries)
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
    session_options = session_options_for(
        options.runtime_level, options.intra_op_num_threads, options.allow_spinning
    )
    try:
        session = ort.InferenceSession(
            str(path),
            session_options,
            providers=[name for name, _ in entries],
            provider_options=[opts for _, opts in entries],
        )
    except ort_errors() as err:
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
