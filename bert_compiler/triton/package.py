"""package: verified engines -> a Triton model repository.

Only engines whose verify report passed, for the same engine file and the same model, are
packaged. The repository (default ``OUT/triton``) holds, for model M::

    manifest.json                  what was packaged from what; Triton ignores files at the root
    M-tokenizer/                   Python backend: TEXT (strings; a cross-encoder's TEXT_PAIR too)
                                   -> input_ids, attention_mask, ...
        config.pbtxt  1/model.py  1/token_rows.py  1/tokenizer.json
    M-ort-cpu-fp32/                onnxruntime_onnx on KIND_CPU instances (also -int8)
        config.pbtxt  1/model.onnx  warmup/...
    M-ort-cuda-fp16/               onnxruntime_onnx on KIND_GPU, one file per compute capability
        config.pbtxt  1/model.sm90.onnx  1/model.sm80.onnx ...   (cc_model_filenames)
    M-trt-fp16/                    tensorrt_plan, one plan per compute capability, every profile
        config.pbtxt  1/model.sm90.plan ...
    M-<engine model>-text/         ensemble: TEXT -> tokenizer -> engine -> outputs
        config.pbtxt  1/
    M-ort-cpu-fp32-python-text/    --python-cpu-engine: Python backend, TEXT -> outputs in one
                                   process (text_engine_model.py; --python-text ensemble: an
                                   M-ort-cpu-fp32-python engine model and an ensemble instead)
        config.pbtxt  1/model.py  1/tokenizer_model.py  1/token_rows.py
        1/onnxruntime_model.py  1/tokenizer.json  1/model.onnx

No GPU model has a default file: a GPU whose compute capability has no engine fails to load the
model instead of running a plan or graph built for another GPU (hardware-compatible TensorRT
plans are the exception, and are named ``M-trt-ampere_plus-...``).

The tree is built in a hidden folder beside the repository, every config.pbtxt is parsed back
with Triton's protobuf and cross-checked against the engine files and the ensembles' wiring, the
manifest is written last, and the finished tree replaces the old one in two renames.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bert_compiler.core.artifacts import (
    ArtifactDir,
    StageRecord,
    atomic_write_text,
    check_free_space,
    clear_leftovers,
    clear_staging,
    is_leftover,
    replace_tree,
    sha256_file,
    sha256_json,
    staging_tree,
    tool_versions,
)
from bert_compiler.core.errors import ArtifactError, InputError, ParityError
from bert_compiler.core.interrupts import checkpoint
from bert_compiler.core.lock import HOLDER_FILE, LOCK_FILE, output_lock
from bert_compiler.core.onnx_io import load_onnx
from bert_compiler.core.outdir import require_writable
from bert_compiler.core.stage import StageResult
from bert_compiler.engines import torch_module
from bert_compiler.engines.backend import get_backend
from bert_compiler.engines.batching import BatchingSpec, rung
from bert_compiler.engines.onnxruntime import recorded_cuda_options, session_parameters
from bert_compiler.models.loading import ModelInfo, load_tokenizer
from bert_compiler.runtime import token_rows
from bert_compiler.runtime.encoder import (
    CPU_BATCHING,
    GPU_BATCHING,
    PACKED_GPU_BATCHING,
    ladder_from_text,
)
from bert_compiler.runtime.text import (
    parity_batches,
    parity_texts,
    resolve_max_length,
    tokenize,
)
from bert_compiler.stages.layout import Layout, model_slug
from bert_compiler.triton import config as tc
from bert_compiler.triton.onnxruntime_model import CUDA_OPTIONS_PARAMETER, DEVICE_PARAMETER
from bert_compiler.triton.repository import (
    JOURNAL_FILE,
    VERSION,
    check_entries,
    checked_manifest,
    foreign_entries,
    package_models,
    package_outputs,
    repository_problems,
)
from bert_compiler.triton.text_engine_model import RUN_COST_PARAMETER
from bert_compiler.triton.tokenizer_model import (
    LADDER_PARAMETER,
    TEXT_INPUT,
    TEXT_PAIR_INPUT,
    TOKENIZER_FILE,
    TextEncoder,
    format_ladder,
)
from bert_compiler.triton.torch_text_model import (
    MAX_LENGTH_PARAMETER,
    MAX_ROWS_PARAMETER,
    PRECISION_PARAMETER,
    TOKEN_BUDGET_PARAMETER,
)

log = logging.getLogger("bert_compile")

REPOSITORY_FOLDER = "triton"
TEXT = tc.TensorSpec(TEXT_INPUT, "TYPE_STRING", (1,))
TEXT_PAIR = tc.TensorSpec(TEXT_PAIR_INPUT, "TYPE_STRING", (1,))
TEMPLATES = {
    "tokenizer": Path(__file__).with_name("tokenizer_model.py"),
    "python-engine": Path(__file__).with_name("onnxruntime_model.py"),
    "python-text": Path(__file__).with_name("text_engine_model.py"),
    "torch-text": Path(__file__).with_name("torch_text_model.py"),
    # Copied beside the model.py files that import them (token_rows.py beside every model
    # holding tokenizer_model.py).
    "token-rows": Path(token_rows.__file__),
    "torch-module": Path(torch_module.__file__),
}
_WARMUP_TEXT = (
    "A man is playing a large flute while a small crowd listens in the park, and two dogs run "
    "across the wide green field together before the rain begins to fall on the old town. "
)


PADDINGS = ("ladder", "request")
# How --python-cpu-engine serves text: one Python model that tokenizes and runs the engine, or
# the tokenizer model -> Python engine model ensemble (a second process, token tensors between).
PYTHON_TEXTS = ("model", "ensemble")
# What one more engine run costs the one-model text engine, in padded tokens: it cuts an execute
# call's length-sorted texts into runs where the padding a cut saves is worth more than this
# (text_engine_model.plan_runs). Chosen with --text-run-cost on the calibration sentences, MiniLM
# fp32 and INT8 on 2 cores (docs/benchmarks.md); near what a run costs there beyond its tokens
# (about 6 tokens' worth for fp32, 4 for INT8).
TEXT_RUN_COST_TOKENS = 8
# Fitted rungs of the Triton ladder (derive_ladder adds rungs 1.5x apart above the calibration
# sentences' longest row). Fewer than the runtime's: the runtime sorts rows before padding, but
# Triton pads requests as they come, and joins (onnxruntime, tensorrt backends) or runs together
# (the Python-backend engine) only requests of one rung. MiniLM on 2 CPU cores, concurrency 32,
# on the calibration sentences (scripts/triton_load.py --data; the report uses STS-B dev):
# 8 rungs 266 sentences/s, 4 256, 32 255, 12 250 (docs/benchmarks.md).
TRITON_LADDER_RUNGS = 8
# Instances of each Python-backend model (the tokenizer, a Python CPU engine): each is a process
# of its own, so two run two execute calls at once, each engine instance on half the usable
# cores (onnxruntime_model.intra_op_threads). Chosen on the calibration sentences at
# concurrency 32 on a 2-core machine (docs/benchmarks.md): MiniLM INT8 1.33x one instance,
# fp32 1.17x.
PYTHON_INSTANCES = 2
# Instances per GPU of a GPU engine's text model (torch_text_model.py): each tokenizes the texts
# of its execute calls on one core, so one instance holds the GPU back. Chosen on the calibration
# sentences on an H100 host (16 cores), MiniLM, 64 texts a request, concurrency 256: 1 instance
# 47,830 sentences/s, 2 94,549, 4 165,697 (docs/gpu-bench/2026-12-07-h100-serving/).
GPU_TEXT_INSTANCES = 4
# Inclusive bounds of PackageSpec's numbers (the CLI's option types are made from them).
PACKAGE_LIMITS = {
    "max_batch_size": (1, 4096),
    "max_queue_delay_us": (0, 10_000_000),
    "instances": (1, 64),
    "python_instances": (1, 64),
    "gpu_text_instances": (1, 64),
    "ladder_rungs": (1, 64),
    "text_run_cost": (0, 100_000),
}


@dataclass(frozen=True)
class PackageSpec:
    """Settings of the package stage.

    Attributes:
        engines: engine folder names under OUT/engines/MODEL to package; empty: all of them.
        max_batch_size: largest batch of ONNX Runtime models (TensorRT models take the largest
            batch every profile accepts).
        max_queue_delay_us: how long Triton's dynamic batcher waits to fill a batch.
        instances: instances of each engine model on a backend of its own (onnxruntime,
            tensorrt): per GPU (GPU models) or in all (CPU models).
        python_instances: instances of each Python-backend model (the tokenizer, Python CPU
            engines, a CPU torch engine's text model); an engine's instances share the usable
            cores.
        gpu_text_instances: instances per GPU of a GPU engine's text model.
        python_cpu_engine: also serve each CPU ONNX Runtime engine through Triton's Python
            backend, for Triton builds without the onnxruntime backend.
        python_gpu_engine: also serve each ONNX Runtime CUDA engine as a Python-backend text
            model on GPU instances (``<engine>-python-text``), for Triton builds without the
            onnxruntime backend (nvidia-pytriton's); engines built with CUDA graphs or ORT's
            TensorRT provider are left out, with a warning.
        python_text: how those engines take text: ``model``, one Python model
            (``<engine>-python-text``) that tokenizes every text of an execute call and runs
            the engine on them; ``ensemble``, the tokenizer model -> a Python engine model
            (``<engine>-python``, token tensors in) in an ensemble of that name.
        text_run_cost: the one-model text engine's cost of one more engine run, in padded
            tokens (0: a run per distinct length; large: one run per execute call).
        warmup: run real-token warmup requests when Triton loads an engine model.
        padding: how the tokenizer model pads a request: ``ladder``, to the shortest rung of
            ``length_ladder`` that holds its longest text (requests of one rung batch together
            in Triton); ``request``, to its own longest text (requests batch only when their
            longest texts have the same length: the behaviour before ladders).
        ladder_rungs: how many rungs of the ladder are fitted to the calibration sentences.
        length_ladder: the rungs, ascending, the top one at the maximum length; filled by
            ``package`` from the bundled calibration sentences (engines/batching.py's
            least-padding ladder with ``ladder_rungs`` fitted rungs), never from evaluation
            text.
    """

    engines: tuple[str, ...] = ()
    max_batch_size: int = 64
    max_queue_delay_us: int = 0
    instances: int = 1
    python_instances: int = PYTHON_INSTANCES
    gpu_text_instances: int = GPU_TEXT_INSTANCES
    python_cpu_engine: bool = False
    python_gpu_engine: bool = False
    python_text: str = "model"
    text_run_cost: int = TEXT_RUN_COST_TOKENS
    warmup: bool = True
    padding: str = "ladder"
    ladder_rungs: int = TRITON_LADDER_RUNGS
    length_ladder: tuple[int, ...] = ()

    def validate(self) -> None:
        for name, (low, high) in PACKAGE_LIMITS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                flag = "--" + name.replace("_", "-")
                raise InputError(f"{flag} {value}: expected {low} to {high}")
        if self.padding not in PADDINGS:
            raise InputError(
                f"--tokenizer-padding {self.padding!r}: expected one of {', '.join(PADDINGS)}"
            )
        if self.python_text not in PYTHON_TEXTS:
            raise InputError(
                f"--python-text {self.python_text!r}: expected one of {', '.join(PYTHON_TEXTS)}"
            )
        if self.padding == "request" and self.length_ladder:
            raise InputError("a length ladder needs --tokenizer-padding ladder")
        BatchingSpec(ladder=self.length_ladder).validate()

    def with_ladder(self, info: ModelInfo, max_length: int) -> PackageSpec:
        """This spec with its length ladder filled in (fitted to the bundled calibration
        sentences) where padding is ``ladder`` and none is set.

        Raises:
            InputError: a set ladder whose top rung is below ``max_length``.
        """
        if self.padding != "ladder":
            return self
        if not self.length_ladder:
            ladder = ladder_from_text(load_tokenizer(info), info, max_length, self.ladder_rungs)
            return replace(self, length_ladder=tuple(int(length) for length in ladder))
        if self.length_ladder[-1] < max_length:
            raise InputError(
                f"length ladder {list(self.length_ladder)}: its top rung must reach the maximum "
                f"length {max_length} the engines were verified at"
            )
        return self


@dataclass(frozen=True)
class VerifiedEngine:
    """An engine folder whose verify report passed for this engine file and this model."""

    name: str
    folder: Path
    spec: Mapping[str, Any]
    results: Mapping[str, Any]
    engine_file: Path
    engine_sha256: str
    report: Mapping[str, Any]
    max_length: int
    # The tensors Triton sees, where they are known already (the gate re-deriving a repository
    # reads them from its copy); None: read from the engine folder.
    io: tuple[list[tc.TensorSpec], list[tc.TensorSpec]] | None = None


def verified_engines(
    *, info: ModelInfo, out: Path, names: Sequence[str] = ()
) -> list[VerifiedEngine]:
    """The engines under OUT/engines/MODEL (or those named) with a passing verify report.

    Raises:
        InputError: no engines, a named one missing, or an engine never verified (or verified
            as another file or against another model).
        ParityError: an engine failed verification.
        ArtifactError: an engine or report does not match its manifest.
    """
    layout = Layout(Path(out))
    root = layout.engines(info.name)
    folders = sorted(f for f in root.glob("*") if f.is_dir() and not f.name.startswith("."))
    if names:
        missing = sorted(set(names) - {f.name for f in folders})
        if missing:
            raise InputError(f"{root}: no engine folder {', '.join(missing)}")
        folders = [f for f in folders if f.name in names]
    if not folders:
        raise InputError(f"{root}: no engines to package; run `bert-compile run` or build first")
    fingerprint = info.fingerprint()["sha256"]
    engines = []
    for folder in folders:
        manifest = ArtifactDir(folder).require_complete()
        if manifest.get("stage") != "build":
            raise ArtifactError(f"{folder}: not an engine folder this tool built")
        results = manifest["results"]
        engine_sha = manifest["outputs"][results["engine_file"]]["sha256"]
        verify_dir = layout.verify(info.name, folder.name)
        hint = f"run `bert-compile verify --engine {folder}` first"
        report = ArtifactDir(verify_dir).read_manifest()
        if report is None or not report.get("complete"):
            raise InputError(f"{folder}: never verified (no report in {verify_dir}); {hint}")
        ArtifactDir(verify_dir).require_complete()
        if report["inputs"]["engine"]["sha256"] != engine_sha:
            raise InputError(f"{folder}: the report in {verify_dir} is for another build; {hint}")
        if report["inputs"]["model"]["sha256"] != fingerprint:
            raise InputError(f"{folder}: verified against another model than {info.path}; {hint}")
        checked, built = report["spec"].get("precision"), manifest["spec"].get("precision")
        if checked != built:
            # verify --precision int8 on an fp32 engine passes it at int8's looser tolerances.
            raise InputError(
                f"{folder}: verified with {checked} tolerances, not its own {built} ones; run "
                f"`bert-compile verify --engine {folder}` without --precision first"
            )
        if not report["results"].get("passed"):
            reasons = "; ".join(report["results"].get("failures", [])) or "unknown"
            raise ParityError(
                f"{folder}: failed verification ({reasons}); only engines that pass are "
                "packaged (name the others with --engine)"
            )
        engines.append(
            VerifiedEngine(
                name=folder.name,
                folder=folder,
                spec=manifest["spec"],
                results=results,
                engine_file=ArtifactDir(folder).output_path(results["engine_file"]),
                engine_sha256=engine_sha,
                report=report["results"],
                max_length=resolve_max_length(info, report["spec"].get("max_length")),
            )
        )
    lengths = {e.max_length for e in engines}
    if len(lengths) != 1:
        raise InputError(
            f"{root}: engines were verified at different --max-length values {sorted(lengths)}; "
            "one tokenizer serves them all: verify them at one length"
        )
    return engines


def engine_kind(spec: Mapping[str, Any]) -> str:
    """The Triton model suffix of an engine: backend, device, precision, variants; never the GPU,
    so engines for several GPUs of one kind share a model (``ort-cuda-fp16``, ``trt-int8``)."""
    return get_backend(spec["backend"]).triton_kind(spec)


@dataclass
class _ModelPlan:
    """One Triton model of the repository before it is written."""

    name: str
    role: str
    config: Any
    files: dict[str, Path | str | bytes] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


def _engine_files(
    kind: str, engines: list[VerifiedEngine]
) -> tuple[dict[str, VerifiedEngine], str]:
    """File name in the version folder for each engine, and the default file name (or '')."""
    first = engines[0]
    backend = get_backend(first.spec["backend"])
    suffix = backend.file_suffix
    if first.spec["device"] == "cpu":
        if len(engines) > 1:
            raise InputError(
                f"{kind}: {len(engines)} CPU engines ({', '.join(e.name for e in engines)}) "
                "would share one Triton model; package one of them with --engine"
            )
        return {f"model{suffix}": first}, ""
    # A portable engine (a TensorRT ampere_plus plan) runs on every GPU of its kind: the model's
    # default file.
    if backend.portable(first.spec):
        if len(engines) > 1:
            raise InputError(f"{kind}: several hardware-compatible plans; package one")
        return {f"model{suffix}": first}, f"model{suffix}"
    files: dict[str, VerifiedEngine] = {}
    for engine in engines:
        capability = engine.results["compute_capability"]
        filename = f"model.sm{capability.replace('.', '')}{suffix}"
        if filename in files:
            raise InputError(
                f"{kind}: {files[filename].name} and {engine.name} both target compute "
                f"capability {capability}; package one of them with --engine"
            )
        files[filename] = engine
    return files, ""


def _check_one_version(kind: str, engines: list[VerifiedEngine]) -> str:
    """A Triton server runs one TensorRT and one ONNX Runtime: one version per model."""
    backend = get_backend(engines[0].spec["backend"])
    versions = {e.results[backend.version_key] for e in engines}
    if len(versions) != 1:
        raise InputError(f"{kind}: engines built with {backend.name} {sorted(map(str, versions))}")
    return str(versions.pop())


def _engine_io(engine: VerifiedEngine) -> tuple[list[tc.TensorSpec], list[tc.TensorSpec]]:
    """The tensors Triton sees: from the ONNX engine itself, or, for an engine file that cannot
    be opened without its backend (a TensorRT plan), from the exact graph it was built from."""
    if engine.io is not None:
        return engine.io
    graph = get_backend(engine.spec["backend"]).io_graph(engine.folder, engine.results)
    return tc.onnx_tensor_specs(load_onnx(ArtifactDir(engine.folder).output_path(graph)))


def _batching(
    kind: str, engine: VerifiedEngine, spec: PackageSpec, max_length: int
) -> tuple[int, list[int], list[str], list[int]]:
    """(max_batch_size, preferred batch sizes, profile indices, warmup lengths) of a model,
    from its backend, the length ladder and the runtime's token budget for its device.

    Raises:
        InputError: TensorRT profiles that leave some batch from 1 to the model's largest, or
            some length up to what the tokenizer sends, without a profile.
    """
    runtime = CPU_BATCHING if engine.spec["device"] == "cpu" else GPU_BATCHING
    batching = get_backend(engine.spec["backend"]).triton_batching(
        engine.spec,
        max_batch_size=spec.max_batch_size,
        max_length=max_length,
        where=kind,
        ladder=spec.length_ladder,
        token_budget=runtime.token_budget,
    )
    return (
        batching.max_batch_size,
        list(batching.preferred_batch_sizes),
        list(batching.profiles),
        list(batching.warmup_lengths),
    )


def tokenizer_json(info: ModelInfo, max_length: int) -> str:
    """The model's fast tokenizer as tokenizer.json, with verify's truncation and padding set in
    it (padding to the longest row, truncation at ``max_length``).

    Raises:
        InputError: the model folder has only a slow (Python) tokenizer.
    """
    from tokenizers import Tokenizer

    hf = load_tokenizer(info)
    if not getattr(hf, "is_fast", False):
        raise InputError(f"{info.path}: only a slow tokenizer; the Triton model needs a fast one")
    tokenizer = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length, direction=hf.truncation_side)
    tokenizer.enable_padding(
        direction=hf.padding_side,
        pad_id=hf.pad_token_id,
        pad_type_id=hf.pad_token_type_id,
        pad_token=hf.pad_token,
    )
    return tokenizer.to_str()


def tokenizer_mismatches(
    info: ModelInfo, tokenizer_file: Path, max_length: int, ladder: Sequence[int] = ()
) -> dict[str, Any]:
    """Compare a tokenizer.json, run as the Triton tokenizer model runs it (every batch as one
    request, padded to the ``ladder`` rung of its longest text; and all batches in one execute
    call, which must not change any of them), with the pipeline's tokenization padded to the
    same rung, on verify's parity batches (real sentences plus edge rows).

    Returns:
        ``{"batches": N, "mismatches": [...]}``; empty mismatches means identical tensors.
    """
    import numpy as np
    from tokenizers import Tokenizer

    try:
        repository_tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as err:  # tokenizers raises its own Exception subclass for a bad file
        raise InputError(f"{tokenizer_file}: not a tokenizer.json ({err})") from err
    hf = load_tokenizer(info)
    names = list(info.architecture.input_names)
    batches = parity_batches(parity_texts(info), max_length)
    encoder = TextEncoder(repository_tokenizer, names, ladder)
    together = encoder.encode_requests(batches)
    pad_values = {
        "input_ids": hf.pad_token_id or 0,
        "attention_mask": 0,
        "token_type_ids": hf.pad_token_type_id,
    }
    mismatches = []
    for index, texts in enumerate(batches):
        expected = tokenize(hf, texts, info, max_length)
        width = rung(ladder, expected["input_ids"].shape[1])
        alone = encoder.encode(texts)
        for name in names:
            extra = width - expected[name].shape[1]
            side = (extra, 0) if hf.padding_side == "left" else (0, extra)
            wanted = np.pad(expected[name], ((0, 0), side), constant_values=pad_values[name])
            for how, actual in (("alone", alone), ("batched", together[index])):
                got = actual[name]
                if got.shape != wanted.shape or (got != wanted).any():
                    mismatches.append(
                        f"batch {index} ({len(texts)} texts, {how}): {name} {got.shape} differs "
                        f"from the pipeline's {wanted.shape}"
                    )
    return {"batches": len(batches), "mismatches": mismatches}


def _warmups(
    info: ModelInfo, lengths: Sequence[int], max_batch: int, input_names: Sequence[str]
) -> tuple[list[tc.Warmup], dict[str, bytes]]:
    """Warmup requests of real tokens at each length, batch 1 and the largest batch."""
    import numpy as np

    tokenizer = load_tokenizer(info)
    warmups, files = [], {}
    for length in lengths:
        encoded = tokenizer(
            [_WARMUP_TEXT * (1 + length // 8)],
            truncation=True,
            max_length=length,
            padding="max_length",
            return_tensors="np",
        )
        names = {}
        for name in input_names:
            values = encoded.get(name)
            if values is None:
                values = np.zeros_like(encoded["input_ids"])
            names[name] = f"{name}_s{length}"
            files[f"{tc.WARMUP_FOLDER}/{names[name]}"] = np.asarray(
                values[0], dtype="<i8"
            ).tobytes()
        for batch in sorted({1, max_batch}):
            warmups.append(tc.Warmup(f"batch{batch}_seq{length}", batch, length, names))
    return warmups, files


def plan_repository(
    *, info: ModelInfo, engines: list[VerifiedEngine], spec: PackageSpec
) -> list[_ModelPlan]:
    """Every model of the repository: configs (protobuf messages) and the files each holds.

    Raises:
        InputError: names unsafe for Triton, engines that cannot share a model, profiles that
            do not cover what the tokenizer sends.
    """
    slug = tc.check_name(model_slug(info.name), "model name")
    spec = spec.with_ladder(info, engines[0].max_length)
    groups: dict[str, list[VerifiedEngine]] = {}
    for engine in engines:
        groups.setdefault(engine_kind(engine.spec), []).append(engine)
    served: list[_ModelPlan] = []
    python_text: list[tuple[_ModelPlan, VerifiedEngine]] = []
    # Engines no Triton backend runs (the torch backend's): a text model whose model.py does.
    engine_texts: list[tuple[str, list[VerifiedEngine]]] = []
    for kind, members in sorted(groups.items()):
        if get_backend(members[0].spec["backend"]).serves_as_python_text:
            engine_texts.append((kind, members))
            continue
        engine_plan = _plan_engine(f"{slug}-{kind}", kind, members, info=info, spec=spec)
        served.append(engine_plan)
        if spec.python_cpu_engine and engine_plan.record["device"] == "cpu":
            if spec.python_text == "ensemble":
                served.append(_plan_python_engine(engine_plan, members[0], spec))
            else:
                python_text.append((engine_plan, members[0]))
        if spec.python_gpu_engine and engine_plan.record["device"] == "cuda":
            backend = get_backend(members[0].spec["backend"])
            problems = {m.name: backend.python_session_problem(m.spec) for m in members}
            if any(problems.values()):
                name, problem = next((n, p) for n, p in problems.items() if p)
                log.warning("[package] %s: no Python text model: %s", name, problem)
            else:
                python_text.append((engine_plan, members[0]))
    tokenizer = _plan_tokenizer(
        f"{slug}-tokenizer",
        info,
        engines[0].max_length,
        max_batch=max((p.config.max_batch_size for p in served), default=spec.max_batch_size),
        spec=spec,
    )
    ensembles = [_plan_ensemble(p, tokenizer) for p in served]
    text_models = [_plan_python_text(p, e, tokenizer, spec) for p, e in python_text]
    text_models += [
        _plan_torch_text(f"{slug}-{kind}-text", kind, members, tokenizer, spec)
        for kind, members in engine_texts
    ]
    return [tokenizer, *served, *ensembles, *text_models]


def _plan_engine(
    name: str, kind: str, members: list[VerifiedEngine], *, info: ModelInfo, spec: PackageSpec
) -> _ModelPlan:
    """The Triton model serving every engine of one kind (one file per compute capability)."""
    name = tc.check_name(name, "model name")
    first = members[0]
    max_length = first.max_length
    input_names = list(info.architecture.input_names)
    backend = get_backend(first.spec["backend"])
    files, default_file = _engine_files(kind, members)
    version = _check_one_version(kind, members)
    inputs, outputs = _engine_io(first)
    for member in members[1:]:
        if _engine_io(member) != (inputs, outputs):
            raise InputError(f"{kind}: {member.name} has other tensors than {first.name}")
        if backend.shared_settings(member.spec) != backend.shared_settings(first.spec):
            # One config serves every GPU's engine: batch limits come from one set of profiles.
            raise InputError(
                f"{kind}: {member.name} was built with other TensorRT options than "
                f"{first.name}; build every GPU's plan with the same profiles"
            )
    for tensor in (*inputs, *outputs):
        tc.check_name(tensor.name, f"{first.engine_file}: tensor name")
    if [t.name for t in inputs] != input_names or any(t.data_type != "TYPE_INT64" for t in inputs):
        raise InputError(
            f"{first.engine_file}: inputs {[str(t) for t in inputs]}; the tokenizer model sends "
            f"int64 {input_names}"
        )
    max_batch, preferred, profiles, lengths = _batching(kind, first, spec, max_length)
    warmups, warmup_files = (
        _warmups(info, lengths, max_batch, input_names) if spec.warmup else ([], {})
    )
    gpu = first.spec["device"] == "cuda"
    model = tc.EngineModel(
        name=name,
        platform=backend.triton_platform,
        kind="KIND_GPU" if gpu else "KIND_CPU",
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch,
        preferred_batch_sizes=preferred,
        max_queue_delay_us=spec.max_queue_delay_us,
        instance_count=spec.instances,
        default_model_filename=default_file,
        cc_model_filenames={}
        if default_file or not gpu
        else {e.results["compute_capability"]: f for f, e in files.items()},
        profiles=profiles,
        warmups=warmups,
        **backend.triton_parameters(first.spec),
    )
    record = _engine_record(kind, backend.name, version, files, members, max_length)
    if backend.opaque:
        # An engine file that cannot be opened without its backend (a TensorRT plan): keep the
        # tensors of the graph it was built from, so the config can be checked anywhere.
        record["io"] = {
            "inputs": [asdict(t) for t in inputs],
            "outputs": [asdict(t) for t in outputs],
        }
    files_out: dict[str, Path | str | bytes] = {
        **{f"{VERSION}/{f}": e.engine_file for f, e in files.items()},
        **warmup_files,
    }
    return _ModelPlan(name, "engine", tc.engine_config(model), files_out, record)


def _plan_python_engine(
    engine_plan: _ModelPlan, engine: VerifiedEngine, spec: PackageSpec
) -> _ModelPlan:
    """The same CPU engine served by Triton's Python backend (onnxruntime inside model.py)."""
    name = tc.check_name(f"{engine_plan.name}-python", "model name")
    inputs, outputs = tc.tensor_specs(engine_plan.config)
    batching = engine_plan.config.dynamic_batching
    config = tc.python_config(
        name=name,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=engine_plan.config.max_batch_size,
        instance_count=spec.python_instances,
        parameters=session_parameters(engine.spec.get("session", {}), python=True),
        preferred_batch_sizes=list(batching.preferred_batch_size),
        max_queue_delay_us=batching.max_queue_delay_microseconds,
        # This backend hands model.py each request's tensors as they are, and model.py runs
        # the requests of each padded length as one batch: requests of different rungs may
        # share an execute call (the onnxruntime and tensorrt backends would need a graph
        # taking 1-D concatenated tokens for that).
        ragged=spec.padding == "ladder",
    )
    files = {
        f"{VERSION}/model.py": TEMPLATES["python-engine"],
        **{k: v for k, v in engine_plan.files.items() if k.startswith(f"{VERSION}/")},
    }
    return _ModelPlan(
        name, "python-engine", config, files, {**engine_plan.record, "role": "python-engine"}
    )


def _plan_python_text(
    engine_plan: _ModelPlan, engine: VerifiedEngine, tokenizer: _ModelPlan, spec: PackageSpec
) -> _ModelPlan:
    """Text -> the same engine's outputs in one Python-backend model (text_engine_model.py,
    importing the tokenizer and engine models' files, copied beside it): on CPU instances for a
    CPU engine; on GPU instances, each opening its GPU's engine file on the CUDA provider with
    the recorded options, for a CUDA engine."""
    name = tc.check_name(f"{engine_plan.name}-python-text", "model name")
    _inputs, outputs = tc.tensor_specs(engine_plan.config)
    texts, _tokens = tc.tensor_specs(tokenizer.config)
    gpu = engine.spec["device"] == "cuda"
    device: dict[str, str] = {}
    if gpu:
        cuda = json.dumps(recorded_cuda_options(engine.spec), sort_keys=True)
        device = {DEVICE_PARAMETER: "cuda", CUDA_OPTIONS_PARAMETER: cuda}
    config = tc.python_config(
        name=name,
        inputs=texts,
        outputs=tc.text_outputs(outputs),
        max_batch_size=engine_plan.config.max_batch_size,
        instance_count=spec.gpu_text_instances if gpu else spec.python_instances,
        parameters={
            **session_parameters(engine.spec.get("session", {}), python=True),
            RUN_COST_PARAMETER: str(spec.text_run_cost),
            **device,
        },
        max_queue_delay_us=spec.max_queue_delay_us,
        gpu=gpu,
    )
    tokenizer_file = f"{VERSION}/{TOKENIZER_FILE}"
    files = {
        f"{VERSION}/model.py": TEMPLATES["python-text"],
        f"{VERSION}/{TEMPLATES['tokenizer'].name}": TEMPLATES["tokenizer"],
        f"{VERSION}/{TEMPLATES['token-rows'].name}": TEMPLATES["token-rows"],
        f"{VERSION}/{TEMPLATES['python-engine'].name}": TEMPLATES["python-engine"],
        tokenizer_file: tokenizer.files[tokenizer_file],
        **{k: v for k, v in engine_plan.files.items() if k.startswith(f"{VERSION}/")},
    }
    record = {
        **engine_plan.record,
        "role": "python-text",
        "text_inputs": [t.name for t in texts],
        "tokenizer": tokenizer.name,
    }
    return _ModelPlan(name, "python-text", config, files, record)


def _plan_torch_text(
    name: str,
    kind: str,
    members: list[VerifiedEngine],
    tokenizer: _ModelPlan,
    spec: PackageSpec,
) -> _ModelPlan:
    """Text -> a torch engine's outputs in one Python-backend model (torch_text_model.py, with
    token_rows.py, torch_module.py and tokenizer_model.py copied beside it), on GPU instances
    for a cuda engine: every text of an execute call tokenized at once and run packed, in the
    runtime's packed batches. Its dynamic batcher joins up to the runtime's rows per batch.

    Raises:
        InputError: several engines of one kind (one file serves every GPU).
    """
    name = tc.check_name(name, "model name")
    if len(members) > 1:
        raise InputError(
            f"{kind}: {len(members)} engines ({', '.join(e.name for e in members)}) would share "
            "one Triton model; package one of them with --engine"
        )
    engine = members[0]
    backend = get_backend(engine.spec["backend"])
    version = _check_one_version(kind, members)
    inputs, outputs = _torch_engine_io(engine)
    texts, _tokens = tc.tensor_specs(tokenizer.config)
    gpu = engine.spec["device"] == "cuda"
    batching = PACKED_GPU_BATCHING if gpu else CPU_BATCHING
    config = tc.python_config(
        name=name,
        inputs=texts,
        outputs=tc.text_outputs(outputs),
        max_batch_size=min(batching.max_batch, PACKAGE_LIMITS["max_batch_size"][1]),
        instance_count=spec.gpu_text_instances if gpu else spec.python_instances,
        parameters={
            PRECISION_PARAMETER: str(engine.spec["precision"]),
            MAX_LENGTH_PARAMETER: str(engine.max_length),
            MAX_ROWS_PARAMETER: str(batching.max_batch),
            TOKEN_BUDGET_PARAMETER: str(batching.token_budget),
        },
        max_queue_delay_us=spec.max_queue_delay_us,
        gpu=gpu,
    )
    tokenizer_file = f"{VERSION}/{TOKENIZER_FILE}"
    files: dict[str, Path | str | bytes] = {
        f"{VERSION}/model.py": TEMPLATES["torch-text"],
        **{
            f"{VERSION}/{TEMPLATES[role].name}": TEMPLATES[role]
            for role in ("token-rows", "torch-module", "tokenizer")
        },
        tokenizer_file: tokenizer.files[tokenizer_file],
        f"{VERSION}/{torch_module.ENGINE_FILE}": engine.engine_file,
    }
    record = {
        **_engine_record(
            kind,
            backend.name,
            version,
            {torch_module.ENGINE_FILE: engine},
            members,
            engine.max_length,
        ),
        "role": "torch-text",
        "text_inputs": [t.name for t in texts],
        "tokenizer": tokenizer.name,
        # The engine file is read only by torch: its tensors as Triton sees them, kept here.
        "io": {"inputs": [asdict(t) for t in inputs], "outputs": [asdict(t) for t in outputs]},
    }
    return _ModelPlan(name, "torch-text", config, files, record)


def _torch_engine_io(engine: VerifiedEngine) -> tuple[list[tc.TensorSpec], list[tc.TensorSpec]]:
    """A torch engine's token inputs and its output as an ONNX engine of the model has them:
    pooled [width] (the hidden size, or a classifier's labels) or token-level [-1, hidden]."""
    if engine.io is not None:
        return engine.io
    from safetensors import safe_open

    try:
        layout = torch_module.read_layout(engine.engine_file)
    except torch_module.LayoutError as err:
        raise ArtifactError(str(err)) from None
    width = layout.hidden
    if layout.head:
        with safe_open(str(engine.engine_file), framework="pt") as opened:
            width = opened.get_slice(f"head.{len(layout.head) - 1}.weight").get_shape()[0]
    dims = (-1, layout.hidden) if layout.pooling == "none" else (width,)
    inputs = [tc.TensorSpec(name, "TYPE_INT64", (-1,)) for name in layout.input_names]
    return inputs, [tc.TensorSpec(layout.output, "TYPE_FP32", dims)]


def _plan_tokenizer(
    name: str, info: ModelInfo, max_length: int, *, max_batch: int, spec: PackageSpec
) -> _ModelPlan:
    """TEXT (and a cross-encoder's TEXT_PAIR) -> the engines' int64 token inputs, truncated as
    verify did, padded to the rungs."""
    input_names = list(info.architecture.input_names)
    texts = text_inputs(info)
    # The ladder reaches max_length (PackageSpec.with_ladder): every truncated text fits.
    ladder = spec.length_ladder
    config = tc.python_config(
        name=tc.check_name(name, "model name"),
        inputs=texts,
        outputs=[tc.TensorSpec(n, "TYPE_INT64", (-1,)) for n in input_names],
        max_batch_size=max_batch,
        instance_count=spec.python_instances,
        parameters={"max_length": str(max_length), LADDER_PARAMETER: format_ladder(ladder)},
    )
    files: dict[str, Path | str | bytes] = {
        f"{VERSION}/model.py": TEMPLATES["tokenizer"],
        f"{VERSION}/{TEMPLATES['token-rows'].name}": TEMPLATES["token-rows"],
        f"{VERSION}/tokenizer.json": tokenizer_json(info, max_length),
    }
    record = {
        "role": "tokenizer",
        "max_length": max_length,
        "text_inputs": [t.name for t in texts],
        "inputs": input_names,
        "length_ladder": list(ladder),
    }
    return _ModelPlan(name, "tokenizer", config, files, record)


def text_inputs(info: ModelInfo) -> list[tc.TensorSpec]:
    """The string inputs of the tokenizer model and the ensembles: TEXT, and TEXT_PAIR for a
    cross-encoder (one pair a row)."""
    return [TEXT, TEXT_PAIR] if info.pairs else [TEXT]


def _plan_ensemble(engine_plan: _ModelPlan, tokenizer: _ModelPlan) -> _ModelPlan:
    """TEXT (and TEXT_PAIR) -> tokenizer -> engine -> the engine's outputs."""
    name = tc.check_name(f"{engine_plan.name}-text", "model name")
    inputs, outputs = tc.tensor_specs(engine_plan.config)
    texts, tokens = tc.tensor_specs(tokenizer.config)
    names = [t.name for t in inputs]
    config = tc.ensemble_config(
        name=name,
        inputs=texts,
        outputs=tc.text_outputs(outputs),
        max_batch_size=engine_plan.config.max_batch_size,
        steps=[
            (tokenizer.name, {t.name: t.name for t in texts}, {t.name: t.name for t in tokens}),
            (engine_plan.name, {n: n for n in names}, {t.name: t.name for t in outputs}),
        ],
    )
    return _ModelPlan(
        name, "ensemble", config, {}, {"role": "ensemble", "engine": engine_plan.name}
    )


def _recorded_results(results: Mapping[str, Any]) -> dict[str, Any]:
    """The build results a repository keeps of an engine: what loads and names it."""
    keep = ("tensorrt", "compute_capability", "gpu", "onnxruntime", "torch", "profiles")
    return {k: v for k, v in results.items() if k in keep}


def _engine_record(kind, backend, version, files, members, max_length) -> dict[str, Any]:
    """What the repository manifest says of an engine model: where each file came from, how it
    was built and loaded, and its verification."""
    return {
        "role": "engine",
        "kind": kind,
        "backend": backend,
        "backend_version": version,
        "device": members[0].spec["device"],
        "precision": members[0].spec["precision"],
        "max_length": max_length,
        "files": {
            f"{VERSION}/{filename}": {
                "engine": engine.name,
                "sha256": engine.engine_sha256,
                "compute_capability": engine.results.get("compute_capability") or None,
                "spec": dict(engine.spec),
                "results": _recorded_results(engine.results),
                "verification": {
                    "passed": engine.report["passed"],
                    "summary": engine.report.get("summary"),
                    "metric": engine.report.get("metric"),
                    "pytorch_metric": engine.report.get("pytorch_metric"),
                },
            }
            for filename, engine in files.items()
        },
    }


def _write(plans: list[_ModelPlan], folder: Path) -> list[str]:
    """Write every planned model into ``folder``; return the written files (relative)."""
    written = []
    for plan in plans:
        model_dir = folder / plan.name
        (model_dir / VERSION).mkdir(parents=True)
        (model_dir / tc.CONFIG_FILE).write_text(tc.render(plan.config), encoding="utf-8")
        written.append(f"{plan.name}/{tc.CONFIG_FILE}")
        for relative, source in sorted(plan.files.items()):
            target = model_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, Path):
                shutil.copyfile(source, target)
            elif isinstance(source, bytes):
                target.write_bytes(source)
            else:
                target.write_text(source, encoding="utf-8")
            written.append(f"{plan.name}/{relative}")
    return written


def package(
    *,
    info: ModelInfo,
    out: Path,
    repository: Path,
    spec: PackageSpec,
    force: bool = False,
    wait_lock: float = 0.0,
) -> StageResult:
    """Add (or replace) the Triton models of the verified engines of ``info`` under ``out`` in
    ``repository``, touching nothing else in it: other models' folders (bert-compile's or a
    user's) and other files stay as they are, and the repository manifest keeps describing every
    package in it. Two packagers of one repository take turns (a lock in it).

    Raises:
        InputError: nothing verified to package, unsafe names, engines that cannot share a model,
            a model folder of the same name that is not this model's, or ``repository`` is a
            non-empty folder this tool did not write.
        ParityError: an engine failed verification.
        ArtifactError: an engine, report or another package's file does not match its manifest.
        BusyError: another packager holds the repository for longer than ``wait_lock`` seconds.
    """
    spec.validate()
    repository = Path(repository)
    engines = verified_engines(info=info, out=out, names=spec.engines)
    # Sealed as the engines selected, not as asked for: `run` names its engines and a later
    # `package` of the same engines names none, and the two must agree on being up to date.
    spec = replace(spec, engines=tuple(sorted(e.name for e in engines)))
    # The ladder goes into the sealed settings: the gate plans again from exactly this one.
    spec = spec.with_ladder(info, engines[0].max_length)
    slug = tc.check_name(model_slug(info.name), "model name")
    inputs = {
        "model": info.fingerprint(),
        # Each engine's build spec and results too: sealed with the manifest, so the gate can
        # tell an edited model record from the one package wrote.
        "engines": {
            e.name: {
                "sha256": e.engine_sha256,
                "report": e.report.get("summary"),
                "spec": dict(e.spec),
                "results": _recorded_results(e.results),
            }
            for e in engines
        },
        "templates": {role: sha256_file(path) for role, path in TEMPLATES.items()},
        # This package's own tool versions: another package written later by another version
        # of the tool must not make this one look up to date.
        "versions": tool_versions(),
    }
    settings = asdict(spec)
    check_repository_target(repository)
    with output_lock(repository, wait_s=wait_lock):
        # Again under the lock: another packager may have written it meanwhile.
        check_repository_target(repository)
        folder = ArtifactDir(repository)
        clear_leftovers(repository)
        # Model folders an interrupted package of this model swapped in before it could record
        # them: its own. An interrupted package of another model must be finished first.
        pending = _pending_models(repository, slug)
        existing = folder.read_manifest()
        if existing is not None:
            existing = checked_manifest(folder, existing)
            # No link or stray entry inside the packages' folders; a user's own entries beside
            # them, and the pending folders, are left alone.
            check_entries(
                repository, existing, foreign=foreign_entries(repository, existing) | pending
            )
        own = (package_models(existing, slug) if existing else set()) | pending
        section = (existing or {}).get("inputs", {}).get("packages", {}).get(slug)
        if section and section["model"]["sha256"] != inputs["model"]["sha256"] and not force:
            raise InputError(
                f"{repository}: its package {slug!r} is of another model (a folder of the same "
                f"name than {info.path}); rename this model's folder, or pass --force to replace "
                "that package"
            )
        if not force and existing and _up_to_date(folder, existing, slug, inputs, settings):
            log.info("[package] up to date: %s (%s)", repository, slug)
            return StageResult("package", repository, existing, skipped=True)
        log.info("[package] writing %s into the Triton repository %s", slug, repository)
        started = time.perf_counter()
        plans = plan_repository(info=info, engines=engines, spec=spec)
        names = {p.name for p in plans}
        taken = sorted(n for n in names if os.path.lexists(repository / n) and n not in own)
        if taken:
            raise InputError(
                f"{repository}: model folders {taken} exist and are not {info.name}'s (another "
                "model's, or your own); rename the model or package into another --repository"
            )
        others = (
            package_outputs(existing, set(existing["results"]["models"]) - own) if existing else {}
        )
        for name, entry in others.items():
            folder.check_output(name, entry)
        # The new model folders are complete beside the old ones before they swap: room for both.
        check_free_space(
            repository,
            sum(
                Path(f).stat().st_size
                for p in plans
                for f in p.files.values()
                if isinstance(f, Path)
            ),
        )
        tokenizer = next(p for p in plans if p.role == "tokenizer")
        staging = staging_tree(repository / slug)
        try:
            outputs = _write(plans, staging)
            check = tokenizer_mismatches(
                info,
                staging / tokenizer.name / VERSION / "tokenizer.json",
                engines[0].max_length,
                spec.length_ladder,
            )
            if check["mismatches"]:
                raise InputError(
                    f"{info.path}: the tokenizer model would not tokenize as verify did: "
                    + "; ".join(check["mismatches"][:3])
                )
            records = {p.name: {**p.record, "package": slug} for p in plans}
            problems = repository_problems(staging, records)
            if problems:
                raise InputError("generated repository fails its checks: " + "; ".join(problems))
            checkpoint()
            journal = {"package": slug, "models": sorted(names | own)}
            atomic_write_text(repository / JOURNAL_FILE, json.dumps(journal) + "\n")
            for plan in plans:
                replace_tree(staging / plan.name, repository / plan.name)
            for stale in sorted(own - names):
                shutil.rmtree(repository / stale, ignore_errors=True)
        finally:
            clear_staging(repository / slug)
        previous = existing or {"inputs": {}, "spec": {}, "results": {}}
        packages = dict(previous["results"].get("packages", {}))
        packages[slug] = {
            "model": {"name": info.name, "task": info.task},
            "tokenizer_check": {"batches": check["batches"], "identical": True},
            "length_ladder": list(spec.length_ladder),
        }
        other_records = {
            n: r for n, r in previous["results"].get("models", {}).items() if n not in own
        }
        record = StageRecord(
            stage="package",
            inputs={
                "packages": {
                    **previous["inputs"].get("packages", {}),
                    # The package's model records, sealed: an edited record is refused.
                    slug: {**inputs, "records": sha256_json(records)},
                }
            },
            spec={"packages": {**previous["spec"].get("packages", {}), slug: settings}},
        )
        manifest = folder.commit(
            record,
            [*sorted(others), *outputs],
            {
                "models": {**other_records, **records},
                "packages": packages,
                "seconds": round(time.perf_counter() - started, 3),
            },
        )
        # The manifest now describes every folder the journal named.
        (repository / JOURNAL_FILE).unlink(missing_ok=True)
    log.info("[package] %d models: %s", len(plans), ", ".join(p.name for p in plans))
    return StageResult("package", repository, manifest, skipped=False)


def _pending_models(repository: Path, slug: str) -> set[str]:
    """The model folders an interrupted package of ``slug`` was swapping in (its journal).

    Raises:
        ArtifactError: the journal is unreadable, or names another model's interrupted package.
    """
    path = repository / JOURNAL_FILE
    if not path.is_file():
        return set()
    try:
        journal = json.loads(path.read_bytes().decode("utf-8"))
        package, models = journal["package"], set(journal["models"])
        if not isinstance(package, str) or not all(isinstance(m, str) for m in models):
            raise TypeError("wrong types")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"{path}: unreadable ({err}); remove it and package again") from err
    if package != slug:
        raise ArtifactError(
            f"{repository}: the package of {package!r} into it was interrupted; package that "
            "model again first"
        )
    return models


