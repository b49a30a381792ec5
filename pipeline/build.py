"""build: a fused graph -> an engine folder per backend, device and precision."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import ArtifactDir, StageRecord, atomic_path, input_file
from pipeline.errors import ArtifactError, InputError
from pipeline.stage import StageResult, run_stage

log = logging.getLogger("bert_compile")

BACKENDS = ("onnxruntime",)
PRECISIONS = ("fp32", "int8")


@dataclass(frozen=True)
class BuildSpec:
    """Settings of the build stage.

    Attributes:
        backend: engine backend (``onnxruntime``; ``tensorrt`` arrives with the GPU issue).
        device: ``cpu``.
        precision: ``fp32``, or ``int8`` from a calibrated Q/DQ graph (fp16 arrives with the GPU
            issue).
        intra_op_num_threads: ONNX Runtime threads; 0 means one per physical core.
        pack_tokens: run feed-forward blocks on valid tokens only where the graph has them
            (the standard-ops INT8 graph does; the fused fp32 graph's blocks are not matched yet).
    """

    backend: str = "onnxruntime"
    device: str = "cpu"
    precision: str = "fp32"
    intra_op_num_threads: int = 0
    pack_tokens: bool = True

    @property
    def engine_name(self) -> str:
        return f"{self.backend}-{self.device}-{self.precision}"

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise InputError(f"--backend {self.backend!r}: supported: {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision {self.precision!r}: supported: {', '.join(PRECISIONS)}")
        if self.device != "cpu":
            raise InputError(f"--device {self.device!r}: supported: cpu")


def build(*, source: Path, out_dir: Path, spec: BuildSpec, force: bool = False) -> StageResult:
    """Build an engine from ``source`` into ``out_dir``.

    Raises:
        InputError: bad settings, or the backend cannot build from the graph.
        EnvironmentProblem: the backend or device is missing on this machine.
    """
    from engines import onnxruntime as ort_engine

    spec.validate()
    source = Path(source)
    options = ort_engine.OrtEngineOptions(
        device=spec.device,
        intra_op_num_threads=spec.intra_op_num_threads,
        lower_int8=spec.precision == "int8",
        pack_tokens=spec.pack_tokens,
    )
    record = StageRecord(
        stage="build",
        inputs={"onnx": input_file(source, "ONNX file")},
        spec={
            "backend": spec.backend,
            "device": spec.device,
            "precision": spec.precision,
            "session": options.to_dict(),
        },
    )

    def body(artifact):
        with atomic_path(artifact.path / ort_engine.ENGINE_FILE) as staging:
            facts = ort_engine.build_engine(source, staging, options)
        # Prove the engine loads with the options recorded for it before calling it complete.
        engine = ort_engine.load(artifact.path / ort_engine.ENGINE_FILE, options)
        return [ort_engine.ENGINE_FILE], {
            **facts,
            "engine_file": ort_engine.ENGINE_FILE,
            "inputs": engine.input_names,
            "outputs": engine.output_names,
        }

    return run_stage(record, Path(out_dir), body, force=force)


def load_engine(engine_dir: Path):
    """Load an engine folder after checking every file against its manifest.

    Raises:
        ArtifactError: no complete manifest, or a file's sha256 differs from it.
    """
    from engines import onnxruntime as ort_engine

    folder = ArtifactDir(Path(engine_dir))
    manifest = folder.require_complete()
    spec = manifest.get("spec", {})
    if manifest.get("stage") != "build" or spec.get("backend") not in BACKENDS:
        raise ArtifactError(f"{engine_dir}: not an engine folder this tool built")
    options = ort_engine.OrtEngineOptions.from_dict(spec.get("session", {}))
    return ort_engine.load(
        folder.output_path(manifest["results"]["engine_file"]), options
    ), manifest
