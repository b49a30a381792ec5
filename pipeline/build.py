"""build: a graph -> an engine folder per model, backend, target GPU, version and precision.

Which graph each engine builds from:

    onnxruntime cpu  fp32 -> fuse/ (ORT contrib ops)     int8 -> calibrate/ (Q/DQ)
    onnxruntime cuda fp32, fp16 -> fuse/                   int8 -> refused (no fast ORT CUDA INT8)
    tensorrt         fp32, fp16 -> simplify/ (standard ops) int8 -> calibrate/ (Q/DQ)

fp16 graphs are made inside the build (engines/fp16.py) and kept in the engine folder, so the
manifest names the exact graph each engine was compiled from.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bert_compiler.core.artifacts import ArtifactDir, StageRecord, atomic_path, input_file
from bert_compiler.core.errors import ArtifactError, InputError
from bert_compiler.core.stage import StageResult, run_stage
from bert_compiler.engines.tensorrt import TensorRTOptions, target_tag

log = logging.getLogger("bert_compile")

BACKENDS = ("onnxruntime", "tensorrt")
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class BuildSpec:
    """Settings of the build stage.

    Attributes:
        backend: ``onnxruntime`` or ``tensorrt``.
        device: ``cpu`` or ``cuda`` (TensorRT is always ``cuda``).
        precision: ``fp32``; ``fp16`` (GPU only); ``int8`` from the calibrated Q/DQ graph.
        compute_capability: the target GPU's (``"9.0"``) for GPU engines; detected when empty.
        intra_op_num_threads: ONNX Runtime CPU threads; 0 means one per physical core.
        pack_tokens: CPU ORT: run feed-forward blocks on valid tokens only where the graph has
            them (the standard-ops INT8 graph does; the fused fp32 graph's blocks are not
            matched yet).
        cuda_graph: ORT CUDA: capture and replay CUDA graphs per input shape.
        ort_tensorrt_provider: ORT CUDA: put ORT's TensorRT provider first.
        keep_float_ops: fp16: op types kept in float32 beyond the defaults (engines/fp16.py).
        tensorrt: TensorRT builder options; empty profiles are derived from the dataset.
    """

    backend: str = "onnxruntime"
    device: str = "cpu"
    precision: str = "fp32"
    compute_capability: str = ""
    intra_op_num_threads: int = 0
    pack_tokens: bool = True
    cuda_graph: bool = False
    ort_tensorrt_provider: bool = False
    keep_float_ops: tuple[str, ...] = ()
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise InputError(f"--backend {self.backend!r}: supported: {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision {self.precision!r}: supported: {', '.join(PRECISIONS)}")
        if self.device not in DEVICES:
            raise InputError(f"--device {self.device!r}: supported: {', '.join(DEVICES)}")
        if self.backend == "tensorrt" and self.device != "cuda":
            raise InputError("TensorRT engines run on cuda only")
        if self.device == "cpu" and self.precision == "fp16":
            raise InputError("--precision fp16 needs a GPU target; the CPU engine is fp32 or int8")
        if self.backend == "onnxruntime" and self.device == "cuda" and self.precision == "int8":
            raise InputError(
                "ONNX Runtime's CUDA provider has no fast path for Q/DQ INT8 graphs; build int8 "
                "with --target tensorrt, or fp16 for ONNX Runtime CUDA"
            )
        self.tensorrt.validate()

    @property
    def source_stage(self) -> str:
        """The stage folder whose model.onnx this engine builds from."""
        if self.precision == "int8":
            return "calibrate"
        return "simplify" if self.backend == "tensorrt" else "fuse"


def backend_version(backend: str) -> str:
    """The installed version of ``backend`` (it goes into engine paths and manifests)."""
    if backend == "tensorrt":
        from bert_compiler.engines.tensorrt import _import_tensorrt

        return _import_tensorrt().__version__
    import onnxruntime

    return onnxruntime.__version__


def model_slug(name: str) -> str:
    """A model name safe as one path component."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")
    return slug or "model"