def _up_to_date(
    folder: ArtifactDir,
    manifest: Mapping[str, Any],
    slug: str,
    inputs: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> bool:
    """True when the repository already holds exactly this package, made by these tool versions,
    with every one of its files unchanged."""
    if not manifest.get("complete"):
        return False
    # The package's own inputs hold the tool versions it was written with.
    recorded = {
        k: v for k, v in manifest["inputs"]["packages"].get(slug, {}).items() if k != "records"
    }
    recorded_spec = manifest["spec"]["packages"].get(slug)
    if sha256_json(recorded) != sha256_json(inputs) or sha256_json(recorded_spec) != sha256_json(
        settings
    ):
        return False
    try:
        for name, entry in package_outputs(manifest, package_models(manifest, slug)).items():
            folder.check_output(name, entry)
    except ArtifactError:
        return False
    return True


def check_repository_target(repository: Path) -> None:
    """Write only where the repository can be written, and only into an empty folder or a
    repository this tool wrote (never a user's folder). A folder holding nothing but a
    packager's lock is empty: another packager is making it.

    Raises:
        InputError: a read-only place, a file, or a user's non-empty folder.
    """
    repository = Path(repository)
    require_writable(repository.parent, "--repository")
    if not repository.exists():
        return
    if not repository.is_dir():
        raise InputError(f"{repository}: exists and is not a folder; choose another --repository")
    try:
        manifest = ArtifactDir(repository).read_manifest()
    except ArtifactError:
        manifest = None
    # A packager's lock, its journal and its staging leftovers are this tool's: a folder holding
    # nothing else is empty (a first package was interrupted, or another one is making it).
    bookkeeping = {LOCK_FILE, HOLDER_FILE, JOURNAL_FILE}
    contents = [
        e for e in repository.iterdir() if e.name not in bookkeeping and not is_leftover(e.name)
    ]
    journal = (repository / JOURNAL_FILE).is_file()
    if contents and (manifest or {}).get("stage") != "package" and not journal:
        raise InputError(
            f"{repository}: not empty and not a repository bert-compile wrote; choose another "
            "--repository or remove it"
        )


def repository_summary(result: StageResult) -> dict[str, Any]:
    """The part of ``run --json`` / ``package --json`` that describes a repository."""
    models = result.results.get("models", {})
    return {
        "path": str(result.path),
        "skipped": result.skipped,
        "models": {name: record["role"] for name, record in models.items()},
    }
