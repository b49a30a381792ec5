"""Triton model configurations, made through Triton's own ModelConfig protobuf.

Never by string pasting: every config.pbtxt is a ``ModelConfig`` message (from tritonclient's
``model_config_pb2``) rendered with protobuf's text format, parsed back with the same schema and
cross-checked against the tensors of the engine it serves. Names that reach a config or a path
are checked against one strict pattern first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bert_compiler.core.errors import EnvironmentProblem, InputError

CONFIG_FILE = "config.pbtxt"
WARMUP_FOLDER = "warmup"
# Model and tensor names become folder names, URL path parts and config strings: letters, digits,
# '_', '-', '.', never a leading dot or dash, nothing that quotes, nests or climbs out of a folder.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_ONNX_TO_TRITON = {
    1: "TYPE_FP32",
    10: "TYPE_FP16",
    16: "TYPE_BF16",
    7: "TYPE_INT64",
    6: "TYPE_INT32",
}


def check_name(name: str, what: str) -> str:
    """Return ``name`` if it is safe as a Triton model or tensor name.

    Raises:
        InputError: quotes, spaces, slashes, braces, newlines, ``..`` or a leading dot.
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InputError(
            f"{what} {name!r} is not a safe Triton name: use letters, digits, '_', '-' and '.' "
            "(no leading '.' or '-', no '..', at most 128 characters)"
        )
    return name


def model_config_pb2():
    """tritonclient's ModelConfig protobuf module (imported only when a config is made or read).

    Raises:
        EnvironmentProblem: tritonclient[grpc] is not installed.
    """
    try:
        from tritonclient.grpc import model_config_pb2 as pb2
    except ImportError as err:
        raise EnvironmentProblem(
            f"Triton configs need tritonclient[grpc] ({err}); run scripts/setup.sh"
        ) from err
    return pb2


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a Triton model: name, Triton data type and dims without the batch axis."""

    name: str
    data_type: str
    dims: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.name} {self.data_type} {list(self.dims)}"


def onnx_tensor_specs(model) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX graph as Triton sees them (first axis = batch).

    Raises:
        InputError: a tensor type Triton cannot carry, or a tensor without a batch axis.
    """

    def spec(value) -> TensorSpec:
        tensor = value.type.tensor_type
        data_type = _ONNX_TO_TRITON.get(tensor.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        if data_type is None or not dims:
            raise InputError(
                f"ONNX tensor {value.name!r} (type {tensor.elem_type}, {len(dims)} axes) cannot "
                "be served with a batch axis"
            )
        return TensorSpec(value.name, data_type, tuple(dims[1:]))

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


@dataclass(frozen=True)
class Warmup:
    """One warmup request Triton runs at load: real tokens read from files in ``warmup/``."""

    name: str
    batch_size: int
    sequence: int
    files: Mapping[str, str]


@dataclass(frozen=True)
class EngineModel:
    """What an engine model's config says: backend, placement, batching, files, tensors."""

    name: str
    platform: str
    kind: str
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]
    max_batch_size: int
    preferred_batch_sizes: Sequence[int] = ()
    max_queue_delay_us: int = 0
    instance_count: int = 1
    default_model_filename: str = ""
    cc_model_filenames: Mapping[str, str] = field(default_factory=dict)
    profiles: Sequence[str] = ()
    graph_level: int = 0
    parameters: Mapping[str, str] = field(default_factory=dict)
    gpu_accelerator: Mapping[str, str] | None = None
    warmups: Sequence[Warmup] = ()


# What a text-in model (an ensemble, the one-model Python text engine) adds beside token-level
# outputs, which come back padded: the mask a client needs to tell which positions are real.
MASK = TensorSpec("attention_mask", "TYPE_INT64", (-1,))


def text_outputs(engine_outputs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """A text-in model's outputs: the engine's, and with a token-level one (a -1 dim) the
    attention mask."""
    padded = any(-1 in t.dims for t in engine_outputs)
    return [*engine_outputs, *([MASK] if padded else [])]


def _tensor(message, spec: TensorSpec, pb2) -> None:
    message.name = spec.name
    message.data_type = pb2.DataType.Value(spec.data_type)
    message.dims.extend(spec.dims)


def _new_config(name: str, max_batch_size: int, inputs, outputs):
    pb2 = model_config_pb2()
    config = pb2.ModelConfig(name=check_name(name, "model name"), max_batch_size=max_batch_size)
    for spec in inputs:
        _tensor(config.input.add(), spec, pb2)
    for spec in outputs:
        _tensor(config.output.add(), spec, pb2)
    return config, pb2


def engine_config(model: EngineModel):
    """The ModelConfig of an ONNX Runtime or TensorRT engine model."""
    config, pb2 = _new_config(model.name, model.max_batch_size, model.inputs, model.outputs)
    config.platform = model.platform
    if model.default_model_filename:
        config.default_model_filename = model.default_model_filename
    for capability, filename in sorted(model.cc_model_filenames.items()):
        config.cc_model_filenames[capability] = filename
    group = config.instance_group.add(count=model.instance_count)
    group.kind = pb2.ModelInstanceGroup.Kind.Value(model.kind)
    # TensorRT instances use only profile 0 unless the group lists the others.
    group.profile.extend(model.profiles)
    batching = config.dynamic_batching
    batching.preferred_batch_size.extend(model.preferred_batch_sizes)
    batching.max_queue_delay_microseconds = model.max_queue_delay_us
    if model.graph_level:
        config.optimization.graph.level = model.graph_level
    if model.gpu_accelerator is not None:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name="cuda"
        )
        accelerator.parameters.update(model.gpu_accelerator)
    for key, value in sorted(model.parameters.items()):
        config.parameters[key].string_value = value
    for warmup in model.warmups:
        entry = config.model_warmup.add(name=warmup.name, batch_size=warmup.batch_size)
        for spec in model.inputs:
            data = entry.inputs[spec.name]
            data.data_type = pb2.DataType.Value(spec.data_type)
            data.dims.append(warmup.sequence)
            data.input_data_file = warmup.files[spec.name]
    return config