def engine_name(spec: BuildSpec, version: str) -> str:
    """Folder name of an engine: backend and version, device or GPU, precision, variants.

    ``ort1.32.0-cpu-fp32``, ``ort1.31.1-cuda-sm90-fp16-cudagraph``, ``trt10.13.3-sm90-fp16``,
    ``trt10.13.3-ampere_plus-int8-vc``.
    """
    if spec.backend == "tensorrt":
        parts = [f"trt{version}", target_tag(spec.compute_capability, spec.tensorrt)]
    else:
        parts = [f"ort{version}", spec.device]
        if spec.device == "cuda":
            parts.append("sm" + spec.compute_capability.replace(".", ""))
    parts.append(spec.precision)
    if spec.cuda_graph:
        parts.append("cudagraph")
    if spec.ort_tensorrt_provider:
        parts.append("trtep")
    if spec.backend == "tensorrt" and spec.tensorrt.version_compatible:
        parts.append("vc")
    return "-".join(parts)


def _ort_options(spec: BuildSpec):
    from bert_compiler.engines import onnxruntime as ort_engine
    from bert_compiler.engines.ort_int8 import weight_type_for_this_cpu

    int8 = spec.precision == "int8"
    return ort_engine.OrtEngineOptions(
        device=spec.device,
        intra_op_num_threads=spec.intra_op_num_threads,
        lower_int8=int8,
        # Part of the build record: an engine built on a VNNI CPU differs from one built without.
        int8_weights=weight_type_for_this_cpu() if int8 else "s8",
        pack_tokens=spec.pack_tokens and spec.device == "cpu",
        fp16=spec.precision == "fp16",
        keep_float_ops=spec.keep_float_ops,
        cuda_graph=spec.cuda_graph,
        tensorrt_provider=spec.ort_tensorrt_provider,
    )


def build(
    *,
    source: Path,
    out_dir: Path,
    spec: BuildSpec,
    input_names: tuple[str, ...] = (),
    force: bool = False,
) -> StageResult:
    """Build an engine from ``source`` into ``out_dir``.

    Args:
        input_names: the model's token inputs (TensorRT profiles set each of them).

    Raises:
        InputError: bad settings, or the backend cannot build from the graph.
        EnvironmentProblem: the backend or device is missing on this machine.
    """
    spec.validate()
    source = Path(source)
    if spec.backend == "tensorrt":
        return _build_tensorrt(source, Path(out_dir), spec, input_names, force)
    return _build_onnxruntime(source, Path(out_dir), spec, force)


def _gpu_facts(spec: BuildSpec) -> dict[str, Any]:
    if spec.device != "cuda":
        return {}
    from bert_compiler.core.targets import current_gpu

    built_for, gpu = current_gpu("building a GPU engine")
    if spec.compute_capability and spec.compute_capability != built_for:
        raise InputError(
            f"asked to build for compute capability {spec.compute_capability} on a "
            f"{gpu} ({built_for}); build on that GPU"
        )
    return {"compute_capability": built_for, "gpu": gpu}


def _build_record(source: Path, spec: BuildSpec, **backend_settings: Any) -> StageRecord:
    """The build stage's record: the graph's hash, the target, and the backend's own settings."""
    return StageRecord(
        stage="build",
        inputs={"onnx": input_file(source, "ONNX file")},
        spec={
            "backend": spec.backend,
            "device": spec.device,
            "precision": spec.precision,
            "compute_capability": spec.compute_capability,
            **backend_settings,
        },
    )


def _build_onnxruntime(source: Path, out_dir: Path, spec: BuildSpec, force: bool) -> StageResult:
    from bert_compiler.engines import onnxruntime as ort_engine

    options = _ort_options(spec)
    record = _build_record(
        source,
        spec,
        session=options.to_dict(),
        # Relative cache path: the record must not change when the output tree moves.
        providers=ort_engine.provider_entries(options, Path(".")),
    )

    def prepare():
        # ORT would follow the graph's external-data paths itself: check containment first.
        from bert_compiler.core.onnx_io import load_onnx

        load_onnx(source)

    def body(artifact):
        facts = _gpu_facts(spec)
        with atomic_path(artifact.path / ort_engine.ENGINE_FILE) as staging:
            facts.update(ort_engine.build_engine(source, staging, options))
        # Prove the engine loads with the options recorded for it before calling it complete.
        engine = ort_engine.load(artifact.path / ort_engine.ENGINE_FILE, options)
        return [ort_engine.ENGINE_FILE], {
            **facts,
            "engine_file": ort_engine.ENGINE_FILE,
            "inputs": engine.input_names,
            "outputs": engine.output_names,
        }

    return run_stage(record, out_dir, body, force=force, prepare=prepare)


