"""Planning a repository in memory: for a model's verified engines, every Triton model (the
tokenizer, the engine models, the ensembles and the Python-backend text models) with its
config.pbtxt, its files and its manifest record, before anything is written (package.py writes
the plan; the gate plans again from the manifest and compares)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bert_compiler.core.artifacts import (
    ArtifactDir,
)
from bert_compiler.core.errors import ArtifactError, InputError
from bert_compiler.core.onnx_io import load_onnx
from bert_compiler.engines import torch_layout
from bert_compiler.engines.backend import get_backend
from bert_compiler.engines.onnxruntime import recorded_cuda_options, session_parameters
from bert_compiler.models.loading import ModelInfo, load_tokenizer
from bert_compiler.runtime.encoder import (
    CPU_BATCHING,
    GPU_BATCHING,
    PACKED_GPU_BATCHING,
)
from bert_compiler.stages.layout import model_slug
from bert_compiler.triton import config as tc
from bert_compiler.triton.onnxruntime_model import CUDA_OPTIONS_PARAMETER, DEVICE_PARAMETER
from bert_compiler.triton.package_spec import (
    PACKAGE_LIMITS,
    TEMPLATES,
    TEXT,
    TEXT_PAIR,
    WARMUP_TEXT,
    PackageSpec,
    VerifiedEngine,
)
from bert_compiler.triton.repository import (
    VERSION,
)
from bert_compiler.triton.text_engine_model import RUN_COST_PARAMETER
from bert_compiler.triton.tokenizer_json import tokenizer_json
from bert_compiler.triton.tokenizer_model import (
    LADDER_PARAMETER,
    TOKENIZER_FILE,
    format_ladder,
)
from bert_compiler.triton.torch_text_model import (
    MAX_LENGTH_PARAMETER,
    MAX_ROWS_PARAMETER,
    PRECISION_PARAMETER,
    TOKEN_BUDGET_PARAMETER,
)

log = logging.getLogger("bert_compile")


def engine_kind(spec: Mapping[str, Any]) -> str:
    """The Triton model suffix of an engine: backend, device, precision, variants; never the GPU,
    so engines for several GPUs of one kind share a model (``ort-cuda-fp16``, ``trt-int8``)."""
    return get_backend(spec["backend"]).triton_kind(spec)


@dataclass
class ModelPlan:
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


def _warmups(
    info: ModelInfo, lengths: Sequence[int], max_batch: int, input_names: Sequence[str]
) -> tuple[list[tc.Warmup], dict[str, bytes]]:
    """Warmup requests of real tokens at each length, batch 1 and the largest batch."""
    import numpy as np

    tokenizer = load_tokenizer(info)
    warmups, files = [], {}
    for length in lengths:
        encoded = tokenizer(
            [WARMUP_TEXT * (1 + length // 8)],
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
) -> list[ModelPlan]:
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
    served: list[ModelPlan] = []
    python_text: list[tuple[ModelPlan, VerifiedEngine]] = []
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
) -> ModelPlan:
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
    return ModelPlan(name, "engine", tc.engine_config(model), files_out, record)


def _plan_python_engine(
    engine_plan: ModelPlan, engine: VerifiedEngine, spec: PackageSpec
) -> ModelPlan:
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
    return ModelPlan(
        name, "python-engine", config, files, {**engine_plan.record, "role": "python-engine"}
    )


def _plan_python_text(
    engine_plan: ModelPlan, engine: VerifiedEngine, tokenizer: ModelPlan, spec: PackageSpec
) -> ModelPlan:
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
    return ModelPlan(name, "python-text", config, files, record)


def _plan_torch_text(
    name: str,
    kind: str,
    members: list[VerifiedEngine],
    tokenizer: ModelPlan,
    spec: PackageSpec,
) -> ModelPlan:
    """Text -> a torch engine's outputs in one Python-backend model (torch_text_model.py, with
    token_rows.py, torch_module.py, torch_layout.py and tokenizer_model.py copied beside it), on
    GPU instances for a cuda engine: every text of an execute call tokenized at once and run
    packed, in the runtime's packed batches. Its dynamic batcher joins up to the runtime's rows
    per batch.

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
            for role in ("token-rows", "torch-module", "torch-layout", "tokenizer")
        },
        tokenizer_file: tokenizer.files[tokenizer_file],
        f"{VERSION}/{torch_layout.ENGINE_FILE}": engine.engine_file,
    }
    record = {
        **_engine_record(
            kind,
            backend.name,
            version,
            {torch_layout.ENGINE_FILE: engine},
            members,
            engine.max_length,
        ),
        "role": "torch-text",
        "text_inputs": [t.name for t in texts],
        "tokenizer": tokenizer.name,
        # The engine file is read only by torch: its tensors as Triton sees them, kept here.
        "io": {"inputs": [asdict(t) for t in inputs], "outputs": [asdict(t) for t in outputs]},
    }
    return ModelPlan(name, "torch-text", config, files, record)


def _torch_engine_io(engine: VerifiedEngine) -> tuple[list[tc.TensorSpec], list[tc.TensorSpec]]:
    """A torch engine's token inputs and its output as an ONNX engine of the model has them:
    pooled [width] (the hidden size, or a classifier's labels) or token-level [-1, hidden]."""
    if engine.io is not None:
        return engine.io
    from safetensors import safe_open

    try:
        layout = torch_layout.read_layout(engine.engine_file)
    except torch_layout.LayoutError as err:
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
) -> ModelPlan:
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
    return ModelPlan(name, "tokenizer", config, files, record)


def text_inputs(info: ModelInfo) -> list[tc.TensorSpec]:
    """The string inputs of the tokenizer model and the ensembles: TEXT, and TEXT_PAIR for a
    cross-encoder (one pair a row)."""
    return [TEXT, TEXT_PAIR] if info.pairs else [TEXT]


def _plan_ensemble(engine_plan: ModelPlan, tokenizer: ModelPlan) -> ModelPlan:
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
    return ModelPlan(name, "ensemble", config, {}, {"role": "ensemble", "engine": engine_plan.name})


def recorded_results(results: Mapping[str, Any]) -> dict[str, Any]:
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
                "results": recorded_results(engine.results),
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