def python_config(
    *,
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int,
    parameters: Mapping[str, str],
    instance_count: int = 1,
    preferred_batch_sizes: Sequence[int] = (),
    max_queue_delay_us: int = 0,
    ragged: bool = False,
    gpu: bool = False,
):
    """The ModelConfig of a Python-backend model on CPU instances (``gpu``: on GPU instances,
    ``instance_count`` per GPU, model.py told its GPU).

    Args:
        ragged: let the dynamic batcher join requests whose inputs differ in shape
            (``allow_ragged_batch`` on every input): for a model.py that handles each request's
            tensors itself.
    """
    config, pb2 = _new_config(name, max_batch_size, inputs, outputs)
    config.backend = "python"
    group = config.instance_group.add(count=instance_count)
    group.kind = pb2.ModelInstanceGroup.Kind.Value("KIND_GPU" if gpu else "KIND_CPU")
    config.dynamic_batching.SetInParent()
    config.dynamic_batching.preferred_batch_size.extend(preferred_batch_sizes)
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    for tensor in config.input:
        tensor.allow_ragged_batch = ragged
    for key, value in sorted(parameters.items()):
        config.parameters[key].string_value = value
    return config


def ensemble_config(
    *,
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int,
    steps: Iterable[tuple[str, Mapping[str, str], Mapping[str, str]]],
):
    """The ModelConfig of an ensemble; each step is (model, input_map, output_map), the maps
    going from the step model's tensor names to the ensemble's."""
    config, _ = _new_config(name, max_batch_size, inputs, outputs)
    config.platform = "ensemble"
    for model_name, input_map, output_map in steps:
        step = config.ensemble_scheduling.step.add(
            model_name=check_name(model_name, "ensemble step model"), model_version=-1
        )
        step.input_map.update(input_map)
        step.output_map.update(output_map)
    return config


def render(config) -> str:
    """config.pbtxt text of a ModelConfig."""
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse(text: str, where: Path):
    """Parse config.pbtxt text with Triton's schema.

    Raises:
        InputError: the text is not a valid ModelConfig.
    """
    from google.protobuf import text_format

    pb2 = model_config_pb2()
    try:
        return text_format.Parse(text, pb2.ModelConfig())
    except text_format.ParseError as err:
        raise InputError(f"{where}: not a valid Triton ModelConfig ({err})") from err


def tensor_specs(config) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A parsed config's inputs and outputs."""
    pb2 = model_config_pb2()

    def spec(message) -> TensorSpec:
        return TensorSpec(message.name, pb2.DataType.Name(message.data_type), tuple(message.dims))

    return [spec(m) for m in config.input], [spec(m) for m in config.output]


def io_problems(
    config, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], where: str
) -> list[str]:
    """How a config's tensors differ from the engine's (names, data types, dims); empty if not."""
    problems = []
    declared_inputs, declared_outputs = tensor_specs(config)
    for role, declared, actual in (
        ("input", declared_inputs, inputs),
        ("output", declared_outputs, outputs),
    ):
        declared_by_name = {t.name: t for t in declared}
        actual_by_name = {t.name: t for t in actual}
        if set(declared_by_name) != set(actual_by_name):
            problems.append(
                f"{where}: config {role}s {sorted(declared_by_name)} but the engine has "
                f"{sorted(actual_by_name)}"
            )
            continue
        for name, tensor in actual_by_name.items():
            if declared_by_name[name] != tensor:
                problems.append(
                    f"{where}: config {role} {declared_by_name[name]} but the engine has {tensor}"
                )
    return problems


def ensemble_problems(config, models: Mapping[str, Any], where: str) -> list[str]:
    """Wiring errors of an ensemble: unknown step models, or maps naming tensors the step model
    or the ensemble does not have, or data types that change along the way.

    Args:
        models: every model of the repository by name, as parsed ModelConfigs.
    """
    problems = []
    available = {t.name: t for t in tensor_specs(config)[0]}
    for index, step in enumerate(config.ensemble_scheduling.step):
        step_config = models.get(step.model_name)
        if step_config is None:
            problems.append(
                f"{where}: step {index} runs {step.model_name!r}, not in the repository"
            )
            continue
        step_inputs, step_outputs = (
            {t.name: t for t in specs} for specs in tensor_specs(step_config)
        )
        for model_tensor, ensemble_tensor in step.input_map.items():
            source = available.get(ensemble_tensor)
            target = step_inputs.get(model_tensor)
            if source is None or target is None or source.data_type != target.data_type:
                problems.append(
                    f"{where}: step {index} maps {ensemble_tensor!r} ({source}) to "
                    f"{step.model_name}.{model_tensor} ({target})"
                )
        if set(step.input_map) != set(step_inputs):
            problems.append(
                f"{where}: step {index} feeds {sorted(step.input_map)} but {step.model_name} "
                f"takes {sorted(step_inputs)}"
            )
        for model_tensor, ensemble_tensor in step.output_map.items():
            if model_tensor not in step_outputs:
                problems.append(f"{where}: {step.model_name} has no output {model_tensor!r}")
                continue
            available[ensemble_tensor] = TensorSpec(
                ensemble_tensor, step_outputs[model_tensor].data_type, ()
            )
    for output in tensor_specs(config)[1]:
        produced = available.get(output.name)
        if produced is None or produced.data_type != output.data_type:
            problems.append(f"{where}: ensemble output {output} is produced as {produced}")
    return problems