def _build_tensorrt(
    source: Path, out_dir: Path, spec: BuildSpec, input_names: tuple[str, ...], force: bool
) -> StageResult:
    from bert_compiler.core.onnx_io import load_onnx, save_onnx
    from bert_compiler.engines import tensorrt as trt_engine

    if not spec.tensorrt.profiles:
        raise InputError("TensorRT build needs profiles (given, or derived by the runner)")
    record = _build_record(
        source,
        spec,
        keep_float_ops=list(spec.keep_float_ops),
        tensorrt=spec.tensorrt.to_dict(),
    )

    loaded = {}

    def prepare():
        loaded["model"] = load_onnx(source)

    def body(artifact):
        _gpu_facts(spec)
        network = trt_engine.prepare_network_graph(
            loaded["model"], precision=spec.precision, keep_float_ops=spec.keep_float_ops
        )
        names = input_names or tuple(i.name for i in network.graph.input)
        save_onnx(network, artifact.path / trt_engine.NETWORK_FILE)
        with atomic_path(artifact.path / trt_engine.PLAN_FILE) as staging:
            facts = trt_engine.build_engine(
                artifact.path / trt_engine.NETWORK_FILE, staging, spec.tensorrt, input_names=names
            )
        engine = trt_engine.load(
            artifact.path / trt_engine.PLAN_FILE,
            spec.tensorrt,
            built_tensorrt=facts["tensorrt"],
            built_compute_capability=facts["compute_capability"],
        )
        return [trt_engine.NETWORK_FILE, trt_engine.PLAN_FILE], {
            **facts,
            "engine_file": trt_engine.PLAN_FILE,
            "network_file": trt_engine.NETWORK_FILE,
            "inputs": engine.input_names,
            "outputs": engine.output_names,
        }

    return run_stage(record, out_dir, body, force=force, prepare=prepare)


def load_engine(engine_dir: Path):
    """Load an engine folder after checking every file against its manifest and, for TensorRT,
    that the plan fits this GPU and TensorRT version.

    Raises:
        ArtifactError: no complete manifest, or a file's sha256 differs from it.
        EnvironmentProblem: the engine was built for another GPU or backend version.
    """
    folder = ArtifactDir(Path(engine_dir))
    manifest = folder.require_complete()
    spec = manifest.get("spec", {})
    results = manifest.get("results", {})
    if manifest.get("stage") != "build" or spec.get("backend") not in BACKENDS:
        raise ArtifactError(f"{engine_dir}: not an engine folder this tool built")
    engine_path = folder.output_path(results["engine_file"])
    return load_recorded_engine(engine_path, spec, results), manifest


def load_recorded_engine(engine_path: Path, spec: dict[str, Any], results: dict[str, Any]):
    """Load an engine file with the settings its build manifest recorded (``spec``, ``results``).

    The caller has checked the file's sha256 against a manifest this tool wrote (an engine
    folder's, or a Triton repository's that copied it).

    Raises:
        EnvironmentProblem: the engine was built for another GPU or backend version, or needs a
            device or package this machine lacks.
    """
    if spec["backend"] == "tensorrt":
        from bert_compiler.engines import tensorrt as trt_engine

        return trt_engine.load(
            engine_path,
            TensorRTOptions.from_dict(spec.get("tensorrt", {})),
            built_tensorrt=results["tensorrt"],
            built_compute_capability=results["compute_capability"],
        )
    from bert_compiler.engines import onnxruntime as ort_engine

    options = ort_engine.OrtEngineOptions.from_dict(spec.get("session", {}))
    if options.device == "cuda":
        _check_ort_gpu(engine_path, results)
    return ort_engine.load(engine_path, options)


def _check_ort_gpu(engine_path: Path, results: dict[str, Any]) -> None:
    """An ORT CUDA engine is optimized offline for one GPU: refuse it on another."""
    from bert_compiler.core.errors import EnvironmentProblem
    from bert_compiler.core.targets import current_gpu

    capability, _ = current_gpu(f"{engine_path}: this CUDA engine")
    if results.get("compute_capability") != capability:
        raise EnvironmentProblem(
            f"{engine_path}: built for compute capability {results.get('compute_capability')}, "
            f"this GPU is {capability}; build an engine for it (--target auto)"
        )
