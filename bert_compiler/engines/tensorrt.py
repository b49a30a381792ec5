"""TensorRT backend: a serialized plan built from the standard-ops ONNX graph, strongly typed.

Precision comes from the graph, never from builder flags (TensorRT 11 removed the FP16/INT8 flags
and implicit calibration): the build stage hands this module an fp16 graph (engines/fp16.py) or
the explicit Q/DQ graph of the calibrate stage, and the network is created STRONGLY_TYPED so
TensorRT runs each tensor in the type the graph gives it.

fp8 (compute capability 8.9+) is the same: the float8 e4m3fn Q/DQ graph of ``calibrate --format
fp8``, its float parts (scales included) turned fp16 by engines/fp16.py, so the projections and
the FFN run as fp8 GEMMs and everything else in fp16. No FP8 or FP16 builder flag is set: NVIDIA's
explicit-quantization guide says to use Q/DQ with strong typing and that precision flags "are not
required and should not be specified" (docs.nvidia.com/deeplearning/tensorrt/latest/
inference-library/quantized-types-explicit-quantization.html); a strongly typed network takes
its types from the graph alone. Weights are stored as float8 with per-output-channel or
per-tensor fp16 scales, as TensorRT's FP8 scheme (castToFp8(clip(x / s, -448, 448))) takes them.

Everything here that needs no GPU (profiles, profile choice, compatibility checks, graph checks,
options) is plain Python and tested on CPU; ``tensorrt`` and ``torch.cuda`` are imported only by
``build_engine`` (engines/tensorrt_build.py) and ``load_plan`` (engines/tensorrt_runtime.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bert_compiler.core.artifacts import atomic_path
from bert_compiler.core.errors import InputError
from bert_compiler.core.onnx_io import load_onnx, save_onnx
from bert_compiler.core.targets import Environment, fp8_capable, fp8_refusal
from bert_compiler.engines.backend import (
    Backend,
    BuildJob,
    BuildSpec,
    TargetPlan,
    TritonBatching,
    check_float_source,
    gpu_facts,
    quantized_types,
    register,
)
from bert_compiler.engines.fp16 import convert_to_fp16
from bert_compiler.engines.tensorrt_build import build_engine
from bert_compiler.engines.tensorrt_options import Profile, TensorRTOptions, target_tag
from bert_compiler.engines.tensorrt_runtime import TensorRTEngine, import_tensorrt, load_plan

PLAN_FILE = "model.plan"
NETWORK_FILE = "network.onnx"


def prepare_network_graph(model: Any, *, precision: str, keep_float_ops: Sequence[str] = ()) -> Any:
    """The graph TensorRT parses: standard ops only, in the precision asked for.

    Raises:
        InputError: the graph holds ORT contrib ops (a fused graph), or an int8 or fp8 build got
            a graph without Q/DQ of its type, or an unknown precision.
    """
    contrib = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if contrib:
        raise InputError(
            f"the TensorRT backend takes the standard-ops graph (simplify/ or calibrate/), "
            f"not one with ONNX Runtime contrib ops ({', '.join(contrib)})"
        )
    if precision == "fp16":
        return convert_to_fp16(model, keep_float_ops=keep_float_ops)
    if precision == "int8":
        if "INT8" not in quantized_types(model):
            raise InputError("int8 TensorRT engines need the Q/DQ graph of the calibrate stage")
        return model
    if precision == "fp8":
        if "FLOAT8E4M3FN" not in quantized_types(model):
            raise InputError(
                "fp8 TensorRT engines need the float8 Q/DQ graph of `calibrate --format fp8` "
                "(OUT/calibrate-fp8)"
            )
        # The rest of the network in fp16: strongly typed, TensorRT keeps the graph's types.
        return convert_to_fp16(model, keep_float_ops=keep_float_ops)
    if precision == "fp32":
        return model
    raise InputError(f"TensorRT precision {precision!r}: expected fp32, fp16, int8 or fp8")


class TensorRTBackend(Backend):
    """TensorRT plans, strongly typed, from the standard-ops graph (fp32, fp16) or the calibrated
    Q/DQ graph (int8; fp8 from the float8 one), with optimization profiles and a timing cache
    shared per GPU."""

    name = "tensorrt"
    tag = "trt"
    file_suffix = ".plan"
    triton_platform = "tensorrt_plan"
    version_key = "tensorrt"
    opaque = True
    builds_fp8 = True
    options_type = TensorRTOptions
    label = "TensorRT"
    targets = ("tensorrt",)
    auto_gpu_rank = 0

    def version(self) -> str:
        return str(import_tensorrt().__version__)

    def gpu_problem(self, env: Environment) -> str:
        return "" if env.tensorrt else env.tensorrt_problem or "TensorRT is not installed"

    def plan(self, target: str, precisions: tuple[str, ...], env: Environment) -> TargetPlan:
        return self.plan_gpus(target, precisions, env, "ONNX Runtime")

    def check(self, spec: BuildSpec) -> None:
        if spec.device != "cuda":
            raise InputError("TensorRT engines run on cuda only")
        spec.options.validate()
        capability = spec.compute_capability
        if spec.precision == "fp8" and capability and not fp8_capable(capability):
            raise InputError(fp8_refusal(f"--backend tensorrt, compute capability {capability}"))
        if spec.precision == "fp8" and spec.options.hardware_compatibility == "ampere_plus":
            raise InputError(
                "--precision fp8 --hardware-compatibility ampere_plus: an Ampere GPU has no fp8 "
                "GEMMs; build fp8 for this GPU only (--hardware-compatibility none)"
            )

    def source_stage(self, spec: BuildSpec) -> str:
        # The folders of stages/layout.py (Layout.calibration): int8 and fp8 graphs apart.
        return {"int8": "calibrate", "fp8": "calibrate-fp8"}.get(spec.precision, "simplify")

    def folder_parts(self, spec: BuildSpec) -> list[str]:
        return [target_tag(spec.compute_capability, spec.options)]

    def variants(self, spec: BuildSpec) -> list[str]:
        return ["vc"] if spec.options.version_compatible else []

    def complete(
        self,
        spec: BuildSpec,
        *,
        derive_profiles: Callable[[], tuple[Profile, ...]],
        timing_cache: Callable[[str, str], Path],
    ) -> BuildSpec:
        options = spec.options
        if not options.profiles:
            options = replace(options, profiles=derive_profiles())
        if not options.timing_cache:
            cache = timing_cache(self.version(), spec.compute_capability)
            options = replace(options, timing_cache=str(cache))
        return replace(spec, options=options)

    def build_job(self, source: Path, spec: BuildSpec, *, input_names: tuple[str, ...]) -> BuildJob:
        if not spec.options.profiles:
            raise InputError("TensorRT build needs profiles (given, or derived by the runner)")
        loaded = {}

        def prepare() -> None:
            loaded["model"] = load_onnx(source)
            check_float_source(loaded["model"], precision=spec.precision, where=str(source))

        def body(folder: Path) -> tuple[list[str], dict[str, Any]]:
            gpu_facts(spec)
            network = prepare_network_graph(
                loaded["model"], precision=spec.precision, keep_float_ops=spec.keep_float_ops
            )
            names = input_names or tuple(i.name for i in network.graph.input)
            save_onnx(network, folder / NETWORK_FILE)
            with atomic_path(folder / PLAN_FILE) as staging:
                facts = build_engine(
                    folder / NETWORK_FILE, staging, spec.options, input_names=names
                )
            engine = load_plan(
                folder / PLAN_FILE,
                spec.options,
                built_tensorrt=facts["tensorrt"],
                built_compute_capability=facts["compute_capability"],
            )
            return [NETWORK_FILE, PLAN_FILE], {
                **facts,
                "engine_file": PLAN_FILE,
                "network_file": NETWORK_FILE,
                "inputs": engine.input_names,
                "outputs": engine.output_names,
            }

        settings = {
            "keep_float_ops": list(spec.keep_float_ops),
            "tensorrt": spec.options.to_dict(),
        }
        return BuildJob(settings=settings, prepare=prepare, body=body)

    def load(
        self, engine_path: Path, spec: Mapping[str, Any], results: Mapping[str, Any]
    ) -> TensorRTEngine:
        return load_plan(
            engine_path,
            self.from_record(spec).options,
            built_tensorrt=results["tensorrt"],
            built_compute_capability=results["compute_capability"],
        )

    def from_record(self, spec: Mapping[str, Any]) -> BuildSpec:
        return BuildSpec(
            backend=self.name,
            device=spec["device"],
            precision=spec["precision"],
            compute_capability=spec.get("compute_capability", ""),
            keep_float_ops=tuple(spec.get("keep_float_ops", ())),
            options=TensorRTOptions.from_dict(spec.get("tensorrt", {})),
        )

    def kind_parts(self, spec: BuildSpec) -> list[str]:
        level = spec.options.hardware_compatibility
        return [] if level == "none" else [level]

    def portable(self, spec: Mapping[str, Any]) -> bool:
        # An ampere_plus plan runs on every sm80+ GPU; a same_compute_capability plan still
        # belongs to one compute capability.
        return self.from_record(spec).options.hardware_compatibility == "ampere_plus"

    def shared_settings(self, spec: Mapping[str, Any]) -> Any:
        # One config serves every GPU's plan: batch limits come from one set of profiles.
        return spec.get("tensorrt")

    def io_graph(self, folder: Path, results: Mapping[str, Any]) -> str:
        # A plan cannot be opened without TensorRT: its tensors are those of the graph it parsed.
        return str(results["network_file"])

    def triton_batching(
        self,
        spec: Mapping[str, Any],
        *,
        max_batch_size: int,
        max_length: int,
        where: str,
        ladder: Sequence[int] = (),
        token_budget: int = 0,
    ) -> TritonBatching:
        # The profiles decide: their opt batches are the preferred sizes. Every rung of the
        # ladder is a length up to max_length, which the check below covers.
        profiles = self.from_record(spec).options.profiles
        max_batch = min(p.max_batch for p in profiles)
        covered = 0
        for profile in sorted(profiles, key=lambda p: p.min_seq):
            if profile.min_batch != 1:
                raise InputError(
                    f"{where}: profile {profile} starts at batch {profile.min_batch}; Triton "
                    "sends batches from 1 up: rebuild with profiles starting at batch 1"
                )
            if profile.min_seq <= covered + 1:
                covered = max(covered, profile.max_seq)
        if covered < max_length:
            raise InputError(
                f"{where}: the profiles cover sequences up to {covered} tokens but the tokenizer "
                f"sends up to {max_length}; rebuild with a profile reaching {max_length} (or "
                f"verify with --max-length {covered} and package again)"
            )
        return TritonBatching(
            max_batch_size=max_batch,
            preferred_batch_sizes=tuple(
                sorted({p.opt_batch for p in profiles if p.opt_batch <= max_batch})
            ),
            profiles=tuple(str(i) for i in range(len(profiles))),
            warmup_lengths=tuple(sorted({min(p.opt_seq, max_length) for p in profiles})),
        )


BACKEND = register(TensorRTBackend())
