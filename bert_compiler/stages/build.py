"""build: a graph -> an engine folder per model, backend, target GPU, version and precision.

Which graph each engine builds from (each backend's ``source_stage``, engines/):

    onnxruntime cpu  fp32 -> fuse/ (ORT contrib ops)     int8 -> calibrate/ (Q/DQ)
    onnxruntime cuda fp32, fp16 -> fuse/                   int8 -> refused (no fast ORT CUDA INT8)
    tensorrt         fp32, fp16 -> simplify/ (standard ops) int8 -> calibrate/ (Q/DQ)
                                                            fp8  -> calibrate-fp8/ (float8 Q/DQ;
                                                                    compute capability 8.9+)
    torch            fp32, fp16 -> fuse/ (read into safetensors; int8, fp8 refused)
    fp8 anywhere else -> refused (core/targets.py fp8_refusal)

fp16 graphs are made inside the build (engines/fp16.py) and kept in the engine folder, so the
manifest names the exact graph each engine was compiled from.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

from bert_compiler.calibration.qdq import QUANTIZED_FORMATS, float_matmuls
from bert_compiler.core.artifacts import StageRecord
from bert_compiler.core.onnx_io import load_onnx, onnx_input
from bert_compiler.core.stage import StageResult, run_stage
from bert_compiler.core.targets import current_gpu
from bert_compiler.engines.backend import BuildSpec, engine_name, get_backend
from bert_compiler.engines.tensorrt_options import Profile, ProfileDerivation, derive_profiles
from bert_compiler.models.loading import ModelInfo, load_tokenizer
from bert_compiler.runtime.text import encode_texts, iter_file_texts, resolve_max_length
from bert_compiler.stages.layout import Layout

log = logging.getLogger("bert_compile")

# How many sentences of the profile text are tokenized to derive TensorRT profiles.
PROFILE_SENTENCES = 4096


@dataclass(frozen=True)
class ProfileText:
    """The text whose token lengths TensorRT profiles are derived from."""

    file: Path
    column: str
    pair_column: str | None
    max_length: int | None


def derive_dataset_profiles(
    info: ModelInfo, text: ProfileText, derivation: ProfileDerivation
) -> tuple[Profile, ...]:
    """TensorRT profiles from the token lengths of ``text`` (engines/tensorrt_options)."""
    max_length = resolve_max_length(info, text.max_length)
    # The first sentences of a file of any size: length quantiles need no more.
    texts = iter_file_texts(info, text.file, column=text.column, pair_column=text.pair_column)
    encoded = encode_texts(
        load_tokenizer(info), list(islice(texts, PROFILE_SENTENCES)), info, max_length
    )
    lengths = [len(ids) for ids in encoded["input_ids"]]
    profiles = derive_profiles(
        lengths, max_batch=derivation.max_batch, max_length=max_length, buckets=derivation.buckets
    )
    log.info(
        "[build] TensorRT profiles from %d sentences: %s",
        len(lengths),
        ", ".join(str(p) for p in profiles),
    )
    return profiles


def resolve_build_spec(
    requested: BuildSpec,
    *,
    info: ModelInfo,
    layout: Layout,
    text: ProfileText,
    derivation: ProfileDerivation,
) -> BuildSpec:
    """Fill in what a GPU build learns from this machine and the data: the compute capability,
    and what its backend derives (TensorRT: profiles from the token lengths of ``text``, the
    timing cache shared by every build of this output tree)."""
    requested.validate()
    if requested.device != "cuda":
        return requested
    resolved = requested
    if not resolved.compute_capability:
        capability, _ = current_gpu("a CUDA engine (use --target auto to fall back to the CPU)")
        resolved = replace(resolved, compute_capability=capability)
    return get_backend(resolved.backend).complete(
        resolved,
        derive_profiles=lambda: derive_dataset_profiles(info, text, derivation),
        timing_cache=layout.timing_cache,
    )


def engine_folder_name(spec: BuildSpec) -> str:
    """The engine's folder name with the installed backend's version in it."""
    return engine_name(spec, get_backend(spec.backend).version())


def build(
    *,
    source: Path,
    out_dir: Path,
    spec: BuildSpec,
    input_names: tuple[str, ...] = (),
    model: Mapping[str, Any] | None = None,
    force: bool = False,
) -> StageResult:
    """Build an engine from ``source`` into ``out_dir``.

    Args:
        input_names: the model's token inputs (TensorRT profiles set each of them).
        model: the fingerprint (ModelInfo.fingerprint) of the model ``source`` was exported
            from, recorded so the engine is never taken for another model's; None where that is
            not known (a graph given by path).

    Raises:
        InputError: bad settings, or the backend cannot build from the graph.
        EnvironmentProblem: the backend or device is missing on this machine.
    """
    spec.validate()
    source = Path(source)
    job = get_backend(spec.backend).build_job(source, spec, input_names=input_names)
    # The graph's hash, the target, and the backend's own settings decide the engine.
    record = StageRecord(
        stage="build",
        inputs={"onnx": onnx_input(source), **({"model": dict(model)} if model else {})},
        spec={
            "backend": spec.backend,
            "device": spec.device,
            "precision": spec.precision,
            "compute_capability": spec.compute_capability,
            **job.settings,
        },
    )

    def body(artifact):
        outputs, results = job.body(artifact.path)
        # A quantized engine's quantizable MatMuls that stayed float (--keep-float, the fallback).
        quantized = (
            spec.precision in QUANTIZED_FORMATS and get_backend(spec.backend).quantizes_from_qdq
        )
        counted = float_matmuls(load_onnx(source)) if quantized else None
        return outputs, {**results, **({"float_ops": counted} if counted else {})}

    return run_stage(record, Path(out_dir), body, force=force, prepare=job.prepare)
